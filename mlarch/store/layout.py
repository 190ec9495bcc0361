"""Where things live inside an archive folder, and the lock that serialises committers."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Phrase, error

DEFAULT_ARCHIVE = "mlarch-archive"
CATALOG = "catalog.duckdb"
ARRAYS = "arrays.zarr"
LOCK = ".commit.lock"


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def resolve(path: str | os.PathLike | None) -> Path:
    """--archive DIR, else $MLARCH_ARCHIVE, else ./mlarch-archive. A URL is refused here:
    Path('s3://b/p') would be a folder named 's3:' (a published s3:// archive is fetched by
    mlarch.store.remote_catalog.resolve, which mlarch.open uses)."""
    chosen = path or os.environ.get("MLARCH_ARCHIVE") or DEFAULT_ARCHIVE
    if _URL.match(os.fspath(chosen)):
        raise error(UsageError, f"archive {str(os.fspath(chosen))[:120]!r} is a URL: an archive is a local folder, or "
                    "a published one at s3://BUCKET/PREFIX (opened by ",
                    Phrase("mlarch.open); pass mlarch.open(DIR) or mlarch.open('s3://BUCKET/PREFIX')",
                           "mlarch.open / --archive); pass --archive DIR or --archive s3://BUCKET/PREFIX"))
    return Path(chosen).expanduser()


def ensure_folder(root: Path) -> None:
    """Create the archive folder (first use) and make sure it is writable."""
    refuse_snapshot(root)
    try:
        (root / ARRAYS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _unwritable(root, exc)
    probe_writable(root, root)


SNAPSHOT = "published-snapshot.json"  # marks a fetched copy of a published archive (store.remote_catalog)
_SNAPSHOT_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]{1,512})?")


def refuse_snapshot(root: Path) -> None:
    """A UsageError if `root` is a fetched copy of a published archive: every writer (ingest,
    eval, rm, gc, import-bundle, sql --write) stops here first; what it would change is the
    publisher's archive."""
    marker = Path(root) / SNAPSHOT
    if not os.path.lexists(marker):
        return
    try:  # our own record, but shown only if it still looks like one
        import json

        url = json.loads(marker.read_text())["url"]
        url = url if _SNAPSHOT_URL.fullmatch(url) else "s3://..."
    except Exception:
        url = "s3://..."
    raise error(UsageError, f"archive {url} is a published read-only snapshot (fetched into {root}): run commands "
                "that change an archive on the archive it was published from, then ",
                Phrase(f"mlarch.open(DIR).publish({url!r})", f"`mlarch --archive DIR publish {url}`"), " again")


def probe_writable(folder: Path, root: Path) -> None:
    """Write and delete a file in `folder` (permission bits say nothing to root)."""
    try:
        probe = folder / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _unwritable(root, exc)


def _unwritable(root: Path, exc: OSError):
    raise error(MlarchError, f"archive folder {root} is not writable ({exc.strerror or exc}): ",
                Phrase("pass mlarch.open(DIR) a writable folder (or set MLARCH_ARCHIVE to one)",
                       "pass --archive DIR (or set MLARCH_ARCHIVE) to a writable folder")) from None


def model_group(model: str) -> str:
    """The arrays group of a model: models/<slug of its name>-<8 hex digits of a uuid5 of the name>."""
    return f"models/{slug(model)}-{uuid.uuid5(uuid.NAMESPACE_URL, model).hex[:8]}"


def run_group(run_id: str) -> str:
    """The arrays group of a run: runs/<run_id>."""
    return f"runs/{run_id}"


def new_run_id() -> str:
    """A fresh run id: 12 random hex digits."""
    return uuid.uuid4().hex[:12]


# Paths read from a catalog row or a bundle are hostile: mlarch reads, writes and removes
# only the groups it would have made itself, and never through a symbolic link.
RUN_ID = re.compile(r"[0-9a-f]{12}")  # what new_run_id makes
RUN_ARRAYS = ("norms", "levels")  # array names inside a run's group
MODEL_ARRAYS = ("magnitudes",)  # inside a model's group


class UnsafePath(MlarchError):
    """A group or array path that is not where mlarch puts arrays; callers add the fix."""


def run_arrays_group(run_id) -> str:
    """run_group(run_id), for a run id of the form mlarch makes (nothing else can reach a path)."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise UnsafePath(f"run id {str(run_id)[:80]!r} is not 12 lowercase hex digits")
    return run_group(run_id)


def array_path(group: str, name: str) -> str:
    """Where array `name` (norms, levels, magnitudes) of a group lies inside arrays.zarr."""
    return f"{group}/{name}"


def owned_array_path(owner, kind) -> str:
    """Where mlarch puts the array of `kind` owned by `owner` (a run id, or for |W| the model
    that archived it): the only path a catalog row of that array may name."""
    if kind in RUN_ARRAYS:
        return array_path(run_arrays_group(owner), kind)
    if kind in MODEL_ARRAYS and isinstance(owner, str):
        return array_path(model_group(owner), kind)
    raise UnsafePath(f"an array of kind {str(kind)[:40]!r} owned by {str(owner)[:80]!r} is not one mlarch writes")


def checked_group(root: Path, group, expected: str) -> Path:
    """The folder of `group` (a group, or an array path inside one) in root/arrays.zarr,
    once it is exactly `expected` and no symbolic link below arrays.zarr leads elsewhere."""
    if group != expected:
        raise UnsafePath(f"arrays path {str(group)[:120]!r} is not the expected {expected!r}")
    try:  # pathlib (3.11) raises RuntimeError, not OSError, for a link loop
        base = (root / ARRAYS).resolve()
        target = base.joinpath(*expected.split("/"))
        resolved = target.resolve()
    except (RuntimeError, OSError) as exc:
        raise UnsafePath(f"arrays path {expected!r} leads through a symbolic link loop "
                         f"({getattr(exc, 'strerror', None) or exc})") from None
    if resolved != target:  # a link anywhere below arrays.zarr, even one pointing inside
        raise UnsafePath(f"arrays path {expected!r} leads through a symbolic link (to {resolved})")
    return target


STAGING_PREFIX = ".import-"
_STAGING = re.compile(r"\.import-([0-9a-f]{8})-([1-9][0-9]{0,9})-[0-9a-f]{8}")


def host_tag() -> str:
    """A short digest of this host's name (staging folder names carry it, not the name)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def staging_name() -> str:
    """`.import-<host>-<pid>-<random>`: gc can tell whether the importing process is gone."""
    return f"{STAGING_PREFIX}{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def staging_owner(name: str) -> tuple[str, int] | None:
    """(host tag, pid) of a staging folder's importer; None for a name without them."""
    match = _STAGING.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else None


def slug(text: str) -> str:
    """`text` with every run of characters other than letters, digits, '.', '_' and '-' made one '-' ('model' if
    nothing is left)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


@contextmanager
def commit_lock(root: Path, notify=None):
    """One committer at a time per archive (across processes and threads); others wait their
    turn. A wait is announced once (`notify(text)`, by default one line on stderr): a commit
    waiting behind another process must not look like a hang."""
    refuse_snapshot(root)
    with file_lock(root / LOCK, "the commit lock", "mlarch commits only where files can be locked (flock or "
                   "Windows); commit from such a system",
                   waiting=f"waiting for another mlarch process to finish writing {root} (its commit lock is held) ...",
                   notify=notify, unwritable=lambda exc: _unwritable(root, exc)):
        yield


_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # a read-only folder or file system, or not ours


def _to_stderr(text: str) -> None:
    """The default notice of a lock wait: one line on stderr (the library has no other channel
    for rm and gc; ingest's progress goes there too)."""
    print(text, file=sys.stderr, flush=True)


@contextmanager
def file_lock(path: Path, what: str, unsupported: str, waiting: str | None = None, notify=None, unwritable=None):
    """Hold an exclusive lock on the plain file `path` (created if missing), waiting for it.

    The file is opened here, never through a link; filelock's lock_descriptor locks it (flock on
    POSIX, LockFileEx on Windows), so nothing here needs fcntl. Not filelock.FileLock: where flock
    is missing it falls back to a marker file that a crashed holder leaves behind for ever.
    `what` names the lock in errors; `unsupported` is the fix where files cannot be locked.
    The lock is tried first without waiting; held by another, `notify(waiting)` is called once
    (default: the line on stderr) before the wait. `unwritable(exc)` raises the error for a lock
    that cannot be created because its folder is read-only or not ours (default: a generic one)."""
    from filelock import lock_descriptor, unlock_descriptor  # ~70 ms to import: lock holders only

    try:  # a planted link would make every lock create a file elsewhere; O_NOFOLLOW refuses it,
        if os.path.islink(path):  # and this check does where there is no O_NOFOLLOW (Windows)
            raise OSError(errno.ELOOP, "a symbolic link")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE and not os.path.isdir(path):  # nothing there to remove: the folder is the trouble
            if unwritable is not None:
                unwritable(exc)
            raise MlarchError(f"cannot open {what} {path} ({exc.strerror or exc}): its folder {path.parent} is not "
                              "writable; make it writable, or use another folder") from None
        raise MlarchError(f"cannot open {what} {path} ({exc.strerror or exc}): mlarch makes it a "
                          "plain file; remove whatever is there") from None
    try:
        try:
            if not lock_descriptor(fd, blocking=False):  # held by another process (or thread)
                (notify or _to_stderr)(waiting or f"waiting for {what} {path}, held by another mlarch process ...")
                lock_descriptor(fd)  # waits its turn (polls every 50 ms)
        except OSError as exc:  # ENOSYS: this Python has neither flock nor LockFileEx
            raise MlarchError(f"cannot lock {what} {path} ({exc.strerror or exc}): {unsupported}") from None
        try:
            yield
        finally:
            unlock_descriptor(fd)
    finally:
        os.close(fd)
