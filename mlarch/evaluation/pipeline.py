"""`eval`: measure a model per language (held-out NLL or accuracy), with and without
interventions on the archived math-only sets, and archive every evaluation.

The model loads once. Interventions are planned from the archive before it loads (a bad
language or k fails before any forward pass), applied in place, evaluated on every
language, and undone exactly. Each evaluation follows the runs' lifecycle: a RUNNING row,
then one transaction that writes its items and marks it FINISHED (or FAILED; `gc` removes
leftovers). An evaluation whose configuration is archived already is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.evaluation import interventions as iv
from mlarch.ingest import provenance, sources
from mlarch.selection import top_count
from mlarch.ingest.pipeline import (MAX_BATCH_SIZE, MAX_LENGTH, MAX_SEED, ROLES, Reporter, _bounded_int,
                                    _check_writable, check_langs, check_name)
from mlarch.store import analyses, catalog, layout, records
from mlarch import wording
from mlarch.wording import Arg, Phrase, error

TASKS = ("nll", "accuracy")
MAX_SHOTS = 64
MAX_NEW_TOKENS = 8192
DEFAULT_SHOTS = 8  # accuracy's, where shots/max_new_tokens are None (not given)
DEFAULT_MAX_NEW_TOKENS = 256
MAX_ITEMS = 1_000_000
METHOD = {
    "name": "mlarch-eval",
    "version": 1,
    "nll": "sum over items of -log p(token | prefix), every token after the first, float32 log-softmax, "
           "float64 sums; value = total / number of those tokens; texts built and tokenized as ingest does",
    "nll_stderr": "ratio estimator over items: sqrt(sum((s_i - value n_i)^2) / (m (m - 1) mean(n)^2))",
    "accuracy": "greedy decoding; answer = number after the last '####', else after the last 'answer is', "
                "else the last number; thousands separators removed; exact decimal comparison",
    "accuracy_stderr": "sqrt(p (1 - p) / m)",
    "items": "file order, minus the items the archived run of (model, lang, role, seed) drew from the same "
             "data (held out) and minus the n-shot exemplars; then the first --limit",
    "exemplars": "the first --shots items of the training split where the source has one, else of the file",
}


@dataclass
class EvalConfig:
    """The settings of one `mlarch eval` / Archive.evaluate call (the CLI's options by name); validate() checks them
    before any work."""
    model: str
    langs: list[str]
    task: str
    data: str
    name: str | None = None
    role: str = "math"
    interventions: list[str] = field(default_factory=list)
    seed: int = 1
    limit: int | None = None
    all_items: bool = False
    shots: int | None = None  # accuracy only; None: DEFAULT_SHOTS (8)
    chat: bool = False
    batch_size: int | None = None  # None: 1 on CPU (nll), 8 on CPU (accuracy), 16 on CUDA
    max_length: int = 512
    max_new_tokens: int | None = None  # accuracy only; None: DEFAULT_MAX_NEW_TOKENS (256)
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    analysis: str | None = None  # whose math-only sets interventions change (None: the model's only one)
    gguf_file: str | None = None  # with a hub id (or a folder): the .gguf file in it to load
    trust_remote_code: bool = False  # run code shipped with the model (its config's auto_map)
    force: bool = False
    data_dir: str | None = None
    device_map: str | None = None  # 'auto': accelerate spreads the model over the GPUs (mlarch.ingest.placement)

    def validate(self) -> list[iv.Intervention]:
        """Refuse bad values before any work; returns the parsed interventions."""
        import numbers

        from mlarch.ingest.config import SOURCE_KINDS, check_data_dir, check_flag, check_source

        # types first: a value of the wrong type fails here by name, not deep in the work
        self.model = check_source(self.model, Arg("model"), "a model folder, .gguf file, hub id or named model",
                                  Arg("model", "qwen2.5-coder-0.5b"))
        self.data = check_source(self.data, Arg("data"), SOURCE_KINDS, Arg("data", "mgsm"))
        self.data_dir = check_data_dir(self.data_dir)
        for flag in ("all_items", "chat", "force", "trust_remote_code"):
            check_flag(self, flag)
        if isinstance(self.interventions, str):
            self.interventions = [self.interventions]
        if not isinstance(self.interventions, (list, tuple)):
            raise error(UsageError, Arg("interventions"), " takes a list of specs such as 'prune:en@0.01' (or one "
                        f"spec), got {self.interventions!r:.60}: e.g. ", Arg("interventions", ["prune:en@0.01"]))
        self.interventions = list(self.interventions)
        if self.task not in TASKS:
            raise error(UsageError, f"unknown task {self.task!r}: choose ", Arg("task", "nll"), " or ",
                        Arg("task", "accuracy"))
        if self.role not in ROLES:
            raise error(UsageError, f"unknown role {self.role!r}: choose ", Arg("role", "math"), " or ",
                        Arg("role", "control"))
        check_langs(self.langs)
        parsed = [iv.parse(spec) for spec in self.interventions]
        labels = [p.label for p in parsed]
        if len(set(labels)) != len(labels):
            raise UsageError(f"interventions repeat ({', '.join(sorted({x for x in labels if labels.count(x) > 1}))}): "
                             "list each once")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed <= MAX_SEED:
            raise error(UsageError, f"seed {self.seed!r} is not valid: ", Arg("seed"),
                        " takes an integer from 0 to 2**63-1, e.g. 1")
        self.seed = int(self.seed)
        if self.limit is not None:
            if self.all_items:
                raise error(UsageError, Arg("limit"), " and ", Arg("all_items"), " exclude each other: pass one")
            self.limit = _bounded_int(Arg("limit"), self.limit, MAX_ITEMS,
                                      ("evaluate from 1 to 1,000,000 items, e.g. ", Arg("limit", 64)))
        # accuracy's options (None: not given): a value given is checked, then refused with nll,
        # which would ignore it; with accuracy None becomes the default, so identities record the
        # number as before
        if self.task == "accuracy" and self.shots is None:
            self.shots = DEFAULT_SHOTS
        if self.shots is not None:
            if (isinstance(self.shots, bool) or not isinstance(self.shots, numbers.Integral)
                    or not 0 <= self.shots <= MAX_SHOTS):
                raise error(UsageError, Arg("shots"), f" must be an integer from 0 to {MAX_SHOTS}, got "
                            f"{self.shots!r}: e.g. ", Arg("shots", 8))
            self.shots = int(self.shots)
        if self.task == "accuracy" and self.max_new_tokens is None:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        if self.max_new_tokens is not None:
            self.max_new_tokens = _bounded_int(Arg("max_new_tokens"), self.max_new_tokens, MAX_NEW_TOKENS,
                                               ("generate from 1 to 8,192 tokens, e.g. ", Arg("max_new_tokens", 256)))
        for option in ("shots", "max_new_tokens"):
            if self.task != "accuracy" and getattr(self, option) is not None:
                raise error(UsageError, Arg(option), " applies to ", Arg("task", "accuracy"), " only: drop it, or use ",
                            Arg("task", "accuracy"))
        if self.batch_size is not None:
            self.batch_size = _bounded_int(Arg("batch_size"), self.batch_size, MAX_BATCH_SIZE,
                                           ("use from 1 to 65,536 items per pass, e.g. ", Arg("batch_size", 8)))
        self.max_length = _bounded_int(Arg("max_length"), self.max_length, MAX_LENGTH,
                                       ("use from 1 to 1,048,576 tokens, e.g. ", Arg("max_length", 512)))
        from mlarch.ingest.devices import check_device_map

        self.device_map = check_device_map(self.device_map, self.device)
        if self.chat and self.task != "accuracy":
            raise error(UsageError, Arg("chat"), " applies to ", Arg("task", "accuracy"),
                        " (NLL scores the texts as ingest builds them): drop ", Arg("chat"))
        if self.name is not None:
            check_name(self.name, Arg("name"))
        if self.analysis is not None:
            analyses.check_name(self.analysis)
        return parsed


@dataclass
class EvalResult:
    """What an evaluation call did: the archive name of the model, and the eval_ids written and reused."""
    model: str
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


@dataclass
class _Items:
    """What one language is evaluated on."""

    lang: str
    indices: list[int]  # item indices, file order
    texts: list[str]  # nll: the texts; accuracy: the prompts
    references: list[str | None]  # accuracy
    exemplars: list[int]
    held_out_runs: list[str]
    loaded: sources.LoadedItems
    references_from: dict | None = None  # files the references came from, when not the data's own
    skipped: list[int] = field(default_factory=list)  # accuracy: items without a reference number


@dataclass
class _Unit:
    lang: str
    intervention: iv.Intervention | None
    config_digest: str
    baseline_key: str
    identity: dict


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def evaluate(root: Path, cfg: EvalConfig, reporter: Reporter | None = None) -> EvalResult:
    """Evaluate the model of `cfg` per language (a baseline and each intervention) and archive each evaluation with
    its items; configurations already archived are reused unless cfg.force. Returns an EvalResult."""
    reporter = reporter or Reporter()
    planned = cfg.validate()
    from mlarch.ingest import loading  # torch + transformers: only now

    data_dir = Path(cfg.data_dir).expanduser().resolve() if cfg.data_dir else None
    cfg.data_dir = str(data_dir) if data_dir else None
    source = sources.resolve(cfg.data, data_dir)
    loaded_items = {lang: source.load(lang, cfg.role) for lang in cfg.langs}
    if cfg.task == "accuracy":
        for lang, items in loaded_items.items():
            if items.pairs is None:
                raise error(UsageError, f"data {source.name!r} ({lang}, {cfg.role}) has no question and answer per "
                            "item: ", Arg("task", "accuracy"), " needs them (use ", Arg("task", "nll"),
                            ", or data with question/answer fields)")
    device = loading.resolve_device(cfg.device)
    dtype = loading.resolve_dtype(cfg.dtype, device)
    kind, local = loading.classify(cfg.model, cfg.gguf_file)
    name = cfg.name if cfg.name is not None else loading.default_name(cfg.model, cfg.gguf_file)
    check_name(name, Arg("name") if cfg.name is not None else ("derived from ", Arg("model")))
    if local is not None:
        cfg.model = str(local.resolve())
    catalog_path = root / layout.CATALOG
    has_catalog = catalog_path.exists()
    if planned and not has_catalog:
        raise catalog.missing_archive(root)
    _check_writable(root)

    archive = _archive(root) if has_catalog else None
    model_row = _model_row(archive, name) if archive else None
    if planned and model_row is None:
        raise error(UsageError, f"no model {name!r} in the archive at {root}: interventions change its archived "
                    "math-only sets, so ingest it first (", Phrase("Archive.ingest", "mlarch ingest"), ") or pass ",
                    Arg("name"), " with an archived model")
    # the weights decide what can be reused and which sets apply: hashed before anything
    # loads (digests are cached per file, so this costs seconds only for new files)
    weights, model_files = loading.fingerprint(cfg.model, cfg.revision, cfg.gguf_file, reporter.message)
    if model_row is not None and model_row["weights_sha256"] != weights:
        raise error(
            UsageError, f"the archive's model {name!r} has other weights ({model_row['weights_sha256'][:12]}) than "
            f"{cfg.model} "
            f"({weights[:12]}): its math-only sets and evaluations belong to those weights; load the model that "
            "was ingested, or pass ", Arg("name"), " to evaluate this one separately")
    # every set's runs before the model loads: a language without runs fails in seconds; the
    # plans (masks read from the archive) are made one at a time, before each is applied,
    # so a grid never holds more than one (plus _PLANS) in memory
    pair_runs: dict[str, dict] = {}
    module_list = _modules(archive, name) if planned else []
    # the analysis whose sets the interventions change: given, else the model's only one
    analysis = None
    if planned or (archive and cfg.analysis):  # `name` is exact here: the model it loads, never a pattern
        with catalog.reading(archive.catalog_path) as con:
            analysis = analyses.resolve(con, name, cfg.analysis)
    for intervention in planned:
        if not any(top_count(rows * cols, intervention.k) for _, rows, cols in module_list):
            raise UsageError(f"k = {intervention.k} selects no parameter in any matrix of {name!r} (floor(numel * k) "
                             f"is 0 everywhere) in {intervention.label!r}: use a larger k")
        pair_runs[intervention.label] = _set_runs(archive, name, analysis, intervention.lang, cfg.seed)
    items = {lang: _select_items(archive, name, cfg, source, lang, loaded_items[lang]) for lang in cfg.langs}
    for lang_items in items.values():
        if lang_items.skipped:
            shown = ", ".join(map(str, lang_items.skipped[:5])) + (", ..." if len(lang_items.skipped) > 5 else "")
            reporter.message(f"{lang_items.lang}: {len(lang_items.skipped)} item(s) have no reference number and are "
                             f"not scored (items {shown}; recorded in the provenance)")

    batch_size = cfg.batch_size or (16 if device.type == "cuda" else (8 if cfg.task == "accuracy" else 1))
    units = _units(cfg, name, weights, dtype, source, items, planned, pair_runs)
    done = _finished(archive, [u.config_digest for u in units]) if archive and not cfg.force else {}
    if done:
        _check_reused_files(archive, cfg, sorted(set(done.values())), model_files)
    result = EvalResult(model=name)
    todo = []
    for unit in units:
        if unit.config_digest in done:
            result.reused.append(done[unit.config_digest])
        else:
            todo.append(unit)
    if result.reused:
        reporter.message(wording.for_reporter(
            reporter, f"{len(result.reused)} of {len(units)} evaluation(s) are archived with identical settings; "
            "reusing them (", Arg("force", True), " reruns)"))
    if not todo:
        return result

    reporter.message(f"loading {cfg.model} ({kind}, {dtype}, {device})")
    loaded = loading.load(cfg.model, revision=cfg.revision, device=device, dtype=dtype, **loading.options(cfg))
    from mlarch.ingest.scoring import scored_modules

    if loaded.weights_sha256 != weights:
        raise MlarchError(f"the weight files of {cfg.model} changed while it loaded ({weights[:12]} became "
                          f"{loaded.weights_sha256[:12]}): run the evaluation again once they stay put")
    modules = scored_modules(loaded.model)
    if planned:
        iv.check_modules(_modules(archive, name), modules)
    if cfg.task == "accuracy":
        from mlarch.evaluation.tasks import build_prompt

        for lang_items in items.values():
            pairs = lang_items.loaded.pairs
            shots = [pairs[i] for i in lang_items.exemplars]
            lang_items.texts = [build_prompt(shots, pairs[i][0], chat=cfg.chat, tokenizer=loaded.tokenizer)
                                for i in lang_items.indices]
            # before any row is written: a prompt over --max-length is a usage error
            lengths = [len(ids) for ids in loaded.tokenizer(lang_items.texts, add_special_tokens=not cfg.chat)["input_ids"]]
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[longest] > cfg.max_length:
                raise error(UsageError, f"the {lang_items.lang} prompt of item {lang_items.indices[longest]} has "
                            f"{lengths[longest]} tokens, over ", Arg("max_length", cfg.max_length), ": pass a larger ",
                            Arg("max_length"), " or fewer ", Arg("shots"))
            positions = _positions(loaded)
            if positions and lengths[longest] + cfg.max_new_tokens > positions:  # would fail mid-generation
                room = positions - lengths[longest]
                raise error(UsageError, f"the {lang_items.lang} prompt of item {lang_items.indices[longest]} has "
                            f"{lengths[longest]} tokens; with ", Arg("max_new_tokens", cfg.max_new_tokens),
                            f" its generation would pass the model's {positions:,} positions: ",
                            *(("pass ", Arg("max_new_tokens", room), " or less, or fewer ") if room > 0 else
                              ("pass fewer ",)), Arg("shots"))
    _check_positions(cfg, loaded, items)
    layout.ensure_folder(root)
    if not has_catalog:
        catalog.ensure_schema(catalog_path)
    env = provenance.environment(device)
    settings = {**asdict(cfg), "name": name, "analysis": analysis, "dtype": dtype, "device": str(device),
                "batch_size": batch_size,
                # the numbers, as earlier archives record them (for nll too, which uses neither)
                "shots": _or(cfg.shots, DEFAULT_SHOTS), "max_new_tokens": _or(cfg.max_new_tokens, DEFAULT_MAX_NEW_TOKENS)}
    model_info = {"name": name, "source": loaded.source, "source_kind": loaded.source_kind,
                  "revision": loaded.revision, "commit_sha": loaded.commit_sha,
                  "weights_sha256": loaded.weights_sha256, "model_files": loaded.model_files,
                  "architecture": loaded.architecture, "dtype": loaded.dtype}
    model_info.update(loaded.placement())  # with --device-map auto: where each module ran
    # intervention-major: apply once, evaluate every language, undo
    order = [None] + planned
    for intervention in order:
        label = intervention.label if intervention else None
        group = [u for u in todo if (u.intervention.label if u.intervention else None) == label]
        if not group:
            continue
        plan = None if intervention is None else _plan(archive, name, analysis, intervention, cfg.seed, module_list,
                                                       pair_runs[label], reporter)
        with iv.applied(modules, plan) if plan is not None else _nothing() as done:
            for unit in group:
                eval_id = _begin(catalog_path, name, analysis if plan is not None else None, cfg, unit, source, plan,
                                 done.n_changed if done else 0, pair_runs.get(label, {}))
                try:
                    outcome = _run_task(cfg, loaded, items[unit.lang], batch_size, reporter, unit)
                    prov = {**env, "eval_id": eval_id, "method": METHOD, "config": settings,
                            "config_digest": unit.config_digest, "identity": unit.identity, "model": model_info,
                            "data": _data_record(source, items[unit.lang]), **outcome["provenance"]}
                    if plan is not None:
                        prov["intervention"] = {"spec": label, "rule": iv.RANDOM_RULE, "set_runs": pair_runs[label],
                                                "n_set": plan.n_set, "n_entries": plan.n_changed,
                                                "n_changed": done.n_changed}
                    _commit(catalog_path, eval_id, outcome, prov)
                except BaseException:
                    _mark_failed(catalog_path, eval_id)
                    raise
                result.written.append(eval_id)
                shown = f"{outcome['value']:.4f}"
                reporter.message(f"archived {cfg.task} {unit.lang} "
                                 f"{'(' + label + ')' if label else '(no intervention)'}: {shown} [{eval_id}]")
    return result


def _or(value, default):
    return default if value is None else value


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _archive(root: Path):
    from mlarch.query.api import Archive

    return Archive(root)


def _model_row(archive, name: str) -> dict | None:
    rows = archive._read("SELECT weights_sha256, dtype FROM models WHERE model = ?", [name])
    return rows.row(0, named=True) if rows.height else None


def _modules(archive, name: str) -> list[tuple[str, int, int]]:
    rows = archive._read("SELECT module, n_rows, n_cols FROM modules WHERE model = ? ORDER BY position", [name])
    return [(r[0], int(r[1]), int(r[2])) for r in rows.iter_rows()]


# Plans of this process, keyed by what decides them (the sets' runs and their record
# digests): a second grid over the same sets (another role or task) skips reading the masks.
_PLANS: dict[tuple, iv.Plan] = {}
_MAX_PLANNED = 1 << 25  # entries (int64) kept in all: 256 MiB


def _plan(archive, name: str, analysis: str, intervention: iv.Intervention, seed: int, modules, runs: dict,
          reporter) -> iv.Plan:
    key = (str(archive.catalog_path.resolve()), name, analysis, intervention.label, seed, tuple(modules),
           tuple(sorted(runs.items())))
    if key in _PLANS:
        return _PLANS[key]
    reporter.message(f"planning {intervention.label} from the archive")
    made = iv.plan(archive, name, intervention, seed, modules, analysis=analysis)
    while _PLANS and sum(p.n_changed for p in _PLANS.values()) + made.n_changed > _MAX_PLANNED:
        _PLANS.pop(next(iter(_PLANS)))  # oldest first
    if made.n_changed <= _MAX_PLANNED:
        _PLANS[key] = made
    return made


def _set_runs(archive, name: str, analysis: str, lang: str, seed: int) -> dict:
    """The math and control runs whose sets an intervention on `lang` uses (as Archive.selection)."""
    rows = archive._read(
        "SELECT DISTINCT s.math_run_id, s.control_run_id, m.record_sha256 AS math_record, "
        "c.record_sha256 AS control_record FROM selections s JOIN runs m ON m.run_id = s.math_run_id "
        "JOIN runs c ON c.run_id = s.control_run_id WHERE s.model = ? AND s.analysis = ? AND s.lang = ? "
        "AND s.seed = ?", [name, analysis, lang, seed])
    if rows.height == 0:
        seeds = sorted(int(x) for x in archive._read(
            "SELECT DISTINCT seed FROM selections WHERE model = ? AND analysis = ? AND lang = ?",
            [name, analysis, lang])["seed"])
        other = (("pass ", Arg("seed", seeds[0]), f" (archived seeds: {', '.join(map(str, seeds))}), or ")
                 if seeds else ())
        raise error(UsageError, f"model {name!r} has no archived math and control runs for {lang!r} at seed {seed} "
                    f"in analysis {analysis!r}, so no math-only set to intervene on: ", *other, f"ingest {lang} with ",
                    Arg("seeds", [seed]), " first (see ", Phrase("Archive.runs()", "`mlarch runs`"), ")")
    if rows.height != 1:
        raise MlarchError(f"the derived tables of {name!r}, {lang!r} name more than one pair of runs at seed {seed}: "
                          "run `mlarch verify`")
    return rows.row(0, named=True)


def _select_items(archive, name: str, cfg: EvalConfig, source, lang: str, loaded: sources.LoadedItems) -> _Items:
    n = len(loaded.texts)
    exemplars: list[int] = []
    if cfg.task == "accuracy" and cfg.shots:
        start = loaded.train_from if loaded.train_from is not None else 0
        exemplars = list(range(start, min(start + cfg.shots, n)))
        if len(exemplars) < cfg.shots:
            raise error(UsageError, f"data {source.name!r} ({lang}) has {len(exemplars)} items for {cfg.shots} "
                        "exemplars: pass a smaller ", Arg("shots"))
    excluded = set(exemplars)
    held_out: list[str] = []
    if not cfg.all_items and archive is not None:
        # every run in use of this model, language and seed that read these very files (either
        # role: a source may serve both), checked against its record before its items count;
        # runs at other seeds only tell, when this seed has none, which seeds drew from these files
        runs = archive._read(
            "SELECT run_id, dataset, role, seed, provenance, record_sha256 FROM runs WHERE model = ? AND lang = ? "
            "AND status = 'FINISHED' AND in_use ORDER BY run_id", [name, lang])
        rows = list(runs.iter_rows(named=True))
        mine = [run for run in rows if run["seed"] == cfg.seed]
        for run in mine:
            files = _run_files(run)
            # the same data is the same content (the files' digests, in order), wherever it lies
            # now (another folder, another machine); the same name or paths with other content
            # means the items were renumbered: loud, never a silent overlap
            if files is None or list(files.values()) != list(loaded.files.values()):
                # (a named source serves both roles from other files: the same name alone is not the same data)
                if (run["dataset"], run["role"]) == (source.name, cfg.role) or (files and set(files) == set(loaded.files)):
                    raise error(
                        MlarchError, f"the data files of {source.name!r} ({lang}) differ from those run "
                        f"{run['run_id']} drew its items from, so its drawn items cannot be held out: restore those "
                        "files, or pass ", Arg("all_items", True))
                continue
            drawn = [int(i) for i in archive._read(
                "SELECT item_index FROM run_samples WHERE run_id = ? ORDER BY position", [run["run_id"]])["item_index"]]
            _check_run_record(archive, run)
            if any(not 0 <= i < n for i in drawn):
                raise MlarchError(f"run {run['run_id']} names items outside the {n} of {source.name!r} ({lang}): "
                                  "run `mlarch verify`")
            excluded.update(drawn)
            held_out.append(run["run_id"])
        seeds = [] if mine else sorted(_seeds_that_drew(rows, loaded))
        if seeds:
            # the model has no run at this seed, but ingest drew from these items at others: this
            # seed (a typo?) would hold out nothing, silently scoring items the sets were made from.
            # A seed with runs of other data (another analysis) holds out what it drew: nothing here
            raise error(UsageError, f"{name!r} has no run of {lang} at seed {cfg.seed}, so none of the items of "
                        f"{source.name!r} ({cfg.role}) would be held out; seeds whose runs drew from them: "
                        f"{', '.join(map(str, seeds))}: pass ", Arg("seed", seeds[0]), ", or ", Arg("all_items", True),
                        " to evaluate every item")
    indices = [i for i in range(n) if i not in excluded]
    references: list[str | None] = []
    references_from = None
    skipped: list[int] = []
    if cfg.task == "accuracy":
        from mlarch.evaluation import answers

        answer_texts, references_from = _answer_texts(source, lang, loaded)
        kept = []
        for i in indices:
            ref = answers.reference(answer_texts[i])
            if ref is None:  # e.g. a degenerate translation: recorded, not scored
                skipped.append(i)
                continue
            kept.append(i)
            references.append(ref)
        indices = kept
    if cfg.limit is not None:
        indices, references = indices[: cfg.limit], references[: cfg.limit]
    if not indices:
        why = f" (runs {', '.join(held_out)} drew every item)" if held_out else ""
        raise error(UsageError, f"no item of {source.name!r} ({lang}, {cfg.role}) is left to evaluate{why}: "
                    "pass ", Arg("all_items", True), ", or data with more items")
    texts = [loaded.texts[i] for i in indices] if cfg.task == "nll" else []
    return _Items(lang, indices, texts, references, exemplars, held_out, loaded, references_from, skipped)


def _answer_texts(source, lang: str, loaded: sources.LoadedItems) -> tuple[list[str], dict | None]:
    """Where each item's reference number is read: the source's own answers, unless it names
    better ones (GSM8K de/hi: the English originals, whose numbers the translations garble)."""
    better = getattr(source, "reference_answers", None)
    found = better(lang) if better is not None else None
    if found is None:
        return [a for _, a in loaded.pairs], None
    answers_, files = found
    if len(answers_) != len(loaded.pairs):
        raise MlarchError(f"data source {source.name!r} gave {len(answers_)} reference answers for {lang!r}, "
                          f"expected {len(loaded.pairs)}")
    return answers_, files


def _check_run_record(archive, run: dict) -> None:
    from mlarch.store import records as run_records

    with catalog.reading(archive.catalog_path) as con:
        actual = run_records.run_digest_in(con, run["run_id"])
    if run["record_sha256"] != actual:
        raise MlarchError(f"run {run['run_id']}'s record changed since it was archived (its drawn items decide what "
                          "is held out): run `mlarch verify`, then restore the catalog or re-ingest that run")


def _seeds_that_drew(runs, loaded: sources.LoadedItems) -> set[int]:
    """The seeds of `runs` that drew from the files of `loaded` (by their digests). Only a hint
    for a refusal: a run whose provenance cannot be read counts as not drawing."""
    seeds = set()
    for run in runs:
        try:
            files = _run_files(run)
        except MlarchError:
            continue
        if files and list(files.values()) == list(loaded.files.values()):
            seeds.add(int(run["seed"]))
    return seeds


def _run_files(run: dict) -> dict | None:
    try:
        files = (json.loads(run["provenance"] or "{}").get("data") or {}).get("files")
    except (ValueError, AttributeError):
        raise MlarchError(f"run {run['run_id']} has unreadable provenance: run `mlarch verify`") from None
    return files if isinstance(files, dict) else None


def _units(cfg, name, weights, dtype, source, items, planned, pair_runs) -> list[_Unit]:
    units = []
    for lang in cfg.langs:
        it = items[lang]
        base = {
            "method": METHOD, "model": name, "weights_sha256": weights, "source": cfg.model,
            "revision": cfg.revision, "dtype": dtype, "references": it.references_from,
            "task": cfg.task, "dataset": source.name, "role": cfg.role, "data_files": it.loaded.files,
            "lang": lang, "seed": cfg.seed, "items": it.indices, "max_length": cfg.max_length,
            **({"trust_remote_code": True} if cfg.trust_remote_code else {}),  # absent: older digests hold
        }
        if cfg.task == "accuracy":
            base.update({"shots": cfg.shots, "exemplars": it.exemplars, "chat": cfg.chat,
                         "max_new_tokens": cfg.max_new_tokens, "stops": list(_stops(cfg))})
        baseline_key = provenance.digest_json(base)
        for intervention in [None] + planned:
            identity = {"baseline_key": baseline_key, "intervention": None}
            if intervention is not None:
                runs = pair_runs[intervention.label]
                identity["intervention"] = {"spec": intervention.label, "rule": iv.RANDOM_RULE,
                                            "math_run_id": runs["math_run_id"],
                                            "control_run_id": runs["control_run_id"]}
            units.append(_Unit(lang, intervention, provenance.digest_json(identity), baseline_key,
                               {**base, **identity}))
    return units


def _positions(loaded) -> int | None:
    """The positions the model was made for (scoring.trained_positions); None where its config names none."""
    from mlarch.ingest.scoring import trained_positions

    return trained_positions(loaded.model.config)


def _check_positions(cfg: EvalConfig, loaded, items: dict) -> None:
    """Before any row: a text (an accuracy prompt) longer than the positions a model was made
    for would fail inside GPT-2's forward pass, or be scored at a rotary model's extrapolated
    positions."""
    from mlarch.ingest.scoring import over_positions

    positions = _positions(loaded)
    if positions is None:
        return
    for lang_items in items.values():
        found = over_positions(loaded.tokenizer, lang_items.texts, cfg.max_length, positions)
        if found is not None:
            raise error(UsageError, f"the {lang_items.lang} text of item {lang_items.indices[found[0]]} has "
                        f"{found[1]:,} tokens, more than the model's {positions:,} positions: pass ",
                        Arg("max_length", positions), " or less")


def _check_reused_files(archive, cfg: EvalConfig, eval_ids: list[str], current: dict[str, str]) -> None:
    """Refuse to reuse an evaluation made when the model's config or tokenizer files held
    something else (its identity has the weights only: an edited config.json scores differently)."""
    from mlarch.ingest import loading
    rows = archive._read("SELECT eval_id, provenance FROM evaluations WHERE list_contains(?, eval_id) ORDER BY eval_id",
                         [eval_ids])
    for eval_id, text in rows.iter_rows():
        changed = loading.changed_model_files(text, current)
        if changed:
            raise error(MlarchError, f"{', '.join(changed[:3])} of {cfg.model} changed since evaluation {eval_id} "
                        "was archived: its number belongs to the files as they were; pass ", Arg("force", True),
                        " to evaluate again")


def _finished(archive, digests: list[str]) -> dict[str, str]:
    """config digest -> eval_id of the archived evaluations to reuse, each checked against
    its record digest (an edited value must not be reused as if measured)."""
    rows = archive._read("SELECT config_digest, eval_id, record_sha256 FROM evaluations_current "
                         "WHERE list_contains(?, config_digest)", [digests])
    with catalog.reading(archive.catalog_path) as con:
        for _, eval_id, stored in rows.iter_rows():
            if records.evaluation_digest_in(con, eval_id) != stored:
                raise error(MlarchError, f"evaluation {eval_id}'s record changed since it was archived, so it "
                            "cannot be reused: run ", Phrase("Archive.verify()", "`mlarch verify`"),
                            ", then restore the catalog, or pass ", Arg("force", True), " to evaluate again")
    return {digest: eval_id for digest, eval_id, _ in rows.iter_rows()}


def _begin(catalog_path: Path, name: str, analysis: str | None, cfg: EvalConfig, unit: _Unit, source, plan,
           n_changed: int, runs: dict) -> str:
    eval_id = layout.new_run_id()
    i = unit.intervention
    with catalog.writing(catalog_path) as con:
        con.execute(
            "INSERT INTO evaluations (eval_id, model, analysis, weights_sha256, math_run_id, control_run_id, task, "
            "dataset, role, lang, intervention, target_lang, k, seed, factor, n_set, n_params_changed, status, "
            "created_at, config_digest, baseline_key, host, pid) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'RUNNING', ?, ?, ?, ?, ?)",
            [eval_id, name, analysis, unit.identity["weights_sha256"], runs.get("math_run_id"), runs.get("control_run_id"),
             cfg.task, source.name, cfg.role, unit.lang, i.kind if i else "none",
             i.lang if i else None, i.k if i else None, cfg.seed, i.factor if i else None,
             plan.n_set if plan else None, n_changed, _now(), unit.config_digest,
             unit.baseline_key, socket.gethostname(), os.getpid()])
    return eval_id


def _run_task(cfg: EvalConfig, loaded, items: _Items, batch_size: int, reporter, unit: _Unit) -> dict:
    from mlarch.evaluation import tasks

    label = f"{unit.lang} {unit.intervention.label if unit.intervention else 'baseline'}"
    reporter.start_pass(label, len(items.indices))
    started = time.perf_counter()
    try:
        if cfg.task == "nll":
            out = tasks.nll_pass(loaded.model, loaded.tokenizer, items.texts, batch_size=batch_size,
                                 max_length=cfg.max_length, device=loaded.device, on_batch=reporter.advance)
            total, tokens = math.fsum(out.nll), sum(out.n_tokens)
            if tokens == 0:
                raise MlarchError(f"the {unit.lang} items are one token each: NLL has no token to predict; "
                                  "use longer texts")
            value = total / tokens
            m = len(out.nll)
            stderr = None
            if m > 1:
                mean_n = tokens / m
                resid = math.fsum((s - value * n) ** 2 for s, n in zip(out.nll, out.n_tokens))
                stderr = math.sqrt(resid / (m * (m - 1))) / mean_n
            rows = {"n_tokens": out.n_tokens, "nll": out.nll}
            prov = {"n_truncated": out.n_truncated, "forward_s": round(out.seconds, 3),
                    "texts_sha256": provenance.texts_digest(items.texts)}
        else:
            from mlarch.evaluation import answers

            out = tasks.generate(loaded.model, loaded.tokenizer, items.texts, batch_size=batch_size,
                                 max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length, device=loaded.device,
                                 add_special_tokens=not cfg.chat, stops=_stops(cfg), on_batch=reporter.advance)
            extracted = [answers.extract(c) for c in out.completions]
            correct = [answers.correct(e, r) for e, r in zip(extracted, items.references)]
            m = len(correct)
            value = sum(correct) / m
            stderr = math.sqrt(value * (1 - value) / m)
            tokens = sum(out.n_tokens)
            rows = {"n_tokens": out.n_tokens, "prompt_sha256": [_sha(p) for p in items.texts],
                    "completion": out.completions, "extracted": extracted, "reference": items.references,
                    "correct": correct}
            pairs = items.loaded.pairs
            shots = [pairs[i] for i in items.exemplars]
            prov = {"generate_s": round(out.seconds, 3), "prompts_sha256": provenance.texts_digest(items.texts),
                    "exemplars": {"item_indices": items.exemplars,
                                  "sha256": provenance.texts_digest([f"{q}\n{a}" for q, a in shots]),
                                  "from": "training split" if items.loaded.train_from is not None else "data file"},
                    "generation": {"decoding": "greedy", "max_new_tokens": cfg.max_new_tokens, "stops": list(_stops(cfg)),
                                   "chat": cfg.chat, "add_special_tokens": not cfg.chat, "shots": cfg.shots}}
    finally:
        reporter.end_pass()
    if not math.isfinite(value):
        what = unit.intervention.label if unit.intervention else "the unchanged model"
        raise error(MlarchError, f"the {cfg.task} of {unit.lang} under {what} is {value}: the model's outputs "
                    f"overflowed (in {loaded.dtype}); use a smaller scale factor, or ", Arg("dtype", "float32"))
    prov.update({"duration_s": round(time.perf_counter() - started, 3), "item_indices": items.indices,
                 "held_out_runs": items.held_out_runs,
                 "skipped_items": items.skipped, "references_from": items.references_from})
    return {"value": value, "stderr": stderr, "n_items": len(items.indices), "n_tokens": tokens,
            "indices": items.indices, "rows": rows, "provenance": prov}


def _stops(cfg: EvalConfig) -> tuple[str, ...]:
    """Plain prompts end a completion at the next blank line or question; a chat model ends
    its turn with an end-of-turn token (its answers may hold blank lines)."""
    from mlarch.evaluation import answers

    return () if cfg.chat else answers.STOPS


def _data_record(source, items: _Items) -> dict:
    return {"lang": items.lang, "dataset": source.name, "source": source.describe(), "files": items.loaded.files,
            "templates": items.loaded.templates, "n_items_in_data": len(items.loaded.texts)}


_ITEM_SCHEMA = {"eval_id": pl.Utf8, "position": pl.Int32, "item_index": pl.Int64, "n_tokens": pl.Int64,
                "nll": pl.Float64, "prompt_sha256": pl.Utf8, "completion": pl.Utf8, "extracted": pl.Utf8,
                "reference": pl.Utf8, "correct": pl.Boolean}


def _commit(catalog_path: Path, eval_id: str, outcome: dict, prov: dict) -> None:
    """Items and the FINISHED row in one transaction, with the record digest."""
    n = len(outcome["indices"])
    columns = {"eval_id": [eval_id] * n, "position": list(range(n)), "item_index": outcome["indices"]}
    for key in ("n_tokens", "nll", "prompt_sha256", "completion", "extracted", "reference", "correct"):
        columns[key] = outcome["rows"].get(key, [None] * n)
    frame = pl.DataFrame(columns, schema=_ITEM_SCHEMA)
    with catalog.writing(catalog_path) as con:
        # the row must still be ours and RUNNING (`rm --model` or an edit may have removed it):
        # else nothing is written, not even items without a row
        if not con.execute("SELECT 1 FROM evaluations WHERE eval_id = ? AND status = 'RUNNING'", [eval_id]).fetchall():
            raise MlarchError(f"evaluation {eval_id} was removed or changed while it ran (`mlarch rm` or an edit): "
                              "its results were not archived; run it again")
        con.register("new_items", frame.to_arrow())
        con.execute("INSERT INTO evaluation_items SELECT * FROM new_items")
        con.unregister("new_items")
        con.execute(
            "UPDATE evaluations SET status = 'FINISHED', finished_at = ?, n_items = ?, n_tokens = ?, value = ?, "
            "stderr = ?, provenance = ? WHERE eval_id = ?",
            [_now(), outcome["n_items"], outcome["n_tokens"], outcome["value"], outcome["stderr"], json.dumps(prov),
             eval_id])
        con.execute("UPDATE evaluations SET record_sha256 = ? WHERE eval_id = ?",
                    [records.evaluation_digest_in(con, eval_id), eval_id])


def _mark_failed(catalog_path: Path, eval_id: str) -> None:
    try:
        with catalog.writing(catalog_path) as con:
            con.execute("UPDATE evaluations SET status = 'FAILED', finished_at = ? WHERE eval_id = ? "
                        "AND status = 'RUNNING'", [_now(), eval_id])
    except Exception:  # the original error matters more
        pass
