"""Hugging Face Hub data sets as sources (hf:OWNER/NAME[@REVISION]:SPLIT[:CONFIG]).

No network: the data sets are laid out in huggingface_hub's cache layout
(datasets--OWNER--NAME/refs/main, snapshots/<commit>/...) under $MLARCH_CACHE/data/hub, and the
hub client runs offline: in-process by its constant (read once, at import), in a subprocess by
HF_HUB_OFFLINE=1 itself, which shows that the installed huggingface_hub resolves a branch from
refs/ and reads the snapshot without asking the hub."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import mlarch
from fixtures import math_items, one_error, prose_items
from mlarch.cli import cli
from mlarch.errors import MlarchError, UsageError
from mlarch.ingest import datafiles, hub_data, sources
from mlarch.ingest.datafiles import QA_TEMPLATE

COMMIT = "1" * 40
NEWER = "2" * 40


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _repo(cache: Path, repo: str, commit: str, files: dict[str, list[dict]], ref: str = "main") -> Path:
    """A data set in huggingface_hub's cache layout; .parquet and .jsonl files from rows."""
    owner, name = repo.split("/")
    storage = cache / "data" / "hub" / f"datasets--{owner}--{name}"
    snapshot = storage / "snapshots" / commit
    for rel, rows in files.items():
        path = snapshot / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """$MLARCH_CACHE with two data sets: math per language (config = language, parquet shards)
    and prose per language (split = language, jsonl with a text column); the hub offline."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "cache"
    monkeypatch.setenv("MLARCH_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    math = {}
    for lang in ("en", "de"):
        items = math_items(lang)
        math[f"{lang}/test-00000-of-00002.parquet"] = items[:6]
        math[f"{lang}/test-00001-of-00002.parquet"] = items[6:]
        math[f"{lang}/train-00000-of-00001.parquet"] = items[:2]  # another split: not read
    prose = {f"data/{lang}.jsonl": [{"text": t, "id": i} for i, t in enumerate(prose_items(lang))]
             for lang in ("en", "de")}
    return {"cache": cache,
            "math": _repo(cache, "acme/tiny-math", COMMIT, math),
            "prose": _repo(cache, "acme/tiny-prose", COMMIT, prose)}


# --- the spec -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, parts", [
    ("hf:openai/gsm8k:test:main", ("openai/gsm8k", None, "test", "main")),
    ("hf:openai/gsm8k:test", ("openai/gsm8k", None, "test", None)),
    (f"hf:a/b@{COMMIT}:train", ("a/b", COMMIT, "train", None)),
    ("hf:a/b@refs/convert/parquet:test:{lang}", ("a/b", "refs/convert/parquet", "test", "{lang}")),
    ("hf:a-b.c/d_e@v1.0:{lang}", ("a-b.c/d_e", "v1.0", "{lang}", None)),
])
def test_spec_parts(spec, parts):
    assert hub_data.parse(spec) == hub_data.HubSpec(*parts)


@pytest.mark.parametrize("spec, problem", [
    ("hf:gsm8k:test", "is not a data set id OWNER/NAME"),
    ("hf:openai/gsm8k", "expected a repository, a split"),
    ("hf:openai/gsm8k:test:main:extra", "expected a repository, a split"),
    ("hf:openai/gsm8k::main", "split '' is not a split name"),
    ("hf:openai/gsm8k:../x", "split '../x' is not a split name"),
    ("hf:openai/gsm8k:test:a/b", "config 'a/b' is not a config name"),
    ("hf:openai/gsm8k@:test", "revision '' is not a branch"),
    ("hf:openai/gsm8k@a/../b:test", "revision 'a/../b' is not a branch"),
    ("hf:{lang}/x:test", "is not a data set id"),
    ("hf:o/n@{lang}:test", "revision '{lang}' is not a branch"),
])
def test_bad_specs_refused_in_one_line(spec, problem):
    with pytest.raises(UsageError) as caught:
        sources.resolve(spec)
    message = str(caught.value)
    assert problem in message and message.endswith(f"use {hub_data.SYNTAX}") and "\n" not in message


def test_a_spec_that_is_neither_names_the_hub_syntax():
    with pytest.raises(UsageError, match=r"a hub data set \(hf:OWNER/NAME"):
        sources.resolve("openai/gsm8k")


# --- which files are a split ----------------------------------------------------------------

def test_split_files_rules(tmp_path):
    for rel in ["main/test-00000-of-00002.parquet", "main/test-00001-of-00002.parquet", "main/train-0.parquet",
                "socratic/test-00000-of-00001.parquet", "data/contest.parquet", "en/test/0000.parquet",
                "en/test/0001.parquet", "README.md", "x/test.jsonl", "x/test.json", ".cache/test.parquet"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert hub_data.split_files(tmp_path, "test", "main") == ["main/test-00000-of-00002.parquet",
                                                              "main/test-00001-of-00002.parquet"]
    assert hub_data.split_files(tmp_path, "test", "en") == ["en/test/0000.parquet", "en/test/0001.parquet"]
    assert hub_data.split_files(tmp_path, "test", "x") == ["x/test.jsonl"]  # .json is not read
    assert hub_data.split_files(tmp_path, "train", None) == ["main/train-0.parquet"]
    assert hub_data.split_files(tmp_path, "dev", None) == []
    with pytest.raises(UsageError, match=r"split 'test' has files in several folders \(en, main, socratic, x\): "
                                         r"name the config"):
        hub_data.split_files(tmp_path, "test", None)


# --- loading, pinned ------------------------------------------------------------------------

def test_loads_each_language_pinned_to_the_commit(hub):
    source = sources.resolve("hf:acme/tiny-math:test:{lang}")
    en = source.load("en", "math")
    assert en.texts == [QA_TEMPLATE.format(**item) for item in math_items("en")]  # both shards, in order
    assert en.pairs == [(i["question"], i["answer"]) for i in math_items("en")]
    shards = [f"en/test-0000{i}-of-00002.parquet" for i in (0, 1)]
    assert en.files == {f"hf://datasets/acme/tiny-math@{COMMIT}/{rel}": _sha(hub["math"] / rel) for rel in shards}
    # the branch resolved once: a moved ref does not change what later languages read
    (hub["cache"] / "data" / "hub" / "datasets--acme--tiny-math" / "refs" / "main").write_text(NEWER)
    de = source.load("de", "math")
    assert list(de.files) == [f"hf://datasets/acme/tiny-math@{COMMIT}/de/test-0000{i}-of-00002.parquet"
                              for i in (0, 1)]
    assert source.describe() == {"kind": "hub", "repo": "acme/tiny-math", "revision": None, "commit": COMMIT,
                                 "split": "test", "config": "{lang}"}

    prose = sources.resolve("hf:acme/tiny-prose:{lang}").load("de", "control")
    assert prose.texts == prose_items("de") and prose.pairs is None


def test_refuses_tables_without_text_columns_naming_them(hub):
    _repo(hub["cache"], "acme/chat", COMMIT, {"data/test.parquet": [{"prompt": "a", "completion": "b", "n": 1}]})
    with pytest.raises(UsageError) as caught:
        sources.resolve("hf:acme/chat:test").load("en", "math")
    assert str(caught.value) == (
        f"hub data set acme/chat@{COMMIT[:12]} split 'test' has the columns prompt, completion, n: mlarch reads "
        "a 'text' column, or 'question' and 'answer' columns (as GSM8K's); pick another split or config")


def test_unknown_split_names_the_files_there(hub):
    with pytest.raises(UsageError, match=r"split 'validation' config 'en' has no .parquet or .jsonl files \(it has "
                                         r"de/test-00000-of-00002.parquet, .*\): pass the SPLIT"):
        sources.resolve("hf:acme/tiny-math:validation:{lang}").load("en", "math")


def test_not_cached_offline_is_one_line(hub):
    with pytest.raises(MlarchError) as caught:
        sources.resolve("hf:acme/absent:test").load("en", "math")
    message = str(caught.value)
    assert message.startswith("could not fetch the hub data set 'acme/absent' (")
    assert "HF_HUB_OFFLINE=1 reads only the cache" in message and "\n" not in message


def test_offline_resolution_by_the_environment_variable(hub, tmp_path):
    """The real switch, in a fresh interpreter: HF_HUB_OFFLINE=1 in the environment, a branch
    resolved through refs/main, the snapshot read; an uncached commit refused."""
    script = ("import sys\nfrom mlarch.ingest import sources\n"
              "print(sorted(sources.resolve(sys.argv[1]).load('en', 'math').files))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLARCH_CACHE": str(hub["cache"])}
    ok = subprocess.run([sys.executable, "-c", script, "hf:acme/tiny-math@main:test:{lang}"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert f"hf://datasets/acme/tiny-math@{COMMIT}/en/test-00000-of-00002.parquet" in ok.stdout
    missing = subprocess.run([sys.executable, "-c", script, f"hf:acme/tiny-math@{NEWER}:test:{{lang}}"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "could not fetch the hub data set 'acme/tiny-math' at " + NEWER in missing.stderr
    assert "outgoing traffic has been disabled" in missing.stderr  # the hub client's own offline refusal


# --- end to end -----------------------------------------------------------------------------

def test_ingest_from_hub_data_sets_and_rerun(hub, model_dir, tmp_path):
    root = tmp_path / "arch"
    archive = mlarch.open(root)
    specs = {"math": "hf:acme/tiny-math:test:{lang}", "control": "hf:acme/tiny-prose:{lang}"}
    first = archive.ingest(str(model_dir["llama"]), ["en", "de"], specs["math"], specs["control"], samples=4,
                           top_k=[0.05], device="cpu", analysis="hub")
    assert len(first.written) == 4
    runs = archive.sql("SELECT run_id, lang, role, dataset FROM runs ORDER BY lang, role").to_dicts()
    assert [(r["lang"], r["role"], r["dataset"]) for r in runs] == [
        ("de", "control", specs["control"]), ("de", "math", specs["math"]),
        ("en", "control", specs["control"]), ("en", "math", specs["math"])]
    prov = archive.run(runs[3]["run_id"])["provenance"]  # en math
    assert prov["data"]["source"]["commit"] == COMMIT
    assert prov["data"]["files"] == {f"hf://datasets/acme/tiny-math@{COMMIT}/en/test-0000{i}-of-00002.parquet":
                                     _sha(hub["math"] / f"en/test-0000{i}-of-00002.parquet") for i in (0, 1)}
    texts = [QA_TEMPLATE.format(**math_items("en")[i]) for i in prov["sample_indices"]]
    from mlarch.ingest.provenance import texts_digest

    assert prov["texts_sha256"] == texts_digest(texts)  # the model read exactly those rows
    from mlarch.ingest.recompute import recompute

    rows = {r["metric"]: r["value"] for r in recompute(archive, runs[3]["run_id"], "cpu")}  # from the pinned commit
    assert rows["max relative norm difference"] == "0" and rows["Jaccard of top-0.05 sets (math top-k, all modules)"] == "1.000000"

    again = archive.ingest(str(model_dir["llama"]), ["en", "de"], specs["math"], specs["control"], samples=4,
                           top_k=[0.05], device="cpu", analysis="hub")
    assert again.written == [] and sorted(again.skipped) == sorted(r["run_id"] for r in runs)

    # a new commit on main with other English answers: the English math run is a new one
    items = math_items("en")
    items[0] = {**items[0], "answer": items[0]["answer"] + " Checked twice."}
    newer = {f"{lang}/test-00000-of-00001.parquet": (items if lang == "en" else math_items(lang))
             for lang in ("en", "de")}
    _repo(hub["cache"], "acme/tiny-math", NEWER, newer)
    (hub["cache"] / "data" / "hub" / "datasets--acme--tiny-math" / "refs" / "main").write_text(NEWER)
    third = archive.ingest(str(model_dir["llama"]), ["en", "de"], specs["math"], specs["control"], samples=4,
                           top_k=[0.05], device="cpu", analysis="hub")
    assert len(third.written) == 2  # en math and de math: their files (and commit) changed
    newest = archive.run(third.written[0])["provenance"]
    assert newest["data"]["source"]["commit"] == NEWER


def test_cli_refuses_bad_columns_before_loading_the_model(hub, model_dir, tmp_path):
    _repo(hub["cache"], "acme/chat", COMMIT, {"data/test.jsonl": [{"prompt": "a", "completion": "b"}]})
    archive = tmp_path / "arch"
    result = CliRunner().invoke(cli, ["--archive", str(archive), "ingest", "--model", str(model_dir["llama"]),
                                      "--langs", "en", "--math", "hf:acme/chat:test", "--control", "starter", "-q"])
    line = one_error(result, 2)
    assert "has the columns prompt, completion: mlarch reads a 'text' column" in line
    assert not archive.exists()


# --- size bounds: a hub file is someone else's ----------------------------------------------------

CAP = 1 << 20  # MAX_FILE_BYTES, lowered: the bombs below stay megabytes, not gigabytes


@pytest.fixture
def small_cap(monkeypatch):
    monkeypatch.setattr(hub_data, "MAX_FILE_BYTES", CAP)


def _snapshot(cache: Path, repo: str) -> Path:
    """An empty snapshot folder of `repo` at COMMIT, for files a test writes itself."""
    snapshot = _repo(cache, repo, COMMIT, {})
    snapshot.mkdir(parents=True)
    return snapshot


def _load_one_line_error(spec: str) -> str:
    with pytest.raises(MlarchError) as caught:
        sources.resolve(spec).load("en", "math")
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_parquet_bomb_is_refused_before_it_is_decoded(hub, small_cap):
    """A few hundred bytes of dictionary-encoded parquet holding one 30,000-character item 1,000 times (30 MB,
    30 times the cap): refused once its size spelled out is counted, before arrow or Python spells it out. The
    file records a plain string column (no arrow schema): a reader not asking for dictionaries decodes it whole."""
    import tracemalloc

    item = "Q: 1+1? A: 2. " * (30_000 // 14)
    text = pa.DictionaryArray.from_arrays(pa.array([0] * 1000, pa.int32()), pa.array([item]))
    snapshot = _snapshot(hub["cache"], "acme/bomb")
    pq.write_table(pa.table({"text": text}), snapshot / "test.parquet", compression="zstd", store_schema=False)
    assert (snapshot / "test.parquet").stat().st_size < 2000
    sources.resolve("hf:acme/tiny-prose:{lang}").load("en", "control")  # imports done: not in the peak below
    pool = pa.default_memory_pool()
    peak_before, held_before = pool.max_memory(), pool.bytes_allocated()
    tracemalloc.start()
    try:
        message = _load_one_line_error("hf:acme/bomb:test")
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    spelled = 1000 * (len(item) + 4 + hub_data.ROW_BYTES)  # each row: the item, its dictionary index, the row
    assert message == (f"hub data set acme/bomb@{COMMIT[:12]} split 'test', file test.parquet holds at least "
                       f"{spelled:,} bytes of data once decoded, more than the {CAP:,} bytes mlarch reads for one language (as "
                       "from a local data file): pick a smaller split or config, or save the items you need to a "
                       "local .jsonl file")
    assert python_peak < 5_000_000  # 1,000 Python strings of the item would be 30 MB
    # nor decoded by arrow: no new peak, or one that held little more (the pool keeps only the process's peak)
    assert pool.max_memory() == peak_before or pool.max_memory() - held_before < 5_000_000


@pytest.mark.parametrize("table", ["wide", "long"])
def test_parquet_metadata_over_the_cap_is_refused_before_reading(hub, small_cap, monkeypatch, table):
    """What the metadata declares is checked before a page is read: a 2 MB plain column, or 100,000 rows (each
    costs ROW_BYTES, as its JSON line would: empty rows are not free)."""
    texts = [f"item {i} " + "x" * 20 for i in range(80_000)] if table == "wide" else ["a"] * 100_000
    snapshot = _snapshot(hub["cache"], "acme/wide")
    pq.write_table(pa.table({"text": texts}), snapshot / "test.parquet", compression="zstd", use_dictionary=False)
    assert (snapshot / "test.parquet").stat().st_size < CAP

    def read(*args, **kwargs):
        raise AssertionError("read before the metadata was checked")

    monkeypatch.setattr(pq.ParquetFile, "read", read)
    message = _load_one_line_error("hf:acme/wide:test")
    assert message.startswith(f"hub data set acme/wide@{COMMIT[:12]} split 'test', file test.parquet declares ")
    assert f"bytes of data in its parquet metadata, more than the {CAP:,} bytes mlarch reads" in message


def test_hub_files_are_bounded_on_disk_and_over_the_split(hub, small_cap):
    """A .jsonl file over the cap on disk is refused before it is read; shards each under the cap are refused
    where, together, they pass it (a thousand shards of a megabyte hold a gigabyte)."""
    big = [{"text": "y" * 1000 + str(i)} for i in range(1100)]  # ~1.1 MB
    _repo(hub["cache"], "acme/big", COMMIT, {"test.jsonl": big})
    message = _load_one_line_error("hf:acme/big:test")
    assert message.startswith(f"hub data set acme/big@{COMMIT[:12]} split 'test', file test.jsonl is ")
    assert f"bytes on disk, more than the {CAP:,} bytes mlarch reads for one language" in message
    shards = {f"test-0000{i}-of-00003.jsonl": big[i * 400:(i + 1) * 400] for i in range(3)}  # ~400 KB each
    snapshot = _repo(hub["cache"], "acme/sharded", COMMIT, shards)
    first, second = ((snapshot / f"test-0000{i}-of-00003.jsonl").stat().st_size for i in (0, 1))
    message = _load_one_line_error("hf:acme/sharded:test")
    assert message.startswith(f"hub data set acme/sharded@{COMMIT[:12]} split 'test', file "
                              f"test-00002-of-00003.jsonl is ")
    assert f"bytes on disk (and the split's earlier files {first + second:,}), more than the {CAP:,}" in message


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_a_hub_file_of_more_lines_than_a_local_file_may_have_is_refused(hub, monkeypatch, kind):
    """Tiny rows under the byte cap still become a dict each: the row (line) count is bounded
    as for a local file, from the parquet metadata or the line count, before any row is made."""
    monkeypatch.setattr(hub_data, "MAX_LINES", 1000)
    monkeypatch.setattr(datafiles, "MAX_LINES", 1000)
    rows = [{"text": "ab"} for _ in range(1001)]
    snapshot = _snapshot(hub["cache"], "acme/many")
    if kind == "parquet":
        pq.write_table(pa.table({"text": [r["text"] for r in rows]}), snapshot / "test.parquet")
    else:
        (snapshot / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = _load_one_line_error("hf:acme/many:test")
    assert message.startswith(f"hub data set acme/many@{COMMIT[:12]} split 'test', file test.{kind} ")
    words = "declares 1,001 rows" if kind == "parquet" else "has 1,001 lines"
    assert f"{words}, more than the 1,000 mlarch reads for one language" in message
    (snapshot / f"test.{kind}").unlink()
    if kind == "parquet":
        pq.write_table(pa.table({"text": [r["text"] for r in rows[:1000]]}), snapshot / "test.parquet")
    else:
        (snapshot / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1000]))
    assert len(sources.resolve("hf:acme/many:test").load("en", "math").texts) == 1000
