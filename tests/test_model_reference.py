"""--model NAME where NAME is both a named (packaged, pinned) model and a folder in the current
directory, and the check of a named model's converted folder (issue 13): a bare name is the
packaged model and ./NAME the folder, so a stray folder never replaces the demo's model; a
converted folder changed since its conversion is refused.

A tiny model stands in for the converted Gemma/Qwen folder in a temporary cache (with the
marker a conversion writes): the code paths are the real ones from the reference to the
archived row, only the minutes of conversion are skipped."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures import one_error

import mlarch
from mlarch.cli import cli
from mlarch.errors import MlarchError
from mlarch.ingest import demo, loading, named_models
from mlarch.ingest.datafiles import sha256_file

GEMMA = named_models.GEMMA


def fake_conversion(cache: Path, model: named_models.NamedModel, source: Path) -> Path:
    """`source` (a tiny transformers folder) as `model`'s converted folder in `cache`, with the
    marker `_convert` writes (the pinned .gguf digest and each weight file's sha256)."""
    folder = cache / "models" / model.folder
    shutil.copytree(source, folder)
    weights = {f.name: sha256_file(f) for f in sorted(folder.glob("*.safetensors"))}
    (folder / named_models.MARKER).write_text(json.dumps({
        "name": model.name, "gguf": model.gguf, "gguf_sha256": model.sha256, "upstream": model.upstream,
        "weight_files": weights, "files": named_models.file_digests(folder)}))
    return folder


def test_bare_name_is_the_named_model_and_dot_slash_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma-3-270m").mkdir()  # e.g. `hf download google/gemma-3-270m --local-dir gemma-3-270m`
    assert loading.classify("gemma-3-270m") == ("named", None)
    assert loading.classify("Gemma-3-270M") == ("named", None)
    for path in ("./gemma-3-270m", "gemma-3-270m/", str(tmp_path / "gemma-3-270m")):
        assert loading.classify(path) == ("folder", Path(path)), path
    assert named_models.referenced("models/gemma-3-270m") is None
    assert named_models.referenced("~/gemma-3-270m") is None
    assert named_models.referenced("gemma-3-270m") is GEMMA


def test_named_model_says_which_it_used(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    folder = fake_conversion(tmp_path / "cache", GEMMA, model_dir["llama"])
    monkeypatch.chdir(tmp_path)
    heard = []
    assert named_models.prepare("gemma-3-270m", heard.append) == folder
    assert heard == []  # no folder of that name here: nothing to say
    (tmp_path / "gemma-3-270m").mkdir()
    assert named_models.prepare("gemma-3-270m", heard.append) == folder
    assert len(heard) == 1 and "the folder ./gemma-3-270m here is not used" in heard[0]
    assert "--model ./gemma-3-270m" in heard[0]


def test_demo_loads_its_pinned_model_whatever_folder_is_here(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    converted = fake_conversion(tmp_path / "cache", GEMMA, model_dir["llama"])
    work = tmp_path / "work"
    shutil.copytree(model_dir["gpt2"], work / "gemma-3-270m")  # a stray folder of the demo model's name
    monkeypatch.chdir(work)
    root = tmp_path / "arch"
    result = demo.run(root, langs=["en"], samples=2)
    assert result["model"] == "gemma-3-270m" and len(result["written"]) == 2
    model = mlarch.open(root).sql("SELECT * FROM models").row(0, named=True)
    assert (model["source"], model["source_kind"]) == ("gemma-3-270m", "named")
    weights = sorted(converted.glob("*.safetensors"))
    assert model["weights_sha256"] == loading.weights_digest(weights)[0]  # the cached conversion's weights
    assert model["architecture"] == "LlamaForCausalLM"  # not the stray folder's GPT-2
    # the folder, spelled as a path, is another model: refused under the demo's name, archived under its own
    args = ["--archive", str(root), "ingest", "--model", "./gemma-3-270m", "--langs", "en", "--math", "starter",
            "--control", "starter", "--samples", "2", "--top-k", "0.01", "--analysis", "k1", "--device", "cpu",
            "--quiet"]
    line = one_error(CliRunner().invoke(cli, args), 1)
    assert "the archive's model 'gemma-3-270m' has other weights" in line and "pass a new --name" in line
    assert CliRunner().invoke(cli, [*args, "--name", "stray"]).exit_code == 0
    rows = mlarch.open(root).sql("SELECT model, source_kind, architecture FROM models ORDER BY model").rows()
    assert rows == [("gemma-3-270m", "named", "LlamaForCausalLM"), ("stray", "folder", "GPT2LMHeadModel")]


def test_a_changed_conversion_is_refused(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    folder = fake_conversion(tmp_path / "cache", named_models.QWEN_CODER, model_dir["llama"])
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # one weight's bits: the file still parses, its numbers are not the converted ones
    weights.write_bytes(bytes(data))
    root = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, [
        "--archive", str(root), "ingest", "--model", "qwen2.5-coder-0.5b", "--langs", "en", "--math", "starter",
        "--control", "starter", "--samples", "2", "--top-k", "0.01", "--device", "cpu", "--quiet"]), 1)
    assert f"the converted qwen2.5-coder-0.5b in {folder} is not what mlarch converted" in line
    assert "model.safetensors was changed" in line and "delete that folder" in line
    assert not root.exists() or mlarch.open(root).sql("SELECT count(*) FROM runs").item() == 0
    with pytest.raises(MlarchError, match="is not what mlarch converted"):
        loading.fingerprint("qwen2.5-coder-0.5b", None).weights
    (folder / "extra.bin").write_bytes(b"x")  # a weight file the conversion did not write
    weights.write_bytes(bytes(data[:-3]) + bytes([data[-3] ^ 0x40]) + bytes(data[-2:]))  # restored
    with pytest.raises(MlarchError, match="extra.bin was changed, added or removed"):
        loading.fingerprint("qwen2.5-coder-0.5b", None).weights
    (folder / "extra.bin").unlink()
    assert loading.fingerprint("qwen2.5-coder-0.5b", None).weights == loading.weights_digest([weights])[0]


def test_a_conversion_without_weight_digests_is_converted_again(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    folder = fake_conversion(tmp_path / "cache", GEMMA, model_dir["llama"])
    assert named_models.converted(GEMMA) == folder
    marker = json.loads((folder / named_models.MARKER).read_text())
    (folder / named_models.MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "weight_files"}))
    assert named_models.converted(GEMMA) is None  # an earlier mlarch's marker: prepare converts again
    (folder / named_models.MARKER).write_text(json.dumps({**marker, "weight_files": {"other.safetensors": "0" * 64}}))
    assert named_models.converted(GEMMA) is None
