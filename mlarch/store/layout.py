"""Where things live inside an archive folder, and the lock that serialises committers."""

from __future__ import annotations

import fcntl
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path

from mlarch.errors import MlarchError

DEFAULT_ARCHIVE = "mlarch-archive"
CATALOG = "catalog.duckdb"
ARRAYS = "arrays.zarr"
LOCK = ".commit.lock"


def resolve(path: str | os.PathLike | None) -> Path:
    """--archive DIR, else $MLARCH_ARCHIVE, else ./mlarch-archive."""
    chosen = path or os.environ.get("MLARCH_ARCHIVE") or DEFAULT_ARCHIVE
    return Path(chosen).expanduser()


def ensure_folder(root: Path) -> None:
    """Create the archive folder (first use) and make sure it is writable."""
    try:
        (root / ARRAYS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _unwritable(root, exc)
    probe_writable(root, root)


def probe_writable(folder: Path, root: Path) -> None:
    """Write and delete a file in `folder` (permission bits say nothing to root)."""
    try:
        probe = folder / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _unwritable(root, exc)


def _unwritable(root: Path, exc: OSError):
    raise MlarchError(
        f"archive folder {root} is not writable ({exc.strerror or exc}): "
        "pass --archive DIR (or set MLARCH_ARCHIVE) to a writable folder"
    ) from None


def model_group(model: str) -> str:
    return f"models/{slug(model)}-{uuid.uuid5(uuid.NAMESPACE_URL, model).hex[:8]}"


def run_group(run_id: str) -> str:
    return f"runs/{run_id}"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


@contextmanager
def commit_lock(root: Path):
    """One committer at a time per archive (across processes); others wait their turn."""
    with open(root / LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
