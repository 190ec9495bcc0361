"""What `ingest` is asked to do: IngestConfig, its checks (run before any work), and the
records that make a run's identity (its config digest) and provenance."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from mlarch import methods
from mlarch.errors import UsageError
from mlarch.ingest import paper_sampling, sources
from mlarch.store import analyses
from mlarch.wording import Arg, Phrase, brief, cli, error, python


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
_LANG = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")  # used with fullmatch: '$' would pass "en\n"



@dataclass
class IngestConfig:
    """The settings of one `mlarch ingest` / Archive.ingest call (the CLI's options by name); validate() checks them
    before any work."""
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
    device_map: str | None = None  # 'auto': accelerate spreads the model over the GPUs (mlarch.ingest.placement)
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
    # where the units run (local: pipeline._run_local; ray: mlarch/ingest/ray_executor.py), not part of a run's identity
    executor: str = "local"  # or ray: one Ray actor per GPU (or CPU slot) holding the model
    ray_address: str | None = None  # with ray: the cluster to join (else RAY_ADDRESS, else a local instance)
    gpus_per_unit: float = 1  # with ray on GPUs: the GPUs each worker (one copy of the model) holds
    # where the arrays go on an archive's first ingest: s3://BUCKET/PREFIX (recorded in the catalog;
    # later ingests read it from there, and may repeat it); None: the archive's arrays.zarr
    arrays: str | None = None

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

        # types first: a value of the wrong type fails here by name, not deep in the work
        self.model = check_source(self.model, Arg("model"), "a model folder, .gguf file, hub id or named model",
                                  Arg("model", "qwen2.5-coder-0.5b"))
        self.math = check_source(self.math, Arg("math"), SOURCE_KINDS, Arg("math", "mgsm"))
        self.control = check_source(self.control, Arg("control"), SOURCE_KINDS, Arg("control", "flores"))
        self.data_dir = check_data_dir(self.data_dir)
        for flag in ("force", "trust_remote_code", "paper_compat"):
            check_flag(self, flag)
        self.top_k = listed(self.top_k, float)
        self.seeds = listed(self.seeds, int)
        self.only_correct = listed(self.only_correct, str)
        self.apply_paper_compat()
        check_langs(self.langs)
        from mlarch.ingest.devices import check_device_map

        self.device_map = check_device_map(self.device_map, self.device)
        if not self.top_k:
            raise error(UsageError, "no top-k values given: pass ", Arg("top_k"), ", e.g. ", Arg("top_k", [0.01]))
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
        self.samples = _bounded_int(Arg("samples"), self.samples, MAX_SAMPLES,
                                    ("draw from 1 to 1,000,000 items per language and role, e.g. ",
                                     Arg("samples", 500)))
        seeds_fix = (Arg("seeds"), " must be distinct integers from 0 to 2**63-1 (stored as BIGINT), e.g. ",
                     Arg("seeds", [1, 101, 201]))
        if not self.seeds:
            raise error(UsageError, "no seeds given: ", *seeds_fix)
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
                raise error(UsageError, f"seed {seed!r} is not valid: ", *seeds_fix)
        self.seeds = [int(seed) for seed in self.seeds]
        if len(set(self.seeds)) != len(self.seeds):
            raise error(UsageError, f"seeds repeat in {','.join(map(str, self.seeds))}: ", *seeds_fix)
        if self.batch_size is not None:
            self.batch_size = _bounded_int(Arg("batch_size"), self.batch_size, MAX_BATCH_SIZE,
                                           ("use from 1 to 65,536 samples per pass, e.g. ", Arg("batch_size", 16)))
        if self.max_length is not None:
            self.max_length = _bounded_int(Arg("max_length"), self.max_length, MAX_LENGTH,
                                           ("truncate texts to 1 to 1,048,576 tokens, e.g. ", Arg("max_length", 512),
                                            ", or ", Phrase("max_length=None", "--max-length none"),
                                            " for no truncation"))
        methods.check_method(self.method)
        if self.method == methods.BF16 and self.dtype not in ("auto", "bfloat16"):
            raise error(UsageError, Arg("method", methods.BF16), " runs the model in bfloat16 as the authors did, not "
                        f"{self.dtype}: pass ", Arg("dtype", "bfloat16"), " (or leave ", Arg("dtype"), " out)")
        if self.method == methods.BF16 and self.dtype == "auto":
            self.dtype = "bfloat16"  # the method's arithmetic is bf16 whatever the device
        if self.shuffle_seed is not None and self.sampling != "pandas":
            raise error(UsageError, Arg("shuffle_seed"), " applies to ", Arg("sampling", "pandas"),
                        " only: drop it, or add ", Arg("sampling", "pandas"))
        paper_sampling.check_sampling(self.sampling, self.seeds, self.shuffle_seed)
        if self.template not in sources.TEXT_TEMPLATES:
            raise error(UsageError, Arg("template", shown=repr(self.template)), " is not known: use one of "
                        f"{', '.join(sources.TEXT_TEMPLATES)}")
        if self.name is not None:
            check_name(self.name, Arg("name"))
        if self.analysis is not None:
            analyses.check_name(self.analysis)
        check_executor(self)
        if self.only_correct is not None:
            if not self.only_correct or any(not isinstance(e, str) or not e for e in self.only_correct):
                raise error(UsageError, Arg("only_correct"), " takes eval ids, one per language: see ",
                            Phrase("Archive.evaluations()", "`mlarch evals`"))
            if len(set(self.only_correct)) != len(self.only_correct):
                raise error(UsageError, "eval ids repeat in ", Arg("only_correct"), ": list each once")




# Upper bounds on values that size allocations or are stored as BIGINT: refused up front
# rather than failing after the forward passes (an overflow) or on allocation (MemoryError).
MAX_SEED = 2**63 - 1
MAX_SAMPLES = 1_000_000
MAX_LENGTH = 1_048_576
MAX_BATCH_SIZE = 65_536
MAX_NAME = 128


def _bounded_int(arg: Arg, value, high: int, fix: tuple) -> int:
    """`value` as an int from 1 to `high`, else a UsageError naming `arg` and ending in `fix`
    (message parts, see mlarch.wording)."""
    import numbers

    # bool is an int to Python, and numpy integers are not ints: accept exactly the integers
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(UsageError, arg, f" takes integers, got {value!r}: ", *fix)
    if value < 1:
        raise error(UsageError, arg, f" must be positive, got {value}: ", *fix)
    if value > high:
        raise error(UsageError, arg, f" must be at most {high:,}, got {value:,}: ", *fix)
    return int(value)


SOURCE_KINDS = "a named source such as mgsm, a path template with {lang} or a hub data set hf:..."


def check_source(value, arg: Arg, what: str, example: Arg) -> str:
    """A model or data reference (a str, or a path object, as a str), else a UsageError: the
    reference is read before anything loads, and a None would fail far inside the work."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise error(UsageError, arg, f" takes a string ({what}), got {brief(value)}: e.g. ", example)
    if "\x00" in value:
        raise error(UsageError, arg, f" holds a NUL character ({brief(value)}): pass {what}")
    return value


def check_data_dir(value) -> str | None:
    """data_dir: None, or a folder path (a str or path object, as a str)."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or "\x00" in value:
        raise error(UsageError, Arg("data_dir"), f" takes a folder path (a str or pathlib.Path), got {brief(value)}: "
                    "e.g. ", Arg("data_dir", "shared/data"))
    return value


def check_flag(cfg, name: str) -> None:
    """An on/off option of `cfg` holds True or False (1 and 0 too), not 'yes' or None."""
    value = getattr(cfg, name)
    try:
        fine = isinstance(value, bool) or value in (0, 1)  # numpy's bools and 0/1 compare equal
    except (TypeError, ValueError):  # an array: no truth value
        fine = False
    if not fine:
        raise error(UsageError, Arg(name), f" takes True or False, got {brief(value)}: e.g. ", Arg(name, True))
    setattr(cfg, name, bool(value))


def listed(value, parse) -> list | None:
    """A list option (top_k, seeds, only_correct) as a list: one value as [value], a string as
    the CLI reads it ('0.01,0.05': comma-separated, each part through `parse`; a part it
    refuses stays text, for the item checks to name). None stays None: the checks say what is
    missing."""
    if value is None:
        return None
    if isinstance(value, str):
        out = []
        for part in (p.strip() for p in value.split(",")):
            try:
                out.append(parse(part))
            except ValueError:
                out.append(part)
        return out
    if isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def check_langs(langs) -> None:
    """--langs: at least one valid language code, each once."""
    if not langs:
        raise error(UsageError, "no languages given: pass ", Arg("langs"), ", e.g. ", Arg("langs", ["en", "de"]))
    for lang in langs:
        if not isinstance(lang, str) or not _LANG.fullmatch(lang):
            raise UsageError(f"language code {lang!r} is not valid: use codes such as en, de, zh")
    if len(set(langs)) != len(langs):
        raise UsageError(f"languages repeat in {','.join(langs)}: list each once")


def _parts(parts) -> tuple:
    return parts if isinstance(parts, tuple) else (parts,)


def check_name(name, source) -> None:
    """A model name is a short, printable label: it is shown in tables, stored in the catalog
    and part of folder names. `source` (message parts: text, an Arg, or a tuple of them) says
    where it came from, for the message."""
    fix = ("pass ", Arg("name"), " with a short name such as ", Phrase("'llama-3-8b'", "llama-3-8b"))
    source = Phrase(python(*_parts(source)), cli(*_parts(source)))
    if not isinstance(name, str):
        raise error(UsageError, f"model name {name!r} (", source, ") is not text: ", *fix)
    shown = repr(name if len(name) <= 40 else name[:40] + "...")
    if not name:
        raise error(UsageError, "the model name (", source, ") is empty: ", *fix)
    if len(name) > MAX_NAME:
        raise error(UsageError, f"model name {shown} (", source, f") has {len(name):,} characters, over {MAX_NAME}: ",
                    *fix)
    if not name.isprintable():  # newlines, tabs, escapes, zero-width and direction marks
        raise error(UsageError, f"model name {shown} (", source, ") contains control or invisible characters: ", *fix)
    if name != name.strip():
        raise error(UsageError, f"model name {shown} (", source, ") starts or ends with whitespace: ", *fix)




def method_record(cfg: IngestConfig) -> dict:
    """The provenance record of the scoring method and draw (the exact one's: METHOD)."""
    if cfg.method == methods.BF16:
        from mlarch.ingest import mathneuro

        record = mathneuro.describe()
    else:
        record = dict(METHOD)
    record["sampling"] = paper_sampling.DESCRIPTIONS[cfg.sampling]
    return record


def run_compat_identity(cfg: IngestConfig) -> dict:
    """What a run's config digest adds for non-default paper-compat settings (nothing for the
    exact defaults, so a run archived before them keeps its digest and is reused).
    max_length None is already in the identity as a value."""
    out = {}
    if cfg.method != methods.EXACT or cfg.sampling != "numpy":
        out["method"] = method_record(cfg)
    if cfg.sampling != "numpy":
        out["sampling"] = paper_sampling.describe(cfg.sampling, cfg.shuffle_seed)
    if cfg.template != "default":
        out["template"] = cfg.template
    return out


EXECUTORS = ("local", "ray")
MAX_GPUS_PER_UNIT = 64


def check_executor(cfg: IngestConfig) -> None:
    """--executor, --ray-address, --gpus-per-unit (whether the cluster answers is the
    executor's check, still before any model loads)."""
    import math
    import numbers

    if cfg.executor not in EXECUTORS:
        raise error(UsageError, Arg("executor", shown=repr(cfg.executor)),
                    " is not known: use local (this process) or ray (a Ray cluster)")
    if cfg.executor != "ray" and cfg.ray_address is not None:
        raise error(UsageError, Arg("ray_address"), " applies to ", Arg("executor", "ray"), " only: add ",
                    Arg("executor", "ray"), ", or drop ", Arg("ray_address"))
    if cfg.ray_address is not None and (not isinstance(cfg.ray_address, str) or not cfg.ray_address.strip()
                                        or not cfg.ray_address.isprintable()):
        raise error(UsageError, Arg("ray_address", shown=repr(cfg.ray_address)), " is not an address: pass "
                    "host:port of the cluster's head (e.g. 127.0.0.1:6379), ray://host:10001 or auto")
    fix = ("pass the GPUs each worker holds, e.g. ", Arg("gpus_per_unit", 1), " (0.5: two workers share a GPU)")
    gpus = cfg.gpus_per_unit
    if isinstance(gpus, bool) or not isinstance(gpus, numbers.Real) or math.isnan(gpus):
        raise error(UsageError, Arg("gpus_per_unit", shown=repr(gpus)), " is not a number: ", *fix)
    if not 0 < gpus <= MAX_GPUS_PER_UNIT:
        raise error(UsageError, Arg("gpus_per_unit", gpus), f" is outside (0, {MAX_GPUS_PER_UNIT}]: ", *fix)
    cfg.gpus_per_unit = float(gpus) if gpus != int(gpus) else int(gpus)
    if cfg.executor == "ray" and cfg.device_map is not None:
        raise error(UsageError, Arg("device_map", "auto"), " spreads one model over this machine's GPUs, while with ",
                    Arg("executor", "ray"), " each worker holds a whole model on ", Arg("gpus_per_unit"),
                    " GPUs: drop one of them")
    if cfg.executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise error(UsageError, Arg("executor", "ray"), " needs Ray, which is not installed: pip install "
                        "'mlarch[ray]' (or use ", Arg("executor", "local"), ")")


def recorded_config(cfg: IngestConfig, **resolved) -> dict:
    """The configuration a run's provenance records: the settings as given, with the values
    resolved at run time (name, analysis, dtype, device, batch_size). Where the units ran is
    recorded only when not here (local runs keep the records of earlier versions)."""
    config = {**asdict(cfg), **resolved}
    for key in ("executor", "ray_address", "gpus_per_unit", "arrays"):  # the catalog records where arrays are
        config.pop(key)
    if cfg.executor != "local":
        config["executor"] = cfg.executor
    return config
