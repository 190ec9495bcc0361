"""Load a causal LM from a local folder, a local .gguf file, or a hub id (with revision)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlarch.errors import MlarchError, UsageError
from mlarch.ingest.sources import sha256_file

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    source_kind: str  # 'folder' | 'gguf' | 'hub'
    revision: str | None
    commit_sha: str | None
    weights_sha256: str
    weight_files: dict[str, str] = field(default_factory=dict)
    architecture: str = ""
    dtype: str = "float32"
    device: torch.device = torch.device("cpu")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MlarchError("--device cuda was asked for but no CUDA device is available: use --device cpu or auto")
    if device not in {"cpu", "cuda"} and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


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


def default_name(ref: str) -> str:
    """Archive name derived from REF: the folder or file name, or the hub id's last part."""
    path = Path(ref.rstrip("/"))
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    return name or ref


def classify(ref: str) -> tuple[str, Path | None]:
    """('folder'|'gguf', path) for local references, ('hub', None) for a hub id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise UsageError(f"model path {ref} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id")
    looks_local = ref.startswith((".", "/", "~")) or ref.lower().endswith(".gguf") or not _HUB_ID.match(ref)
    if looks_local:
        raise MlarchError(
            f"model path {ref} does not exist: pass an existing model folder, a .gguf file or a hub id"
        )
    return "hub", None


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
    """sha256 of a weight file, remembered by (path, size, mtime, inode) in the user cache:
    hashing a 1 GB checkpoint costs seconds on every ingest otherwise."""
    from mlarch.ingest.demo import cache_dir

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    store = cache_dir() / "weight-digests.json"
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
    per_file = {f.name: _cached_sha256(f) for f in sorted(files)}
    h = hashlib.sha256("".join(f"{name}:{sha}\n" for name, sha in per_file.items()).encode())
    return h.hexdigest(), per_file


def load(ref: str, *, revision: str | None, device: torch.device, dtype: str) -> LoadedModel:
    kind, path = classify(ref)
    commit = None
    if kind == "hub":
        path, commit = _fetch_from_hub(ref, revision)
        folder, extra = path, {}  # the snapshot folder already is that revision
    elif kind == "gguf":
        folder, extra = path.parent, {"gguf_file": path.name}
    else:
        folder, extra = path, {}
    if kind == "gguf":
        weight_files = [path]
    else:
        weight_files = [f for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file()]
        if not weight_files and not (folder / "config.json").exists():
            raise MlarchError(
                f"model folder {folder} has no config.json or weight files: pass a transformers model folder"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=_DTYPES[dtype], **extra)
    except ImportError as exc:
        hint = " (pip install 'mlarch[gguf]')" if kind == "gguf" else ""
        raise MlarchError(f"cannot load {ref}: a library is missing: {exc}{hint}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MlarchError(f"cannot load model {ref}: {reason}") from None
    model.to(device)
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
        architecture=type(model).__name__,
        dtype=dtype,
        device=device,
    )
