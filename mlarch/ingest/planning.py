"""Planning an ingest: everything decided before a model loads.

Validate the settings, resolve the data sources and read their texts, name the model and
the analysis (checked against the archive's), compute every unit's config digest and skip
the units already archived with identical settings. The result is a Plan that any executor
(this process, or a Ray cluster: mlarch/ingest/ray_executor.py) carries out.
"""

from __future__ import annotations

import itertools
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from mlarch.errors import MlarchError, UsageError
from mlarch.ingest import provenance, sources
from mlarch.ingest.config import METHOD, ROLES, IngestConfig, check_name, run_compat_identity
from mlarch.store import analyses, array_store, catalog, layout, records
from mlarch import wording
from mlarch.wording import Arg, Phrase, error

VERIFY = Phrase("Archive.verify()", "`mlarch verify`")  # the integrity check, in the caller's words


@dataclass
class IngestResult:
    """What an ingest call did: the archive name of the model, its analysis, and the run ids written and reused."""
    model: str
    analysis: str | None = None
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Unit:
    """One scoring pass: a language's math or control texts under one seed."""
    seed: int
    lang: str
    role: str
    digest: str  # the config digest: identical settings, identical digest (a rerun skips it)

    @property
    def label(self) -> str:
        """How progress names the unit: `<lang> <role> seed <seed>`."""
        return f"{self.lang} {self.role} seed {self.seed}"


@dataclass
class Plan:
    """What an ingest will do, decided before any model loads."""
    root: Path
    cfg: IngestConfig
    name: str  # the model's name in the archive
    analysis: str
    analysis_config: dict
    kind: str  # how the model is stored: folder, gguf, hub, named
    device: object  # torch.device the units run on
    dtype: str
    sources: dict  # role -> DataSource
    items: dict  # (lang, role) -> LoadedItems
    pools: dict  # (lang, 'math') -> items an evaluation scored correct (--only-correct)
    units: list[Unit]
    todo: list[Unit]  # the units not archived yet (all of them with --force)
    result: IngestResult
    store: object = None  # mlarch.store.array_store.ArrayStore (None: the archive's arrays.zarr)

    @property
    def catalog_path(self) -> Path:
        """The archive's catalog file."""
        return self.root / layout.CATALOG

    @property
    def array_store(self):
        """Where the arrays go: the archive's arrays.zarr, or the S3 prefix its catalog records
        (a new archive's: --arrays)."""
        return self.store if self.store is not None else self.root / layout.ARRAYS

    def commit_groups(self) -> list[tuple[tuple[int, str], list[Unit]]]:
        """The units to do, by (seed, lang): each group is committed in one transaction (the
        derived tables of a language need its math and control runs together)."""
        key = lambda unit: (unit.seed, unit.lang)  # noqa: E731
        return [(k, list(group)) for k, group in itertools.groupby(self.todo, key)]


def plan(root: Path, cfg: IngestConfig, reporter, resolve=None) -> Plan:
    """The Plan of an ingest of `cfg` into the archive at `root`. `resolve(cfg)` gives the
    (torch.device, dtype) the units run on (default: this machine's, as `--executor local`);
    `reporter.message` hears what is skipped."""
    cfg.validate()
    cfg.top_k = sorted(cfg.top_k)
    from mlarch.ingest import loading  # torch + transformers: only now

    data_dir = Path(cfg.data_dir).expanduser().resolve() if cfg.data_dir else None
    cfg.data_dir = str(data_dir) if data_dir else None  # recorded absolute, for verify --recompute
    srcs = {role: sources.resolve(spec, data_dir, cfg.template)
            for role, spec in (("math", cfg.math), ("control", cfg.control))}
    items = {(lang, role): srcs[role].load(lang, role) for lang in cfg.langs for role in ROLES}
    if resolve is None:
        device = loading.resolve_device(cfg.device)
        dtype = loading.resolve_dtype(cfg.dtype, device)
    else:
        device, dtype = resolve(cfg)
    kind, local = loading.classify(cfg.model, cfg.gguf_file)
    name = cfg.name if cfg.name is not None else loading.default_name(cfg.model, cfg.gguf_file)
    check_name(name, Arg("name") if cfg.name is not None else ("derived from ", Arg("model")))
    if local is not None:  # recorded absolute, so provenance and rerun detection do not depend on the cwd
        cfg.model = str(local.resolve())
    check_writable(root)
    if kind == "folder":
        check_positions(cfg, local, items)
    catalog_path = root / layout.CATALOG
    # the catalog's location (a different --arrays is refused); a bucket is probed now, before any model loads
    store = array_store.for_ingest(root, cfg.arrays)

    pools = _correct_pools(catalog_path, cfg, name, srcs["math"].name, items) if cfg.only_correct else {}
    # the analysis: a name stands for one configuration, checked before any work
    analysis_config = analyses.config_of({lang: srcs["math"].name for lang in cfg.langs},
                                         {lang: srcs["control"].name for lang in cfg.langs}, cfg.samples,
                                         cfg.max_length, cfg.top_k, bool(cfg.only_correct),
                                         cfg.compat_identity())
    analysis = cfg.analysis or analyses.default_name(srcs["math"].name, srcs["control"].name, bool(cfg.only_correct),
                                                     paper=bool(cfg.compat_identity()) or cfg.max_length is None)
    if catalog_path.exists():
        with catalog.reading(catalog_path) as con:
            analyses.check_config(con, name, analysis, analysis_config)
    units = []
    for seed in cfg.seeds:
        for lang in cfg.langs:
            for role in ROLES:
                identity = {
                    "method": METHOD, "model": name, "source": cfg.model, "revision": cfg.revision,
                    "dtype": dtype, "lang": lang, "role": role, "dataset": srcs[role].name,
                    "data_files": items[(lang, role)].files, "seed": seed, "samples": cfg.samples,
                    "max_length": cfg.max_length, "top_k": cfg.top_k, **loading.identity(cfg),
                }
                if (lang, role) in pools:  # absent otherwise: earlier archives' digests stay valid
                    identity["only_correct"] = pools[(lang, role)]["record"]
                identity.update(run_compat_identity(cfg))  # likewise: nothing added for the exact defaults
                units.append(Unit(seed, lang, role, provenance.digest_json(identity)))
    existing = finished_digests(catalog_path, name, analysis)
    result = IngestResult(model=name, analysis=analysis)
    todo = []
    for unit in units:
        if unit.digest in existing and not cfg.force:
            result.skipped.append(existing[unit.digest])
        else:
            todo.append(unit)
    if result.skipped:
        found = loading.fingerprint(cfg.model, cfg.revision, cfg.gguf_file, reporter.message)
        check_archived_model(catalog_path, cfg, name, found.weights)
        check_reused_files(catalog_path, cfg, result.skipped, found.files)
        reporter.message(wording.for_reporter(
            reporter, f"{len(result.skipped)} of {len(units)} run(s) of {name} are already archived with identical "
            "settings; reusing them (", Arg("force", True), " reruns)"))
    return Plan(root, cfg, name, analysis, analysis_config, kind, device, dtype, srcs, items, pools, units, todo,
                result, store)


def check_archived_model(catalog_path: Path, cfg: IngestConfig, name: str, weights: str, dtype: str | None = None,
                         during: bool = False) -> dict | None:
    """The archive's row of model `name` (None: not archived yet), refused when the archive gave
    that name to other weights (or, given `dtype`, another dtype): its runs belong to those.
    Made before any model loads when runs would be reused (a run's settings digest names the
    model folder, not its weights, so a changed checkpoint would be reported done with the old
    weights' runs), after the load, and again at the commit (`during`: another ingest may have
    archived the name meanwhile)."""
    with catalog.reading(catalog_path) as con:
        found = con.execute("SELECT weights_sha256, dtype FROM models WHERE model = ?", [name]).fetchone()
    row = None if found is None else {"weights_sha256": found[0], "dtype": found[1]}
    if row is None or (row["weights_sha256"] == weights and dtype in (None, row["dtype"])):
        return row
    archived, now = (row["weights_sha256"][:12], weights[:12]) if dtype is None else (
        f"{row['weights_sha256'][:12]}, {row['dtype']}", f"{weights[:12]}, {dtype}")
    meanwhile = " (another ingest archived it while this one ran)" if during else ""
    raise error(MlarchError, f"the archive's model {name!r} has other weights{' or dtype' if dtype else ''} "
                f"({archived}) than {cfg.model} has now ({now}){meanwhile}: its archived runs belong to those "
                "weights; pass a new ", Arg("name"), " to archive these weights separately, or remove the archived "
                "model (", Phrase(f"Archive.rm(model={name!r})", f"`mlarch rm --model {shlex.quote(name)}`"),
                ") and ingest again")


def check_reused_files(catalog_path: Path, cfg: IngestConfig, run_ids: list[str], current: dict[str, str]) -> None:
    """Refuse to reuse runs scored when the model's config or tokenizer files held something
    else: a run's settings digest names the folder, not those files (loading.fingerprint)."""
    from mlarch.ingest import loading
    with catalog.reading(catalog_path) as con:
        rows = con.execute("SELECT run_id, provenance FROM runs WHERE list_contains(?, run_id) ORDER BY run_id",
                           [run_ids]).fetchall()
    for run_id, text in rows:
        changed = loading.changed_model_files(text, current)
        if changed:
            raise error(MlarchError, f"{', '.join(changed[:3])} of {cfg.model} changed since run {run_id} was "
                        "archived: its results belong to the files as they were; pass ", Arg("force", True),
                        " to score again (the new runs replace it), or a new ", Arg("name"))


def check_positions(cfg: IngestConfig, folder: Path, items: dict) -> None:
    """Refuse a text longer than the positions the model was made for (scoring.trained_positions):
    GPT-2's forward pass fails with an IndexError after the run rows are written, and a rotary
    model's scores would come from extrapolated positions. Read from the folder's config and
    tokenizer, before the model loads; a folder without them is left to the load to refuse."""
    from mlarch.ingest.model_inputs import config_dict
    from mlarch.ingest.scoring import may_exceed, over_positions, trained_positions

    config = config_dict(folder)  # as transformers reads it (configuration_files)
    positions = trained_positions(config) if config is not None else None
    if positions is None or (cfg.max_length is not None and cfg.max_length <= positions):
        return
    tokenizer = None
    for (lang, role), loaded in items.items():
        if not any(may_exceed(text, positions) for text in loaded.texts):
            continue  # no text long enough: no tokenizer needed
        if tokenizer is None:
            tokenizer = _tokenizer(cfg, folder)
            if tokenizer is None:
                return
        found = over_positions(tokenizer, loaded.texts, cfg.max_length, positions)
        if found is not None:
            raise error(MlarchError, f"text {found[0]} of {lang} {role} has {found[1]:,} tokens, more than the "
                        f"model's {positions:,} positions: pass ", Arg("max_length", positions),
                        " or remove that text")


def _tokenizer(cfg: IngestConfig, folder: Path):
    """The folder's tokenizer, as the load will read it; None where it cannot be read (the load says why)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=bool(cfg.trust_remote_code))
    except Exception:  # noqa: BLE001 - refused, with its reason, when the model loads
        return None


def check_writable(root: Path) -> None:
    """Fail before any work if the archive folder cannot be created or written."""
    if root.exists():
        layout.ensure_folder(root)
        return
    ancestor = root
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(MlarchError, f"archive folder {root} cannot be created: {ancestor} is a file; ",
                    Phrase("open a writable folder instead (mlarch.open(DIR))",
                           "pass --archive DIR (or set MLARCH_ARCHIVE) to a writable folder"))
    layout.probe_writable(ancestor, root)


def finished_digests(catalog_path: Path, model: str, analysis: str) -> dict[str, str]:
    """config_digest -> run_id of the finished runs in use of `model` in `analysis` (empty without a catalog)."""
    if not catalog_path.exists():
        return {}
    with catalog.reading(catalog_path) as con:
        rows = con.execute(
            "SELECT config_digest, run_id FROM runs WHERE model = ? AND analysis = ? AND status = 'FINISHED' AND in_use",
            [model, analysis],
        ).fetchall()
    return dict(rows)



def _correct_pools(catalog_path: Path, cfg: IngestConfig, name: str, dataset: str, items) -> dict:
    """{(lang, 'math'): {"items": item indices scored correct, "record": what identifies them}}
    from the accuracy evaluations named by --only-correct, one per language, checked first."""
    if not catalog_path.exists():
        raise catalog.missing_archive(catalog_path.parent)
    with catalog.reading(catalog_path) as con:
        rows = catalog.dicts(con, "SELECT eval_id, model, task, dataset, role, lang, status, intervention, "
                                  "record_sha256, provenance FROM evaluations WHERE list_contains(?, eval_id)",
                             [cfg.only_correct])
        found = {r["eval_id"]: r for r in rows}
        missing = [e for e in cfg.only_correct if e not in found]
        if missing:
            raise error(UsageError, f"no evaluation {', '.join(missing)} in the archive: pass eval ids from ",
                        Phrase("Archive.evaluations()", "`mlarch evals`"))
        pools, by_lang = {}, {}
        for eval_id in cfg.only_correct:
            r = found[eval_id]
            problem = ("has not finished" if r["status"] != "FINISHED" else
                       f"is a {r['task']} evaluation, not accuracy" if r["task"] != "accuracy" else
                       f"evaluated the model under an intervention ({r['intervention']})"
                       if r["intervention"] != "none" else
                       f"evaluated model {r['model']!r}, not {name!r}" if r["model"] != name else
                       f"evaluated {r['dataset']!r} ({r['role']}), not the math data {dataset!r}"
                       if (r["dataset"], r["role"]) != (dataset, "math") else
                       (f"evaluated {r['lang']!r}, which is not in ", Arg("langs")) if r["lang"] not in cfg.langs else
                       f"repeats language {r['lang']!r}" if r["lang"] in by_lang else None)
            if problem:
                problem = problem if isinstance(problem, tuple) else (problem,)  # text, or text and an Arg
                raise error(UsageError, f"evaluation {eval_id} ", *problem,
                            ": ", Arg("only_correct"), " takes one finished accuracy evaluation of this model on the ",
                            Arg("math"), " data per language")
            # its correct flags decide what ingest draws: the record must be as archived
            if records.evaluation_digest_in(con, eval_id) != r["record_sha256"]:
                raise error(MlarchError, f"evaluation {eval_id}'s record changed since it was archived: run ",
                            VERIFY, ", then restore the catalog or evaluate again")
            try:
                files = (json.loads(r["provenance"] or "{}").get("data") or {}).get("files")
            except (ValueError, AttributeError):
                files = None
            if files != items[(r["lang"], "math")].files:
                raise MlarchError(f"evaluation {eval_id} read other data files than {dataset!r} ({r['lang']}) has now: "
                                  "its item numbers do not apply; restore those files or evaluate again")
            by_lang[r["lang"]] = eval_id
            correct = [i for (i,) in con.execute("SELECT item_index FROM evaluation_items WHERE eval_id = ? AND correct "
                                                 "ORDER BY item_index", [eval_id]).fetchall()]
            n_items = len(items[(r["lang"], "math")].texts)
            if any(not 0 <= i < n_items for i in correct):
                raise error(MlarchError, f"evaluation {eval_id} names items outside the {n_items} of {dataset!r} "
                            f"({r['lang']}): run ", VERIFY)
            if not correct:
                raise error(UsageError, f"evaluation {eval_id} ({r['lang']}) scored no item correct: nothing to draw "
                            "from; drop ", Arg("only_correct"), " for that language or evaluate more items")
            pools[(r["lang"], "math")] = {"items": correct,
                                          "record": {"eval_id": eval_id, "record_sha256": r["record_sha256"]}}
    uncovered = [lang for lang in cfg.langs if lang not in by_lang]
    if uncovered:
        raise error(UsageError, Arg("only_correct"), f" names no evaluation for {', '.join(uncovered)}: pass one "
                    "accuracy evaluation per language in ", Arg("langs"))
    return pools

