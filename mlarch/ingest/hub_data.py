"""Hugging Face Hub data sets as sources: ``hf:OWNER/NAME[@REVISION]:SPLIT[:CONFIG]``.

    hf:openai/gsm8k:test:main                          GSM8K's test split, config main
    hf:openai/gsm8k@<40-hex commit>:test:main          the same, pinned by the user
    hf:OWNER/mgsm-parquet:test:{lang}                  one config per language
    hf:OWNER/NAME@refs/convert/parquet:test:{lang}     the hub's own parquet conversion

``{lang}`` in SPLIT or CONFIG is replaced by each language code; without it every language
reads the same split. REVISION is a branch, tag or commit (default: main); whatever it names,
the first language resolves it to a commit and every later language reads that commit, so
one ingest reads one version. The files come through huggingface_hub (snapshot_download)
into the one mlarch cache: $MLARCH_CACHE/data/hub (else ~/.cache/mlarch/data/hub), in
huggingface_hub's cache layout; HF_HUB_OFFLINE=1 reads only what is there.

Which files are a split: the snapshot's .parquet and .jsonl files (under the folder CONFIG/
when a config is given) that sit in a folder named SPLIT or whose name is SPLIT.<ext> or
starts with SPLIT- (the hub's shard names: test-00000-of-00001.parquet), in path order. Files of
one split spread over several folders (two configs, say) are refused: name the CONFIG.

Columns: a ``text`` column verbatim, else ``question`` and ``answer`` (GSM8K's), as for data
files (mlarch.ingest.datafiles); any other table is refused, naming its columns. Each file's
sha256 and the commit go into the run's provenance and identity (`files` keys are
``hf://datasets/OWNER/NAME@COMMIT/PATH``), so a rerun reads the very same bytes or is a new run.

A split's files are bounded as a local data file is: at most datafiles.MAX_FILE_BYTES for one
language, on disk and once decoded (parquet compresses and dictionary-encodes: a few hundred
bytes can hold a gigabyte of text), refused before they are read into memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mlarch.errors import MlarchError, UsageError
from mlarch.ingest.datafiles import (MAX_FILE_BYTES, MAX_LINES, TEXT_TEMPLATES, LoadedItems, check_line_count, decoded,
                                     jsonl_records, parse_rows, sha256_file, shown_columns, text_lines,
                                     unknown_template)

PREFIX = "hf:"
SYNTAX = "hf:OWNER/NAME[@REVISION]:SPLIT[:CONFIG], e.g. hf:openai/gsm8k:test:main"
_REPO = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # fullmatch
_PART = re.compile(r"(?:[\w.-]|\{lang\}){1,128}")  # split, config: fullmatch
_REVISION = re.compile(r"[\w.][\w./-]{0,254}")  # branch, tag, refs/convert/parquet or commit: fullmatch
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SUFFIXES = (".parquet", ".jsonl")


def _fail(spec: str, problem: str) -> UsageError:
    shown = spec if spec.isprintable() else ascii(spec)
    return UsageError(f"hub data set {shown[:160]!r}: {problem}: use {SYNTAX}")


@dataclass(frozen=True)
class HubSpec:
    """A hub data set reference: repository, revision, split and configuration."""
    repo: str
    revision: str | None
    split: str
    config: str | None


def parse(spec: str) -> HubSpec:
    """The parts of ``hf:OWNER/NAME[@REVISION]:SPLIT[:CONFIG]``; a one-line UsageError otherwise."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        raise _fail(str(spec), "does not start with hf:")
    parts = spec[len(PREFIX):].split(":")
    if len(parts) not in (2, 3):
        raise _fail(spec, "expected a repository, a split and optionally a config, separated by ':'")
    where, split = parts[0], parts[1]
    config = parts[2] if len(parts) == 3 else None
    repo, at, revision = where.partition("@")
    if not _REPO.fullmatch(repo):
        raise _fail(spec, f"{repo!r} is not a data set id OWNER/NAME")
    if at and (not _REVISION.fullmatch(revision) or ".." in revision or revision.endswith("/")):
        raise _fail(spec, f"revision {revision!r} is not a branch, tag or commit")
    if "{lang}" in repo or "{lang}" in revision:
        raise _fail(spec, "{lang} may appear in SPLIT or CONFIG only")
    if not _PART.fullmatch(split) or split.strip(".") == "":
        raise _fail(spec, f"split {split!r} is not a split name such as test or train")
    if config is not None and (not _PART.fullmatch(config) or config.strip(".") == ""):
        raise _fail(spec, f"config {config!r} is not a config name such as main or en")
    return HubSpec(repo, revision if at else None, split, config)


def split_files(folder: Path, split: str, config: str | None) -> list[str]:
    """Relative paths (POSIX, sorted) of the split's data files in a snapshot folder (rule in the
    module docstring); [] when there are none. Several folders holding the split are refused."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.suffix not in _SUFFIXES or not path.is_file() or rel.startswith("."):
            continue
        parts = rel.split("/")
        if config is not None:
            if parts[0] != config:
                continue
            parts = parts[1:]
        folders, name = parts[:-1], parts[-1]
        if split in folders:
            home = "/".join(parts[: folders.index(split)])
        elif name.split(".")[0] == split or name.startswith(f"{split}-"):
            home = "/".join(folders)
        else:
            continue
        found.append((home, rel))
    homes = sorted({home for home, _ in found})
    if len(homes) > 1:
        raise UsageError(f"split {split!r} has files in several folders ({', '.join(h or '.' for h in homes[:5])}): "
                          "name the config, hf:OWNER/NAME:SPLIT:CONFIG, where CONFIG is the folder to read")
    return [rel for _, rel in found]


# Every column parse_rows reads of a row: only these are decoded (a table's other columns can be anything).
_TEXT_COLUMNS = ("text", "question", "answer", "qa", "solution")
# A row costs at least what its JSON line would ('{"text":"a"}\n' is 13 bytes): a hundred million empty rows,
# a few kilobytes as parquet, are bounded as they are in a local file.
ROW_BYTES = 16


class _Room:
    """The bytes a language's files have taken: MAX_FILE_BYTES, the bound of a local data file, bounds them all
    (a thousand shards of a megabyte hold a gigabyte too)."""

    def __init__(self):
        self.used = 0

    def check(self, label: str, size: int, amount: str) -> None:
        """Refuse the file `label` unless `size` more bytes fit; `amount`: the size in words."""
        if self.used + size <= MAX_FILE_BYTES:
            return
        earlier = f" (and the split's earlier files {self.used:,})" if self.used else ""
        raise MlarchError(f"{label} {amount.format(size)}{earlier}, more than the {MAX_FILE_BYTES:,} bytes mlarch "
                          "reads for one language (as from a local data file): pick a smaller split or config, or "
                          "save the items you need to a local .jsonl file")


def _declared(meta, leaves: list[int]) -> int:
    """What the parquet metadata says the `leaves` (column indices) take decoded: each chunk's uncompressed pages
    and at least 8 bytes a value (an offset, a number; more for fixed-length strings), and ROW_BYTES a row. A
    dictionary-encoded chunk's values are counted once here, however many rows repeat them: see _decoded_bytes."""
    size = meta.num_rows * ROW_BYTES
    for leaf in leaves:
        width = max(8, meta.schema.column(leaf).length or 0)
        for group in range(meta.num_row_groups):
            chunk = meta.row_group(group).column(leaf)
            size += chunk.total_uncompressed_size + chunk.num_values * width
    return size


def _decoded_bytes(array) -> int:
    """Bytes `array` takes once every value is spelled out, as to_pylist spells them: a dictionary's value counted
    for every row that refers to it, nested values where they sit."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind, types = array.type, pa.types
    if types.is_dictionary(kind):
        values = array.dictionary
        if any(test(values.type) for test in (types.is_string, types.is_binary, types.is_large_string,
                                              types.is_large_binary)):
            spelled = pc.sum(pc.take(pc.binary_length(values), array.indices)).as_py() or 0
        else:  # a dictionary of numbers (a pandas category): each row spells out one value
            spelled = len(array) * (values.nbytes // max(len(values), 1))
        return spelled + array.indices.nbytes
    if types.is_struct(kind):
        return sum(_decoded_bytes(child) for child in array.flatten())
    if any(test(kind) for test in (types.is_list, types.is_large_list, types.is_fixed_size_list, types.is_map)):
        return len(array) * 8 + _decoded_bytes(array.flatten())
    return array.nbytes


def _unreadable(label: str, exc: Exception) -> MlarchError:
    reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return MlarchError(f"{label} is not a readable parquet file ({reason}): delete it from the cache and fetch again")


def _read_parquet(path: Path, label: str, room: _Room) -> tuple[list[dict], list[str], int]:
    """Rows (the columns parse_rows reads), column names and decoded size of a parquet file. Parquet compresses
    and dictionary-encodes: 571 bytes can hold a gigabyte of text. So the metadata is checked first; then the text
    columns are read a batch at a time with their strings kept as dictionaries (a value repeated a million times
    held once), and the size they take spelled out is counted as they come, before a single Python string is made.
    (The metadata is the file's word: a batch whose pages say more than it declared is counted once it is read.)"""
    import pyarrow.parquet as pq

    batches, size = [], 0
    try:
        handle = pq.ParquetFile(path)  # reads the footer only
        meta, columns = handle.metadata, list(handle.schema_arrow.names)
        wanted = [name for name in columns if name in _TEXT_COLUMNS]
        leaves = [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] in wanted]
        room.check(label, _declared(meta, leaves), "declares {:,} bytes of data in its parquet metadata")
        if meta.num_rows > MAX_LINES:  # as a local file's lines: each row becomes a dict
            raise MlarchError(f"{label} declares {meta.num_rows:,} rows, more than the {MAX_LINES:,} mlarch reads "
                              "for one language: pick a smaller split or config, or save the items you need to a "
                              "local .jsonl file")
        strings = [meta.schema.column(i).path for i in leaves if meta.schema.column(i).physical_type == "BYTE_ARRAY"]
        for batch in pq.ParquetFile(path, read_dictionary=strings).iter_batches(columns=wanted):
            size += batch.num_rows * ROW_BYTES + sum(_decoded_bytes(column) for column in batch.columns)
            room.check(label, size, "holds at least {:,} bytes of data once decoded")
            batches.append(batch)
    except MlarchError:
        raise
    except Exception as exc:  # a damaged or foreign file: any reader error
        raise _unreadable(label, exc) from None
    return [row for batch in batches for row in batch.to_pylist()], columns, size


def _read(path: Path, label: str, room: _Room | None = None) -> tuple[list[dict], list[str]]:
    """Rows and column names of one .parquet or .jsonl file, which takes its size from `room` (the split's: one
    file's of its own by default). Hub files are someone else's: bounded as a local data file is, before they are
    read into memory."""
    room = room or _Room()
    room.check(label, path.stat().st_size, "is {:,} bytes on disk")
    if path.suffix == ".parquet":
        rows, columns, size = _read_parquet(path, label, room)
    else:
        rows, columns, size = _read_jsonl(path, label)
    room.used += size
    return rows, columns


def _read_jsonl(path: Path, label: str) -> tuple[list[dict], list[str], int]:
    """Rows, column names and size of a .jsonl file."""
    rows, columns = [], {}
    data = path.read_bytes()
    try:
        content = decoded(data)
        check_line_count(content, label)
        lines = text_lines(content)
    except UnicodeDecodeError as exc:
        raise MlarchError(f"{label}: not UTF-8 text (byte {exc.start}); delete it from the cache and fetch again") from None
    for _, record in jsonl_records(lines, label):
        rows.append(record)
        columns.update(dict.fromkeys(record))
    return rows, list(columns), len(data)


class HubDataSource:
    """A split of a Hugging Face Hub data set, pinned to one commit (see the module docstring)."""

    def __init__(self, spec: str, template: str = "default"):
        if template not in TEXT_TEMPLATES:
            raise unknown_template(template)
        self.parts = parse(spec)
        self.name = spec  # recorded as the runs' dataset
        self.template = template
        self.commit: str | None = self.parts.revision if self.parts.revision and _COMMIT.fullmatch(self.parts.revision) else None

    def _snapshot(self, split: str, config: str | None) -> Path:
        """The snapshot folder (named by its commit) holding at least this split's files."""
        from huggingface_hub import snapshot_download

        from mlarch.cache import hub_data_dir

        patterns = [f"{config}/*{split}*{suffix}" if config else f"*{split}*{suffix}" for suffix in _SUFFIXES]
        revision = self.commit or self.parts.revision
        try:
            folder = Path(snapshot_download(self.parts.repo, repo_type="dataset", revision=revision,
                                            cache_dir=hub_data_dir(), allow_patterns=patterns))
        except Exception as exc:  # offline and not cached, unknown or gated repo, bad revision...
            reason = " ".join(str(exc).split()).split(". ")[0][:200] or type(exc).__name__  # its first sentence
            raise MlarchError(
                f"could not fetch the hub data set {self.parts.repo!r}{f' at {revision}' if revision else ''} "
                f"({reason}): check its id and revision and the network (HF_HUB_OFFLINE=1 reads only "
                f"the cache, {hub_data_dir()})") from None
        if not _COMMIT.fullmatch(folder.name):
            raise MlarchError(f"huggingface_hub returned {folder}, not a snapshot folder named by its commit: "
                              "mlarch cannot pin this data set's version")
        if self.commit is None:
            self.commit = folder.name  # every later language reads this commit
        elif folder.name != self.commit:
            raise MlarchError(f"the hub data set {self.parts.repo!r} resolved to commit {folder.name}, "
                              f"not {self.commit}: run again")
        return folder

    def load(self, lang: str, role: str = "math") -> LoadedItems:
        """The split's texts for `lang` ({lang} in SPLIT or CONFIG replaced), in file and row order."""
        split = self.parts.split.replace("{lang}", lang)
        config = self.parts.config.replace("{lang}", lang) if self.parts.config else None
        folder = self._snapshot(split, config)
        where = f"hub data set {self.parts.repo}@{folder.name[:12]} split {split!r}" + (
            f" config {config!r}" if config else "")
        files = split_files(folder, split, config)
        if not files:
            present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                             if p.suffix in _SUFFIXES and p.is_file())
            raise UsageError(f"{where} has no .parquet or .jsonl files (it has {shown_columns(present, 6)}): "
                              "pass the SPLIT (and CONFIG, the folder) those files are under")
        rows, columns, digests, room = [], {}, {}, _Room()
        for rel in files:
            path = folder / rel
            part, names = _read(path, f"{where}, file {rel}", room)
            rows += part
            columns.update(dict.fromkeys(names))
            digests[f"hf://datasets/{self.parts.repo}@{folder.name}/{rel}"] = sha256_file(path)
        texts, templates, pairs = parse_rows(rows, list(columns), where, self.template)
        return LoadedItems(texts, templates, digests, pairs)

    def describe(self) -> dict:
        """The source as provenance records it: kind 'hub', repository, revision and resolved commit, split,
        configuration (and the text template unless the default)."""
        described = {"kind": "hub", "repo": self.parts.repo, "revision": self.parts.revision, "commit": self.commit,
                     "split": self.parts.split, "config": self.parts.config}
        if self.template != "default":
            described["text_template"] = self.template
        return described


def pinned(described: dict) -> HubDataSource:
    """The source a run's provenance describes (describe()'s record), at the commit it read:
    what `verify --recompute` reads again."""
    spec = f"{PREFIX}{described['repo']}@{described['commit']}:{described['split']}"
    if described.get("config"):
        spec += f":{described['config']}"
    return HubDataSource(spec, described.get("text_template", "default"))
