"""Ingest equals a slow, obvious reference: batch size 1, full forward passes (output head
included), per-sample norms in float64, numpy scores and a stable argsort top-k.

The data is ragged (texts of 1 to 40+ tokens), so the batched ingest really pads: padding
counted in the norms, left padding (gpt2's learned positions) or one norm per batch instead
of per sample all change the batched norms."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

import mlarch
from mlarch.ingest.sources import parse_file

from fixtures import LANGS as DATA_LANGS, math_items, prose_items

KS = [0.01, 0.05, 0.25]
LANGS = ["en", "de", "bn"]
SAMPLES = 7
MAX_LENGTH = 40  # some items are longer: truncation is exercised
# words kept of item i: lengths from 1-2 tokens to well past MAX_LENGTH, all different, so a
# batch of the length-sorted samples pads unless it holds one item repeated
MATH_WORDS = [2, 5, 8, 11, 14, 17, 20, 23, 26, 30]
CONTROL_WORDS = [1, 3, 5, 7, 9, 11, 14, 17]

EXPECTED_MODULES = {
    "llama": {"lm_head"} | {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    "qwen2": {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    "gpt2": {f"transformer.h.{i}.{p}" for i in range(2) for p in (
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
}


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """Math and control files whose items are cut to different numbers of words."""
    folder = tmp_path_factory.mktemp("ragged")
    (folder / "math").mkdir()
    (folder / "control").mkdir()
    for lang in DATA_LANGS:
        with open(folder / "math" / f"{lang}.jsonl", "w", encoding="utf-8") as handle:
            for words, item in zip(MATH_WORDS, math_items(lang, len(MATH_WORDS))):
                text = " ".join(f"Q: {item['question']} A: {item['answer']}".split()[:words])
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        lines = [" ".join(text.split()[:words]) for words, text in zip(CONTROL_WORDS, prose_items(lang))]
        (folder / "control" / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"math": str(folder / "math" / "{lang}.jsonl"), "control": str(folder / "control" / "{lang}.txt")}


def ingest(root, model_path, data, batch_size):
    archive = mlarch.open(root)
    archive.ingest(str(model_path), LANGS, data["math"], data["control"], samples=SAMPLES,
                   seeds=[3], top_k=KS, batch_size=batch_size, max_length=MAX_LENGTH, device="cpu")
    return archive


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def case(request, model_dir, ragged, tmp_path_factory):
    """Batch size 1 as on a CPU (selection and writes in between the passes); batch size 4
    with them in a background thread beside the next pass, as on a GPU. The attention masks
    of the batched passes are recorded: (batch width, real tokens per row) per batch."""
    from mlarch.ingest import pipeline, scoring

    kind = request.param
    one = ingest(tmp_path_factory.mktemp(f"{kind}-b1"), model_dir[kind], ragged, 1)
    masks = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "overlaps", lambda device: True)
        spy = []
        patch.setattr(pipeline.parallel, "background", lambda overlap, real=pipeline.parallel.background: (
            spy.append(overlap), real(overlap))[1])
        real_start = scoring.NormCollector.start_batch
        patch.setattr(scoring.NormCollector, "start_batch", lambda self, mask: (
            masks.append((mask.shape[1], mask.sum(dim=1).to(torch.long).tolist())), real_start(self, mask))[1])
        batched = ingest(tmp_path_factory.mktemp(f"{kind}-b4"), model_dir[kind], ragged, 4)
    assert spy == [True]
    return kind, model_dir[kind], one, batched, masks


def reference_norms(model_path, texts):
    """Sum over samples of ||X_s[:, j]||_2, one sample at a time, head computed as usual."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    inputs, weights, hooks = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            w = module.weight.detach().double().numpy()
            weights[name] = w.T if isinstance(module, Conv1D) else w
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, name=name: inputs.__setitem__(name, args[0][0].double().numpy())))
    norms = {name: np.zeros(w.shape[1]) for name, w in weights.items()}
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_LENGTH)
            model(input_ids=ids["input_ids"])
            for name in norms:
                norms[name] += np.sqrt((inputs[name] ** 2).sum(axis=0))
    return norms, weights


def reference_top(scores, k):
    n = math.floor(round(scores.size * k, 9))
    order = np.argsort(-scores.reshape(-1), kind="stable")[:n]
    mask = np.zeros(scores.size, bool)
    mask[order] = True
    return mask.reshape(scores.shape)


def drawn_texts(archive, run_id, template):
    run = archive.run(run_id)
    texts, _ = parse_file(Path(template.replace("{lang}", run["lang"])))
    idx = archive.sql(f"SELECT item_index FROM run_samples WHERE run_id = '{run_id}' ORDER BY position")
    return [texts[i] for i in idx["item_index"]]


def test_scored_modules_and_shapes(case):
    kind, model_path, archive, *_ = case
    modules = archive.sql("SELECT * FROM modules ORDER BY module")
    assert set(modules["module"]) == EXPECTED_MODULES[kind]
    model = AutoModelForCausalLM.from_pretrained(model_path)
    for row in modules.iter_rows(named=True):
        weight = model.get_submodule(row["module"]).weight
        out_in = weight.shape[::-1] if kind == "gpt2" else weight.shape
        assert (row["n_rows"], row["n_cols"]) == tuple(out_in)
        assert row["n_params"] == weight.numel()
        expected_layer = None if row["module"] == "lm_head" else int(row["module"].split(".")[2])
        assert row["layer"] == expected_layer


def test_norms_scores_and_sets_match_reference(case, ragged):
    kind, model_path, archive, *_ = case
    runs = archive.sql("SELECT run_id, lang, role FROM runs ORDER BY lang, role")
    assert len(runs) == 2 * len(LANGS)
    tops = {}
    for run in runs.iter_rows(named=True):
        template = ragged["math"] if run["role"] == "math" else ragged["control"]
        norms, weights = reference_norms(model_path, drawn_texts(archive, run["run_id"], template))
        stored = archive.norms(run["run_id"])
        assert set(stored) == EXPECTED_MODULES[kind]
        for module in stored:
            np.testing.assert_allclose(stored[module], norms[module], rtol=2e-5, atol=1e-6)
            ref_scores = np.abs(weights[module]) * norms[module][None, :]
            np.testing.assert_allclose(archive.scores(run["run_id"], module), ref_scores, rtol=5e-5, atol=1e-6)
            levels = archive.levels(run["run_id"], module)
            for j, k in enumerate(KS):
                ref = reference_top(ref_scores, k)
                assert ref.sum() == math.floor(round(ref.size * k, 9))
                np.testing.assert_array_equal((levels != 0) & (levels <= j + 1), ref, err_msg=f"{module} k={k}")
                np.testing.assert_array_equal(archive.top_k(run["run_id"], module, k), ref)
                tops[(run["lang"], run["role"], module, k)] = ref
    sizes = archive.sql("SELECT * FROM set_sizes")
    assert len(sizes) == len(LANGS) * len(KS) * len(EXPECTED_MODULES[kind])
    for row in sizes.iter_rows(named=True):
        key = (row["lang"], row["module"], row["k"])
        math_top, control_top = tops[(key[0], "math", key[1], key[2])], tops[(key[0], "control", key[1], key[2])]
        expected = math_top & ~control_top
        assert row["n_math_top"] == math_top.sum() and row["n_control_top"] == control_top.sum()
        assert row["n_selected"] == expected.sum()
        np.testing.assert_array_equal(archive.selection(archive.models()["model"][0], row["lang"], row["k"], row["module"]), expected)


def test_batched_passes_really_padded(case):
    """Without padding, the batched comparison below cannot see how padding is treated."""
    _, _, _, batched, masks = case
    assert len(masks) == 2 * len(LANGS) * math.ceil(SAMPLES / 4)
    assert all(max(rows) == width and 0 < min(rows) for width, rows in masks)  # right-sized, no empty row
    padded = [(width, rows) for width, rows in masks if min(rows) < width]
    pad_tokens = sum(width * len(rows) - sum(rows) for width, rows in padded)
    assert len(padded) >= len(LANGS) and pad_tokens >= 50, masks
    print(f"\n{case[0]}: {len(padded)} of {len(masks)} batches padded, {pad_tokens} padding tokens; "
          f"(width, real tokens per row): {padded}")
    # the masks' real tokens are the runs' tokens: each sample was counted once, unpadded
    assert sum(sum(rows) for _, rows in masks) == batched.sql("SELECT sum(n_tokens) AS n FROM runs")["n"][0]


def test_batched_ingest_equals_batch_one(case):
    _, _, one, batched, _ = case
    a = one.sql("SELECT lang, role, run_id, n_tokens, arrays_group FROM runs ORDER BY lang, role")
    b = batched.sql("SELECT lang, role, run_id, n_tokens, arrays_group FROM runs ORDER BY lang, role")
    assert a["n_tokens"].to_list() == b["n_tokens"].to_list()
    for ra, rb in zip(a.iter_rows(named=True), b.iter_rows(named=True)):
        na, nb = one.norms(ra["run_id"]), batched.norms(rb["run_id"])
        for module in na:
            np.testing.assert_allclose(na[module], nb[module], rtol=1e-5, atol=1e-6)
            la = one.levels(ra["run_id"], module)
            lb = batched.levels(rb["run_id"], module)
            np.testing.assert_array_equal(la, lb)
    cols = "model, k, seed, lang, module, n_math_top, n_control_top, n_selected"
    assert one.sql(f"SELECT {cols} FROM set_sizes ORDER BY ALL").equals(batched.sql(f"SELECT {cols} FROM set_sizes ORDER BY ALL"))
    assert one.sql("SELECT * FROM overlap_by_layer ORDER BY ALL").equals(batched.sql("SELECT * FROM overlap_by_layer ORDER BY ALL"))


def test_truncation_and_samples_recorded(case):
    _, _, archive, *_ = case
    runs = archive.sql("SELECT run_id, n_samples, n_truncated FROM runs")
    assert (runs["n_samples"] == SAMPLES).all()
    assert runs["n_truncated"].sum() > 0  # the long math items were cut to MAX_LENGTH
    for run_id in runs["run_id"]:
        prov = archive.run(run_id)["provenance"]
        indices = archive.sql(f"SELECT item_index FROM run_samples WHERE run_id = '{run_id}' ORDER BY position")
        assert prov["sample_indices"] == indices["item_index"].to_list()
        expected = np.random.default_rng(3).integers(0, prov["data"]["n_items"], size=SAMPLES).tolist()
        assert prov["sample_indices"] == expected
