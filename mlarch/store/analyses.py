"""Analyses: named configurations of a model's runs (math and control sources, samples, max
length, k values). A model may hold several side by side (e.g. the same math data against
two control sets); its derived rows and views carry the analysis, and one analysis's rows
never change when another is ingested.

A name stands for one configuration: ingesting another configuration under a name already
used (for that model) is refused. The configuration holds the settings (samples, max length,
k values, --only-correct) and each language's math and control source: a language added
later extends it (from any source, as the paper's GSM8K-for-English, MGSM-for-the-rest set-up
needs), but a language already in it keeps its sources. The default name is derived from the
sources only (`gsm8k-vs-flores`), so reruns land in the same analysis."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import PurePosixPath

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, Phrase, error
from mlarch.store import records

MAX_NAME = 128
CONFIG_FIELDS = ("math", "control", "samples", "max_length", "top_k", "only_correct")
SETTINGS = ("samples", "max_length", "top_k", "only_correct")
# paper-compat settings (issue 15): in a configuration (and its digest) only when not at their
# defaults, so analyses recorded before them keep their configuration digests
COMPAT_SETTINGS = ("method", "sampling", "shuffle_seed", "template")
ROLES = ("math", "control")


def config_of(math: dict, control: dict, samples: int, max_length: int | None, top_k, only_correct: bool,
              compat: dict | None = None) -> dict:
    """The configuration an analysis stands for: the settings, and for each language its math
    and control source ({lang: dataset name}: a named source, or the path template as given).
    `compat`: the non-default paper-compat settings (method, sampling, shuffle_seed, template);
    max_length None: no truncation."""
    config = {"math": {str(k): str(v) for k, v in math.items()},
              "control": {str(k): str(v) for k, v in control.items()},
              "samples": int(samples), "max_length": None if max_length is None else int(max_length),
              "top_k": sorted(float(k) for k in top_k), "only_correct": bool(only_correct)}
    config.update({f: (compat or {})[f] for f in COMPAT_SETTINGS if (compat or {}).get(f) is not None})
    return config


def method_of(config: dict) -> str:
    """The scoring method of an analysis's runs (the exact method when the configuration names none)."""
    from mlarch import methods

    return str(config.get("method") or methods.EXACT)


def merged(old: dict, new: dict) -> dict | None:
    """`old` extended by the languages of `new`; None when they disagree (a setting, or the
    source of a language both name)."""
    if any(old.get(f) != new.get(f) for f in SETTINGS + COMPAT_SETTINGS):
        return None
    out = {f: old.get(f) for f in SETTINGS}
    out.update({f: old[f] for f in COMPAT_SETTINGS if old.get(f) is not None})
    for role in ROLES:
        before, after = old.get(role) or {}, new.get(role) or {}
        if not isinstance(before, dict) or not isinstance(after, dict):
            return None
        if any(before[lang] != after[lang] for lang in set(before) & set(after)):
            return None
        out[role] = {**before, **after}
    return out


def config_digest(config: dict) -> str:
    """sha256 of an analysis configuration's canonical JSON (its fields, and the paper-compat settings where set)."""
    fields = {f: config.get(f) for f in CONFIG_FIELDS}
    fields.update({f: config[f] for f in COMPAT_SETTINGS if config.get(f) is not None})
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _readable(dataset: str) -> str:
    """A short label of a source: its name, or for a path template the part that names the
    data (`data/{lang}/math.jsonl` -> math, `flores/{lang}.txt` -> flores)."""
    if "{lang}" not in dataset:
        label = dataset
    else:
        path = PurePosixPath(dataset.replace("\\", "/").replace("{lang}", ""))
        stem = "" if path.name.startswith(".") else path.stem  # `{lang}.txt`: the folder names the data
        parts = [p for p in (stem, *(q.name for q in path.parents)) if p.strip("._-")]
        label = parts[0] if parts else "data"
    return re.sub(r"[^A-Za-z0-9._]+", "-", label).strip("-.") or "data"


def default_name(math: str, control: str, only_correct: bool = False, paper: bool = False) -> str:
    """`<math>-vs-<control>` (`-correct` after the math data filtered by --only-correct; `-paper`
    at the end for paper-compat settings, so such an analysis sits beside the exact one)."""
    name = f"{_readable(math)}{'-correct' if only_correct else ''}-vs-{_readable(control)}"
    suffix = "-paper" if paper else ""
    return name[:MAX_NAME - len(suffix)] + suffix


def check_name(name) -> None:
    """Refuse an analysis name that is empty, not text, over MAX_NAME characters, or holds control characters, commas
    or surrounding spaces (a UsageError)."""
    fix = ("pass ", Arg("analysis"), " with a short name such as gsm8k-vs-flores")
    if not isinstance(name, str) or not name:
        raise error(UsageError, f"the analysis name {name!r} is empty or not text: ", *fix)
    shown = repr(name if len(name) <= 40 else name[:40] + "...")
    if len(name) > MAX_NAME:
        raise error(UsageError, f"analysis name {shown} has {len(name):,} characters, over {MAX_NAME}: ", *fix)
    if not name.isprintable() or name != name.strip() or "," in name:
        raise error(UsageError, f"analysis name {shown} contains control characters, commas or surrounding spaces: ",
                    *fix)


def _differences(old: dict, new: dict) -> str:
    changed = [f"{f} {_shown(old.get(f))}, not {_shown(new.get(f))}" for f in SETTINGS + COMPAT_SETTINGS
               if old.get(f) != new.get(f)]
    for role in ROLES:
        before, after = old.get(role), new.get(role)
        if not isinstance(before, dict) or not isinstance(after, dict):
            continue
        changed += [f"{role} data for {lang} {before[lang]}, not {after[lang]}" for lang in sorted(set(before) & set(after))
                    if before[lang] != after[lang]]
    return "; ".join(changed) or "another configuration"


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def describe(config_text) -> dict:
    """An analysis's configuration for display: each role's sources as one string (the
    source, or `source (langs); ...` when languages use different ones), the settings as
    they are, the k values comma-separated."""
    try:
        config = json.loads(config_text) if isinstance(config_text, str) else dict(config_text or {})
    except (TypeError, ValueError):
        config = {}
    out = {}
    for role in ROLES:
        by_lang = config.get(role) if isinstance(config.get(role), dict) else {}
        langs_of: dict[str, list[str]] = {}
        for lang, source in sorted(by_lang.items()):
            langs_of.setdefault(str(source), []).append(lang)
        out[role] = (next(iter(langs_of)) if len(langs_of) == 1 else
                     "; ".join(f"{source} ({','.join(langs)})" for source, langs in sorted(langs_of.items())))
    for field in ("samples", "max_length"):
        out[field] = config.get(field) if isinstance(config.get(field), int) else None
    out["top_k"] = _shown(config.get("top_k") or [])
    out["only_correct"] = bool(config.get("only_correct"))
    # the method, and the paper-compat draw and texts where not the defaults (issue 15)
    extras = [f"{f}={config[f]}" for f in ("sampling", "shuffle_seed", "template") if config.get(f) is not None]
    out["method"] = method_of(config) + (f" ({', '.join(extras)})" if extras else "")
    return out


def stored(con, model: str, analysis: str) -> dict | None:
    """(config, config_digest) of one analysis as the catalog holds it, None if absent."""
    rows = con.execute("SELECT config, config_digest FROM analyses WHERE model = ? AND analysis = ?",
                       [model, analysis]).fetchall()
    if not rows:
        return None
    try:
        config = json.loads(rows[0][0])
    except (TypeError, ValueError):
        config = {}
    return {"config": config, "config_digest": rows[0][1]}


def check_config(con, model: str, analysis: str, config: dict) -> dict | None:
    """The analysis's configuration extended by `config` (None: no such analysis yet); a
    UsageError when they disagree."""
    found = stored(con, model, analysis)
    if found is None:
        return None
    both = merged(found["config"], config)
    if both is None:
        raise error(UsageError, f"analysis {analysis!r} of model {model!r} was ingested with another configuration "
                    f"({_differences(found['config'], config)}): pass ", Arg("analysis", shown="NAME"),
                    " to archive this one as a separate analysis (see ",
                    Phrase("Archive.analyses()", "`mlarch analyses`"), ")")
    return both


def ensure(con, model: str, analysis: str, config: dict) -> None:
    """Record the analysis, or extend it by the languages of `config`, inside the caller's
    transaction (a disagreeing configuration raises, as check_config)."""
    both = check_config(con, model, analysis, config)
    if both is None:
        con.execute("INSERT INTO analyses VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
                    [model, analysis, json.dumps(config), config_digest(config)])
    elif config_digest(both) != stored(con, model, analysis)["config_digest"]:
        con.execute("UPDATE analyses SET config = ?, config_digest = ? WHERE model = ? AND analysis = ?",
                    [json.dumps(both), config_digest(both), model, analysis])


def names(con, model: str) -> list[str]:
    """The analysis names of `model`, sorted."""
    return [r[0] for r in con.execute("SELECT analysis FROM analyses WHERE model = ? ORDER BY analysis",
                                      [model]).fetchall()]


def resolve(con, model: str, analysis: str | None) -> str:
    """The analysis of `model` to use: the one given (checked), else the only one; an error
    listing them when there are several (or none)."""
    known = names(con, model)
    if analysis is not None:
        if analysis not in known:
            raise UsageError(f"model {model!r} has no analysis {analysis!r}; its analyses: "
                             f"{', '.join(known) or 'none'} (see `mlarch analyses`)")
        return analysis
    if len(known) == 1:
        return known[0]
    if not known:
        raise MlarchError(f"model {model!r} has no analysis yet: ingest math and control runs for it")
    raise error(UsageError, f"model {model!r} has {len(known)} analyses ({', '.join(known)}): pass ",
                Phrase("analysis=NAME", "--analysis NAME (analysis= in the Python API)"), " to choose one")


# --- placing runs archived before analyses existed -----------------------------------------
def _legacy_config(con, model: str, run_ids: list[str]) -> tuple[str, dict]:
    """Name and configuration of the analysis that pre-analysis runs of one model form: from
    the newest finished math run among them (its provenance's settings and datasets)."""
    rows = con.execute(
        "SELECT lang, role, dataset, provenance FROM runs WHERE list_contains(?, run_id) AND status = 'FINISHED' "
        "ORDER BY in_use DESC, finished_at DESC, run_id", [run_ids]).fetchall()
    rows = rows or con.execute("SELECT lang, role, dataset, provenance FROM runs WHERE list_contains(?, run_id) "
                               "ORDER BY started_at DESC, run_id", [run_ids]).fetchall()
    sources = {role: {} for role in ROLES}
    for lang, role, dataset, _ in reversed(rows):  # the run in use (else the newest) of each wins
        sources.setdefault(role, {})[lang] = dataset
    datasets = {role: dataset for _, role, dataset, _ in reversed(rows)}  # for the name: the newest of each role
    settings = {}
    for _, _, _, prov in rows:
        try:
            settings = (json.loads(prov) if isinstance(prov, str) else prov or {}).get("config") or {}
        except (ValueError, AttributeError):
            settings = {}
        if settings:
            break
    math, control = datasets.get("math", "math"), datasets.get("control", "control")
    only_correct = bool(settings.get("only_correct"))
    top_k = settings.get("top_k") or []
    try:
        config = config_of(sources["math"], sources["control"], settings.get("samples") or 0,
                           settings.get("max_length") or 0, top_k, only_correct)
    except (TypeError, ValueError):
        config = config_of(sources["math"], sources["control"], 0, 0, [], only_correct)
    config["placed"] = "runs archived before analyses existed"
    return default_name(math, control, only_correct), config


def place(con, model: str, run_ids: list[str]) -> str:
    """Put runs of `model` that have no analysis (archived before schema 4, or from an older
    bundle) into one analysis, inside the caller's transaction; re-seal the record digest of
    each run (and each evaluation of their sets) whose digest verified before, so `verify`
    still reports one that did not. Returns the analysis name."""
    name, config = _legacy_config(con, model, run_ids)
    found = stored(con, model, name)
    if found is not None and merged(found["config"], config) is None:
        name = f"{name}-{config_digest(config)[:8]}"[:MAX_NAME]
    ensure(con, model, name, config)
    for run_id in run_ids:
        stored_seal = con.execute("SELECT record_sha256 FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0]
        was_true = stored_seal is not None and records.run_digest_in(con, run_id) == stored_seal
        con.execute("UPDATE runs SET analysis = ? WHERE run_id = ?", [name, run_id])
        if was_true:
            con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?", [records.run_digest_in(con, run_id), run_id])
        for (eval_id, seal) in con.execute(
                "SELECT eval_id, record_sha256 FROM evaluations WHERE math_run_id = ? AND analysis IS NULL",
                [run_id]).fetchall():
            ok = seal is not None and records.evaluation_digest_in(con, eval_id) == seal
            con.execute("UPDATE evaluations SET analysis = ? WHERE eval_id = ?", [name, eval_id])
            if ok:
                con.execute("UPDATE evaluations SET record_sha256 = ? WHERE eval_id = ?",
                            [records.evaluation_digest_in(con, eval_id), eval_id])
    return name


def place_legacy(con) -> None:
    """Migration step of schema 4: every model's runs form one analysis; the derived rows
    (copied with a '' placeholder) get its name."""
    models = [r[0] for r in con.execute("SELECT DISTINCT model FROM runs WHERE analysis IS NULL ORDER BY model")
              .fetchall()]
    for model in models:
        run_ids = [r[0] for r in con.execute("SELECT run_id FROM runs WHERE model = ? AND analysis IS NULL",
                                             [model]).fetchall()]
        name = place(con, model, run_ids)
        for table in ("selections", "patterns"):
            con.execute(f"UPDATE {table} SET analysis = ? WHERE model = ? AND analysis = ''", [name, model])


# --- verify: the analyses table against itself and against its runs ---------------------------
def _run_settings(run_config: dict) -> dict:
    """The analysis settings a run's recorded ingest config implies (compat ones as config_of
    records them: absent at their defaults)."""
    from mlarch import methods

    out = {"samples": run_config.get("samples"), "max_length": run_config.get("max_length"),
           "top_k": sorted(float(k) for k in run_config.get("top_k") or []),
           "only_correct": bool(run_config.get("only_correct")),
           "method": run_config.get("method") if run_config.get("method") not in (None, methods.EXACT) else None,
           "sampling": None, "shuffle_seed": None,
           "template": run_config.get("template") if run_config.get("template") not in (None, "default") else None}
    if run_config.get("sampling") not in (None, "numpy"):
        out["sampling"], out["shuffle_seed"] = run_config["sampling"], run_config.get("shuffle_seed")
    return out


def problems(con) -> list[tuple[str, str, str]]:
    """(model, analysis, what is wrong) for each analysis whose row was edited (its config no
    longer gives its digest) or whose configuration disagrees with its finished runs (their
    sealed provenance: sources, samples, max length, k values, paper-compat settings). An
    analysis placed from pre-analysis runs is checked against its digest only: its settings
    were read from one of its runs."""
    found = []
    for model, analysis, text, stored_digest in con.execute(
            "SELECT model, analysis, config, config_digest FROM analyses ORDER BY model, analysis").fetchall():
        try:
            config = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            config = None
        if not isinstance(config, dict):
            found.append((model, analysis, "its configuration is not a JSON object"))
            continue
        try:
            actual = config_digest(config)
        except (TypeError, ValueError):
            actual = None
        if actual != stored_digest:
            found.append((model, analysis, "its configuration does not give its recorded config_digest (edited)"))
            continue
        if config.get("placed"):
            continue
        runs = con.execute("SELECT run_id, lang, role, dataset, provenance FROM runs WHERE model = ? AND analysis = ? "
                           "AND status = 'FINISHED' ORDER BY run_id", [model, analysis]).fetchall()
        for run_id, lang, role, dataset, prov in runs:
            try:
                run_config = (json.loads(prov) if isinstance(prov, str) else prov or {}).get("config") or {}
                settings = _run_settings(run_config)
            except (TypeError, ValueError, AttributeError, RecursionError):
                found.append((model, analysis, f"run {run_id}'s provenance has no readable ingest config"))
                continue
            sources = config.get(role) if isinstance(config.get(role), dict) else {}
            if sources.get(lang) != dataset:
                found.append((model, analysis, f"run {run_id} ({lang} {role}) read {dataset!r}, the analysis says "
                                               f"{sources.get(lang)!r}"))
            wrong = [f for f in SETTINGS + COMPAT_SETTINGS
                     if (sorted(float(k) for k in config.get(f) or []) if f == "top_k" else config.get(f))
                     != settings[f]]
            if wrong:
                found.append((model, analysis, f"run {run_id} was ingested with other {', '.join(wrong)} than the "
                                               "analysis records"))
    return found
