"""Hugging Face conventions: device names (cuda:N, mps), --trust-remote-code as an explicit,
recorded opt-in, one .gguf file of a hub repo (--gguf-file), and one cache variable.

Everything runs offline: the hub cases read a Hugging Face cache laid out in a temporary
folder with the hub client in offline mode, and the GGUF is a tiny llama written here."""

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mlarch
from fixtures import RecordingReporter, build_tokenizer, one_error
from mlarch.cli import cli
from mlarch.errors import MlarchError, UsageError
from mlarch.ingest import devices, loading
from mlarch.ingest.pipeline import IngestConfig



def ingest(tmp_path, data, model, *extra, archive=None):
    archive = archive or tmp_path / "arch"
    result = CliRunner().invoke(cli, ["--archive", str(archive), "ingest", "--model", str(model), "--langs", "en",
                                      "--math", data["math"], "--control", data["control"], "--samples", "2",
                                      "--top-k", "0.05", "--quiet", *extra])
    return result, archive


# --- devices -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, value", [("auto", "auto"), ("cpu", "cpu"), ("CPU", "cpu"), (" cuda ", "cuda"),
                                         ("cuda:0", "cuda:0"), ("cuda:12", "cuda:12"), ("mps", "mps")])
def test_device_names_accepted(spec, value):
    assert devices.check(spec) == value


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:0:1", "cuda0", "mps:0", "xla", "", "cpu,cuda",
                                  "cuda:\n0"])
def test_unknown_device_names_refused(spec):
    with pytest.raises(UsageError, match="unknown device .*: use auto, cpu, cuda, cuda:N"):
        devices.check(spec)


@pytest.mark.parametrize("command", ["ingest", "eval", "verify"])
def test_cli_refuses_unknown_device_in_one_line(model_dir, data, tmp_path, command):
    archive = tmp_path / "arch"
    args = {"ingest": ["ingest", "--model", str(model_dir["llama"]), "--langs", "en", "--math", data["math"],
                       "--control", data["control"]],
            "eval": ["eval", "--model", str(model_dir["llama"]), "--langs", "en", "--task", "nll", "--data",
                     data["math"]],
            "verify": ["verify", "--recompute", "0123456789ab"]}[command]
    line = one_error(CliRunner().invoke(cli, ["--archive", str(archive), *args, "--device", "gpu"]), 2)
    assert line == "Error: unknown device 'gpu': use auto, cpu, cuda, cuda:N (e.g. cuda:0) or mps"
    assert not archive.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the device would be used")
@pytest.mark.parametrize("spec", ["cuda:0", "cuda"])
def test_cuda_device_parsed_then_refused_when_absent(model_dir, data, tmp_path, spec):
    result, archive = ingest(tmp_path, data, model_dir["llama"], "--device", spec)
    line = one_error(result, 1)
    assert f"--device {spec} was asked for but no CUDA device is available" in line
    assert not archive.exists()
    with pytest.raises(MlarchError, match="no CUDA device"):  # the library refuses it too
        mlarch.open(tmp_path / "api").ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"],
                                             samples=2, device=spec)


@pytest.mark.skipif(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                    reason="this machine has MPS")
def test_mps_parsed_then_refused_when_absent(model_dir, data, tmp_path):
    result, archive = ingest(tmp_path, data, model_dir["llama"], "--device", "mps")
    assert "MPS backend is not available here: use --device cpu or auto" in one_error(result, 1)
    assert not archive.exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_ingests_and_out_of_range_refused(model_dir, data, tmp_path):
    result, archive = ingest(tmp_path, data, model_dir["llama"], "--device", "cuda:0", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    run = mlarch.open(archive).runs().row(0, named=True)
    assert mlarch.open(archive).run(run["run_id"])["provenance"]["device"] == "cuda:0"
    count = torch.cuda.device_count()
    with pytest.raises(MlarchError, match=f"device='cuda:{count}' does not exist: this machine has {count}"):
        devices.resolve(f"cuda:{count}")


# --- --trust-remote-code -----------------------------------------------------------------

_MODELING = '''
from transformers import LlamaForCausalLM, LlamaConfig


class ShippedConfig(LlamaConfig):
    model_type = "{model_type}"


class ShippedLlamaForCausalLM(LlamaForCausalLM):
    config_class = ShippedConfig
'''


def shipped_code_model(source: Path, folder: Path, model_type: str) -> Path:
    """The tiny llama with its own modeling code (config auto_map), as hub repos ship it."""
    shutil.copytree(source, folder)
    (folder / "modeling_shipped.py").write_text(_MODELING.format(model_type=model_type))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "modeling_shipped.ShippedConfig",
                          "AutoModelForCausalLM": "modeling_shipped.ShippedLlamaForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies shipped code here before importing it: keep it out of ~/.cache."""
    import transformers.dynamic_module_utils as dynamic

    folder = tmp_path / "hf-modules"
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(folder))
    return folder


def test_shipped_code_needs_the_flag(model_dir, data, tmp_path, modules_cache):
    folder = shipped_code_model(model_dir["llama"], tmp_path / "shipped-llama", "mlarch-shipped")
    result, archive = ingest(tmp_path, data, folder, "--device", "cpu")
    line = one_error(result, 1)
    assert "ships its own Python code" in line and line.endswith("then pass --trust-remote-code "
                                                                 "(trust_remote_code=True)")
    assert not archive.exists() and not modules_cache.exists()  # none of it ran, nothing copied

    result, archive = ingest(tmp_path, data, folder, "--device", "cpu", "--trust-remote-code")
    assert result.exit_code == 0, result.output
    arch = mlarch.open(archive)
    assert arch.sql("SELECT architecture FROM models").item() == "ShippedLlamaForCausalLM"
    schema = json.loads((resources.files("mlarch.schemas") / "run_provenance.schema.json").read_text())
    import jsonschema

    for run_id in arch.runs()["run_id"]:
        provenance = arch.run(run_id)["provenance"]
        jsonschema.validate(provenance, schema)
        assert provenance["config"]["trust_remote_code"] is True


def test_flag_changes_the_class_and_the_identity(model_dir, data, tmp_path, modules_cache):
    """With a library class for its model type, the shipped code replaces it only when trusted:
    another model runs, so the runs are not reused across the flag."""
    folder = shipped_code_model(model_dir["llama"], tmp_path / "both-llama", "llama")
    plain, archive = ingest(tmp_path, data, folder, "--device", "cpu")
    assert plain.exit_code == 0, plain.output
    reporter = RecordingReporter()  # the swap is said, not silent
    mlarch.open(tmp_path / "said").ingest(str(folder), ["en"], data["math"], data["control"], samples=2, top_k=[0.05],
                                           device="cpu", reporter=reporter)
    assert any("ships its own model code (modeling_shipped.ShippedLlamaForCausalLM)" in line
               for line in reporter.lines), reporter.lines
    trusted, _ = ingest(tmp_path, data, folder, "--device", "cpu", "--trust-remote-code", "--name", "both-trusted",
                        archive=archive)
    assert trusted.exit_code == 0, trusted.output
    arch = mlarch.open(archive)
    rows = dict(arch.sql("SELECT model, architecture FROM models").iter_rows())
    assert rows == {"both-llama": "LlamaForCausalLM", "both-trusted": "ShippedLlamaForCausalLM"}
    base = dict(model=str(folder), langs=["en"], math="m", control="c")
    assert loading.identity(IngestConfig(**base)) == {}  # untouched: older archives' digests hold
    assert loading.identity(IngestConfig(**base, trust_remote_code=True)) == {"trust_remote_code": True}
    again, _ = ingest(tmp_path, data, folder, "--device", "cpu", "--trust-remote-code", archive=archive)
    assert again.exit_code == 0 and "Archived 2 run(s)" in again.stdout  # not the untrusted runs reused


# --- --gguf-file -------------------------------------------------------------------------

def write_tiny_gguf(path: Path, seed: int = 5, layers: int = 2, hidden: int = 32, ff: int = 48, heads: int = 4,
                    kv: int = 2) -> Path:
    """A float32 llama GGUF with the fixtures' BPE tokenizer (gpt2-style), as llama.cpp writes it."""
    gguf = pytest.importorskip("gguf", reason="gguf not installed: pip install -e '.[gguf]'")
    tok = build_tokenizer(with_pad=True, with_bos=False)
    vocab = tok.backend_tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape):
        w.add_tensor(name, (0.1 * rng.standard_normal(shape)).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    for b in range(layers):
        tensor(f"blk.{b}.attn_norm.weight", hidden)
        tensor(f"blk.{b}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{b}.attn_k.weight", hidden * kv // heads, hidden)
        tensor(f"blk.{b}.attn_v.weight", hidden * kv // heads, hidden)
        tensor(f"blk.{b}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{b}.ffn_norm.weight", hidden)
        tensor(f"blk.{b}.ffn_gate.weight", ff, hidden)
        tensor(f"blk.{b}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{b}.ffn_down.weight", hidden, ff)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(tokens), hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding org/tiny-gguf at COMMIT (two .gguf files), the hub client
    offline: what `hf download` leaves behind, read without a network."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-hub"
    repo = cache / "models--org--tiny-gguf"
    write_tiny_gguf(repo / "snapshots" / COMMIT / "tiny-q8.gguf", seed=5)
    write_tiny_gguf(repo / "snapshots" / COMMIT / "sub" / "tiny-f32.gguf", seed=6)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_gguf_file_loads_one_file_of_the_repo(data, tmp_path, hub_cache):
    result, archive = ingest(tmp_path, data, "org/tiny-gguf", "--gguf-file", "tiny-q8.gguf", "--device", "cpu")
    assert result.exit_code == 0, result.output
    arch = mlarch.open(archive)
    model = arch.sql("SELECT * FROM models").row(0, named=True)
    assert (model["model"], model["source"], model["source_kind"], model["commit_sha"]) == (
        "tiny-q8", "org/tiny-gguf", "hub", COMMIT)  # the default --name: the file's name
    assert model["architecture"] == "LlamaForCausalLM"
    provenance = arch.run(arch.runs()["run_id"][0])["provenance"]
    assert provenance["config"]["gguf_file"] == "tiny-q8.gguf"
    assert list(provenance["model"]["weight_files"]) == ["tiny-q8.gguf"]
    # verify --recompute reloads the same file of the repo from the recorded provenance
    again = CliRunner().invoke(cli, ["--archive", str(archive), "verify", "--recompute", provenance["run_id"],
                                     "--device", "cpu", "--format", "csv"])
    assert again.exit_code == 0, again.output
    assert "max relative norm difference,0" in again.stdout and "1.000000" in again.stdout
    # another file of the same repo is another model: its own name, weights and runs
    other, _ = ingest(tmp_path, data, "org/tiny-gguf", "--gguf-file", "sub/tiny-f32.gguf", "--device", "cpu",
                      archive=archive)
    assert other.exit_code == 0 and "Archived 2 run(s) of tiny-f32" in other.stdout, other.output
    digests = arch.sql("SELECT model, weights_sha256 FROM models ORDER BY model")
    assert digests["weights_sha256"].n_unique() == 2


def test_hub_gguf_file_missing_from_the_repo(data, tmp_path, hub_cache):
    result, archive = ingest(tmp_path, data, "org/tiny-gguf", "--gguf-file", "tiny-q4.gguf", "--device", "cpu")
    line = one_error(result, 1)
    assert line.startswith("Error: could not fetch tiny-q4.gguf from the Hugging Face Hub repo 'org/tiny-gguf' (")
    assert "HF_HUB_OFFLINE=1 reads only the local Hugging Face cache" in line
    assert not archive.exists()
    unknown, archive = ingest(tmp_path, data, "org/absent", "--gguf-file", "tiny-q8.gguf", "--device", "cpu")
    assert "could not fetch tiny-q8.gguf from the Hugging Face Hub repo 'org/absent'" in one_error(unknown, 1)


def test_gguf_file_in_a_local_folder(data, tmp_path):
    folder = tmp_path / "ggufs"
    write_tiny_gguf(folder / "tiny-a.gguf")
    result, archive = ingest(tmp_path, data, folder, "--gguf-file", "tiny-a.gguf", "--device", "cpu")
    assert result.exit_code == 0, result.output
    model = mlarch.open(archive).sql("SELECT model, source, source_kind FROM models").row(0)
    assert model == ("tiny-a", str(folder.resolve()), "gguf")
    missing, archive = ingest(tmp_path, data, folder, "--gguf-file", "tiny-b.gguf", "--device", "cpu",
                              archive=tmp_path / "other")
    assert "--gguf-file tiny-b.gguf is not in the model folder" in one_error(missing, 1)
    assert not archive.exists()


@pytest.mark.parametrize("name, message", [
    ("../tiny-a.gguf", "is not a .gguf file inside the repository"),
    ("/etc/tiny.gguf", "is not a .gguf file inside the repository"),
    ("model.safetensors", "is not a .gguf file inside the repository"),
    ("a\nb.gguf", "is not a .gguf file inside the repository"),
])
def test_gguf_file_names_refused(data, tmp_path, name, message):
    result, archive = ingest(tmp_path, data, "org/tiny-gguf", "--gguf-file", name, "--device", "cpu")
    assert message in one_error(result, 2)
    assert not archive.exists()


def test_gguf_file_with_a_gguf_model_refused(data, tmp_path):
    path = write_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    result, archive = ingest(tmp_path, data, path, "--gguf-file", "tiny.gguf", "--device", "cpu")
    assert "already is a .gguf file: drop --gguf-file" in one_error(result, 2)


def test_gguf_file_is_part_of_the_identity():
    base = dict(model="org/repo", langs=["en"], math="m", control="c")
    assert loading.identity(IngestConfig(**base, gguf_file="a.gguf")) == {"gguf_file": "a.gguf"}
    assert loading.identity(IngestConfig(**base)) == {}


# --- one cache variable ------------------------------------------------------------------

def test_one_cache_variable_for_models_data_and_digests(tmp_path, monkeypatch, model_dir):
    from mlarch import cache
    from mlarch.ingest import corpora

    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "c"))
    assert cache.models_dir() == tmp_path / "c" / "models"
    assert cache.data_dir() == tmp_path / "c" / "data"
    loading.fingerprint(str(model_dir["llama"]), None).weights
    assert str(model_dir["llama"].resolve()) in (tmp_path / "c" / "weight-digests.json").read_text()
    seen = {}

    def retrieve(**kwargs):  # where corpora would download to, without a network
        seen.update(kwargs)
        raise ConnectionError("offline")

    import pooch

    monkeypatch.setattr(pooch, "retrieve", retrieve)
    with pytest.raises(MlarchError, match="could not download"):
        corpora.fetch(corpora.FLORES_METADATA, None)
    assert Path(seen["path"]) == tmp_path / "c" / "data"
