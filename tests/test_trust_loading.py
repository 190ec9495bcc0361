"""Trust at ingest: checkpoints that do not match their config, damaged weight files and
bad values are refused with one `Error:` line before any scoring or archive write."""

import json
import re
import shutil
import zipfile
from pathlib import Path

import duckdb
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mlarch
from fixtures import one_error
from mlarch.cli import cli
from mlarch.errors import MlarchError, UsageError
from mlarch.ingest import loading
from mlarch.ingest.pipeline import IngestConfig


def rewrite(folder: Path, edit) -> dict:
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return weights


def ingest(tmp_path, data, model, *extra):
    archive = tmp_path / "arch"
    result = CliRunner().invoke(cli, ["--archive", str(archive), "ingest", "--model", str(model), "--langs", "en",
                                      "--math", data["math"], "--control", data["control"], "--samples", "2",
                                      "--top-k", "0.05", "--device", "cpu", "--quiet", *extra])
    return result, archive



def archived_runs(archive: Path) -> int:
    catalog = archive / "catalog.duckdb"
    if not catalog.exists():
        return 0
    with duckdb.connect(str(catalog), read_only=True) as con:
        return con.execute("SELECT count(*) FROM runs").fetchone()[0]


# --- checkpoints that do not match their config ----------------------------------------------------

def test_missing_weights_refused_before_scoring(llama_copy, data, tmp_path):
    removed = sorted(k for k in rewrite(llama_copy, lambda w: None) if k.startswith("model.layers.1.mlp."))
    kept = rewrite(llama_copy, lambda w: [w.pop(k) for k in removed])
    assert len(removed) == 3 and not set(removed) & set(kept)
    result, archive = ingest(tmp_path, data, llama_copy)
    line = one_error(result, 1)
    assert f"model folder {llama_copy} does not match its config: 3 weights missing (" in line
    assert removed[0] in line and "0 unexpected" in line and "restore the checkpoint's weight files" in line
    assert archived_runs(archive) == 0


def test_unexpected_and_reshaped_weights_refused(llama_copy, data, tmp_path):
    rewrite(llama_copy, lambda w: w.update({"model.layers.1.mlp.extra.weight": torch.zeros(3)}))
    line = one_error(ingest(tmp_path, data, llama_copy)[0], 1)
    assert "0 weights missing, 1 unexpected (model.layers.1.mlp.extra.weight)" in line
    rewrite(llama_copy, lambda w: (w.pop("model.layers.1.mlp.extra.weight"),
                                   w.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(5, 32)})))
    result, archive = ingest(tmp_path, data, llama_copy)
    line = one_error(result, 1)
    assert "1 of another shape (model.layers.0.mlp.up_proj.weight 5x32 in the checkpoint, 48x32 in the config)" in line
    assert archived_runs(archive) == 0


@pytest.mark.parametrize("edit, words", [
    ({"vocab_size": 10_000_000}, "vocab_size 10,000,000 and hidden_size 32 (320,000,000 parameters at least)"),
    ({"num_hidden_layers": 200_000}, "num_hidden_layers 200,000 and hidden_size 32 (6,400,000 parameters at least)"),
    ({"intermediate_size": 100_000_000}, "intermediate_size 100,000,000 and hidden_size 32"),
    ({"hidden_size": 1_000_000, "head_dim": 8}, "vocab_size 384 and hidden_size 1,000,000"),
])
def test_a_config_larger_than_its_checkpoint_is_refused_before_the_model_is_built(llama_copy, data, tmp_path,
                                                                                 monkeypatch, edit, words):
    """transformers builds and randomly fills the config's model before the completeness check
    sees the mismatch: vocab_size 10 M took 2.9 GB, 200,000 layers three minutes. Refused first."""
    import json

    from transformers import AutoModelForCausalLM

    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, **edit}))

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    result, archive = ingest(tmp_path, data, llama_copy)
    line = one_error(result, 1)
    assert line.startswith(f"Error: model {llama_copy}'s config.json declares {words}"), line
    assert line.endswith(", more than its weight files hold (40,096): the config does not match the checkpoint; "
                         "restore config.json or the weights"), line
    assert archived_runs(archive) == 0


@pytest.fixture
def unbuilt(monkeypatch):
    """from_pretrained fails the test: a refusal must come before the config's model is built."""
    from transformers import AutoModelForCausalLM

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)


def edit_config(folder: Path, edit: dict, drop=()) -> Path:
    config = {**json.loads((folder / "config.json").read_text()), **edit}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in drop}))
    return folder


def as_pickled(folder: Path) -> Path:
    """The folder with its weights in a pickled checkpoint (pytorch_model.bin) instead."""
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def refused_unbuilt(tmp_path, data, folder, held: str) -> str:
    """The problem part of the one `Error:` line of a config larger than its checkpoint."""
    result, archive = ingest(tmp_path, data, folder)
    line = one_error(result, 1)
    assert archived_runs(archive) == 0
    prefix, suffix = f"Error: model {folder}'s config.json declares ", ": the config does not match the checkpoint; " \
                                                                      "restore config.json or the weights"
    assert line.startswith(prefix) and line.endswith(suffix), line
    assert held in line, line
    return line[len(prefix):-len(suffix)]


@pytest.mark.parametrize("edit, words", [
    ({"n_embd": 1_000_000}, "vocab_size 384 and n_embd 1,000,000 (384,000,000 parameters at least)"),
    ({"n_layer": 200_000}, "n_layer 200,000 and n_embd 32 (6,400,000 parameters at least)"),
    ({"vocab_size": 200_000_000}, "vocab_size 200,000,000 and n_embd 32 (6,400,000,000 parameters at least)"),
    ({"n_inner": 100_000_000}, "n_inner 100,000,000 and n_embd 32 (3,200,000,000 parameters at least)"),
])
def test_gpt2_names_of_the_sizes_are_checked(model_dir, data, tmp_path, unbuilt, edit, words):
    """GPT-2's config names the sizes n_embd, n_layer and n_inner (its class maps them): before
    they were not checked, and n_layer 200,000 built for minutes, n_embd 1 M asked for 16 TB."""
    folder = edit_config(Path(shutil.copytree(model_dir["gpt2"], tmp_path / "tiny-gpt2")), edit)
    assert refused_unbuilt(tmp_path, data, folder, "(45,952)") == f"{words}, more than its weight files hold (45,952)"


@pytest.mark.parametrize("edit, words", [
    ({"vocab_size": 10_000_000}, "vocab_size 10,000,000 and hidden_size 32"),
    ({"num_hidden_layers": 200_000}, "num_hidden_layers 200,000 and hidden_size 32"),
])
def test_a_pickled_checkpoint_is_counted_too(llama_copy, data, tmp_path, unbuilt, edit, words):
    """pytorch_model.bin (read weights_only onto the meta device: its shapes, no data) bounds the
    config as safetensors headers do."""
    folder = edit_config(as_pickled(llama_copy), edit)
    assert refused_unbuilt(tmp_path, data, folder, "(40,096)").startswith(words)


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "bin"])
def test_more_layers_than_tensors_refused(llama_copy, data, tmp_path, unbuilt, pickled):
    """22 layers of 32 need fewer parameters than the checkpoint holds, but each layer stores a
    tensor of its own: with a real hidden size, extra layers are what a config multiplies."""
    folder = edit_config(as_pickled(llama_copy) if pickled else llama_copy, {"num_hidden_layers": 22})
    assert refused_unbuilt(tmp_path, data, folder, "21 tensors") == (
        "num_hidden_layers 22, more layers than the 21 tensors its weight files hold (a layer stores one at least)")


def test_a_pickled_shape_adds_no_more_than_its_file_holds(llama_copy, data, tmp_path, unbuilt):
    """A pickle may declare any shape over a one-element storage (an expanded view), and the
    meta load does not check it: each file counts at most what its bytes could hold."""
    weights = {**load_file(llama_copy / "model.safetensors"), "padding": torch.zeros(1).expand(10**12)}
    torch.save(weights, llama_copy / "pytorch_model.bin")
    (llama_copy / "model.safetensors").unlink()
    folder = edit_config(llama_copy, {"vocab_size": 10_000_000})
    most = 2 * (folder / "pytorch_model.bin").stat().st_size
    assert refused_unbuilt(tmp_path, data, folder, f"({most:,})").startswith("vocab_size 10,000,000")


def test_a_legacy_pickled_checkpoint_counts_its_size(llama_copy, data, tmp_path, unbuilt):
    """torch's pre-zip format is not unpickled here (torch allocates what it declares, even for
    meta): its size bounds it."""
    torch.save(load_file(llama_copy / "model.safetensors"), llama_copy / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    (llama_copy / "model.safetensors").unlink()
    folder = edit_config(llama_copy, {"vocab_size": 10_000_000})
    most = 2 * (folder / "pytorch_model.bin").stat().st_size
    assert refused_unbuilt(tmp_path, data, folder, f"({most:,})").startswith("vocab_size 10,000,000")


def test_sizes_missing_from_the_config_are_its_class_defaults(llama_copy, data, tmp_path, unbuilt):
    """A config.json without hidden_size builds llama's default 4,096 (and 32 layers of 11,008)."""
    folder = edit_config(llama_copy, {}, drop=("hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"))
    assert refused_unbuilt(tmp_path, data, folder, "(40,096)").startswith(
        "vocab_size 384 and hidden_size 4,096 by default (1,572,864 parameters at least)")


def test_an_unreadable_weight_file_does_not_lift_the_bound(llama_copy, data, tmp_path, unbuilt):
    """A file that does not parse counts as the most its bytes could hold (2 elements a byte):
    a planted one no longer switches the check off."""
    (llama_copy / "model-extra.safetensors").write_bytes(b"x" * 64)
    folder = edit_config(llama_copy, {"vocab_size": 10_000_000})
    assert refused_unbuilt(tmp_path, data, folder, "(40,224)").startswith("vocab_size 10,000,000")


def test_sub_configs_are_read_with_their_defaults(llama_copy):
    """A multimodal config's text_config (and vision_config) as transformers' class reads it:
    the vocab_size it leaves out is Gemma 3's 262,208."""
    (llama_copy / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8}}))
    with pytest.raises(MlarchError, match=re.escape(
            "declares text_config.vocab_size 262,208 by default and text_config.hidden_size 32 (8,390,656 ")):
        loading.check_config_sizes("m", llama_copy, loading._folder_weights(llama_copy))


# real models' config.json sizes and what their safetensors hold (elements, tensors): no refusal
REAL = {
    "gemma-3-270m": ({"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
                      "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                      "tie_word_embeddings": True}, (268_098_176, 236)),
    "gpt2": ({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
              "n_positions": 1024}, (124_439_808, 148)),
    "qwen2.5-0.5b": ({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                      "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                      "tie_word_embeddings": True}, (494_032_768, 290)),
    "llama-3.2-1b": ({"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                      "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                      "tie_word_embeddings": True}, (1_235_814_400, 146)),
}


@pytest.mark.parametrize("name", REAL)
def test_real_models_configs_pass(tmp_path, monkeypatch, name):
    config, held = REAL[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(loading, "_held", lambda folder, files: loading._Held(*held))
    loading.check_config_sizes(name, tmp_path, [])


def test_tiny_models_pass(model_dir, llama_copy):
    for folder in (*model_dir.values(), as_pickled(llama_copy)):
        loading.check_config_sizes(folder.name, folder, loading._folder_weights(folder))


def test_tied_head_and_conv1d_fixtures_still_load(model_dir):
    qwen = loading.load(str(model_dir["qwen2"]), revision=None, device=torch.device("cpu"), dtype="float32")
    stored = load_file(model_dir["qwen2"] / "model.safetensors")
    assert "lm_head.weight" not in stored  # the case: the head is not in the checkpoint, only tied
    assert qwen.model.lm_head.weight.data_ptr() == qwen.model.model.embed_tokens.weight.data_ptr()
    gpt2 = loading.load(str(model_dir["gpt2"]), revision=None, device=torch.device("cpu"), dtype="float32")
    assert gpt2.architecture == "GPT2LMHeadModel"
    # the same report with one weight missing is refused
    with pytest.raises(MlarchError, match="1 weight missing"):
        loading.check_complete("x", "folder", {"missing_keys": {"model.norm.weight"}})


# --- damaged weight files -------------------------------------------------------------------------

def _truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "model.safetensors"


def _garble_header(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"x" * 32
    (folder / "model.safetensors").write_bytes(bytes(data))
    return "model.safetensors"


def _garbage_bin(folder):  # torch.load(weights_only=True) raises UnpicklingError
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint " * 64)
    return "pytorch_model.bin"


def _broken_zip_bin(folder):  # torch.load raises RuntimeError from its zip reader
    (folder / "model.safetensors").unlink()
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", b"garbage")
    return "pytorch_model.bin"


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def _code_bin(folder):  # a pickle that carries a callable, not only tensors
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": _RunsCode()}, folder / "pytorch_model.bin")
    return "pytorch_model.bin"


@pytest.mark.parametrize("damage", [_truncate, _garble_header, _garbage_bin, _broken_zip_bin, _code_bin])
def test_damaged_weight_file_named(llama_copy, data, tmp_path, damage):
    broken = damage(llama_copy)
    result, archive = ingest(tmp_path, data, llama_copy)
    line = one_error(result, 1)
    if broken.endswith(".bin"):
        assert line.startswith(f"Error: weight file {llama_copy / broken} is damaged or holds more than tensors (")
        assert line.endswith(": restore it from the original checkpoint, download the model again or use its "
                             ".safetensors weights")
    else:
        assert line.startswith(f"Error: weight file {llama_copy / broken} is damaged or truncated (")
        assert line.endswith(": restore it from the original checkpoint or download the model again")
    assert "weights_only" not in line  # not torch's advice to unpickle it unsafely
    assert "unpickled code ran" not in result.output
    assert not archive.exists()


@pytest.mark.parametrize("damage", [_truncate, _garble_header, _garbage_bin, _broken_zip_bin, _code_bin])
def test_damaged_weight_file_named_before_the_model_is_built(llama_copy, data, tmp_path, unbuilt, damage):
    """A weight file that transformers reads and that does not parse is named by the size check,
    before a config larger than the checkpoint is built (it was no bound: the check was skipped)."""
    broken = damage(llama_copy)
    result, archive = ingest(tmp_path, data, edit_config(llama_copy, {"vocab_size": 10_000_000}))
    line = one_error(result, 1)
    assert line.startswith(f"Error: weight file {llama_copy / broken} is damaged or "), line
    assert "unpickled code ran" not in result.output
    assert not archive.exists()


# --- bad values, refused before any work ----------------------------------------------------------

BAD_VALUES = [
    (["--seeds", "9223372036854775808"],
     "seed 9223372036854775808 is not valid: --seeds must be distinct integers from 0 to 2**63-1"),
    (["--seeds", "1,9223372036854775808"], "seed 9223372036854775808 is not valid"),
    (["--samples", "1000000000000"], "--samples must be at most 1,000,000, got 1,000,000,000,000"),
    (["--max-length", "1048577"], "--max-length must be at most 1,048,576, got 1,048,577"),
    (["--batch-size", "65537"], "--batch-size must be at most 65,536, got 65,537"),
    (["--name", "x" * 5000], "has 5,000 characters, over 128"),
    (["--name", "two\nlines"], "control or invisible characters"),
    (["--name", "tab\there"], "control or invisible characters"),
    (["--name", "red\x1b[31m"], "control or invisible characters"),
    (["--name", "zero\u200bwidth"], "control or invisible characters"),
    (["--name", " padded"], "starts or ends with whitespace"),
    (["--name", "padded "], "starts or ends with whitespace"),
    (["--name", ""], "the model name (--name) is empty"),
    (["--top-k", "nan"], "not a number (nan)"),
    (["--top-k", "0.01,nan"], "not a number (nan)"),
]


@pytest.mark.parametrize("extra,message", BAD_VALUES, ids=lambda v: repr(v)[:40] if isinstance(v, list) else None)
def test_bad_value_refused_before_work(model_dir, data, tmp_path, extra, message):
    result, archive = ingest(tmp_path, data, model_dir["llama"], *extra)
    line = one_error(result, 2)
    assert message in line and line.count(":") >= 2  # <problem>: <fix>
    assert not archive.exists()


@pytest.mark.parametrize("folder_name,message", [
    ("tiny\nllama", "control or invisible characters"),
    ("m" * 200, "has 200 characters, over 128"),
])
def test_default_name_from_model_folder_checked(model_dir, data, tmp_path, folder_name, message):
    model = tmp_path / folder_name
    model.symlink_to(model_dir["llama"], target_is_directory=True)
    result, archive = ingest(tmp_path, data, model)
    line = one_error(result, 2)
    assert message in line and "(derived from --model)" in line and "pass --name" in line
    assert not archive.exists()


def test_api_refuses_bad_seed_before_work(model_dir, data, tmp_path):
    archive = tmp_path / "arch"
    for seeds in ([2**63], [1.5], [True]):  # too large, not an integer, an int to Python but not a seed
        message = f"seed {seeds[0]!r} is not valid"
        with pytest.raises(UsageError, match=re.escape(message)):
            mlarch.open(archive).ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"],
                                        seeds=seeds, samples=2, device="cpu")
    assert not archive.exists()


def test_bounds_are_inclusive_and_numpy_integers_accepted():
    import numpy as np

    cfg = IngestConfig(model="m", langs=["en"], math="-", control="-", seeds=[0, 2**63 - 1, np.int64(7)],
                       samples=1_000_000, batch_size=65_536, max_length=1_048_576, name="n" * 128)
    cfg.validate()
    assert cfg.seeds == [0, 2**63 - 1, 7] and all(type(s) is int for s in cfg.seeds)


def refused_built(tmp_path, data, folder) -> str:
    """The one `Error:` line of a config whose model (built on the meta device) is larger than its checkpoint."""
    result, archive = ingest(tmp_path, data, folder)
    line = one_error(result, 1)
    assert archived_runs(archive) == 0
    assert line.startswith(f"Error: model {folder}'s config.json builds "), line
    assert line.endswith(": the config does not match the checkpoint; restore config.json or the weights"), line
    return line


@pytest.mark.parametrize("kind, edit", [
    ("gpt2", {"n_positions": 50_000_000}),  # a learned position table: 11.9 GiB built before
    ("llama", {"head_dim": 1_000_000}),  # attention projections: 5.7 GiB
])
def test_sizes_no_product_bounds_are_bounded_by_the_model_built_on_meta(model_dir, data, tmp_path, unbuilt, kind, edit):
    """Sizes outside the three products (positions, head_dim, heads, experts...) pass those
    checks; the config's model, built on the meta device and counted, is refused."""
    folder = edit_config(Path(shutil.copytree(model_dir[kind], tmp_path / f"tiny-{kind}")), edit)
    assert "parameters, more than its weight files hold" in refused_built(tmp_path, data, folder)


@pytest.mark.parametrize("edit", [{"n_inner": 100_000_000, "intermediate_size": 1},
                                  {"intermediate_size": 1, "n_inner": 100_000_000}])
def test_a_decoy_size_key_hides_no_other(model_dir, data, tmp_path, unbuilt, edit):
    """GPT-2 builds its MLP from n_inner: an intermediate_size of 1 beside it hid it (first name
    found); the largest size under any name is checked."""
    folder = edit_config(Path(shutil.copytree(model_dir["gpt2"], tmp_path / "tiny-gpt2")), edit)
    assert "n_inner 100,000,000 and n_embd 32" in refused_unbuilt(tmp_path, data, folder, "(45,952)")


def test_a_config_file_for_this_transformers_version_is_read(llama_copy, data, tmp_path, unbuilt):
    """configuration_files: transformers reads config.<version>.json instead of config.json (its
    200,000 layers passed the check of config.json before)."""
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.5.0.0.json").write_text(json.dumps({**config, "num_hidden_layers": 200_000}))
    edit_config(llama_copy, {"configuration_files": ["config.5.0.0.json"]})
    from transformers import PreTrainedConfig

    assert PreTrainedConfig.get_config_dict(str(llama_copy))[0]["num_hidden_layers"] == 200_000  # what it reads
    assert "num_hidden_layers 200,000" in refused_unbuilt(tmp_path, data, llama_copy, "")


@pytest.mark.parametrize("entries", [["sub/config.5.0.0.json"], ["../config.5.0.0.json"], "config.5.0.0.json"])
def test_config_files_elsewhere_refused(llama_copy, data, tmp_path, unbuilt, entries):
    edit_config(llama_copy, {"configuration_files": entries})
    result, archive = ingest(tmp_path, data, llama_copy)
    line = one_error(result, 1)
    assert line.startswith(f"Error: model folder {llama_copy}'s config.json names configuration files "), line
    assert line.endswith("(configuration_files) that are not files next to it: remove the key and keep the config "
                         "in config.json"), line
    assert archived_runs(archive) == 0


def test_the_built_model_check_takes_real_sizes(tmp_path):
    """Gemma-3-style text + vision configs and a tied head pass the meta-device count when the
    checkpoint holds what the model has (no false refusal)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    slack = loading._BUILD_SLACK
    assert params < slack  # so the bounds below are the slack's
    loading._check_built_model("m", config, loading._Held(0, 1000), quantized=False)
    big = Gemma3TextConfig(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256)  # Gemma-3-270M's sizes
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(big).parameters())
    assert params == 268_098_176  # its checkpoint's elements, measured
    loading._check_built_model("m", big, loading._Held(params, 236), quantized=False)
    loading._check_built_model("m", big, loading._Held((params - slack + 1) // 2, 236), quantized=False)
    with pytest.raises(MlarchError, match="builds a model of 268,098,176 parameters, more than its weight files hold"):
        loading._check_built_model("m", big, loading._Held((params - slack) // 2 - 1, 236), quantized=False)
    loading._check_built_model("m", big, loading._Held((params - slack + 15) // 16, 236), quantized=True)


@pytest.mark.parametrize("hidden", [64, 128])  # TinyStories-1M and -3M
def test_a_causal_mask_per_layer_is_no_oversized_buffer(hidden):
    """GPT-Neo keeps a max_positions² causal mask per layer: TinyStories-1M (8 layers, 2048
    positions) holds 33.5 M mask elements beside 3.7 M parameters and must pass; 65,536
    positions would build 34 GB of masks."""
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    def config(positions):
        return GPTNeoConfig(vocab_size=50257, hidden_size=hidden, num_layers=8, num_heads=16, window_size=256,
                            max_position_embeddings=positions, attention_types=[[["global", "local"], 4]])

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(2048))
    params = sum(p.numel() for p in model.parameters())
    assert sum(b.numel() for b in model.buffers()) > params + loading._BUILD_SLACK  # the case that was refused
    loading._check_built_model("m", config(2048), loading._Held(params, 100), quantized=False)
    with pytest.raises(MlarchError, match="bytes of buffers beside"):
        loading._check_built_model("m", config(65536), loading._Held(params, 100), quantized=False)


def test_config_values_its_class_refuses_are_one_line(llama_copy, data, tmp_path):
    """transformers' config validators raise huggingface_hub's StrictDataclassError (no
    ValueError): it was 'unexpected StrictDataclassClassValidationError'."""
    edit_config(llama_copy, {"num_attention_heads": 100_000, "num_key_value_heads": 100_000})
    result, archive = ingest(tmp_path, data, llama_copy)
    line = one_error(result, 1)
    assert line == (f"Error: cannot load model {llama_copy}: The hidden size (32) is not a multiple of the number of "
                    "attention heads (100000)."), line
    assert archived_runs(archive) == 0
