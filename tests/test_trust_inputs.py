"""Trust at ingest, part two: model folders and data files whose contents try to make mlarch
archive a wrong number (weights the digest does not cover, weights changed under archived
runs, items split where the file has none) or fail with a traceback. Each is refused with
one `<problem>: <fix>` line, or read as the file means it."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mlarch
from fixtures import one_error
from mlarch.cli import cli
from mlarch.errors import MlarchError
from mlarch.ingest import datafiles, hub_data, loading, model_inputs


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The weight-digest cache of this test alone."""
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))


def ingest_args(archive, data, model, *extra):
    return ["--archive", str(archive), "ingest", "--model", str(model), "--langs", "en", "--math", data["math"],
            "--control", data["control"], "--samples", "2", "--top-k", "0.05", "--device", "cpu", "--quiet", *extra]


def other_weights(folder: Path) -> None:
    """Overwrite the folder's checkpoint with other values of the same shapes."""
    weights = load_file(folder / "model.safetensors")
    save_file({k: v * 3 + 0.5 for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})


# --- F1: a sharded index must name files that the digest covers ---------------------------------

def shard_into(folder: Path, shard: str) -> None:
    """Move the folder's weights to `shard` (relative to the folder) and name it in an index."""
    weights = load_file(folder / "model.safetensors")
    target = Path(shard) if Path(shard).is_absolute() else folder / shard
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, target, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: shard for k in weights}}))


@pytest.mark.parametrize("shard", ["shards/model-00001-of-00001.safetensors", "../elsewhere/secret.safetensors",
                                   "ABSOLUTE", "sub\\model.safetensors"])
def test_index_naming_shards_outside_the_folder_refused(llama_copy, data, tmp_path, shard):
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "abs" / "model.safetensors")
    shard_into(llama_copy, shard)
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith(f"Error: index file {llama_copy / 'model.safetensors.index.json'} names the weight file ")
    assert line.endswith(": put every shard in the model folder itself and name it there by its file name")
    assert not archive.exists()


@pytest.mark.parametrize("named", ["sub/other.safetensors", "../other.safetensors", "missing.safetensors",
                                   "config.json", 7, "sub/../model.safetensors"])
def test_config_naming_other_weights_refused(llama_copy, data, tmp_path, named):
    """config.json's transformers_weights makes transformers read that file instead of
    model.safetensors, even in a subfolder, where the weights digest did not look."""
    other = llama_copy / "sub" / "other.safetensors"
    other.parent.mkdir()
    shutil.copy(llama_copy / "model.safetensors", other)
    shutil.copy(llama_copy / "model.safetensors", llama_copy.parent / "other.safetensors")
    other_weights(llama_copy)  # the file the digest would cover holds other values than the one read
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "transformers_weights": named}))
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith(f"Error: model folder {llama_copy}'s config.json names the weight file {named!r} "
                           "(transformers_weights), which is not a weight file next to it: ")
    assert not archive.exists()


def test_config_renaming_transformers_weights_refused(llama_copy, data, tmp_path):
    """config.json's own attribute_map makes transformers look transformers_weights up under
    another key (it read sub/other.safetensors so): read as transformers reads it."""
    other = llama_copy / "sub" / "other.safetensors"
    other.parent.mkdir()
    shutil.copy(llama_copy / "model.safetensors", other)
    other_weights(llama_copy)
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps(
        {**config, "attribute_map": {"transformers_weights": "weights_at"}, "weights_at": "sub/other.safetensors"}))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(llama_copy).transformers_weights == "sub/other.safetensors"  # what it reads
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith(f"Error: model folder {llama_copy}'s config.json names the weight file "
                           "'sub/other.safetensors' (transformers_weights), which is not a weight file next to it: ")
    assert not archive.exists()


@pytest.mark.parametrize("named", [None, "./model.safetensors"])
def test_config_naming_its_own_weights_loads(llama_copy, data, tmp_path, named):
    """transformers_weights null (no setting) or ./model.safetensors (the file itself) are read as they are."""
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "transformers_weights": named}))
    result = CliRunner().invoke(cli, ingest_args(tmp_path / "arch", data, llama_copy))
    assert result.exit_code == 0, result.output


def test_config_naming_weights_next_to_it_digested(llama_copy, data, tmp_path):
    """A transformers_weights file beside config.json is read and in the digest."""
    (llama_copy / "model.safetensors").rename(llama_copy / "weights.safetensors")
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "transformers_weights": "weights.safetensors"}))
    assert loading._read_weights(llama_copy, loading._folder_weights(llama_copy)) == [llama_copy / "weights.safetensors"]
    expected = loading.weights_digest([llama_copy / "weights.safetensors"])[0]
    assert loading.fingerprint(str(llama_copy), None).weights == expected
    result = CliRunner().invoke(cli, ingest_args(tmp_path / "arch", data, llama_copy))
    assert result.exit_code == 0, result.output


def test_index_shards_next_to_it_are_digested(llama_copy):
    weights = load_file(llama_copy / "model.safetensors")
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: weights[k] for k in keys}, llama_copy / shard, metadata={"format": "pt"})
    (llama_copy / "model.safetensors").unlink()
    (llama_copy / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: s for s, keys in halves.items() for k in keys}}))
    expected = loading.weights_digest([llama_copy / s for s in halves])[0]
    assert loading.fingerprint(str(llama_copy), None).weights == expected


def test_weights_digest_of_no_files_refused(llama_copy):
    with pytest.raises(MlarchError, match="no weight files to digest: "):
        loading.weights_digest([])
    (llama_copy / "model.safetensors").unlink()  # config.json, no weights
    with pytest.raises(MlarchError, match=r"has no weight files: pass a transformers model folder that holds"):
        loading.fingerprint(str(llama_copy), None).weights


# --- F2: a rerun over a folder whose weights changed ---------------------------------------------

def test_rerun_with_changed_weights_refused_before_loading(llama_copy, data, tmp_path, monkeypatch):
    archive = tmp_path / "arch"
    assert CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)).exit_code == 0
    runs = mlarch.open(archive).runs().height
    other_weights(llama_copy)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", no_load)
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith("Error: the archive's model 'tiny-llama' has other weights (")
    assert line.endswith(": its archived runs belong to those weights; pass a new --name to archive these weights "
                         "separately, or remove the archived model (`mlarch rm --model tiny-llama`) and ingest again")
    with pytest.raises(MlarchError, match=r"pass a new name= .*\(Archive\.rm\(model='tiny-llama'\)\)"):
        mlarch.open(archive).ingest(str(llama_copy), ["en"], data["math"], data["control"], samples=2,
                                    top_k=[0.05], device="cpu")
    assert mlarch.open(archive).runs().height == runs


def test_a_name_archived_with_other_weights_during_the_passes_is_refused_at_the_commit(llama_copy, data, tmp_path,
                                                                                       monkeypatch):
    """Another ingest may archive the name with other weights between this one's load and its
    commit: the commit checks again under the lock, and nothing of this ingest is archived."""
    from mlarch.ingest import pipeline

    archive = tmp_path / "arch"
    assert CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)).exit_code == 0
    other_weights(llama_copy)
    checked = []
    monkeypatch.setattr(pipeline, "check_model_row", lambda work, info: checked.append(work.name))  # not there yet
    line = one_error(CliRunner().invoke(cli, [*ingest_args(archive, data, llama_copy)[:6], "de",
                                              *ingest_args(archive, data, llama_copy)[7:]]), 1)
    assert checked == ["tiny-llama"]
    assert line.startswith("Error: the archive's model 'tiny-llama' has other weights or dtype (")
    assert "(another ingest archived it while this one ran): its archived runs belong to those weights" in line
    runs = mlarch.open(archive).sql("SELECT lang, status FROM runs ORDER BY ALL").rows()
    assert runs == [("de", "FAILED"), ("de", "FAILED"), ("en", "FINISHED"), ("en", "FINISHED")]


# --- a config or tokenizer edited in place: runs and evaluations made with the old files are not reused --

def _edit_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 1000  # other activations, same weights
    (folder / "config.json").write_text(json.dumps(config))


def test_rerun_after_the_config_changed_is_refused_then_forced(llama_copy, data, tmp_path):
    archive = tmp_path / "arch"
    assert CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)).exit_code == 0
    before = set(mlarch.open(archive).runs()["run_id"])
    recorded = json.loads(mlarch.open(archive).sql("SELECT provenance FROM runs LIMIT 1").item())["model"]
    assert set(recorded["model_files"]) >= {"config.json", "tokenizer.json"}
    _edit_config(llama_copy)
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith("Error: config.json of ") and "changed since run " in line and "--force" in line, line
    with pytest.raises(MlarchError, match="config.json of .* pass force=True"):
        mlarch.open(archive).ingest(str(llama_copy), ["en"], data["math"], data["control"], samples=2,
                                    top_k=[0.05], device="cpu")
    assert set(mlarch.open(archive).runs()["run_id"]) == before  # nothing written
    assert CliRunner().invoke(cli, ingest_args(archive, data, llama_copy, "--force")).exit_code == 0
    in_use = set(mlarch.open(archive).sql("SELECT run_id FROM runs WHERE in_use")["run_id"])
    assert in_use and not in_use & before
    assert CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)).exit_code == 0  # now reused


def test_an_evaluation_after_the_tokenizer_changed_is_refused(llama_copy, data, tmp_path):
    archive = mlarch.open(tmp_path / "arch")
    args = (str(llama_copy), ["en"], "nll", data["math"])
    first = archive.evaluate(*args, limit=2, device="cpu")
    assert archive.evaluate(*args, limit=2, device="cpu").reused == first.written
    tokenizer = json.loads((llama_copy / "tokenizer_config.json").read_text())
    tokenizer["model_max_length"] = 77
    (llama_copy / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    with pytest.raises(MlarchError, match=f"tokenizer_config.json of .* since evaluation {first.written[0]}"):
        archive.evaluate(*args, limit=2, device="cpu")
    assert archive.evaluate(*args, limit=2, device="cpu", force=True).written


# --- files transformers reads beyond the digested ones (mlarch.ingest.model_inputs) ---------------
# Each case was measured under transformers 5.24 by running loading.load under strace and
# listing the files opened: each test shows transformers really reading the file, then the
# ingest refusing (or the file's digest in the record).

def _update_json(path: Path, **entries) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))


def _tokenizer_json(folder: Path) -> dict:
    return json.loads((folder / "tokenizer.json").read_text())


def _ids(folder: Path, **kwargs) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **kwargs)("hello world")["input_ids"]


def _without_merges(source: Path, target: Path) -> None:
    """A copy of source's tokenizer.json that tokenizes otherwise (no merges: a token per byte)."""
    tokenizer = _tokenizer_json(source)
    tokenizer["model"]["merges"] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(tokenizer))


@pytest.mark.parametrize("named", ["sub/tokenizer.1.0.json", "../tokenizer.1.0.json", "ABSOLUTE",
                                   "tokenizer.1.0.json.bak"])
def test_fast_tokenizer_files_naming_other_files_refused(llama_copy, data, tmp_path, named):
    """tokenizer_config.json's fast_tokenizer_files makes transformers load the entry for its
    version instead of tokenizer.json: in a subfolder, up `..`, absolute, or a top-level name
    of a suffix no digest covers (transformers searches `tokenizer\\.(.*)\\.json` in it)."""
    if named == "ABSOLUTE":
        named = str(tmp_path / "abs" / "tokenizer.1.0.json")
    before = _ids(llama_copy)
    _without_merges(llama_copy, llama_copy / named)
    _update_json(llama_copy / "tokenizer_config.json", fast_tokenizer_files=[named])
    assert _ids(llama_copy) != before  # transformers tokenizes with the named file
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith(f"Error: model folder {llama_copy}'s tokenizer_config.json names the tokenizer file "
                           f"{named!r} (fast_tokenizer_files), which is not a file next to it that mlarch digests: ")
    assert not archive.exists()


def _planted_vocabulary(folder: Path, target: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt in `target`: the folder's tokenizer, plus a token 'zzplanted'."""
    model = _tokenizer_json(folder)["model"]
    vocab = {**model["vocab"], "zzplanted": len(model["vocab"]), "<unk>": len(model["vocab"]) + 1}
    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.json").write_text(json.dumps(vocab))
    lines = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (target / "merges.txt").write_text("".join(f"{line}\n" for line in lines))
    return target / "vocab.json", target / "merges.txt"


@pytest.mark.parametrize("tokenizer_class, keys, where", [
    ("LlamaTokenizer", ("vocab", "merges"), "absolute"),
    ("GemmaTokenizer", ("vocab_file", "merges_file"), "absolute"),  # not in GemmaTokenizer's own file names
    ("GemmaTokenizer", ("vocab_file", "merges_file"), "working directory"),
])
def test_tokenizer_config_naming_files_elsewhere_refused(llama_copy, data, tmp_path, monkeypatch, tokenizer_class,
                                                         keys, where):
    """Without tokenizer.json, transformers opens a vocabulary that tokenizer_config.json names
    by a key the class does not replace by the folder's own file (its `vocab` and `merges`,
    Gemma's `vocab_file`, any class's `merges_file`) as written: absolute, or relative to the
    working directory."""
    from transformers import AutoTokenizer

    vocab, merges = _planted_vocabulary(llama_copy, tmp_path / "elsewhere")
    if where == "working directory":
        monkeypatch.chdir(tmp_path)
        vocab, merges = Path("elsewhere/vocab.json"), Path("elsewhere/merges.txt")
    (llama_copy / "tokenizer.json").unlink()
    _update_json(llama_copy / "tokenizer_config.json", tokenizer_class=tokenizer_class,
                 **{keys[0]: str(vocab), keys[1]: str(merges)})
    assert "zzplanted" in AutoTokenizer.from_pretrained(str(llama_copy)).get_vocab()  # read from there
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith(f"Error: model folder {llama_copy}'s tokenizer_config.json names the file {str(vocab)!r} "
                           f"({keys[0]}), which transformers reads though it is not a file of the folder that mlarch "
                           "digests: remove the key from tokenizer_config.json")
    assert not archive.exists()


@pytest.mark.parametrize("tokenizer_class, refused", [("GPT2Tokenizer", False), ("GemmaTokenizer", True)])
def test_a_file_key_is_checked_unless_its_class_replaces_it(llama_copy, tmp_path, monkeypatch, tokenizer_class,
                                                            refused):
    """vocab_file 'vocab.json' with a vocab.json in the working directory: GPT2Tokenizer replaces
    its vocab_file with the folder's own (not refused, wherever mlarch runs); GemmaTokenizer does
    not list vocab_file and would open the working directory's."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    assert ("vocab_file" in tokenizer_class_from_name(tokenizer_class).vocab_files_names) is not refused
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    _update_json(llama_copy / "tokenizer_config.json", tokenizer_class=tokenizer_class, vocab_file="vocab.json")
    covered = [*loading._folder_weights(llama_copy), *loading._model_file_paths(llama_copy, []).values()]
    if refused:
        with pytest.raises(MlarchError, match="names the file 'vocab.json' \\(vocab_file\\)"):
            model_inputs.check(llama_copy, covered)
    else:
        model_inputs.check(llama_copy, covered)


def test_stale_tokenizer_file_keys_that_transformers_replaces_are_not_refused(llama_copy, tmp_path):
    """Old tokenizer_config.json files name their files where they were saved; transformers
    always replaces these keys by the folder's own files (or none), so they are read from
    nowhere else. (Another key naming an existing file is refused even for a class that would
    replace it: which class loads is not told cheaply.)"""
    elsewhere = tmp_path / "elsewhere"
    _without_merges(llama_copy, elsewhere / "tokenizer.json")
    before = _ids(llama_copy)
    _update_json(llama_copy / "tokenizer_config.json", tokenizer_file=str(elsewhere / "tokenizer.json"),
                 special_tokens_map_file=str(elsewhere / "tokenizer.json"))
    assert _ids(llama_copy) == before
    assert set(loading.fingerprint(str(llama_copy), None).files) == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


def test_chat_templates_in_their_folder_are_digested(llama_copy, data, tmp_path):
    """transformers reads every additional_chat_templates/*.jinja; one named default.jinja is
    the template applied, over chat_template.jinja. Each is a model file, so a rerun after one
    changed is refused; a folder without them keeps the model files it had."""
    from transformers import AutoTokenizer

    assert set(loading.fingerprint(str(llama_copy), None).files) == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    (llama_copy / "chat_template.jinja").write_text("top {{ messages[0]['content'] }}")
    (llama_copy / "additional_chat_templates").mkdir()
    (llama_copy / "additional_chat_templates" / "default.jinja").write_text("sub {{ messages[0]['content'] }}")
    tokenizer = AutoTokenizer.from_pretrained(str(llama_copy))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "sub hi"
    assert "additional_chat_templates/default.jinja" in loading.fingerprint(str(llama_copy), None).files
    archive = tmp_path / "arch"
    assert CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)).exit_code == 0
    (llama_copy / "additional_chat_templates" / "default.jinja").write_text("other {{ messages[0]['content'] }}")
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith(f"Error: additional_chat_templates/default.jinja of {llama_copy} changed since run ")


def test_tokenizer_files_of_other_suffixes_are_digested(llama_copy, data, tmp_path):
    """tokenizer_config.json picks the tokenizer class: PhoBERT's reads bpe.codes, a suffix
    that only its name brings under the model files' digests."""
    (llama_copy / "tokenizer.json").unlink()
    words = ["hello", "wor@@", "ld", "h@@", "e@@", "l@@", "o", "w@@", "r@@", "d"]
    (llama_copy / "vocab.txt").write_text("".join(f"{w} 1\n" for w in words))
    (llama_copy / "bpe.codes").write_text("h e 1\nhe l 1\nhel l 1\nhell o</w> 1\n")  # merges to 'hello'
    _update_json(llama_copy / "tokenizer_config.json", tokenizer_class="PhobertTokenizer")
    before = _ids(llama_copy)
    archive = tmp_path / "arch"
    assert CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)).exit_code == 0
    (llama_copy / "bpe.codes").write_text("h e 1\n")
    assert _ids(llama_copy) != before  # transformers reads bpe.codes
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith(f"Error: bpe.codes of {llama_copy} changed since run ")


def test_every_tokenizer_file_name_of_transformers_is_digested():
    """Every vocabulary file name a tokenizer class of transformers reads (its VOCAB_FILES_NAMES,
    read from transformers' source) is a model file, by its suffix or by name."""
    import ast

    import transformers

    from mlarch.ingest import model_inputs

    root = Path(transformers.__file__).parent
    names = set()
    for path in [*root.glob("tokenization_*.py"), *root.glob("models/*/tokenization_*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "VOCAB_FILES_NAMES" for t in node.targets):
                try:
                    names.update(ast.literal_eval(node.value).values())
                except ValueError:  # TokenizersBackend's, of constants: tokenizer.json and tokenizer.model
                    continue
    assert len(names) > 20 and {"bpe.codes", "source.spm", "prophetnet.tokenizer"} <= names
    assert names <= model_inputs.TOKENIZER_FILES
    assert all(Path(n).suffix in loading._MODEL_FILE_SUFFIXES or n in model_inputs.TOKENIZER_FILES for n in names)


@pytest.mark.parametrize("beside", ["tokenizer.json", "additional_chat_templates/default.jinja"])
@pytest.mark.parametrize("passed", ["gguf_file", "file"])
def test_gguf_beside_tokenizer_files_refused(data, tmp_path, beside, passed):
    """With a .gguf file, transformers still reads the folder's tokenizer files (tokenizer.json,
    tokenizer_config.json, the class's vocabulary, additional_chat_templates/) instead of the
    GGUF's own tokenizer, and no digest covered them."""
    pytest.importorskip("gguf")
    from test_hf_conventions import write_tiny_gguf
    from transformers import AutoTokenizer

    alone, folder = tmp_path / "alone", tmp_path / "ggufs"
    write_tiny_gguf(alone / "tiny.gguf")
    shutil.copytree(alone, folder)
    if beside == "tokenizer.json":
        tokenizer = json.loads(AutoTokenizer.from_pretrained(str(alone), gguf_file="tiny.gguf")
                               .backend_tokenizer.to_str())
        tokenizer["model"]["merges"] = []
        (folder / beside).write_text(json.dumps(tokenizer))
        assert _ids(folder, gguf_file="tiny.gguf") != _ids(alone, gguf_file="tiny.gguf")
    else:
        (folder / beside).parent.mkdir()
        (folder / beside).write_text("planted {{ messages[0]['content'] }}")
        assert AutoTokenizer.from_pretrained(str(folder), gguf_file="tiny.gguf").chat_template.startswith("planted")
    extra = ["--gguf-file", "tiny.gguf"] if passed == "gguf_file" else []
    model = folder if passed == "gguf_file" else folder / "tiny.gguf"
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, model, *extra)), 1)
    assert line == (f"Error: the folder {folder} of 'tiny.gguf' also holds tokenizer files ({beside!r}), which "
                    "transformers reads instead of the GGUF file's own tokenizer: put the .gguf file in a folder of "
                    "its own and pass it there")
    assert not archive.exists()
    assert CliRunner().invoke(cli, ingest_args(archive, data, alone / "tiny.gguf")).exit_code == 0


def _lora_adapter(folder: Path, base: Path) -> None:
    """A LoRA adapter on q_proj and v_proj as peft saves it (adapter_config.json, adapter_model.safetensors)."""
    import torch

    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": 2,
        "lora_alpha": 2, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True}))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for module, out in (("q_proj", 32), ("v_proj", 16)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(2, 32, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, 2, generator=generator)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("with_config", [True, False], ids=["with-config", "adapter-only"])
def test_peft_adapter_refused(llama_copy, pristine_llama, data, tmp_path, with_config):
    """transformers looks for adapter_config.json in every folder it loads; where peft is
    installed it applies the adapter (weights the digest covers, but which the same digest
    leaves out where peft is not), and without config.json it loads the base model from
    base_model_name_or_path, wherever that is. Measured with peft 0.21.2 (not a dependency of
    mlarch): the sum of a 5-token forward's logits went from 9.584 to 2.481 with the adapter,
    under the same weights digest as without peft; an adapter-only folder read config.json,
    generation_config.json and model.safetensors of the base folder outside it."""
    import importlib.util

    from transformers.utils.peft_utils import find_adapter_config_file

    _lora_adapter(llama_copy, pristine_llama)
    if not with_config:
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            (llama_copy / name).unlink()
    assert find_adapter_config_file(str(llama_copy)) == str(llama_copy / "adapter_config.json")
    if importlib.util.find_spec("peft") is not None:
        import torch
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([[0, 273, 78, 78, 81]])
        logits = [AutoModelForCausalLM.from_pretrained(str(f))(ids).logits.sum().item()
                  for f in (pristine_llama, llama_copy)]
        assert logits[0] != logits[1]
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line.startswith(f"Error: model folder {llama_copy} holds a PEFT adapter (adapter_config.json), which "
                           "transformers applies to the weights only where the peft library is installed")
    assert line.endswith(": merge the adapter into the model (peft's merge_and_unload, then save_pretrained) and "
                         "pass that folder")
    assert not archive.exists()


@pytest.mark.parametrize("key", ["attn_implementation", "_attn_implementation"])
def test_attention_kernel_from_the_hub_refused(llama_copy, data, tmp_path, key):
    """config.json may name a Hub repository as its attention: transformers then downloads that
    kernel with the kernels library (without it, the load asked to install it)."""
    from transformers import AutoConfig
    from transformers.integrations.hub_kernels import is_kernel

    _update_json(llama_copy / "config.json", **{key: "kernels-community/flash-attn2"})
    implementation = AutoConfig.from_pretrained(str(llama_copy))._attn_implementation
    assert implementation == "kernels-community/flash-attn2" and is_kernel(implementation)
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, llama_copy)), 1)
    assert line == (f"Error: model folder {llama_copy}'s config.json asks for the attention kernel "
                    "'kernels-community/flash-attn2' from the Hugging Face Hub (attn_implementation), code and files "
                    "outside the folder that mlarch does not digest: remove the key from config.json")
    assert not archive.exists()


def test_attention_kernel_in_the_config_file_transformers_reads_refused(llama_copy, data, tmp_path):
    """With configuration_files, the kernel named in config.<version>.json is the one read."""
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.5.0.0.json").write_text(json.dumps({**config, "attn_implementation": "kernels-community/x"}))
    _update_json(llama_copy / "config.json", configuration_files=["config.5.0.0.json"])
    from transformers import PreTrainedConfig

    assert PreTrainedConfig.get_config_dict(str(llama_copy))[0]["attn_implementation"] == "kernels-community/x"
    line = one_error(CliRunner().invoke(cli, ingest_args(tmp_path / "arch", data, llama_copy)), 1)
    assert line.startswith(f"Error: model folder {llama_copy}'s config.json asks for the attention kernel "
                           "'kernels-community/x' from the Hugging Face Hub"), line


def test_stale_adapter_config_without_adapter_weights_loads_where_peft_is_absent(llama_copy, data, tmp_path):
    """A merged fine-tune with a leftover adapter_config.json: without adapter weights and
    without peft, transformers leaves it alone, and so does mlarch."""
    import importlib.util

    (llama_copy / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    result = CliRunner().invoke(cli, ingest_args(tmp_path / "arch", data, llama_copy))
    if importlib.util.find_spec("peft") is None:
        assert result.exit_code == 0, result.output
    else:  # where peft is installed, transformers would look for the adapter: refused
        assert "holds a PEFT adapter" in result.output


# --- F3: the digest cache must notice a rewrite in place that keeps the mtime ----------------------

def test_digest_cache_sees_in_place_rewrite_with_kept_mtime(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 64)
    before = os.stat(path)
    assert loading._cached_sha256(path) == datafiles.sha256_file(path)
    time.sleep(0.05)  # past the file system clock's tick: the rewrite gets another ctime
    with open(path, "r+b") as handle:  # same inode, same size (rsync --inplace)
        handle.write(b"b" * 64)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime as before
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns
    assert loading._cached_sha256(path) == datafiles.sha256_file(path)


# --- F9: a GGUF header cut short -------------------------------------------------------------------

def test_truncated_gguf_header_named_as_damaged(data, tmp_path):
    pytest.importorskip("gguf")
    model = tmp_path / "huge.gguf"  # version 3, tensor and key counts far past the file's end
    model.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 7 + b"\x7f" + b"\xff" * 7 + b"\x7f")
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ingest_args(archive, data, model)), 1)
    assert line.startswith(f"Error: weight file {model} is damaged or truncated (")
    assert line.endswith(": restore it from the original checkpoint or download the model again")
    assert not archive.exists()


# --- data files: JSON Python reads but rejects oddly, BOMs, line breaks ---------------------------

@pytest.mark.parametrize("value,problem", [
    ("9" * 5000, "number too long"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("NaN", "NaN is not a JSON value"),
    ("Infinity", "Infinity is not a JSON value"),
    ("-Infinity", "-Infinity is not a JSON value"),
])
def test_jsonl_values_python_rejects_oddly_are_invalid_json(tmp_path, value, problem):
    path = tmp_path / "math.jsonl"
    path.write_text('{"question": "q?", "answer": "1"}\n' f'{{"question": "q?", "answer": {value}}}\n')
    with pytest.raises(MlarchError) as caught:
        datafiles.parse_records(path)
    assert str(caught.value) == f"{path}, line 2: invalid JSON ({problem}); fix that line"
    hub = tmp_path / "train.jsonl"
    shutil.copy(path, hub)
    with pytest.raises(MlarchError, match=rf"^hub split, line 2: invalid JSON \({problem}\)$"):
        hub_data._read(hub, "hub split")


def test_jsonl_bigint_is_one_error_line_in_the_cli(data, model_dir, tmp_path):
    (tmp_path / "en.jsonl").write_text('{"id": ' + "1" * 5000 + ', "question": "q?", "answer": "1"}\n')
    args = ingest_args(tmp_path / "arch", {**data, "math": str(tmp_path / "{lang}.jsonl")}, model_dir["llama"])
    line = one_error(CliRunner().invoke(cli, args), 1)
    assert line == f"Error: {tmp_path / 'en.jsonl'}, line 1: invalid JSON (number too long); fix that line"


def test_utf8_bom_removed_before_parsing(tmp_path):
    csv_file = tmp_path / "math.csv"
    csv_file.write_bytes("\ufeffquestion,answer\nq?,1\n".encode())
    assert datafiles.parse_records(csv_file)[0] == ["Q: q?\nA: 1"]
    text = tmp_path / "control.txt"
    text.write_bytes("\ufeffFirst passage.\nSecond.\n".encode())
    assert datafiles.parse_records(text)[0] == ["First passage.", "Second."]
    jsonl = tmp_path / "math.jsonl"
    jsonl.write_bytes('\ufeff{"text": "t"}\n'.encode())
    assert datafiles.parse_records(jsonl)[0] == ["t"]
    hub = tmp_path / "train.jsonl"
    shutil.copy(jsonl, hub)
    assert hub_data._read(hub, "hub split") == ([{"text": "t"}], ["text"])


def test_items_split_at_newlines_only(tmp_path):
    # U+2028, NEL, form feed, vertical tab, file separator: inside an item, as `wc -l` counts lines
    lines = ["one\u2028half", "two\x85half", "three\x0chalf", "four\x0bhalf\x1chalf"]
    text = tmp_path / "control.txt"
    text.write_bytes(("\r\n".join(lines) + "\n").encode())
    assert datafiles.parse_records(text)[0] == lines
    jsonl = tmp_path / "math.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in lines) + "\n",
                     encoding="utf-8")
    assert datafiles.parse_records(jsonl)[0] == lines
    hub = tmp_path / "train.jsonl"
    shutil.copy(jsonl, hub)
    assert [row["text"] for row in hub_data._read(hub, "hub split")[0]] == lines


def test_a_text_file_with_bare_carriage_returns_is_refused(data, model_dir, tmp_path):
    """Old Mac line ends (\\r alone): split at \\n only, the whole file would be one item."""
    control = tmp_path / "en.txt"
    control.write_bytes(b"First passage.\rSecond passage.\rThird.\r")
    args = ingest_args(tmp_path / "arch", {**data, "control": str(tmp_path / "{lang}.txt")}, model_dir["llama"])
    line = one_error(CliRunner().invoke(cli, args), 1)
    assert line == (f"Error: {control}, line 1: a carriage return that ends no line (\\r without \\n): give the "
                    "file \\n line ends (e.g. tr '\\r' '\\n')")
    assert not (tmp_path / "arch").exists()
    control.write_bytes(b"First passage.\r\nSecond passage.\r\n")  # Windows line ends are lines
    assert datafiles.parse_records(control)[0] == ["First passage.", "Second passage."]


# --- F7: texts longer than the positions a model was made for -------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_text_past_learned_positions_refused_before_any_run(model_dir, data, tmp_path, kind):
    """GPT-2's table of 256 learned positions fails the forward pass; the tiny Llama's rotary
    positions past its max_position_embeddings (256) would be extrapolated: plausible scores
    from positions it was never made for."""
    control = tmp_path / "control"
    control.mkdir()
    words = " ".join(f"word{i} and more" for i in range(300))  # ~1,000+ tokens; the model has 256 positions
    (control / "en.txt").write_text(f"A short line.\n{words}\n", encoding="utf-8")
    archive = tmp_path / "arch"
    args = ingest_args(archive, {**data, "control": str(control / "{lang}.txt")}, model_dir[kind])
    line = one_error(CliRunner().invoke(cli, args), 1)
    assert line.startswith("Error: text 1 of en control has ")
    assert line.endswith(" tokens, more than the model's 256 positions: pass --max-length 256 or remove that text")
    assert not archive.exists()
    result = CliRunner().invoke(cli, [*args, "--max-length", "256"])  # the fix it names
    assert result.exit_code == 0, result.output


def test_positions_read_from_the_config_file_transformers_reads(llama_copy, data, tmp_path):
    """With configuration_files, transformers reads config.<version>.json: its 64 positions
    count, not config.json's 4096 (the check read config.json and let 100-token texts through)."""
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.5.0.0.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    (llama_copy / "config.json").write_text(json.dumps(
        {**config, "max_position_embeddings": 4096, "configuration_files": ["config.5.0.0.json"]}))
    control = tmp_path / "control"
    control.mkdir()
    (control / "en.txt").write_text("A short line.\n" + " ".join(f"word{i}" for i in range(60)) + "\n")
    args = ingest_args(tmp_path / "arch", {**data, "control": str(control / "{lang}.txt")}, llama_copy)
    line = one_error(CliRunner().invoke(cli, args), 1)
    assert line.startswith("Error: text ") and " of en " in line, line
    assert line.endswith(" tokens, more than the model's 64 positions: pass --max-length 64 or remove that text")


# --- files that are not one item per line, and items too long to tokenize -------------------------

@pytest.mark.parametrize("suffix", [".json", ".tsv"])
def test_files_that_are_not_lines_are_refused(tmp_path, suffix):
    path = tmp_path / f"items{suffix}"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n]\n' if suffix == ".json" else "question\tanswer\n1+1\t2\n")
    with pytest.raises(MlarchError, match=f"not {suffix}: convert it to JSON Lines"):
        datafiles.parse_records(path)


def test_an_item_too_long_to_tokenize_is_refused_before_tokenizing(tmp_path):
    path = tmp_path / "items.txt"
    path.write_text("short item\n" + "x" * (datafiles.MAX_ITEM_CHARS + 1) + "\n")
    with pytest.raises(MlarchError, match=r"item 1 has 1,048,577 characters, more than the 1,048,576"):
        datafiles.parse_records(path)
    path.write_text("short item\n" + "x" * datafiles.MAX_ITEM_CHARS + "\n")
    assert len(datafiles.parse_records(path)[0]) == 2


@pytest.mark.parametrize("length, refused", [(200_000, False), (datafiles.MAX_ITEM_CHARS, False),
                                             (datafiles.MAX_ITEM_CHARS + 1, True)])
def test_a_long_csv_item_has_the_item_limit_of_any_file(tmp_path, length, refused):
    """csv's own field limit (131,072 characters) refused a 200,000-character item as 'malformed
    CSV' that a .jsonl file takes; the limit is MAX_ITEM_CHARS, with its message, as for .jsonl."""
    import csv

    path = tmp_path / "items.csv"
    path.write_text('text\n"' + "x" * length + '"\nshort item\n', encoding="utf-8")
    before = csv.field_size_limit()
    if refused:
        with pytest.raises(MlarchError, match=f"item 0 has {length:,} characters, more than the 1,048,576"):
            datafiles.parse_records(path)
    else:
        assert [len(t) for t in datafiles.parse_records(path)[0]] == [length, 10]
    assert csv.field_size_limit() == before  # the process-wide limit is put back


def test_json_numbers_are_written_out_and_other_types_refused(tmp_path):
    """str(1e21) is '1e+21' and str(5e-07) '5e-07', whose last numbers (21, 7) an accuracy
    reference would read: numbers are written out in full; lists, objects, booleans refused."""
    from mlarch.evaluation import answers

    path = tmp_path / "items.jsonl"
    path.write_text('{"question": "How many atoms?", "answer": 1e21}\n{"question": "q", "answer": 5e-07}\n'
                    '{"question": "q", "answer": 42}\n')
    texts, _, pairs = datafiles.parse_records(path)
    assert [a for _, a in pairs] == ["1000000000000000000000", "0.0000005", "42"]
    assert texts[0] == "Q: How many atoms?\nA: 1000000000000000000000"
    assert [answers.reference(a) for _, a in pairs] == ["1000000000000000000000", "0.0000005", "42"]
    for bad, kind in (('["a", "b"]', "list"), ('{"x": 12}', "dict"), ("true", "bool")):
        path.write_text(f'{{"question": "q", "answer": {bad}}}\n')
        with pytest.raises(MlarchError, match=f"line 1: the 'answer' field is a {kind}, not text or a number"):
            datafiles.parse_records(path)


def test_a_parquet_file_is_refused_for_what_it_is(tmp_path):
    path = tmp_path / "items.parquet"
    path.write_bytes(b"PAR1\x15\x04\x15\x10\xff\xfe" * 10)  # not UTF-8: the suffix speaks first
    with pytest.raises(MlarchError, match="not .parquet: convert it to JSON Lines"):
        datafiles.parse_records(path)


def test_a_data_file_over_a_gibibyte_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "items.txt"
    with open(path, "wb") as f:
        f.truncate(datafiles.MAX_FILE_BYTES + 1)  # sparse
    with pytest.raises(MlarchError, match=r"is 1,073,741,825 bytes, more than the 1,073,741,824 mlarch reads"):
        datafiles.parse_records(path)


def test_a_json_escape_of_half_a_surrogate_pair_is_refused(tmp_path, model_dir, data):
    """`{"text": "\\ud800"}` is valid JSON that decodes to no character: it went through the
    reader and failed later as an `unexpected UnicodeEncodeError`."""
    math = tmp_path / "en.jsonl"
    math.write_text('{"text": "fine"}\n{"text": "a \\ud800 b"}\n', encoding="utf-8")
    assert "\ud800" in json.loads(math.read_text().splitlines()[1])["text"]  # the case is real
    args = ingest_args(tmp_path / "arch", {**data, "math": str(tmp_path / "{lang}.jsonl")}, model_dir["llama"])
    line = one_error(CliRunner().invoke(cli, args), 1)
    assert line == (f"Error: {math}, line 2: a \\u escape (\\ud800) names half of a UTF-16 surrogate pair, which "
                    "is no character; fix that line")
    assert not (tmp_path / "arch").exists()
    math.write_text('{"text": "a \\ud83d\\ude00 b"}\n', encoding="utf-8")  # a whole pair is a character: read
    assert datafiles.parse_records(math)[0] == ["a \U0001F600 b"]


def test_a_csv_quote_that_never_closes_is_refused(tmp_path):
    """csv's lenient default read `"unterminated` and every later line as one item."""
    path = tmp_path / "items.csv"
    path.write_text('text\nfirst\n"unterminated\nsecond\nthird\n', encoding="utf-8")
    with pytest.raises(MlarchError, match=r"items\.csv, line \d+: malformed CSV \(unexpected end of data\)"):
        datafiles.parse_records(path)
    path.write_text('text\n"a ""quoted"" word"\nplain\n', encoding="utf-8")  # CSV's own quoting still reads
    assert datafiles.parse_records(path)[0] == ['a "quoted" word', "plain"]


@pytest.mark.parametrize("suffix, line", [(".txt", "ab"), (".jsonl", '{"text": "ab"}'), (".csv", "ab")])
def test_a_file_of_more_lines_than_mlarch_reads_is_refused_before_items_are_made(tmp_path, monkeypatch, suffix,
                                                                                  line):
    """64 MiB of 'ab' lines became 2.3 GB of Python strings (a .jsonl of them 2.7 GB of dicts): under
    the 1 GiB size bound, a file of tiny lines would take ~30 GB. Lines are counted first."""
    monkeypatch.setattr(datafiles, "MAX_LINES", 100)
    path = tmp_path / f"items{suffix}"
    header = "text\n" if suffix == ".csv" else ""
    path.write_text(header + (line + "\n") * (100 - len(header.splitlines())))
    assert len(datafiles.parse_records(path)[0]) == 100 - len(header.splitlines())
    path.write_text(header + (line + "\n") * (101 - len(header.splitlines())))
    with pytest.raises(MlarchError, match=r"items\.\w+ has 101 lines, more than the 100 mlarch reads for one "
                                          "language: sample the items you need into a smaller file"):
        datafiles.parse_records(path)
    path.write_text(header + (line + "\n") * (100 - len(header.splitlines())) + line)  # no final newline
    with pytest.raises(MlarchError, match="has 101 lines"):
        datafiles.parse_records(path)
