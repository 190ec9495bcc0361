"""--device-map auto: a model spread by accelerate over devices, scored and intervened on.

On this CPU-only machine `auto` places every module on the CPU: the whole path (loading with
a device map, provenance, identity) runs and must give the default path's numbers bit for
bit. accelerate's hooks themselves are exercised on the CPU too: layers offloaded with
accelerate.cpu_offload keep meta tensors as weights (their values in the hook's weights map),
as modules offloaded from a GPU do; |W|, norms and interventions must be those of the plain
model. The GPU split (max_memory forcing part of the model off cuda:0) is in the cuda test
at the end, skipped without CUDA."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mlarch
from fixtures import one_error
from mlarch.cli import cli
from mlarch.errors import UsageError
from mlarch.evaluation.interventions import Intervention, ModuleChange, Plan, applied
from mlarch.ingest import devices, loading
from mlarch.ingest.scoring import run_pass, scored_modules

pytest.importorskip("accelerate", reason="--device-map needs accelerate (pip install 'mlarch[device-map]')")
KS = [0.01, 0.05, 0.25]


def _ingest(root, model_dir, data, **options):
    archive = mlarch.open(root)
    archive.ingest(str(model_dir["llama"]), ["en", "de"], data["math"], data["control"], samples=4, top_k=KS,
                   **options)
    return archive


def test_auto_on_cpu_gives_the_default_paths_sets_and_records_the_map(model_dir, data, tmp_path):
    plain = _ingest(tmp_path / "plain", model_dir, data, device="cpu")
    mapped = _ingest(tmp_path / "mapped", model_dir, data, device_map="auto")
    query = "SELECT lang, role, run_id, config_digest FROM runs ORDER BY lang, role"
    rows = list(zip(plain.sql(query).iter_rows(named=True), mapped.sql(query).iter_rows(named=True)))
    assert len(rows) == 4
    for a, b in rows:
        assert a["config_digest"] == b["config_digest"]  # placement is not part of what was computed
        na, nb = plain.norms(a["run_id"]), mapped.norms(b["run_id"])
        assert list(na) == list(nb)
        for module in na:
            assert np.array_equal(na[module], nb[module])
            assert np.array_equal(plain.levels(a["run_id"], module), mapped.levels(b["run_id"], module))
    sets = "SELECT lang, k, module, n_math_top, n_control_top, n_selected FROM selections ORDER BY ALL"
    assert plain.sql(sets).rows() == mapped.sql(sets).rows()
    prov = mapped.run(rows[0][1]["run_id"])["provenance"]
    assert prov["config"]["device_map"] == "auto" and prov["config"]["device"] == "cpu"
    assert prov["model"]["placement"] == {"device_map": {"": "cpu"}, "modules_per_device": {"cpu": 1}}
    assert "placement" not in plain.run(rows[0][0]["run_id"])["provenance"]["model"]
    # the same identity: an archive ingested on one device reuses its runs under a device map
    again = plain.ingest(str(model_dir["llama"]), ["en", "de"], data["math"], data["control"], samples=4,
                         top_k=KS, device_map="auto")
    assert again.written == [] and len(again.skipped) == 4


def test_eval_under_a_device_map_matches(model_dir, data, tmp_path):
    results = []
    for label, options in (("plain", {"device": "cpu"}), ("mapped", {"device_map": "auto"})):
        archive = _ingest(tmp_path / label, model_dir, data, device="cpu")
        archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["prune:en@0.05"],
                         limit=3, **options)
        results.append(archive.sql("SELECT e.intervention, i.item_index, i.nll FROM evaluation_items i JOIN "
                                   "evaluations e USING (eval_id) ORDER BY ALL").rows())
    assert results[0] == results[1] and len(results[0]) == 6


def _offloaded(path):
    """The tiny llama with its second block and its (untied, scored) head offloaded by
    accelerate: their weights are meta tensors, the values sit in the hooks' weights maps."""
    from accelerate import cpu_offload

    model = loading.load(str(path), revision=None, device=torch.device("cpu"), dtype="float32").model
    cpu_offload(model.model.layers[1], execution_device=torch.device("cpu"))
    cpu_offload(model.lm_head, execution_device=torch.device("cpu"))
    return model


def test_offloaded_modules_score_like_the_plain_model(model_dir):
    loaded = loading.load(str(model_dir["llama"]), revision=None, device=torch.device("cpu"), dtype="float32")
    model = _offloaded(model_dir["llama"])
    plain, split = scored_modules(loaded.model), scored_modules(model)
    assert [m.name for m in plain] == [m.name for m in split]
    offloaded = [m.name for m in split if m.module.weight.device.type == "meta"]
    assert "lm_head" in offloaded and any(name.startswith("model.layers.1.") for name in offloaded)
    for a, b in zip(plain, split):
        assert np.array_equal(a.magnitudes(), b.magnitudes())
    texts = ["Q: 2 + 3?\nA: 5.", "The river runs slowly.", "Wenn Ana 4 Äpfel hat?"]
    one = run_pass(loaded.model, loaded.tokenizer, plain, texts, batch_size=2, max_length=64, device=loaded.device)
    two = run_pass(model, loaded.tokenizer, split, texts, batch_size=2, max_length=64, device=loaded.device)
    assert list(one.norms) == list(two.norms)  # module order: the host gets them in the scored order
    for name in one.norms:
        assert np.array_equal(one.norms[name], two.norms[name]), name


def test_interventions_change_offloaded_weights_and_restore_them(model_dir):
    loaded = loading.load(str(model_dir["llama"]), revision=None, device=torch.device("cpu"), dtype="float32")
    model = _offloaded(model_dir["llama"])
    plain, split = scored_modules(loaded.model), scored_modules(model)
    targets = [i for i, m in enumerate(split) if m.module.weight.device.type == "meta"][:3]
    rng = np.random.default_rng(0)
    changes = [ModuleChange(split[i].name, i, np.sort(rng.choice(split[i].n_params, 40, replace=False)))
               for i in targets]
    plan = Plan(Intervention("prune", "en", 0.01, None), 1, changes, 120)
    ids = loaded.tokenizer(["Q: 2 + 3?\nA: 5."], return_tensors="pt")["input_ids"]

    def logits(m):
        with torch.no_grad():  # not inference_mode: its meta tensors would refuse a (wrong) write loudly
            return m(input_ids=ids).logits

    before = logits(model)
    assert torch.equal(before, logits(loaded.model))
    kept = {split[i].name: split[i].weight().clone() for i in targets}
    with applied(plain, plan), applied(split, plan):
        changed = logits(model)
        assert torch.equal(changed, logits(loaded.model))  # the offloaded model saw the same change
        assert not torch.equal(changed, before)
    assert torch.equal(logits(model), before)
    for i in targets:
        assert torch.equal(split[i].weight(), kept[split[i].name])


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["ingest", "eval"])
def test_cli_device_map_with_a_device_is_one_line(model_dir, data, tmp_path, command):
    archive = tmp_path / "arch"
    args = {"ingest": ["ingest", "--model", str(model_dir["llama"]), "--langs", "en", "--math", data["math"],
                       "--control", data["control"]],
            "eval": ["eval", "--model", str(model_dir["llama"]), "--langs", "en", "--task", "nll", "--data",
                     data["math"]]}[command]
    line = one_error(CliRunner().invoke(cli, ["--archive", str(archive), *args, "--device-map", "auto",
                                              "--device", "cpu", "-q"]), 2)
    assert line == ("Error: --device-map auto places every module itself: drop --device cpu "
                    "(or drop --device-map to use that one device)")
    line = one_error(CliRunner().invoke(cli, ["--archive", str(archive), *args, "--device-map", "balanced"]), 2)
    assert line.startswith("Error: unknown device map 'balanced': use --device-map auto")
    assert not archive.exists()


def test_missing_accelerate_is_one_line_with_the_pip_fix(model_dir, data, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(UsageError, match=r"^device_map='auto' needs accelerate, which is not installed: "
                                         r"pip install 'mlarch\[device-map\]'"):
        devices.check_device_map("auto")
    archive = tmp_path / "arch"
    line = one_error(CliRunner().invoke(cli, ["--archive", str(archive), "ingest", "--model", str(model_dir["llama"]),
                                              "--langs", "en", "--math", data["math"], "--control", data["control"],
                                              "--device-map", "auto", "-q"]), 2)
    assert "pip install 'mlarch[device-map]'" in line and not archive.exists()


# --- a real split over a GPU and the CPU (skipped without CUDA) --------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_split_with_cpu_offload_matches_one_gpu(model_dir):
    """max_memory leaves cuda:0 room for about half the model: accelerate offloads the rest to
    the CPU and runs it on cuda:0. Same kernels, same per-module sums: the norms equal the
    one-GPU run's bit for bit, and an intervention on an offloaded module is seen."""
    cuda = torch.device("cuda:0")
    whole = loading.load(str(model_dir["llama"]), revision=None, device=cuda, dtype="float32")
    size = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    split = loading.load(str(model_dir["llama"]), revision=None, device=cuda, dtype="float32", device_map="auto",
                         max_memory={0: size // 2, "cpu": 10 * size})
    placed = set(split.device_map.values())
    assert "cpu" in placed and placed & {"0", "cuda:0"}, split.device_map
    a, b = scored_modules(whole.model), scored_modules(split.model)
    assert any(m.module.weight.device.type == "meta" for m in b)
    texts = ["Q: 2 + 3?\nA: 5.", "The river runs slowly.", "Wenn Ana 4 Äpfel hat?"]
    one = run_pass(whole.model, whole.tokenizer, a, texts, batch_size=2, max_length=64, device=whole.device)
    two = run_pass(split.model, split.tokenizer, b, texts, batch_size=2, max_length=64, device=split.device)
    for name in one.norms:
        assert np.array_equal(one.norms[name], two.norms[name]), name
    for x, y in zip(a, b):
        assert np.array_equal(x.magnitudes(), y.magnitudes())
    target = next(i for i, m in enumerate(b) if m.module.weight.device.type == "meta")
    plan = Plan(Intervention("prune", "en", 0.01, None), 1,
                [ModuleChange(b[target].name, target, np.arange(0, b[target].n_params, 7, dtype=np.int64))], 1)
    ids = split.tokenizer(texts[:1], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        base = split.model(input_ids=ids.to(split.device)).logits.cpu()
        with applied(a, plan), applied(b, plan):
            left = whole.model(input_ids=ids.to(cuda)).logits.cpu()
            right = split.model(input_ids=ids.to(split.device)).logits.cpu()
        assert torch.equal(left, right) and not torch.equal(right, base)
        assert torch.equal(split.model(input_ids=ids.to(split.device)).logits.cpu(), base)
