"""`ingest`: score a model on math and control texts per language and archive the results.

Run lifecycle (MLflow style): a run row is inserted as RUNNING (a short write), the
forward passes and array writes happen with no catalog connection open, then one
transaction marks the run FINISHED together with every derived row. Readers never see
half a run; an interrupted run leaves a RUNNING/FAILED row and orphan arrays, nothing else.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from mlarch import methods, parallel
from mlarch.errors import MlarchError, UsageError
from mlarch import selection
from mlarch.ingest import paper_sampling, provenance, sources
from mlarch.store import analyses, arrays, catalog, layout, records
from mlarch.store import spans as span_layout
from mlarch.store.derive import (RunRef, current_runs, derive, levels_path, magnitudes_path, norms_path,
                                 replace_derived)

PAPER_KS = (0.0001, 0.001, 0.01, 0.025, 0.05, 0.1, 0.15)
METHOD = {
    "name": "mathneuro",
    "version": 1,
    "score": "|W[i,j]| * sum_s ||X_s[:, j]||_2 over real tokens (float32 product, float64 sums)",
    "k_rule": "per matrix, floor(numel * k) with k read as the decimal given",
    "tie_rule": "score descending, then lowest flat (row-major, out x in) index first",
    "math_only": "top-k(math) and not top-k(control), same matrix and k",
    "sampling": "numpy.random.default_rng(seed).integers(0, n_items, n_samples) (with replacement)",
}
ROLES = ("math", "control")
_LANG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


class Reporter:
    """Progress sink; the CLI shows a progress bar, the API stays quiet by default."""

    def message(self, text: str) -> None: ...

    def start_pass(self, label: str, total: int) -> None: ...

    def advance(self, samples: int, tokens: int) -> None: ...

    def end_pass(self) -> None: ...


@dataclass
class IngestConfig:
    model: str
    langs: list[str]
    math: str
    control: str
    name: str | None = None
    analysis: str | None = None  # None: derived from the sources (analyses.default_name)
    samples: int = 500
    seeds: list[int] = field(default_factory=lambda: [1])
    top_k: list[float] = field(default_factory=lambda: list(PAPER_KS))
    batch_size: int | None = None  # None: 1 on CPU, 16 on CUDA
    max_length: int | None = 512  # None (`--max-length none`): no truncation, as the authors' code
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    gguf_file: str | None = None  # with a hub id (or a folder): the .gguf file in it to load
    trust_remote_code: bool = False  # run code shipped with the model (its config's auto_map)
    force: bool = False
    data_dir: str | None = None
    # accuracy evaluations (eval_ids, one per language): math items are drawn only from the
    # items each scored correct (the paper filters GSM8K to items the model solves)
    only_correct: list[str] | None = None
    # paper compatibility (issue 15); each default keeps earlier runs' identities unchanged
    method: str = methods.EXACT  # or mathneuro-bf16: the authors' bf16 arithmetic (mlarch/ingest/mathneuro.py)
    sampling: str = "numpy"  # or pandas: the authors' draw (mlarch/ingest/paper_sampling.py)
    shuffle_seed: int | None = None  # pandas: the seed of their one-off shuffle of the file
    template: str = "default"  # or paper: the authors' Instruct texts / verbatim qa column
    paper_compat: bool = False  # shorthand: methods.PAPER_COMPAT for every setting left at its default

    def apply_paper_compat(self) -> None:
        """--paper-compat: what the authors' code does, for each setting still at its default
        (a value given explicitly stays, and is checked like any other)."""
        if not self.paper_compat:
            return
        defaults = {"method": methods.EXACT, "dtype": "auto", "batch_size": None, "sampling": "numpy",
                    "shuffle_seed": None, "template": "default", "max_length": 512}
        for key, value in methods.PAPER_COMPAT.items():
            if getattr(self, key) == defaults[key]:
                setattr(self, key, value)

    def compat_identity(self) -> dict:
        """The non-default paper-compat settings: part of a run's and an analysis's identity,
        absent when at their defaults (so exact runs' digests are those of earlier versions)."""
        out = {}
        if self.method != methods.EXACT:
            out["method"] = self.method
        if self.sampling != "numpy":
            out["sampling"] = self.sampling
            out["shuffle_seed"] = self.shuffle_seed
        if self.template != "default":
            out["template"] = self.template
        return out

    def validate(self) -> None:
        """Refuse bad values before any work (the model is not loaded yet, the archive untouched)."""
        import math
        import numbers

        self.apply_paper_compat()
        check_langs(self.langs)
        if not self.top_k:
            raise UsageError("no top-k values given: pass --top-k, e.g. --top-k 0.01")
        for k in self.top_k:
            if isinstance(k, bool) or not isinstance(k, numbers.Real):
                raise UsageError(f"top-k value {k!r} is not a number: use fractions such as 0.01 for 1%")
            if math.isnan(k):
                raise UsageError("a top-k value is not a number (nan): use fractions such as 0.01 for 1%")
            if not 0 < k < 1:
                raise UsageError(f"top-k value {k} is outside (0, 1): use fractions such as 0.01 for 1%")
        self.top_k = [float(k) for k in self.top_k]
        if len(set(self.top_k)) != len(self.top_k):
            raise UsageError("top-k values repeat: list each once")
        self.samples = _bounded_int("--samples", self.samples, MAX_SAMPLES,
                                    "draw from 1 to 1,000,000 items per language and role, e.g. --samples 500")
        seeds_fix = "--seeds must be distinct integers from 0 to 2**63-1 (stored as BIGINT), e.g. --seeds 1,101,201"
        if not self.seeds:
            raise UsageError(f"no seeds given: {seeds_fix}")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
                raise UsageError(f"seed {seed!r} is not valid: {seeds_fix}")
        self.seeds = [int(seed) for seed in self.seeds]
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds repeat in {','.join(map(str, self.seeds))}: {seeds_fix}")
        if self.batch_size is not None:
            self.batch_size = _bounded_int("--batch-size", self.batch_size, MAX_BATCH_SIZE,
                                           "use from 1 to 65,536 samples per pass, e.g. --batch-size 16")
        if self.max_length is not None:
            self.max_length = _bounded_int("--max-length", self.max_length, MAX_LENGTH,
                                           "truncate texts to 1 to 1,048,576 tokens, e.g. --max-length 512, "
                                           "or --max-length none for no truncation")
        methods.check_method(self.method)
        if self.method == methods.BF16 and self.dtype not in ("auto", "bfloat16"):
            raise UsageError(f"--method {methods.BF16} runs the model in bfloat16 as the authors did, not "
                             f"{self.dtype}: pass --dtype bfloat16 (or leave --dtype out)")
        if self.method == methods.BF16 and self.dtype == "auto":
            self.dtype = "bfloat16"  # the method's arithmetic is bf16 whatever the device
        if self.shuffle_seed is not None and self.sampling != "pandas":
            raise UsageError("--shuffle-seed applies to --sampling pandas only: drop it, or add --sampling pandas")
        paper_sampling.check_sampling(self.sampling, self.seeds, self.shuffle_seed)
        if self.template not in sources.TEXT_TEMPLATES:
            raise UsageError(f"--template {self.template!r} is not known: use one of "
                             f"{', '.join(sources.TEXT_TEMPLATES)}")
        if self.name is not None:
            check_name(self.name, "--name")
        if self.analysis is not None:
            analyses.check_name(self.analysis)
        if self.only_correct is not None:
            if not self.only_correct or any(not isinstance(e, str) or not e for e in self.only_correct):
                raise UsageError("--only-correct takes eval ids, one per language: see `mlarch evals`")
            if len(set(self.only_correct)) != len(self.only_correct):
                raise UsageError("eval ids repeat in --only-correct: list each once")


# Upper bounds on values that size allocations or are stored as BIGINT: refused up front
# rather than failing after the forward passes (an overflow) or on allocation (MemoryError).
MAX_SEED = 2**63 - 1
MAX_SAMPLES = 1_000_000
MAX_LENGTH = 1_048_576
MAX_BATCH_SIZE = 65_536
MAX_NAME = 128


def _bounded_int(flag: str, value, high: int, fix: str) -> int:
    """`value` as an int from 1 to `high`, else a UsageError ending in `fix`."""
    import numbers

    # bool is an int to Python, and numpy integers are not ints: accept exactly the integers
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{flag} takes integers, got {value!r}: {fix}")
    if value < 1:
        raise UsageError(f"{flag} must be positive, got {value}: {fix}")
    if value > high:
        raise UsageError(f"{flag} must be at most {high:,}, got {value:,}: {fix}")
    return int(value)


def check_langs(langs) -> None:
    """--langs: at least one valid language code, each once."""
    if not langs:
        raise UsageError("no languages given: pass --langs, e.g. --langs en,de")
    for lang in langs:
        if not isinstance(lang, str) or not _LANG.match(lang):
            raise UsageError(f"language code {lang!r} is not valid: use codes such as en, de, zh")
    if len(set(langs)) != len(langs):
        raise UsageError(f"languages repeat in {','.join(langs)}: list each once")


def check_name(name, source: str) -> None:
    """A model name is a short, printable label: it is shown in tables, stored in the catalog
    and part of folder names. `source` says where it came from, for the message."""
    fix = "pass --name with a short name such as llama-3-8b"
    if not isinstance(name, str):
        raise UsageError(f"model name {name!r} ({source}) is not text: {fix}")
    shown = repr(name if len(name) <= 40 else name[:40] + "...")
    if not name:
        raise UsageError(f"the model name ({source}) is empty: {fix}")
    if len(name) > MAX_NAME:
        raise UsageError(f"model name {shown} ({source}) has {len(name):,} characters, over {MAX_NAME}: {fix}")
    if not name.isprintable():  # newlines, tabs, escapes, zero-width and direction marks
        raise UsageError(f"model name {shown} ({source}) contains control or invisible characters: {fix}")
    if name != name.strip():
        raise UsageError(f"model name {shown} ({source}) starts or ends with whitespace: {fix}")


@dataclass
class IngestResult:
    model: str
    analysis: str | None = None
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    run_id: str
    lang: str
    role: str
    seed: int
    group: str
    indices: np.ndarray
    records: list
    n_tokens: int
    n_truncated: int
    provenance: dict
    levels: np.ndarray  # kept in memory for the commit's derive


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _check_writable(root: Path) -> None:
    """Fail before any work if the archive folder cannot be created or written."""
    if root.exists():
        layout.ensure_folder(root)
        return
    ancestor = root
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MlarchError(
            f"archive folder {root} cannot be created: {ancestor} is a file; "
            "pass --archive DIR (or set MLARCH_ARCHIVE) to a writable folder"
        )
    layout.probe_writable(ancestor, root)


def ingest(root: Path, cfg: IngestConfig, reporter: Reporter | None = None) -> IngestResult:
    reporter = reporter or Reporter()
    cfg.validate()
    cfg.top_k = sorted(cfg.top_k)
    from mlarch.ingest import loading  # torch + transformers: only now

    data_dir = Path(cfg.data_dir).expanduser().resolve() if cfg.data_dir else None
    cfg.data_dir = str(data_dir) if data_dir else None  # recorded absolute, for verify --recompute
    srcs = {role: sources.resolve(spec, data_dir, cfg.template)
            for role, spec in (("math", cfg.math), ("control", cfg.control))}
    items = {(lang, role): srcs[role].load(lang, role) for lang in cfg.langs for role in ROLES}
    device = loading.resolve_device(cfg.device)
    dtype = loading.resolve_dtype(cfg.dtype, device)
    kind, local = loading.classify(cfg.model, cfg.gguf_file)
    name = cfg.name if cfg.name is not None else loading.default_name(cfg.model, cfg.gguf_file)
    check_name(name, "--name" if cfg.name is not None else "derived from --model")
    if local is not None:  # recorded absolute, so provenance and rerun detection do not depend on the cwd
        cfg.model = str(local.resolve())
    _check_writable(root)
    catalog_path = root / layout.CATALOG

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
    units = []  # (seed, lang, role, digest)
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
                identity.update(_compat_identity(cfg))  # likewise: nothing added for the exact defaults
                units.append((seed, lang, role, provenance.digest_json(identity)))
    existing = _finished_digests(catalog_path, name, analysis)
    result = IngestResult(model=name, analysis=analysis)
    todo = []
    for unit in units:
        if unit[3] in existing and not cfg.force:
            result.skipped.append(existing[unit[3]])
        else:
            todo.append(unit)
    if result.skipped:
        reporter.message(
            f"{len(result.skipped)} of {len(units)} run(s) of {name} are already archived with identical "
            "settings; reusing them (--force reruns)"
        )
    if not todo:
        return result

    reporter.message(f"loading {cfg.model} ({kind}, {dtype}, {device})")
    loaded = loading.load(cfg.model, revision=cfg.revision, device=device, dtype=dtype, **loading.options(cfg),
                          message=reporter.message)
    from mlarch.ingest.scoring import scored_modules

    modules = scored_modules(loaded.model)
    if not modules:
        raise MlarchError(f"model {cfg.model} has no nn.Linear or Conv1D modules to score")
    _check_finite(cfg.model, modules)
    if cfg.method == methods.BF16:  # a guard: validate made the dtype bfloat16 already
        from mlarch.ingest import mathneuro

        mathneuro.check_bf16(loaded.model, modules)
        run_pass = mathneuro.run_pass_bf16
    else:
        from mlarch.ingest.scoring import run_pass
    layout.ensure_folder(root)
    if not catalog_path.exists():  # an existing catalog's schema is checked by its first reading
        catalog.ensure_schema(catalog_path)
    model_row = _model_row(catalog_path, name)
    if model_row is not None:
        if model_row["weights_sha256"] != loaded.weights_sha256 or model_row["dtype"] != dtype:
            raise MlarchError(
                f"the archive's model {name!r} has other weights or dtype "
                f"({model_row['weights_sha256'][:12]}, {model_row['dtype']}) than {cfg.model} "
                f"({loaded.weights_sha256[:12]}, {dtype}): pass --name to archive it separately"
            )
    spans = span_layout.layout([(m.name, m.layer, m.n_rows, m.n_cols) for m in modules])
    magnitudes = np.empty(span_layout.total_params(spans), dtype=np.float32)

    def prepare_magnitudes() -> None:
        for m, span in zip(modules, spans):
            m.magnitudes(out=magnitudes[span.params])

    env = provenance.environment(device)
    batch_size = cfg.batch_size or (16 if device.type == "cuda" else 1)
    config = {**asdict(cfg), "name": name, "analysis": analysis, "dtype": dtype, "device": str(device), "batch_size": batch_size}
    # array work (|W|, selection, compression, digests) runs in order, in one background
    # thread while the next forward pass runs where the passes leave the CPU idle
    with parallel.background(overlap=overlaps(device)) as background:
        reporter.message(f"|W| of {magnitudes.size:,} scored parameters" + (
            ": extracting (archived with the first commit)" if model_row is None else ": extracting"))
        magnitudes_ready = background.submit(prepare_magnitudes)  # before any run's selection
        for seed in cfg.seeds:
            for lang in cfg.langs:
                units_here = [(role, digest) for s_, l_, role, digest in todo if (s_, l_) == (seed, lang)]
                if not units_here:
                    continue
                run_ids = _begin_runs(catalog_path, name, analysis, lang, seed, cfg, srcs, units_here)
                try:
                    futures = [
                        _score_run(
                            root, cfg, name, lang, role, seed, run_id, digest, srcs[role], items[(lang, role)],
                            loaded, modules, spans, magnitudes, magnitudes_ready, batch_size, env, config,
                            reporter, run_pass, background, pools.get((lang, role)),
                        )
                        for run_id, (role, digest) in zip(run_ids, units_here)
                    ]
                    pending = [future.result() for future in futures]
                    _commit(root, name, analysis, analysis_config, seed, loaded, modules, spans, magnitudes, pending,
                            count_tops=cfg.method == methods.BF16)
                except BaseException:
                    _mark_failed(catalog_path, run_ids)  # those not committed
                    raise
                result.written.extend(p.run_id for p in pending)
                reporter.message(
                    f"archived {lang} seed {seed}: " + ", ".join(f"{p.role} {p.run_id}" for p in pending))
    return result


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
            raise UsageError(f"no evaluation {', '.join(missing)} in the archive: pass eval ids from `mlarch evals`")
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
                       f"evaluated {r['lang']!r}, which is not in --langs" if r["lang"] not in cfg.langs else
                       f"repeats language {r['lang']!r}" if r["lang"] in by_lang else None)
            if problem:
                raise UsageError(f"evaluation {eval_id} {problem}: --only-correct takes one finished accuracy "
                                 "evaluation of this model on the --math data per language")
            # its correct flags decide what ingest draws: the record must be as archived
            if records.evaluation_digest_in(con, eval_id) != r["record_sha256"]:
                raise MlarchError(f"evaluation {eval_id}'s record changed since it was archived: run `mlarch verify`, "
                                  "then restore the catalog or evaluate again")
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
                raise MlarchError(f"evaluation {eval_id} names items outside the {n_items} of {dataset!r} "
                                  f"({r['lang']}): run `mlarch verify`")
            if not correct:
                raise UsageError(f"evaluation {eval_id} ({r['lang']}) scored no item correct: nothing to draw from; "
                                 "drop --only-correct for that language or evaluate more items")
            pools[(r["lang"], "math")] = {"items": correct,
                                          "record": {"eval_id": eval_id, "record_sha256": r["record_sha256"]}}
    uncovered = [lang for lang in cfg.langs if lang not in by_lang]
    if uncovered:
        raise UsageError(f"--only-correct names no evaluation for {', '.join(uncovered)}: pass one accuracy "
                         "evaluation per language in --langs")
    return pools


def _check_finite(ref: str, modules) -> None:
    """Refuse weights that are inf or NaN before any run row is written: their scores have
    no top-k (selection would fail after the forward passes, or rank garbage)."""
    import torch

    def finite(weight) -> bool:  # min and max carry any NaN or inf, with no temporary (~0.05 s / 100 M)
        low, high = torch.aminmax(weight)
        return bool(torch.isfinite(low) & torch.isfinite(high))

    with torch.no_grad():
        bad = [m.name for m in modules if not finite(m.module.weight.detach())]
    if bad:
        raise MlarchError(f"model {ref} has inf or NaN weights in {len(bad)} scored module(s) ({', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''}): the checkpoint is damaged; restore its weight files")


def _method_record(cfg: IngestConfig) -> dict:
    """The provenance record of the scoring method and draw (the exact one's: METHOD)."""
    if cfg.method == methods.BF16:
        from mlarch.ingest import mathneuro

        record = mathneuro.describe()
    else:
        record = dict(METHOD)
    record["sampling"] = paper_sampling.DESCRIPTIONS[cfg.sampling]
    return record


def _compat_identity(cfg: IngestConfig) -> dict:
    """What a run's config digest adds for non-default paper-compat settings (nothing for the
    exact defaults, so a run archived before them keeps its digest and is reused).
    max_length None is already in the identity as a value."""
    out = {}
    if cfg.method != methods.EXACT or cfg.sampling != "numpy":
        out["method"] = _method_record(cfg)
    if cfg.sampling != "numpy":
        out["sampling"] = paper_sampling.describe(cfg.sampling, cfg.shuffle_seed)
    if cfg.template != "default":
        out["template"] = cfg.template
    return out


def overlaps(device) -> bool:
    """Whether selection and writes should overlap the next forward pass: yes on an
    accelerator, whose passes leave the CPU idle; not on a CPU, where torch already uses
    every core (overlapping made the passes of a 48-sample Gemma ingest 1.3x slower and the
    ingest 10-35% slower than running the same work in between, on 2 cores)."""
    return device.type != "cpu"


def _finished_digests(catalog_path: Path, model: str, analysis: str) -> dict[str, str]:
    if not catalog_path.exists():
        return {}
    with catalog.reading(catalog_path) as con:
        rows = con.execute(
            "SELECT config_digest, run_id FROM runs WHERE model = ? AND analysis = ? AND status = 'FINISHED' AND in_use",
            [model, analysis],
        ).fetchall()
    return dict(rows)


def _model_row(catalog_path: Path, model: str) -> dict | None:
    with catalog.reading(catalog_path) as con:
        rows = con.execute("SELECT weights_sha256, dtype FROM models WHERE model = ?", [model]).fetchall()
        row = rows[0] if rows else None
    return None if row is None else {"weights_sha256": row[0], "dtype": row[1]}


def _begin_runs(catalog_path: Path, name: str, analysis: str, lang: str, seed: int, cfg: IngestConfig, srcs,
                units: list[tuple[str, str]]) -> list[str]:
    """Insert RUNNING rows for one language and seed (math, control) in one short write."""
    run_ids = [layout.new_run_id() for _ in units]
    with catalog.writing(catalog_path) as con:
        for run_id, (role, digest) in zip(run_ids, units):
            con.execute(
                "INSERT INTO runs (run_id, model, analysis, lang, role, dataset, seed, n_samples, status, started_at, "
                "k_values, config_digest, in_use, arrays_group, host, pid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'RUNNING', ?, ?, ?, false, ?, ?, ?)",
                [run_id, name, analysis, lang, role, srcs[role].name, seed, cfg.samples, _now(), cfg.top_k, digest,
                 layout.run_group(run_id), socket.gethostname(), os.getpid()],
            )
    return run_ids


def _score_run(root, cfg, name, lang, role, seed, run_id, digest, source, loaded_items, loaded, modules, spans,
               magnitudes, magnitudes_ready, batch_size, env, config, reporter, run_pass, background,
               pool=None) -> Future:
    """Run the forward pass here; select and write in `background` (a thread beside the next
    pass, or inline: see `overlaps`). The returned future gives the run, ready to commit."""
    group = layout.run_group(run_id)
    started = _now()
    texts_all = loaded_items.texts
    if pool is None:
        indices = paper_sampling.draw(cfg.sampling, len(texts_all), cfg.samples, seed, cfg.shuffle_seed)
    else:  # the same draw, over the pool of items an evaluation scored correct
        allowed = np.asarray(pool["items"], dtype=np.int64)
        indices = allowed[paper_sampling.draw(cfg.sampling, len(allowed), cfg.samples, seed, cfg.shuffle_seed)]
    texts = [texts_all[i] for i in indices]
    reporter.start_pass(f"{lang} {role} seed {seed}", len(texts))
    clock = time.perf_counter()
    result = run_pass(
        loaded.model, loaded.tokenizer, modules, texts, batch_size=batch_size,
        max_length=cfg.max_length, device=loaded.device,
        on_batch=reporter.advance,
    )
    reporter.end_pass()

    def finish() -> _Pending:
        magnitudes_ready.result()  # done (the queue runs in order); re-raises its error
        norms = np.empty(span_layout.total_norms(spans), dtype=np.float32)
        for span in spans:
            norms[span.norms] = result.norms[span.module]
        if not np.isfinite(norms).all():  # no top-k of inf or NaN scores means anything
            bad = next(s.module for s in spans if not np.isfinite(norms[s.norms]).all())
            raise MlarchError(f"the activations entering {bad} overflowed to inf or NaN on {lang} {role} texts "
                              f"(dtype {loaded.dtype}): ingest in --dtype float32, or with a smaller --max-length")
        if cfg.method == methods.BF16:  # the authors' bf16 scores and set sizes, not |W| x norms
            from mlarch.ingest import mathneuro

            levels = mathneuro.model_levels_bf16(spans, result.scores, cfg.top_k)
        else:
            levels = selection.model_levels(spans, magnitudes, norms, cfg.top_k)
        store = root / layout.ARRAYS
        records = [("norms", arrays.write(store, norms_path(group), norms, compress=False)),
                   ("levels", arrays.write(store, levels_path(group), levels))]
        prov = {
            **env,
            "run_id": run_id,
            "started_at": started.isoformat(),
            "finished_at": _now().isoformat(),
            "duration_s": round(time.perf_counter() - clock, 3),
            "forward_s": round(result.seconds, 3),
            "n_tokens": result.n_tokens,
            "n_truncated": result.n_truncated,
            "config": config,
            "config_digest": digest,
            "method": _method_record(cfg),
            "model": {
                "name": name, "source": loaded.source, "source_kind": loaded.source_kind,
                "revision": loaded.revision, "commit_sha": loaded.commit_sha,
                "weights_sha256": loaded.weights_sha256, "weight_files": loaded.weight_files,
                "architecture": loaded.architecture, "dtype": loaded.dtype,
            },
            "data": {
                "lang": lang, "role": role, "dataset": source.name, "source": source.describe(),
                "files": loaded_items.files, "templates": loaded_items.templates,
                "n_items": len(texts_all),
            },
            "texts_sha256": provenance.texts_digest(texts),
            "seed": seed,
            "sample_indices": indices.tolist(),
        }
        if cfg.sampling != "numpy":
            prov["sampling"] = paper_sampling.describe(cfg.sampling, cfg.shuffle_seed)
        if cfg.template != "default":
            prov["template"] = cfg.template
        if pool is not None:
            prov["only_correct"] = {**pool["record"], "n_items": len(pool["items"])}
        return _Pending(run_id, lang, role, seed, group, indices, records, result.n_tokens, result.n_truncated, prov,
                        levels)

    return background.submit(finish)


def _mark_failed(catalog_path: Path, run_ids: list[str]) -> None:
    """Mark the runs that are still RUNNING as FAILED (best effort: gc cleans up otherwise)."""
    try:
        with catalog.writing(catalog_path) as con:
            for run_id in run_ids:
                con.execute("UPDATE runs SET status = 'FAILED', finished_at = ? WHERE run_id = ? AND status = 'RUNNING'",
                            [_now(), run_id])
    except Exception:  # the original error matters more
        pass


def _commit(root: Path, name: str, analysis: str, analysis_config: dict, seed: int, loaded, modules, spans,
            magnitudes: np.ndarray, pending: list[_Pending], count_tops: bool = False) -> None:
    """Fold finished runs into the catalog: one transaction, under the archive's commit lock.

    The model's rows and |W| array go in with the first commit that finds the model missing,
    decided under the lock: two ingests of a new model at once both complete, the second
    reusing what the first archived (same weights) or refusing (other weights). A new model
    name whose weights (and dtype) another model has archived already points at that |W|
    array: it is stored once per weights digest."""
    catalog_path = root / layout.CATALOG
    with layout.commit_lock(root):
        model_row = _model_row(catalog_path, name)
        new_model = None
        if model_row is None:
            shared = _shared_magnitudes(catalog_path, loaded, spans)
            if shared is not None:
                new_model = (shared, None)
            else:
                group = _free_model_group(catalog_path, name)
                new_model = (group, arrays.write(root / layout.ARRAYS, magnitudes_path(group), magnitudes))
        elif model_row["weights_sha256"] != loaded.weights_sha256 or model_row["dtype"] != loaded.dtype:
            raise MlarchError(
                f"another ingest archived model {name!r} with other weights or dtype "
                f"({model_row['weights_sha256'][:12]}, {model_row['dtype']}) while this one ran: "
                "pass --name to archive this model separately")
        with catalog.reading(catalog_path) as con:
            analyses.check_config(con, name, analysis, analysis_config)  # another ingest may have named it
            current = current_runs(con, name, analysis, seed)
            newest = {(lang, role): at for lang, role, at in con.execute(
                "SELECT lang, role, max(finished_at) FROM runs WHERE model = ? AND analysis = ? AND seed = ? "
                "AND status = 'FINISHED' GROUP BY ALL", [name, analysis, seed]).fetchall()}
        # the run in use is the newest finished one (as import-bundle and verify have it): a run
        # that another ingest overtook while this one ran is archived, but not used
        in_use = {p.run_id: (p.lang, p.role) not in newest
                  or datetime.fromisoformat(p.provenance["finished_at"]) >= newest[(p.lang, p.role)] for p in pending}
        for p in pending:
            if in_use[p.run_id]:
                levels = dict(p.records)["levels"]
                current[(p.lang, p.role)] = RunRef(p.run_id, p.lang, p.role, p.group,
                                                   tuple(p.provenance["config"]["top_k"]), levels)
        # count_tops: set sizes as stored (mathneuro-bf16's are the authors' int(numel * k), not top_count's)
        selections, patterns = derive(root / layout.ARRAYS, name, analysis, seed, spans, current,
                                      preloaded={p.group: p.levels for p in pending}, count_tops=count_tops)
        with catalog.writing(catalog_path) as con:
            if new_model is not None:
                group, record = new_model
                con.execute(
                    "INSERT INTO models (model, source, source_kind, revision, commit_sha, weights_sha256, dtype, "
                    "architecture, n_modules, n_scored_params, magnitudes_group, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [name, loaded.source, loaded.source_kind, loaded.revision, loaded.commit_sha,
                     loaded.weights_sha256, loaded.dtype, loaded.architecture, len(modules),
                     sum(m.n_params for m in modules), group, _now()],
                )
                rows = pl.DataFrame(  # one insert from a frame: executemany costs ~0.7 ms a row
                    [(name, m.name, m.layer, m.kind, m.n_rows, m.n_cols, m.n_params, i, span.param_offset,
                      span.norm_offset) for i, (m, span) in enumerate(zip(modules, spans))],
                    schema={"model": pl.Utf8, "module": pl.Utf8, "layer": pl.Int64, "kind": pl.Utf8,
                            "n_rows": pl.Int64, "n_cols": pl.Int64, "n_params": pl.Int64, "position": pl.Int64,
                            "param_offset": pl.Int64, "norm_offset": pl.Int64},
                    orient="row",
                )
                con.register("new_modules", rows.to_arrow())
                con.execute("INSERT INTO modules SELECT * FROM new_modules")
                con.unregister("new_modules")
                if record is not None:  # else the array of the model that archived these weights first
                    _insert_arrays(con, [(name, "magnitudes", record)])
                con.execute("UPDATE models SET record_sha256 = ? WHERE model = ?",
                            [records.model_digest_in(con, name), name])
            for p in pending:
                if in_use[p.run_id]:
                    con.execute(
                        "UPDATE runs SET in_use = false WHERE model = ? AND analysis = ? AND lang = ? AND role = ? "
                        "AND seed = ? AND in_use", [name, analysis, p.lang, p.role, p.seed],
                    )
                con.execute(
                    "UPDATE runs SET status = 'FINISHED', started_at = ?, finished_at = ?, n_tokens = ?, "
                    "n_truncated = ?, in_use = ?, provenance = ? WHERE run_id = ?",
                    [datetime.fromisoformat(p.provenance["started_at"]),
                     datetime.fromisoformat(p.provenance["finished_at"]), p.n_tokens, p.n_truncated,
                     in_use[p.run_id], json.dumps(p.provenance), p.run_id],
                )
                samples = pl.DataFrame({
                    "run_id": [p.run_id] * len(p.indices),
                    "position": np.arange(len(p.indices), dtype=np.int32),
                    "item_index": p.indices.astype(np.int64),
                })
                con.register("new_samples", samples.to_arrow())
                con.execute("INSERT INTO run_samples SELECT * FROM new_samples")
                con.unregister("new_samples")
                _insert_arrays(con, [(p.run_id, kind, r) for kind, r in p.records])
                con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?",
                            [records.run_digest_in(con, p.run_id), p.run_id])
            analyses.ensure(con, name, analysis, analysis_config)
            replace_derived(con, name, analysis, seed, selections, patterns)


def _shared_magnitudes(catalog_path: Path, loaded, spans) -> str | None:
    """The magnitudes group of an archived model with these weights and dtype and the same
    scored layout, whose |W| array a new model name reuses (None: there is none)."""
    with catalog.reading(catalog_path) as con:
        for other, group in con.execute(
                "SELECT m.model, m.magnitudes_group FROM models m JOIN arrays a ON a.path = m.magnitudes_group || "
                "'/magnitudes' AND a.kind = 'magnitudes' WHERE m.weights_sha256 = ? AND m.dtype = ? "
                "ORDER BY m.created_at, m.model", [loaded.weights_sha256, loaded.dtype]).fetchall():
            if span_layout.read_spans(con, other) == list(spans):
                return group
    return None


def _free_model_group(catalog_path: Path, name: str) -> str:
    """The group of a new model's |W|: refused while a model of a removed name's weights
    still uses the group that name gives."""
    group = layout.model_group(name)
    with catalog.reading(catalog_path) as con:
        users = [r[0] for r in con.execute("SELECT model FROM models WHERE magnitudes_group = ?", [group]).fetchall()]
        owned = con.execute("SELECT count(*) FROM arrays WHERE path = ?", [magnitudes_path(group)]).fetchone()[0]
    if users or owned:
        raise MlarchError(f"model name {name!r} was used for other weights whose |W| array models "
                          f"{', '.join(users) or '(none)'} still share: pass another --name")
    return group


def _insert_arrays(con, rows) -> None:
    con.executemany(
        "INSERT INTO arrays (path, owner, kind, dtype, shape, sha256, nbytes, meta_sha256, chunk_sha256) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [[r.path, owner, kind, r.dtype, list(r.shape), r.sha256, r.nbytes, r.meta_sha256,
          list(r.chunk_sha256) if r.chunk_sha256 is not None else None] for owner, kind, r in rows],
    )
