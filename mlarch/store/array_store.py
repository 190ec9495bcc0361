"""Where an archive's arrays live: its own folder (<archive>/arrays.zarr, the default) or a
prefix in an S3-protocol bucket (`mlarch ingest --arrays s3://BUCKET/PREFIX` on an archive's
first ingest; the catalog records it and every later command reads it from there).

The catalog stays one local DuckDB file either way. Inside the store the layout is the one
mlarch makes (runs/<12 hex>/{norms,levels}, models/<slug>-<8 hex>/magnitudes), and every
read is checked against the catalog's digests (mlarch.store.arrays) wherever the bytes come
from. S3 settings are the standard AWS ones, read by botocore: AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
AWS_REGION (or AWS_DEFAULT_REGION), AWS_PROFILE, AWS_MAX_ATTEMPTS and the shared config and
credentials files."""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, Phrase, error, for_cli
from mlarch.store import layout

LOCAL = "local"  # what a catalog without a recorded location means: <archive>/arrays.zarr
# bucket names as S3 allows them; prefix segments of the characters mlarch's own names use
_URL = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[^?#]*))?")
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_GROUP_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_S3_FIX = "pip install 'mlarch[s3]' (s3fs)"
# what may carry a secret in a message: user:password@ in a URL, and the query parameters of a
# presigned URL (its signature, credential and session token)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_SIGNED = re.compile(r"(?P<name>X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']*", re.IGNORECASE)
# the values of these are never printed: every AWS_* variable that names a secret or token
# (AWS_SESSION_TOKEN, AWS_SECURITY_TOKEN, AWS_CONTAINER_AUTHORIZATION_TOKEN, ...)
_SECRET_NAME = re.compile(r"AWS_\w*(?:SECRET|TOKEN|PASSWORD)\w*")


def redact(text: str) -> str:
    """`text` without secrets (a URL's user:password, a presigned URL's signature, credential and
    token, the values of AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and every other AWS_*
    variable named as a secret or token): mlarch prints no secret."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    text = _SIGNED.sub(lambda m: f"{m.group('name')}***", text)
    for name, value in os.environ.items():
        if value and len(value) >= 4 and _SECRET_NAME.fullmatch(name):
            text = text.replace(value, "***")
    return text


class StoreError(UsageError):
    """The array store cannot be used as configured (missing bucket, credentials, endpoint):
    one line, exit status 2."""


def parse(url: str, arg: Arg | None = None) -> S3Arrays:
    """The S3 location of `s3://BUCKET/PREFIX` (prefix optional), or a UsageError naming
    `arg` (the argument the URL came in: arrays= / --arrays unless told)."""
    text = str(url).strip()
    match = _URL.fullmatch(text)
    name, flag = (arg.name, arg.flag) if arg is not None else ("arrays", None)
    given = Arg(name, flag=flag, shown=repr(redact(text)[:120]))
    if match is None:
        raise error(UsageError, given, " is not s3://BUCKET/PREFIX: pass e.g. "
                    "s3://my-bucket/mlarch (a bucket name of 3-63 lowercase letters, digits, dots and hyphens)")
    prefix = (match.group("prefix") or "").strip("/")
    segments = prefix.split("/") if prefix else []
    bad = [s for s in segments if not _SEGMENT.fullmatch(s)]
    if bad or len(prefix) > 512:
        raise error(UsageError, given, f": prefix segment {(bad or [prefix[:40]])[0][:40]!r} is not "
                    "letters, digits, '.', '_' and '-' (and not '.' or '..'): choose a plain prefix such as "
                         "s3://bucket/team/mlarch")
    return S3Arrays(match.group("bucket"), prefix)


class ArrayStore:
    """Base of the two kinds of location. `url` is what the catalog records (LOCAL: nothing)."""

    url = LOCAL
    remote = False

    def where(self) -> str:  # for messages
        """Where the arrays lie, for messages."""
        raise NotImplementedError


class LocalArrays(ArrayStore):
    """<archive>/arrays.zarr: zarr's LocalStore; groups are folders, never reached through a link."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"LocalArrays({str(self.folder)!r})"

    def where(self) -> str:
        """The arrays folder, for messages."""
        return str(self.folder)

    def zarr_store(self, read_only: bool):
        """A zarr LocalStore on the folder (read-only if asked)."""
        from zarr.storage import LocalStore

        return LocalStore(str(self.folder), read_only=read_only)

    def groups(self, kind: str) -> set[str]:
        """The array groups of `kind` (runs or models) present on disk, as `kind/name`."""
        folder = self.folder / kind
        if not folder.is_dir():
            return set()
        return {f"{kind}/{entry.name}" for entry in os.scandir(folder) if _is_group(entry)}

    def owned(self, group, expected: str) -> Path:
        """The folder of `group` once it is exactly `expected` (layout.UnsafePath otherwise,
        or where a symbolic link below arrays.zarr would lead elsewhere)."""
        return layout.checked_group(self.folder.parent, group, expected)

    def refuse_links(self, path: str) -> None:
        """layout.UnsafePath unless every folder of array `path` that exists below arrays.zarr
        is a folder, not a link: a write through a link planted where a model's group (named
        after the model) belongs would land, and clear a folder, wherever it points."""
        step = self.folder
        for depth, part in enumerate(path.split("/")):
            step = step / part
            try:
                mode = os.lstat(step).st_mode
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(mode):
                where = "/".join(path.split("/")[:depth + 1])
                raise layout.UnsafePath(f"arrays path {path!r} leads through {layout.ARRAYS}/{where}, which is "
                                        f"{_kind(mode)}, not a folder")

    def remove(self, handle: Path) -> None:
        """Remove a group's folder (errors ignored)."""
        shutil.rmtree(handle, ignore_errors=True)

    def size(self, handle: Path) -> int:
        """Bytes of the regular files in a group's folder (0 if it is gone)."""
        return sum(f.stat().st_size for f in handle.rglob("*") if f.is_file() and not f.is_symlink()) \
            if handle.is_dir() else 0

    def shown(self, handle: Path, root: Path) -> str:
        """A group's folder as arrays.zarr/<group>, for listings (arrays.zarr may be a link to
        a folder elsewhere, as mlarch advises: resolving it would leave the archive root)."""
        pairs = [(Path(handle), self.folder)]
        try:
            pairs.append((Path(handle).resolve(), self.folder.resolve()))
        except (OSError, RuntimeError):  # a link loop (pathlib raises RuntimeError in Python 3.11)
            pass
        for inside, base in pairs:
            try:
                return (Path(self.folder.name) / inside.relative_to(base)).as_posix()
            except ValueError:
                continue
        return str(handle)

    def open_file(self, path: str, name: str):
        """(binary handle, os.fstat of it) of file `name` (zarr.json, c/0, ...) of array `path`
        (runs/<id>/levels, ...), or None where nothing is there: the one way mlarch opens a
        local array file (reads, verify, export). A folder from elsewhere may hold, where an
        array file belongs, a link (to /dev/zero, to a copy outside the archive; a link to a
        folder anywhere on the way), a named pipe (opening it would wait for ever) or a
        device: each is UnsafeFile before a byte is read. The caller bounds the size."""
        names = [*path.split("/"), *name.split("/")] if path else name.split("/")
        if not all(part not in ("", ".", "..") for part in names):
            raise UnsafeFile(f"{name} is not a name mlarch gives an array file")
        if not _WALK:  # no dir_fd (Windows): lstat each step, then open
            return self._open_checked(path, name, names)
        try:  # arrays.zarr itself may be a link (mlarch advises it for a bigger disk)
            folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            for depth, part in enumerate(names[:-1]):
                try:  # O_NOFOLLOW: a link fails (ENOTDIR or ELOOP) instead of being followed
                    inner = os.open(part, _DIR_FLAGS, dir_fd=folder)
                except FileNotFoundError:
                    return None
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    mode = os.stat(part, dir_fd=folder, follow_symlinks=False).st_mode
                    raise UnsafeFile(_behind(name, names[:depth + 1], mode)) from None
                os.close(folder)
                folder = inner
            try:  # never opened unless a regular file: opening a device or pipe has effects of its own
                mode = os.stat(names[-1], dir_fd=folder, follow_symlinks=False).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not stat.S_ISREG(mode):
                raise UnsafeFile(f"{name} is not a plain file ({_kind(mode)})")
            try:
                fd = os.open(names[-1], _FILE_FLAGS, dir_fd=folder)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP, errno.EMLINK):
                    raise  # ELOOP: a link; ENXIO/EOPNOTSUPP: a socket; EMLINK: a link on FreeBSD
                mode = os.stat(names[-1], dir_fd=folder, follow_symlinks=False).st_mode
                raise UnsafeFile(f"{name} is not a plain file ({_kind(mode)})") from None
        finally:
            os.close(folder)
        return _plain(fd, name)

    def _open_checked(self, path: str, name: str, names: list[str]):
        """open_file where there is no dir_fd: every step lstat-ed first (no pipes here)."""
        step = self.folder
        for depth, part in enumerate(names):
            step = step / part
            try:
                mode = os.lstat(step).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return None
            if depth < len(names) - 1 and not stat.S_ISDIR(mode):
                raise UnsafeFile(_behind(name, names[:depth + 1], mode))
            if depth == len(names) - 1 and not stat.S_ISREG(mode):
                raise UnsafeFile(f"{name} is not a plain file ({_kind(mode)})")
        try:
            fd = os.open(step, _FILE_FLAGS)
        except FileNotFoundError:
            return None
        return _plain(fd, name)

    def signature(self, path: str) -> tuple:
        """Names, sizes and modification times of an array's files: an array vouched for once
        that changed since is checked again."""
        folder = self.folder / path
        entries = []
        for sub in (folder, folder / "c"):
            try:
                with os.scandir(sub) as found:
                    for entry in found:
                        if entry.is_file(follow_symlinks=False):  # a link is never read (open_file)
                            st = entry.stat(follow_symlinks=False)
                            entries.append((sub.name, entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:  # a missing folder: the read itself reports it
                pass
        try:
            where = str(self.folder.resolve())
        except (OSError, RuntimeError):  # a link loop (pathlib raises RuntimeError): the read reports it
            where = str(self.folder.absolute())
        return (where, tuple(sorted(entries)))

    def probe(self, write: bool = False) -> None:
        """Nothing to check up front: the archive folder's checks cover arrays.zarr."""

    def trouble(self, exc: BaseException) -> BaseException:
        """The error to show for a failure (a local one as it is)."""
        return exc


class UnsafeFile(MlarchError):
    """A local array file, or a folder on the way to it, that is not a plain one (a link, a
    named pipe, a device); callers add the fix."""


_NOFOLLOW, _NONBLOCK = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_NONBLOCK", 0)
_WALK = os.open in os.supports_dir_fd and bool(_NOFOLLOW) and hasattr(os, "O_DIRECTORY")
# O_NONBLOCK: a named pipe opens at once (and fstat refuses it) instead of waiting for a writer
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _NONBLOCK
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0) | _NOFOLLOW | _NONBLOCK


def _kind(mode: int) -> str:
    """What a file of `mode` is, for messages."""
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISREG, "a file")):
        if test(mode):
            return what
    return "not a plain file"


def _behind(name: str, parts: list[str], mode: int) -> str:
    """Why array file `name` is refused when parts[-1] of its path is no folder."""
    where = f"{layout.ARRAYS}/{'/'.join(parts)}"
    if stat.S_ISLNK(mode):
        return f"{name} lies behind a symbolic link, {where} (mlarch follows no link inside {layout.ARRAYS})"
    return f"{name} lies behind {where}, which is {_kind(mode)}, not a folder"


def _plain(fd: int, name: str):
    """(handle, fstat) of an opened array file once it is a regular file (fd closed otherwise)."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{name} is not a plain file ({_kind(info.st_mode)})")
        return open(fd, "rb", closefd=True), info
    except BaseException:
        os.close(fd)
        raise


def _is_group(entry: os.DirEntry) -> bool:
    """Whether a scanned entry of arrays.zarr/runs or /models is a group: a folder, or a link
    that cannot be followed (a loop), which verify lists and gc leaves alone as links."""
    try:
        return entry.is_dir()
    except OSError:  # ELOOP: a link to itself
        return entry.is_symlink()


class S3Arrays(ArrayStore):
    """s3://BUCKET/PREFIX through s3fs: zarr's FsspecStore on an async S3FileSystem for arrays,
    a synchronous one for listing, removing, sizes, export and import."""

    remote = True

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.base = f"{bucket}/{prefix}" if prefix else bucket  # s3fs paths: no scheme

    def __repr__(self) -> str:
        return f"S3Arrays({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, S3Arrays) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def where(self) -> str:
        """The s3:// URL of the arrays, for messages."""
        return self.url

    def endpoint(self) -> str:
        """The S3 endpoint in use (AWS_ENDPOINT_URL, else AWS S3), for messages."""
        return redact(_endpoint() or "AWS S3")

    # --- zarr ---------------------------------------------------------------------------
    def zarr_store(self, read_only: bool):
        """A zarr FsspecStore on the bucket prefix (read-only if asked)."""
        from zarr.storage import FsspecStore

        return FsspecStore(_filesystem(asynchronous=True), read_only=read_only, path=self.base)

    # --- groups, as mlarch lays them out ------------------------------------------------
    def _key(self, path: str) -> str:
        """The s3fs path of `path` inside the prefix, once it is made of plain names: a key
        from a catalog row can address nothing outside the prefix ('..', '.', '', '/x' refused;
        zarr refuses them too, but listings, removals and exports come through here)."""
        if not isinstance(path, str) or not all(_GROUP_SEGMENT.fullmatch(s) for s in path.split("/")):
            raise layout.UnsafePath(f"arrays path {redact(str(path))[:120]!r} is not made of plain names")
        return f"{self.base}/{path}"

    def groups(self, kind: str) -> set[str]:
        """`kind/<name>` of every "folder" (common prefix) under PREFIX/kind."""
        fs = _filesystem()
        try:
            entries = self._call(fs.ls, self._key(kind), detail=True)
        except FileNotFoundError:
            return set()
        found = set()
        for entry in entries:
            if entry.get("type") == "directory":
                name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
                found.add(f"{kind}/{name}")
        return found

    def owned(self, group, expected: str) -> str:
        """`group` once it is exactly `expected` and made of plain names (no '.', '..' or
        empty segment could address another prefix); layout.UnsafePath otherwise."""
        if group != expected:
            raise layout.UnsafePath(f"arrays path {str(group)[:120]!r} is not the expected {expected!r}")
        if not all(_GROUP_SEGMENT.fullmatch(s) for s in expected.split("/")):
            raise layout.UnsafePath(f"arrays path {expected[:120]!r} is not made of plain names")
        return expected

    def _objects(self, group: str) -> dict[str, dict]:
        """key -> info of every object under PREFIX/group/ (the slash: runs/ab is not runs/abc)."""
        fs = _filesystem()
        prefix = self._key(group) + "/"
        try:
            found = self._call(fs.find, prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {key: info for key, info in found.items() if key.startswith(prefix)}

    def remove(self, group: str) -> None:
        """Remove every object of a group."""
        keys = sorted(self._objects(group))
        if keys:
            self._call(_filesystem().rm, keys)

    def exists(self, group: str) -> bool:
        """Whether a group has any object."""
        return bool(self._objects(group))

    def size(self, group: str) -> int:
        """Bytes of a group's objects."""
        return sum(int(info.get("size") or 0) for info in self._objects(group).values())

    def shown(self, group: str, root: Path) -> str:
        """A group's s3:// URL, for listings."""
        return f"{self.url}/{group}"

    def signature(self, path: str) -> tuple:
        """Keys, sizes and ETags of an array's objects (a vouched array that changed since is
        checked again)."""
        found = self._objects(path)
        return (self.url, tuple(sorted((key, info.get("size"), info.get("ETag")) for key, info in found.items())))

    # --- export and import ------------------------------------------------------------
    @contextmanager
    def member(self, path: str, name: str):
        """(readable handle, size) of one stored object of array `path` (name: zarr.json, c/0...)."""
        fs = _filesystem()
        key = self._key(f"{path}/{name}")
        try:
            size = int(self._call(fs.info, key)["size"])
            handle = self._call(fs.open, key, "rb")
        except FileNotFoundError:
            raise MlarchError(f"array object {self.url}/{path}/{name} is missing: run `mlarch verify` to list "
                              "damage") from None
        with handle:
            yield handle, size

    def upload(self, folder: Path, path: str) -> None:
        """Copy the array folder `folder` (zarr.json, c/<i>: regular files only) to PREFIX/path."""
        fs = _filesystem()
        for file in sorted(folder.rglob("*")):
            if file.is_symlink() or not file.is_file():
                continue
            relative = file.relative_to(folder).as_posix()
            self._call(fs.put_file, str(file), self._key(f"{path}/{relative}"))

    # --- which archive's arrays these are ------------------------------------------------
    def claimant(self) -> str | None:
        """The archive identity the prefix's OWNER object names (None: no such object)."""
        fs = _filesystem()
        try:
            with self._call(fs.open, f"{self.base}/{OWNER}", "rb") as handle:
                raw = handle.read(_OWNER_LIMIT + 1)
        except FileNotFoundError:
            return None
        try:
            found = json.loads(raw) if len(raw) <= _OWNER_LIMIT else None
        except (ValueError, RecursionError):
            found = None
        archive = found.get("archive") if isinstance(found, dict) else None
        if not isinstance(archive, str) or not re.fullmatch(r"[0-9a-f]{32}", archive):
            raise StoreError(f"{self.url}/{OWNER} is not an owner record mlarch writes: the prefix holds something "
                             "else; give this archive a prefix of its own")
        return archive

    def claim(self, archive: str) -> None:
        """Write the OWNER object naming `archive` where the prefix has none. The write is
        conditional (If-None-Match): of two archives claiming one empty prefix at once, one
        wins and the other is refused here. A client or server without conditional writes
        (botocore before 1.35, some S3-compatible servers) gets a plain write and a read-back."""
        fs, key = _filesystem(), f"{self.base}/{OWNER}"
        body = json.dumps({"archive": archive, "by": "mlarch"}).encode()
        try:
            fs.pipe_file(key, body, IfNoneMatch="*")
        except Exception as exc:  # noqa: BLE001 - a lost race (412), an unsupported condition, or trouble
            names, text = {cls.__name__ for cls in type(exc).__mro__}, str(exc)
            if names & {"ParamValidationError", "NotImplementedError"} or "NotImplemented" in text \
                    or "IfNoneMatch" in text:
                self._call(fs.pipe_file, key, body)
            elif self.claimant() is None:  # no claim there: not a lost race (s3fs < 2024.10 reports a 412 as OSError)
                raise self.trouble(exc) from None
        found = self.claimant()
        if found != archive:
            raise claimed_by_another(self, found, archive)

    # --- checks ---------------------------------------------------------------------------
    def probe(self, write: bool = False) -> None:
        """One request (list PREFIX/), or a write and delete of a probe object: a missing
        bucket, wrong credentials or an unreachable endpoint is one clear error up front."""
        fs = _filesystem()
        if write:
            key = f"{self.base}/.write-probe-{uuid.uuid4().hex}"  # a name of ours: no catalog row's
            self._call(fs.pipe_file, key, b"")
            self._call(fs.rm_file, key)
        else:
            self._call(fs.call_s3, "list_objects_v2", Bucket=self.bucket,
                       Prefix=f"{self.prefix}/" if self.prefix else "", MaxKeys=1)

    def _call(self, function, *args, **kwargs):
        """function(...), its S3 failures turned into one-line errors (FileNotFoundError of a
        key passes: the caller decides what a missing object means)."""
        try:
            return function(*args, **kwargs)
        except FileNotFoundError as exc:
            if _bucket_missing(exc):
                raise self.trouble(exc) from None
            raise
        except StoreError:
            raise
        except Exception as exc:
            raise self.trouble(exc) from None

    def trouble(self, exc: BaseException) -> BaseException:
        """The one-line error for an S3 failure (exc itself where it is not one)."""
        if isinstance(exc, StoreError):
            return exc
        text = redact(" ".join(str(exc).split()))[:160] or type(exc).__name__
        names = {cls.__name__ for cls in type(exc).__mro__}
        if (isinstance(exc, FileNotFoundError) and _bucket_missing(exc)) or "NoSuchBucket" in text:
            return error(StoreError, f"bucket {self.bucket!r} does not exist at {self.endpoint()} (arrays at "
                         f"{self.url}): create it, or check the archive's ", Arg("arrays"), " URL and AWS_ENDPOINT_URL")
        if "NoCredentialsError" in names or "Unable to locate credentials" in text:
            return StoreError(f"no AWS credentials for {self.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                              "or AWS_PROFILE")
        # before "refused": an older s3fs (2024.6.1, the floor) reports a failed connection as a PermissionError
        if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                    "ServerDisconnectedError", "ReadTimeoutError", "FSTimeoutError", "TimeoutError"} \
                or isinstance(exc, (ConnectionError, TimeoutError)) or "Could not connect" in text:
            return StoreError(f"cannot reach the S3 endpoint {self.endpoint()} for {self.url} ({text[:100]}): "
                              "check AWS_ENDPOINT_URL and the network")
        if isinstance(exc, PermissionError) or any(code in text for code in (
                "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403")):
            return StoreError(f"access to {self.url} at {self.endpoint()} was refused ({text[:100]}): check "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's policy")
        if "InvalidEndpoint" in names or "ValueError" in names and "endpoint" in text.lower():
            return StoreError(f"S3 endpoint {redact(_endpoint() or '')!r} is not a valid URL: set AWS_ENDPOINT_URL "
                              "to e.g. http://127.0.0.1:9000")
        return StoreError(f"S3 request for {self.url} at {self.endpoint()} failed ({type(exc).__name__}: {text}): "
                          "check the bucket, credentials and AWS_ENDPOINT_URL")


def _bucket_missing(exc: BaseException) -> bool:
    return "NoSuchBucket" in str(exc) or "bucket does not exist" in str(exc).lower()


# --- s3fs file systems, one per set of AWS settings (a botocore client costs ~50 ms) ------
_FILESYSTEMS: dict[tuple, object] = {}
_FILESYSTEMS_LOCK = threading.Lock()
_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
             "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _filesystem(asynchronous: bool = False):
    """An s3fs S3FileSystem for the AWS settings in the environment now (a changed setting
    gets a new one). No listings cache: other processes write the same prefix."""
    try:
        import s3fs
    except ImportError:
        raise StoreError(f"arrays on S3 need s3fs, which is not installed: {_S3_FIX}") from None
    settings = tuple(os.environ.get(name) for name in _SETTINGS)
    key = (asynchronous, hashlib.sha256(repr(settings).encode()).hexdigest())
    with _FILESYSTEMS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            client = {}
            if _endpoint():
                client["endpoint_url"] = _endpoint()
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                client["region_name"] = region
            config = {"connect_timeout": 5, "read_timeout": 60}
            if not os.environ.get("AWS_MAX_ATTEMPTS"):  # else botocore's own reading of it
                config["retries"] = {"max_attempts": 3}  # an unreachable endpoint: ~6 s, not botocore's ~20
            # max_concurrency=1: a chunk is one GET (s3fs would first ask its size with a HEAD)
            fs = s3fs.S3FileSystem(asynchronous=asynchronous, skip_instance_cache=True, use_listings_cache=False,
                                   max_concurrency=1, client_kwargs=client, config_kwargs=config)
            if asynchronous and not any(k[0] for k in _FILESYSTEMS):
                atexit.register(_close_sessions)  # after zarr's own handler: runs first, its loop still up
            _FILESYSTEMS[key] = fs
        return fs


def _close_sessions() -> None:
    """Close the async file systems' HTTP sessions in zarr's event loop, where they were
    opened (else aiohttp prints "Unclosed client session" as the process exits)."""
    from zarr.core.sync import sync

    for (asynchronous, _), fs in list(_FILESYSTEMS.items()):
        client = getattr(fs, "_s3", None)
        if asynchronous and client is not None:
            try:
                sync(client.__aexit__(None, None, None), timeout=2)
            except Exception:  # exiting anyway
                pass


# --- the location an archive's catalog records ---------------------------------------------
def recorded(catalog_path: Path) -> str | None:
    """The URL of the archive's arrays as its catalog records it (None: its arrays.zarr)."""
    import duckdb

    from mlarch.store import catalog

    with catalog.reading(catalog_path) as con:
        try:
            row = con.execute("SELECT url FROM array_location").fetchone()
        except duckdb.Error as exc:  # dropped or altered by hand (`sql --write`)
            raise MlarchError(f"catalog {catalog_path} cannot say where its arrays are ({' '.join(str(exc).split())[:100]}): "
                              "restore the catalog from a copy") from None
    return None if row is None else row[0]


# At the top of an S3 prefix: which archive's arrays lie there. Two archives given one prefix
# would each list the other's runs as orphans (gc deleting them) and write |W| over the
# other's (model groups are named after the model): the second is refused, and rm, gc and
# later ingests check the claim first. The identity is the catalog's location row's (URL and
# the time its first ingest recorded it): no schema change, and unique per archive.
OWNER = "mlarch-archive.json"
_OWNER_LIMIT = 4096


def identity(catalog_path: Path) -> str | None:
    """The archive's identity for the OWNER object (None: its arrays are in its folder)."""
    from mlarch.store import catalog

    with catalog.reading(catalog_path) as con:
        row = con.execute("SELECT url, recorded_at FROM array_location").fetchone()
    return None if row is None else _identity(*row)


def _identity(url: str, recorded_at) -> str:
    return hashlib.sha256(f"{url}\n{recorded_at.isoformat()}".encode()).hexdigest()[:32]


def for_changes(root: Path, claim: bool = True) -> ArrayStore:
    """The archive's store for rm, gc and ingest, once an S3 prefix is this archive's: its OWNER
    object names this archive (written now where an archive made before it has none, unless
    not `claim`: a dry run changes nothing)."""
    store = of(root)
    if store.remote:
        mine, found = identity(Path(root) / layout.CATALOG), store.claimant()
        if found is None:
            if claim:
                store.claim(mine)
        elif found != mine:
            raise claimed_by_another(store, found, mine)
    return store


def claimed_by_another(store: "S3Arrays", found: str | None, mine: str) -> StoreError:
    """The refusal when the prefix's OWNER object names another archive than `mine`."""
    return error(StoreError, f"{store.url} holds the arrays of another mlarch archive (its {OWNER} names "
                 f"{str(found)[:12]}, this archive is {mine[:12]}): nothing was changed; each archive needs a "
                 "prefix of its own (the catalog's recorded location may have been edited: ",
                 Phrase("Archive.verify()", "`mlarch verify`"), ")")


_OPENED: dict[tuple, ArrayStore] = {}
_OPENED_LOCK = threading.Lock()


def of(root: Path) -> ArrayStore:
    """Where the arrays of the archive at `root` live: the S3 prefix its catalog records
    (probed once per process and settings: a missing bucket, wrong credentials or an
    unreachable endpoint is a one-line error before any work), else <root>/arrays.zarr."""
    root = Path(root)
    catalog_path = root / layout.CATALOG
    url = recorded(catalog_path) if catalog_path.exists() else None
    if url is None:
        return LocalArrays(root / layout.ARRAYS)
    try:
        store = parse(url)
    except UsageError as exc:
        raise error(StoreError, f"the catalog of {root} records arrays at {str(url)[:120]!r}, which is not an s3:// "
                    "URL mlarch makes (", Phrase(str(exc), for_cli(exc)), "): restore the catalog from a copy") from None
    key = (store.url, tuple(os.environ.get(name) for name in _SETTINGS))
    with _OPENED_LOCK:
        known = _OPENED.get(key)
    if known is not None:
        return known
    store.probe()
    with _OPENED_LOCK:
        _OPENED[key] = store
    return store


def coerce(where) -> ArrayStore:
    """An ArrayStore as it is, a folder path as LocalArrays (the arrays.zarr folder itself)."""
    return where if isinstance(where, ArrayStore) else LocalArrays(Path(where))


def _has_arrays(catalog_path: Path) -> bool:
    from mlarch.store import catalog

    with catalog.reading(catalog_path) as con:
        return con.execute("SELECT count(*) FROM arrays").fetchone()[0] > 0


def for_ingest(root: Path, url: str | None) -> ArrayStore:
    """The store an ingest into `root` writes to, checked before any expensive work: the
    location the catalog records (an --arrays that differs is a UsageError), else `url` for
    an archive without arrays yet; a remote one is probed with a write."""
    requested = parse(url) if url is not None else None
    catalog_path = Path(root) / layout.CATALOG
    if catalog_path.exists():
        current = recorded(catalog_path)
        if current is None and requested is not None and _has_arrays(catalog_path):
            raise error(UsageError, f"archive {root} keeps its arrays in its folder ({layout.ARRAYS}); ",
                        Arg("arrays", shown=requested.url), " differs: drop ", Arg("arrays"),
                        ", or start a new archive for arrays on S3")
        if current is not None and requested is not None and requested.url != current:
            raise error(UsageError, f"archive {root} keeps its arrays at {current} (recorded by its first ingest); ",
                        Arg("arrays", shown=requested.url), " differs: drop ", Arg("arrays"), f" or pass {current}")
        if current is not None:
            requested = for_changes(root)
            requested.probe(write=True)
            return requested
    if requested is None:
        return LocalArrays(Path(root) / layout.ARRAYS)
    requested.probe(write=True)
    if requested.claimant() is not None or requested.groups("runs") or requested.groups("models"):
        name = Path(root).name if _SEGMENT.fullmatch(Path(root).name) else "archive2"
        sibling = f"s3://{requested.bucket}/" + "/".join([*requested.prefix.split("/")[:-1], name]).strip("/")
        raise error(UsageError, Arg("arrays", shown=requested.url), " already holds another mlarch archive's "
                    f"arrays: give this archive a prefix of its own (e.g. {sibling})")
    return requested


def record(root: Path, store: ArrayStore) -> None:
    """Record a remote location in the catalog (its first ingest), once; LOCAL records nothing."""
    from mlarch.store import catalog

    store = coerce(store)
    if not store.remote:
        return
    with catalog.writing(Path(root) / layout.CATALOG) as con:
        row = con.execute("SELECT url FROM array_location").fetchone()
        if row is not None:
            if row[0] != store.url:  # another ingest recorded another one meanwhile
                raise error(UsageError, f"archive {root} keeps its arrays at {row[0]}; ",
                            Arg("arrays", shown=store.url), " differs: drop ", Arg("arrays"), f" or pass {row[0]}")
            return
        if con.execute("SELECT count(*) FROM arrays").fetchone()[0] > 0:
            raise error(UsageError, f"archive {root} keeps its arrays in its folder ({layout.ARRAYS}); ",
                        Arg("arrays", shown=store.url), " differs: drop ", Arg("arrays"))
        con.execute("INSERT INTO array_location VALUES (1, ?, now()::TIMESTAMP)", [store.url])
        # in the transaction: no location row without its claim
        store.claim(_identity(*con.execute("SELECT url, recorded_at FROM array_location").fetchone()))


__all__ = ["ArrayStore", "LocalArrays", "S3Arrays", "StoreError", "UnsafeFile", "coerce", "for_changes", "for_ingest",
           "identity", "of", "parse", "record", "recorded", "redact"]
