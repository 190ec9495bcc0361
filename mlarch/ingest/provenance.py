"""What a run records about where its numbers came from (lm-evaluation-harness style)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlarch


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def git_state() -> dict | None:
    """Commit and dirty flag of the mlarch checkout, when running from one."""
    src = Path(mlarch.__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def environment(device) -> dict:
    """What a run records of where it ran: mlarch and library versions, git state, device and its name, torch threads,
    MKL_CBWR, host and platform."""
    import torch

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    return {
        "mlarch": mlarch.__version__,
        "git": git_state(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "duckdb": _version("duckdb"),
        "zarr": _version("zarr"),
        "numpy": _version("numpy"),
        "device": str(device),
        "device_name": device_name,
        # what moves float32 rounding in the forward pass, hence near-tied selections
        "torch_threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
    }


def digest_json(value) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def texts_digest(texts: list[str]) -> str:
    """sha256 over the exact texts fed to the model, in order (NUL-separated)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
