"""Load a causal LM from a local folder, a local .gguf file, a hub id (with revision, or one
.gguf file of a hub repo), or a named model packaged on PyPI (mlarch.ingest.named_models)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

# MKL's conditional numerical reproducibility: float32 sums in the same order whatever the
# thread count (measured on Gemma-3-270M: 1 and 2 threads then give identical norms; without
# it ~67% of norm sums differ in the last bits). Read by MKL at its first call, hence here,
# before torch runs anything; a user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402 - after MKL_CBWR

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, Phrase, error
from mlarch.ingest.datafiles import sha256_file
from mlarch.ingest import model_inputs
from mlarch.ingest.completeness import check_complete  # noqa: F401 - also mlarch.ingest.loading's API

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # fullmatch: `$` would also match before a final newline


@dataclass
class LoadedModel:
    """A loaded model and tokenizer with what provenance records of them: source and its kind, revision and hub
    commit, weights digest (and per file), architecture, dtype, device and loading options."""
    model: torch.nn.Module
    tokenizer: object
    source: str
    source_kind: str  # 'folder' | 'gguf' | 'hub' | 'named'
    revision: str | None
    commit_sha: str | None
    weights_sha256: str
    weight_files: dict[str, str] = field(default_factory=dict)
    model_files: dict[str, str] = field(default_factory=dict)  # config, tokenizer, ...: see fingerprint
    architecture: str = ""
    dtype: str = "float32"
    device: torch.device = torch.device("cpu")
    gguf_file: str | None = None
    trust_remote_code: bool = False
    # --device-map auto: module prefix -> device as accelerate placed them (None: all on `device`,
    # which is then where inputs go: the input embedding's device)
    device_map: dict[str, str] | None = None

    def placement(self) -> dict:
        """{"placement": the device map's record} for provenance with --device-map auto; {} on
        one device, so records made without a map stay exactly as before."""
        if self.device_map is None:
            return {}
        from mlarch.ingest.placement import describe

        return {"placement": describe(self.device_map)}


def resolve_device(device: str) -> torch.device:
    """auto, cpu, cuda, cuda:N or mps; refused when unknown or not on this machine."""
    from mlarch.ingest.devices import resolve

    return resolve(device)


def options(cfg) -> dict:
    """The loading options an IngestConfig or EvalConfig carries (or a run's recorded config,
    where runs from before the options lack them), as `load` takes them."""
    get = cfg.get if isinstance(cfg, dict) else (lambda key, default: getattr(cfg, key, default))
    return {"gguf_file": get("gguf_file", None), "trust_remote_code": bool(get("trust_remote_code", False)),
            "device_map": get("device_map", None)}


def identity(cfg) -> dict:
    """The loading options that change what is loaded, for a configuration's identity: only
    those set, so configurations from before the options existed keep their digests. Remote
    code decides which model class runs (it may replace the library's own), so it is part
    of what was computed; the GGUF file picks the weights inside a repository. The device
    map is not: like --device, it decides where the same arithmetic runs (see placement)."""
    opts = options(cfg)
    return {key: value for key, value in opts.items() if value and key != "device_map"}


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' is float32 on CPU and bfloat16 on CUDA (float16 where bf16 is unsupported)."""
    if dtype == "auto":
        if device.type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return dtype


def default_name(ref: str, gguf_file: str | None = None) -> str:
    """Archive name derived from REF: the folder or file name, the hub id's last part, the
    --gguf-file's name without .gguf, or a named model's name."""
    if gguf_file:
        return Path(gguf_file).stem
    path = Path(ref.rstrip("/"))
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    return name or ref


def classify(ref: str, gguf_file: str | None = None) -> tuple[str, Path | None]:
    """('folder'|'gguf', path) for local references, ('hub', None) for a hub id, ('named',
    None) for a named model. A named model's bare name is that model even where a folder of
    that name is here: the folder is ./NAME (named_models.referenced)."""
    from mlarch.ingest import named_models

    if gguf_file is not None:
        _check_gguf_name(gguf_file)
    if named_models.referenced(ref) is not None:
        if gguf_file is not None:
            raise error(UsageError, f"{ref} is a named model (its GGUF file is pinned): drop ", Arg("gguf_file"))
        return "named", None
    path = Path(ref).expanduser()
    if path.is_dir():
        if gguf_file is not None:  # as transformers reads from_pretrained(folder, gguf_file=...)
            if not (path / gguf_file).is_file():
                raise error(MlarchError, Arg("gguf_file", gguf_file), f" is not in the model folder {ref}: "
                            "pass a .gguf file that the folder holds, or the .gguf file itself as ", Arg("model"))
            return "gguf", path
        return "folder", path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            if gguf_file is not None:
                raise error(UsageError, Arg("model", ref), " already is a .gguf file: drop ", Arg("gguf_file"))
            return "gguf", path
        raise UsageError(f"model path {ref} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id")
    looks_local = ref.startswith((".", "/", "~")) or ref.lower().endswith(".gguf") or not _HUB_ID.fullmatch(ref)
    if looks_local:
        raise MlarchError(
            f"model path {ref} does not exist: pass an existing model folder, a .gguf file or a hub id"
        )
    return "hub", None


def _check_gguf_name(name: str) -> None:
    """A .gguf path inside a repository or folder: relative, without '..', printable."""
    parts = name.split("/")
    if (not name.lower().endswith(".gguf") or not name.isprintable()
            or "\\" in name or any(p in ("", ".", "..") for p in parts)):
        shown = repr(name[:120]) if name.isprintable() else ascii(name[:120])  # untrusted: one printable line
        raise error(UsageError, Arg("gguf_file", shown=shown), " is not a .gguf file inside the repository: pass "
                    "its path there, e.g. ", Arg("gguf_file", "qwen2.5-0.5b-instruct-q4_k_m.gguf"))


def _fetch_gguf_from_hub(ref: str, gguf_file: str, revision: str | None) -> Path:
    """The hub repo's one .gguf file (nothing else is downloaded), from the Hugging Face cache
    when it is there ($HF_HOME / $HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads only that)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref, gguf_file, revision=revision))
    except Exception as exc:  # offline and not cached, no such file, unknown or gated repo...
        reason = _first_line(exc)
        raise MlarchError(
            f"could not fetch {gguf_file} from the Hugging Face Hub repo {ref!r}"
            f"{f' at {revision}' if revision else ''} ({reason[:200]}): check the file name against the repo's "
            "files and the network (HF_HUB_OFFLINE=1 reads only the local Hugging Face cache)") from None


def _fetch_from_hub(ref: str, revision: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
    try:
        folder = Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(ref, revision=revision, allow_patterns=patterns + ["*.bin"]))
    except Exception as exc:  # offline, unknown repo, gated repo, bad revision...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MlarchError(
            f"could not fetch {ref!r} from the Hugging Face Hub ({reason}): check the network "
            "and the model id, or pass a local model folder or .gguf file"
        ) from None
    return folder, folder.name  # snapshot folders are named by commit sha


def _cached_sha256(path: Path) -> str:
    """sha256 of a weight file, remembered by (path, size, mtime, ctime, inode) in the user
    cache: hashing a 1 GB checkpoint costs seconds on every ingest otherwise. The ctime is
    there because an in-place rewrite can keep the mtime (rsync -a --inplace, utime), never
    the ctime: every write and utime sets it."""
    from mlarch.cache import digests_file

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    store = digests_file()
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    known[key] = digest
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        staging = store.with_name(f"{store.name}.{os.getpid()}")
        staging.write_text(json.dumps(known))
        staging.replace(store)
    except OSError:  # a read-only cache only costs time
        pass
    return digest


def weights_digest(files: list[Path]) -> tuple[str, dict[str, str]]:
    """The weights digest of a model's files (sha256 over each file's name and sha256, sorted), and the per-file
    digests by file name. Never of no files: that digest (sha256 of nothing) would be every such model's."""
    if not files:
        raise MlarchError("no weight files to digest: pass a model folder or .gguf file that holds its weights")
    per_file = {f.name: _cached_sha256(f) for f in sorted(files)}
    h = hashlib.sha256("".join(f"{name}:{sha}\n" for name, sha in per_file.items()).encode())
    return h.hexdigest(), per_file


def _locate(ref: str, revision: str | None, gguf_file: str | None = None, message=None):
    """(kind, folder, from_pretrained extras, hub commit, weight files) of a model reference."""
    kind, path = classify(ref, gguf_file)
    commit = None
    if kind == "named":
        from mlarch.ingest import named_models

        if revision is not None:
            raise error(UsageError, f"{ref} is a named model (its files are pinned): drop ", Arg("revision"))
        path = named_models.prepare(ref, message or (lambda text: None))  # converts on first use
        kind, folder, extra = "named", path, {}
    elif kind == "hub" and gguf_file is not None:
        path = _fetch_gguf_from_hub(ref, gguf_file, revision)
        # the snapshot folder (named by commit) holds the file at its path in the repo
        commit = path.parents[len(Path(gguf_file).parts) - 1].name
        folder, extra = path.parents[len(Path(gguf_file).parts) - 1], {"gguf_file": gguf_file}
        kind = "hub"
    elif kind == "hub":
        path, commit = _fetch_from_hub(ref, revision)
        folder, extra = path, {}  # the snapshot folder already is that revision
    elif kind == "gguf" and gguf_file is not None:  # a folder and a .gguf file in it
        folder, extra = path, {"gguf_file": gguf_file}
        path = path / gguf_file
    elif kind == "gguf":
        folder, extra = path.parent, {"gguf_file": path.name}
    else:
        folder, extra = path, {}
    weight_files = [path] if "gguf_file" in extra else _folder_weights(folder)
    if kind == "named":  # the cached conversion, as converted (digests cached: cheap after the first load)
        named_models.check_weights(named_models.lookup(ref), folder, {f.name: _cached_sha256(f) for f in weight_files})
    # what transformers would read beyond the digested files (an adapter, files named elsewhere)
    if "gguf_file" in extra:
        model_inputs.check(folder, weight_files, gguf=extra["gguf_file"])
    else:
        model_inputs.check(folder, [*weight_files, *_model_file_paths(folder, weight_files).values()])
    return kind, folder, extra, commit, weight_files


def _folder_weights(folder: Path) -> list[Path]:
    """The weight files of a model folder: those at its top level, and every shard its index
    files name, which must be plain file names there too. transformers reads an index's
    shards wherever it points (a subfolder, `../`), and the weights digest must cover
    exactly the files that are read."""
    files = {f for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file()}
    _explicit_weights(folder)  # a file it names is one of these (or refused)
    for index in sorted(folder.glob("*.index.json")):
        files.update(shard for shard in map(folder.joinpath, _shard_names(index)) if shard.is_file())
    if not files:
        what = "weight files" if (folder / "config.json").exists() else "config.json or weight files"
        raise MlarchError(f"model folder {folder} has no {what}: pass a transformers model folder "
                          "that holds its config.json and weight files")
    return sorted(files)


def _explicit_weights(folder: Path) -> Path | None:
    """The weight file config.json names in `transformers_weights` (transformers then reads that
    file, or that index's shards, whatever the folder's usual names hold), or None. Refused unless
    it is a weight or index file at the folder's top level, where the weights digest covers it:
    transformers reads a file in a subfolder too. Read as transformers reads it: from the
    config object, where a config.json's own attribute_map may rename the key."""
    config = model_inputs.config_dict(folder)
    if config is None:
        return None
    built = _built_config(config)
    name = getattr(built, "transformers_weights", None) if built is not None else config.get("transformers_weights")
    if name is None:
        return None
    # ./model.safetensors is the file itself; no other normalising (sub/../x may leave through a link)
    plain = name[2:] if isinstance(name, str) and name.startswith("./") else name
    target = folder / plain if model_inputs.plain_name(plain) else None
    if target is None or not target.is_file() or not (target.suffix in _WEIGHT_SUFFIXES or plain.endswith(".index.json")):
        raise MlarchError(f"model folder {folder}'s config.json names the weight file {model_inputs.shown(name)} (transformers_weights), "
                          "which is not a weight file next to it: remove the key and keep the weights in the "
                          "folder under their usual names")
    return target


def _shard_names(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index names, refused unless each is a
    plain file name (no folder, no `..`, not absolute)."""
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        bad_map = isinstance(exc, (KeyError, TypeError, AttributeError))
        why = "no weight_map of file names" if bad_map else _first_line(exc)[:120]
        raise MlarchError(f"index file {index} cannot be read ({why}): restore it from the original checkpoint "
                          "or download the model again") from None
    for name in names:
        if not model_inputs.plain_name(name):
            shown = repr(name)[:120] if isinstance(name, str) and name.isprintable() else ascii(name)[:120]
            raise MlarchError(f"index file {index} names the weight file {shown}, which is not a file next to it: "
                              "put every shard in the model folder itself and name it there by its file name")
    return names


# Files beside the weights that change what the model computes or how texts are tokenized
# (config, generation config, tokenizer, chat template, shipped code). They are not in the
# weights digest (an archived model's identity, which must not change); each run and
# evaluation records their digests, and a reuse of it is refused when they changed since.
# Also by name: the tokenizer files of other suffixes (model_inputs.TOKENIZER_FILES: PhoBERT's
# bpe.codes...), and the chat templates in additional_chat_templates/ (named with that folder).
_MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".py", ".jinja")


def _model_files(folder: Path, weight_files: list[Path], extra: dict) -> dict[str, str]:
    if "gguf_file" in extra:  # a GGUF file carries its config and tokenizer (none beside it: model_inputs)
        return {}
    return {name: _model_file_digest(path) for name, path in _model_file_paths(folder, weight_files).items()}


def _model_file_paths(folder: Path, weight_files: list[Path]) -> dict[str, Path]:
    """The model files of a folder by their names in provenance (see _MODEL_FILE_SUFFIXES)."""
    skip = {f.name for f in weight_files}
    found = {f.name: f for f in sorted(folder.iterdir())
             if (f.suffix in _MODEL_FILE_SUFFIXES or f.name in model_inputs.TOKENIZER_FILES)
             and not f.name.startswith(".") and f.name not in skip and f.is_file()}
    found.update((f"{model_inputs.CHAT_TEMPLATE_DIR}/{t.name}", t) for t in model_inputs.chat_templates(folder))
    return found


def _model_file_digest(path: Path) -> str:
    """sha256 of the file; of a config's content without the transformers version that saved
    it (a named model converted again under a newer transformers is the same model)."""
    if path.name in ("config.json", "generation_config.json"):
        try:
            content = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            content = None
        if isinstance(content, dict):
            content.pop("transformers_version", None)
            return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return _cached_sha256(path)


class Fingerprint(NamedTuple):
    """What a model's files hold, as digests; see fingerprint()."""

    weights: str  # the weights digest: the archived model's identity
    files: dict[str, str]  # the model files' digests (see _MODEL_FILE_SUFFIXES)


def fingerprint(ref: str, revision: str | None, gguf_file: str | None = None, message=None) -> Fingerprint:
    """The digests `load` will record, without loading (cached per file): what decides
    whether archived results of this model can be reused."""
    _, folder, extra, _, weight_files = _locate(ref, revision, gguf_file, message)
    return Fingerprint(weights_digest(weight_files)[0], _model_files(folder, weight_files, extra))


def changed_model_files(provenance: str | None, current: dict[str, str]) -> list[str]:
    """Names of model files that differ between those a run's or evaluation's provenance (JSON
    text) recorded and `current`; none where it recorded none (made before they were recorded,
    or unreadable: its record digest speaks for that on every reuse path)."""
    try:
        model = json.loads(provenance or "{}").get("model")
    except (ValueError, RecursionError, AttributeError):
        return []
    recorded = model.get("model_files") if isinstance(model, dict) else None
    if not isinstance(recorded, dict):
        return []
    return sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))


def load(ref: str, *, revision: str | None, device: torch.device, dtype: str, gguf_file: str | None = None,
         trust_remote_code: bool = False, message=None, device_map: str | None = None,
         max_memory: dict | None = None) -> LoadedModel:
    """The model and tokenizer of `ref`. Code shipped with a model (its config's auto_map)
    runs only with trust_remote_code=True; `message` hears about a named model's first
    conversion. device_map='auto': accelerate spreads the modules over the GPUs, then CPU
    memory (`max_memory` as transformers takes it: {0: '20GiB', 'cpu': '64GiB'}), and
    `device` is ignored (see mlarch.ingest.placement)."""
    kind, folder, extra, commit, weight_files = _locate(ref, revision, gguf_file, message)
    extra = {**extra, "trust_remote_code": bool(trust_remote_code)}
    placing = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory}
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    if "gguf_file" not in extra:
        check_config_sizes(ref, folder, weight_files, built_model=not trust_remote_code)
    shipped = _shipped_model_code(folder) if not trust_remote_code and "gguf_file" not in extra else None
    if shipped and message is not None:  # transformers silently takes its own class for a model_type it knows
        message(f"{ref} ships its own model code ({shipped}); without trust_remote_code transformers' built-in "
                "class for its model_type is loaded and scored instead, if it has one")

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
        # The loading report, not the (silenced) warning, says whether every weight came from the
        # checkpoint. ignore_mismatched_sizes turns transformers' bare "see the above report"
        # RuntimeError into report entries, refused below like missing weights.
        model, report = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=_DTYPES[dtype], output_loading_info=True, ignore_mismatched_sizes=True, **extra,
            **placing)
    except ImportError as exc:
        hint = " (pip install 'mlarch[gguf]')" if "gguf_file" in extra else ""
        raise MlarchError(f"cannot load {ref}: a library is missing: {exc}{hint}") from None
    # struct.error: the GGUF reader's, on a header cut short; StrictDataclassError: a config's values
    # its class refuses (hidden size not a multiple of the heads)
    except (SafetensorError, pickle.UnpicklingError, OSError, ValueError, KeyError, IndexError, RuntimeError,
            struct.error, StrictDataclassError) as exc:
        reason = _first_line(exc.__cause__ if isinstance(exc, StrictDataclassError) and exc.__cause__ else exc)
        damaged = _damaged_file(kind, weight_files)
        if damaged is not None:
            raise _damaged_error(*damaged) from None
        if isinstance(exc, (SafetensorError, pickle.UnpicklingError)):  # a weight file, though no probe caught it
            raise MlarchError(
                f"the weight files of {ref} cannot be read ({reason}): restore them from the original "
                "checkpoint or download the model again") from None
        if device_map is not None and "offload" in str(exc) and "disk" in str(exc):  # no offload_folder given
            raise error(MlarchError, Arg("device_map", "auto"), f" would offload part of {ref} to disk, which "
                        "mlarch does not use: use a machine with more GPU or CPU memory, or ",
                        Arg("dtype", "bfloat16")) from None
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise error(
                MlarchError, f"model {ref} ships its own Python code (auto_map in its config), which mlarch does not "
                "run unless asked: read that code, then pass ",
                Phrase("trust_remote_code=True", "--trust-remote-code (trust_remote_code=True)")) from None
        raise MlarchError(f"cannot load model {ref}: {reason}") from None
    check_complete(ref, kind, report)
    placed = None
    if device_map is None:
        model.to(device)
    else:  # accelerate placed the modules (and hooks that move activations between devices)
        from mlarch.ingest import placement

        placed = placement.device_map_of(model)
        placement.check_placement(ref, placed)
        device = placement.input_device(model)
    model.eval()
    sha, per_file = weights_digest(weight_files)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=ref,
        source_kind=kind,
        revision=revision,
        commit_sha=commit,
        weights_sha256=sha,
        weight_files=per_file,
        model_files=_model_files(folder, weight_files, extra),
        architecture=type(model).__name__,
        dtype=dtype,
        device=device,
        gguf_file=gguf_file,
        trust_remote_code=bool(trust_remote_code),
        device_map=placed,
    )


class _Held(NamedTuple):
    """The most a checkpoint's weight files can hold, told from their headers (no tensor data read)."""

    elements: int
    tensors: int  # those with at least one element


def _held(folder: Path, weight_files: list[Path]) -> _Held | None:
    """What the weight files declare: those transformers reads, and every other .safetensors
    file (header only; they loosen the bound, and cover a choice of files made otherwise, as
    by the config's transformers_weights). None: no such file. A file that transformers reads
    and that does not parse is refused now, as the load would refuse it after building the
    config's model; another counts as the most its size allows."""
    read = _read_weights(folder, weight_files)
    counted = sorted(set(read) | {f for f in weight_files if f.suffix == ".safetensors"})
    if not counted:
        return None
    elements = tensors = 0
    for path in counted:
        try:
            n, t = _declared(path)
        except Exception as exc:  # any failure to parse
            if path in read:
                raise _damaged_error(path, _probe_reason(exc)) from None
            n, t = _most(path)
        elements, tensors = elements + n, tensors + t
    return _Held(elements, tensors)


def _read_weights(folder: Path, weight_files: list[Path]) -> list[Path]:
    """The weight files transformers reads of a folder, as it picks them."""
    explicit = _explicit_weights(folder)
    if explicit is not None:
        files = [folder / n for n in _shard_names(explicit)] if explicit.name.endswith(".json") else [explicit]
        return [f for f in files if f in weight_files]
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            files = [folder / n for n in _shard_names(folder / name)] if name.endswith(".json") else [folder / name]
            return [f for f in files if f in weight_files]
    return []


def _most(path: Path) -> tuple[int, int]:
    """The most elements and tensors a weight file of its size can hold: two elements a byte
    (4-bit types), a tensor per 16 bytes (its header entry)."""
    size = path.stat().st_size
    return 2 * size, size // 16


def _declared(path: Path) -> tuple[int, int]:
    """(elements, non-empty tensors) a weight file declares, read from its header (no tensor
    data); raises where it does not parse."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:  # checks that the header covers the file
            shapes = [handle.get_slice(key).get_shape() for key in handle.keys()]
    elif zipfile.is_zipfile(path):
        # as the probe and transformers load it (weights_only: untrusted); meta: the pickle's
        # shapes, no storage read. Shapes are not checked against the storages there: capped below.
        state = torch.load(path, map_location="meta", weights_only=True)
        shapes = [tuple(v.shape) for v in state.values() if isinstance(v, torch.Tensor)]
    else:
        with open(path, "rb") as handle:
            legacy = handle.read(1) == b"\x80"  # torch's legacy format: a pickle (its PROTO opcode)
        if not legacy:  # not a checkpoint (or a .tar one): torch refuses it before any storage
            _probe(path)
        # legacy: left unread, as torch allocates the storages it declares there, even for meta
        return _most(path)
    counts = [math.prod(int(n) for n in shape) for shape in shapes]
    return min(sum(counts), _most(path)[0]), sum(1 for n in counts if n)


# Config names of the sizes bounded below, transformers' own first: GPT-2's n_embd, n_layer and
# n_inner, T5's d_model, num_layers and d_ff, OPT's ffn_dim... A config class's attribute_map
# (n_embd for GPT-2's hidden_size) comes before these.
_SIZE_NAMES = {
    "vocab_size": ("vocab_size", "n_vocab", "padded_vocab_size"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "n_embed"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size"),
}
# config sizes whose products a checkpoint of that config stores at least once: the embedding
# (vocab x hidden), a norm per layer (layers x hidden), an MLP matrix (intermediate x hidden)
_SIZE_BOUNDS = (("vocab_size", "hidden_size"), ("num_hidden_layers", "hidden_size"),
                ("intermediate_size", "hidden_size"))


class _Size(NamedTuple):
    name: str  # as the config names it, with the sub-config it is in (text_config.hidden_size)
    value: int
    default: bool = False  # not in config.json: the config class's default

    def __str__(self) -> str:
        return f"{self.name} {self.value:,}{' by default' if self.default else ''}"


def check_config_sizes(ref: str, folder: Path, weight_files: list[Path], built_model: bool = True) -> None:
    """Refuse a config.json whose sizes need more parameters than the weight files hold, before
    transformers builds (and randomly fills) a model of the config's size: vocab_size 10 M on a
    tiny checkpoint took 2.9 GB before the completeness check refused it, 200,000 layers three
    minutes. The bounds are loose (a product each checkpoint stores at least once, a tensor per
    layer); the exact comparison is the completeness check after the load. config.json is read
    as written, then as transformers' class for its model_type reads it (its defaults for
    missing sizes, its names), each sub-config too (text_config, vision_config...); then its
    model is built on the meta device and counted (`built_model`; not with trust_remote_code,
    where the model's own class, not transformers', is loaded)."""
    config = model_inputs.config_dict(folder)
    held = _held(folder, weight_files) if config is not None else None
    if held is None:
        return
    # as written first: the class may build lists as long as the layers (layer_types)
    for sizes in _written_sizes(config):
        _check_sizes(ref, sizes, held)
    built = _built_config(config)
    if built is None:
        return
    for sizes in _built_sizes(built, config):
        _check_sizes(ref, sizes, held)
    if built_model:  # every size, under every name: the model itself, on the meta device (no memory)
        _check_built_model(ref, built, held, quantized="quantization_config" in config)


_CONFIG_FIX = "the config does not match the checkpoint; restore config.json or the weights"
# Elements a config's model may have beyond twice what the checkpoint holds: a model missing a
# few tensors is left to the loading report, which names them (64 MB of float32 at most)
_BUILD_SLACK = 1 << 24
# Buffer bytes beyond the parameters' float32 bytes: GPT-Neo keeps a max_positions² causal mask
# per layer (TinyStories-1M: 33.5 MB beside 3.7 M parameters), GPTBigCode one
_BUFFER_SLACK = 1 << 30


def _check_built_model(ref: str, built, held: _Held, quantized: bool) -> None:
    """Refuse a config whose model has more than twice the parameters the weight files hold
    (16 times for a quantized checkpoint, which packs up to 16 values in one stored element),
    or buffers of more than 1 GiB beyond the parameters' float32 bytes: sizes no product above
    bounds (GPT-2's n_positions, head_dim, experts, a vision tower's image size) built GBs
    before. Built on the meta device, where nothing is allocated: 0.03-0.24 s for real sizes up
    to 671 B parameters, after the import of the model's class (which from_pretrained pays)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(built)
    except Exception:  # a config transformers refuses: the load reports it
        return
    params = sum(p.numel() for p in model.parameters())  # a tied head once
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    fix = _CONFIG_FIX
    if params > held.elements * (16 if quantized else 2) + _BUILD_SLACK:
        raise MlarchError(f"model {ref}'s config.json builds a model of {params:,} parameters, more than its weight "
                          f"files hold ({held.elements:,}): {fix}")
    if buffer_bytes > 4 * params + _BUFFER_SLACK:
        raise MlarchError(f"model {ref}'s config.json builds {buffer_bytes:,} bytes of buffers beside {params:,} "
                          f"parameters: {fix}")


def _check_sizes(ref: str, sizes: dict[str, _Size], held: _Held) -> None:
    fix = _CONFIG_FIX
    for a, b in _SIZE_BOUNDS:
        if a in sizes and b in sizes and sizes[a].value * sizes[b].value > held.elements:
            raise MlarchError(f"model {ref}'s config.json declares {sizes[a]} and {sizes[b]} "
                              f"({sizes[a].value * sizes[b].value:,} parameters at least), more than its weight files "
                              f"hold ({held.elements:,}): {fix}")
    layers = sizes.get("num_hidden_layers")
    if layers is not None and layers.value > held.tensors:
        raise MlarchError(f"model {ref}'s config.json declares {layers}, more layers than the {held.tensors:,} tensors "
                          f"its weight files hold (a layer stores one at least): {fix}")


def _config_class(model_type):
    """transformers' own config class for a model_type (never code shipped with the model), or None."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type]
    except Exception:  # an unknown or malformed model_type: the load reports it
        return None


def _written_sizes(config: dict, prefix: str = "", depth: int = 0):
    """The sizes config.json writes, of it and of each sub-config in it (dicts, to depth 3)."""
    mapped = getattr(_config_class(config.get("model_type")), "attribute_map", None)
    yield _largest_sizes(mapped, config.get, lambda key, name: _Size(prefix + key, config[key]))
    if depth < 3:
        for key, value in config.items():
            if isinstance(value, dict):
                yield from _written_sizes(value, f"{prefix}{key}.", depth + 1)


def _largest_sizes(mapped, get, size) -> dict[str, _Size]:
    """Each size of _SIZE_NAMES at its largest under any of its names (a decoy key hides none),
    the `mapped` name (a config class's attribute_map) first; `get(key)` reads a value,
    `size(key, name)` makes its _Size."""
    mapped = mapped if isinstance(mapped, dict) else {}
    sizes = {}
    for name, names in _SIZE_NAMES.items():
        found = [size(key, name) for key in dict.fromkeys((mapped.get(name, name), *names))
                 if type(get(key)) is int and get(key) > 0]
        if found:
            sizes[name] = max(found, key=lambda found_size: found_size.value)
    return sizes


def _built_config(config: dict):
    """config.json as transformers' class for its model_type reads it, or None: an unknown
    model_type (shipped code is not run here) or values the class refuses (the load reports
    them). Cheap: a config, no model."""
    import copy

    cls = _config_class(config.get("model_type"))
    if cls is None:
        return None
    try:
        return cls.from_dict(copy.deepcopy(config))
    except Exception:
        return None


def _built_sizes(config, written, prefix: str = "", depth: int = 0):
    """The sizes of a config object (attribute_map and defaults applied), and of its sub-configs."""
    from transformers import PreTrainedConfig

    written = written if isinstance(written, dict) else {}
    yield _largest_sizes(getattr(config, "attribute_map", None), lambda key: getattr(config, key, None),
                         lambda key, name: _Size(prefix + key, getattr(config, key),
                                                 default=key not in written and name not in written))
    if depth < 3:
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if isinstance(sub, PreTrainedConfig):
                yield from _built_sizes(sub, written.get(key), f"{prefix}{key}.", depth + 1)


def _shipped_model_code(folder: Path) -> str | None:
    """The config's auto_map entry for AutoModelForCausalLM (code shipped with the model), if any."""
    try:
        config = json.loads((folder / "config.json").read_bytes())
        entry = config.get("auto_map", {}).get("AutoModelForCausalLM")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    shown = entry[0] if isinstance(entry, list) and entry else entry
    return ascii(shown)[1:-1][:120] if isinstance(shown, str) else None


def _damaged_error(path: Path, why: str) -> MlarchError:
    if path.suffix == ".bin":  # a pickle: may also hold objects that are not tensors (code)
        return MlarchError(f"weight file {path} is damaged or holds more than tensors ({why}): restore it from the "
                           "original checkpoint, download the model again or use its .safetensors weights")
    return MlarchError(f"weight file {path} is damaged or truncated ({why}): restore it from the original "
                       "checkpoint or download the model again")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _damaged_file(kind: str, weight_files: list[Path]) -> tuple[Path, str] | None:
    """The first weight file transformers would read that fails a cheap structural probe, with why."""
    if weight_files and all(f.suffix == ".gguf" for f in weight_files):
        candidates = weight_files
    else:  # the files transformers reads (not training_args.bin, adapters...), .safetensors first
        candidates = ([f for f in weight_files if f.suffix == ".safetensors" and f.name.startswith("model")]
                      or [f for f in weight_files if f.suffix == ".bin" and f.name.startswith("pytorch_model")])
    for path in sorted(candidates):
        try:
            _probe(path)
        except ImportError:  # no reader for this format: cannot tell
            continue
        except Exception as exc:  # any failure to parse a file is what we are looking for
            return path, _probe_reason(exc)
    return None


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _probe_reason(exc: BaseException) -> str:
    """The informative part of a reader's error, short: torch wraps it in advice that does not
    apply here (mlarch never unpickles a weight file with weights_only=False)."""
    if isinstance(exc, pickle.UnpicklingError):
        parts = [" ".join(p.split()) for p in str(exc).split("\n\n")]
        parts = [p for p in parts if p and not p.startswith(_TORCH_BOILERPLATE)]
        reason = f"not plain tensors: {parts[0]}" if parts else "not plain tensors"
    else:
        reason = re.sub(r"\s*\(Could this error message be improved\?.*", "", _first_line(exc))
    return reason if len(reason) <= 200 else reason[:200] + "..."


def _probe(path: Path) -> None:
    """Parse a weight file's structure without reading its tensors' data."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt"):  # checks the header and that it covers the file
            pass
    elif path.suffix == ".gguf":
        from gguf import GGUFReader

        GGUFReader(path)
    else:  # weights_only: the file is not trusted; meta: shapes only, no data read
        torch.load(path, map_location="meta", weights_only=True)
