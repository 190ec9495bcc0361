"""Method mathneuro-bf16 equals a slow, literal reimplementation of the authors' arithmetic.

The reference below is written the way the authors' MathNeuroFast.py is: a bf16 model, forward
hooks on every Linear (and Conv1D, transposed) that compute `x.norm(p=2, dim=1).to(bf16) * |W|`,
one unpadded sample per forward (tokenizer.encode, no attention mask, no truncation), and
`acc += product` into a bf16 tensor of the weight's shape, sample after sample in draw order;
then the top int(numel * k) by a stable sort (ties: lowest flat index).

The drawn texts are ragged (1 to 60+ tokens, one past any usual --max-length here) and repeat
items, so order, padding and truncation all matter."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from mlarch import methods, selection
from mlarch.errors import UsageError
from mlarch.ingest import mathneuro, scoring

from fixtures import math_items, prose_items

KS = [0.01, 0.05, 0.25]
CPU = torch.device("cpu")
WORDS = [2, 9, 30, 5, 14, 1, 22, 60]


def corpus() -> list[str]:
    items = math_items("en", 8)
    texts = []
    for words, item, prose in zip(WORDS, items, prose_items("de")):
        long = f"Q: {item['question']} A: {item['answer']} {prose} {item['answer']}"
        texts.append(" ".join(long.split()[:words]))
    return texts


# draw order with repeats, lengths unsorted: a draw-order bug or a per-batch sum shows up
DRAW = [3, 0, 7, 3, 5, 1, 6, 2, 4, 7, 0]


@pytest.fixture(scope="module")
def texts():
    pool = corpus()
    return [pool[i] for i in DRAW]


def load_bf16(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), AutoTokenizer.from_pretrained(path)


def scored_names(model) -> list[tuple[str, nn.Module]]:
    embed = model.get_input_embeddings().weight
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and "embed" not in name
            and module.weight.data_ptr() != embed.data_ptr()]


def out_in(module) -> torch.Tensor:
    weight = module.weight.detach()
    return weight.t() if isinstance(module, Conv1D) else weight


def authors_scores(model, tokenizer, texts) -> dict[str, torch.Tensor]:
    """The authors' loop: one sample per forward, hook products, bf16 `+=` in draw order."""
    magnitude, handles = {}, []

    def hook(name):
        def fn(module, inputs, output):
            norm = inputs[0].norm(p=2, dim=1).to(torch.bfloat16)  # (1, in)
            magnitude[name] = norm * torch.abs(out_in(module))  # (out, in) bf16

        return fn

    for name, module in scored_names(model):
        handles.append(module.register_forward_hook(hook(name)))
    acc = {name: torch.zeros_like(out_in(module)) for name, module in scored_names(model)}
    try:
        with torch.no_grad():
            for text in texts:
                model(tokenizer.encode(text, return_tensors="pt"))
                for name, product in magnitude.items():
                    acc[name] += product
    finally:
        for handle in handles:
            handle.remove()
    return acc


def same_batches_scores(model, tokenizer, texts, batch_size) -> tuple[dict[str, torch.Tensor], list]:
    """The same arithmetic on the activations of padded batches: per row, its real tokens only;
    products summed afterwards in draw order. Also returns (width, real tokens per row) per batch."""
    vocab = model.get_input_embeddings().weight.shape[0]
    inputs, _ = scoring.batches(tokenizer, texts, batch_size=batch_size, max_length=None, vocab=vocab)
    seen, handles, shapes = {}, [], []
    for name, module in scored_names(model):
        handles.append(module.register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, args[0].detach().clone())))
    norms = {}
    try:
        with torch.no_grad():
            for batch in inputs:
                model(input_ids=batch.input_ids, attention_mask=batch.attention)
                lengths = batch.attention.sum(dim=1).tolist()
                shapes.append((batch.input_ids.shape[1], lengths))
                for name, x in seen.items():
                    for row, position in enumerate(batch.items):
                        norms[(name, position)] = x[row : row + 1, : lengths[row]].norm(p=2, dim=1).to(torch.bfloat16)
    finally:
        for handle in handles:
            handle.remove()
    acc = {}
    for name, module in scored_names(model):
        w = torch.abs(out_in(module))
        acc[name] = torch.zeros_like(w)
        for position in range(len(texts)):
            acc[name] += norms[(name, position)] * w
    return acc, shapes


def reference_levels(scores: torch.Tensor, ks) -> np.ndarray:
    """Top int(numel * k) by a stable descending sort (lowest index first among ties)."""
    flat = scores.float().abs().reshape(-1).numpy()
    order = np.argsort(-flat, kind="stable")
    levels = np.zeros(flat.size, np.uint8)
    for j in reversed(range(len(ks))):
        levels[order[: int(flat.size * ks[j])]] = j + 1
    return levels.reshape(scores.shape)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def case(request, model_dir, texts):
    kind = request.param
    model, tokenizer = load_bf16(model_dir[kind])
    return kind, model, tokenizer


def test_batch_one_equals_authors_loop(case, texts):
    kind, model, tokenizer = case
    modules = scoring.scored_modules(model)
    expected = {"llama": 15, "qwen2": 14, "gpt2": 8}[kind]  # llama's untied lm_head is scored, qwen2's tied one not
    assert len(modules) == expected
    result = mathneuro.run_pass_bf16(model, tokenizer, modules, texts, batch_size=1, max_length=None, device=CPU)
    reference = authors_scores(model, tokenizer, texts)
    assert set(result.scores) == set(reference)
    ties = 0
    for m in modules:
        assert result.scores[m.name].dtype == torch.bfloat16 and result.scores[m.name].shape == (m.n_rows, m.n_cols)
        assert torch.equal(result.scores[m.name], reference[m.name]), m.name
        levels = mathneuro.levels_bf16(result.scores[m.name], KS)
        np.testing.assert_array_equal(levels, reference_levels(reference[m.name], KS), err_msg=m.name)
        values = reference[m.name].float().reshape(-1)
        ties += values.numel() - values.unique().numel()
    assert ties > 0  # bf16 scores tie: the tie rule is exercised
    assert result.n_truncated == 0 and result.n_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    assert not any(m.module._forward_pre_hooks for m in modules)  # the pass leaves no hooks behind


def test_padded_batches_equal_reference_on_their_activations(case, texts):
    kind, model, tokenizer = case
    modules = scoring.scored_modules(model)
    masks = []
    real = mathneuro.SampleNormRecorder.start_rows
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mathneuro.SampleNormRecorder, "start_rows", lambda self, mask, positions: (
            masks.append((mask.shape[1], mask.sum(dim=1).to(torch.long).tolist())), real(self, mask, positions))[1])
        result = mathneuro.run_pass_bf16(model, tokenizer, modules, texts, batch_size=4, max_length=None, device=CPU)
    reference, shapes = same_batches_scores(model, tokenizer, texts, 4)
    assert masks == shapes  # the reference saw the very batches the pass ran
    padded = [(width, rows) for width, rows in masks if min(rows) < width]
    assert len(padded) >= 2 and sum(w * len(r) - sum(r) for w, r in padded) >= 20, masks
    for m in modules:
        assert torch.equal(result.scores[m.name], reference[m.name]), m.name
        np.testing.assert_array_equal(mathneuro.levels_bf16(result.scores[m.name], KS),
                                      reference_levels(reference[m.name], KS), err_msg=m.name)


def test_bf16_sets_differ_from_exact_sums(case, texts):
    """Not the exact method in disguise: the same bf16 forwards, summed exactly, select otherwise."""
    kind, model, tokenizer = case
    modules = scoring.scored_modules(model)
    bf16 = mathneuro.run_pass_bf16(model, tokenizer, modules, texts, batch_size=1, max_length=None, device=CPU)
    exact = scoring.run_pass(model, tokenizer, modules, texts, batch_size=1, max_length=10_000, device=CPU)
    differ = 0
    for m in modules:
        exact_scores = selection.scores(m.magnitudes(), exact.norms[m.name])
        differ += int((selection.level_codes(exact_scores, KS) != mathneuro.levels_bf16(bf16.scores[m.name], KS)).sum())
        # the diagnostic norms are the exact sums of the bf16-rounded per-sample norms
        np.testing.assert_allclose(bf16.norms[m.name], exact.norms[m.name], rtol=2e-2)
    assert differ > 0


def test_model_levels_layout(model_dir, texts):
    from mlarch.store import spans as span_layout

    model, tokenizer = load_bf16(model_dir["llama"])
    modules = scoring.scored_modules(model)
    result = mathneuro.run_pass_bf16(model, tokenizer, modules, texts[:3], batch_size=2, max_length=None, device=CPU)
    spans = span_layout.layout([(m.name, m.layer, m.n_rows, m.n_cols) for m in modules])
    levels = mathneuro.model_levels_bf16(spans, result.scores, KS)
    assert levels.dtype == np.uint8 and levels.size == sum(m.n_params for m in modules)
    for span in spans:
        np.testing.assert_array_equal(levels[span.params].reshape(span.n_rows, span.n_cols),
                                      reference_levels(result.scores[span.module], KS))


def test_set_sizes_and_tie_rule():
    # the authors' int(numel * k): 0.29 of 100 is 28 (floating point), where the exact method takes 29
    scores = torch.arange(100, dtype=torch.bfloat16).reshape(10, 10)
    assert (mathneuro.levels_bf16(scores, [0.29]) != 0).sum() == 28
    assert (selection.level_codes(scores.float().numpy(), [0.29]) != 0).sum() == 29
    assert [methods.authors_count(100, k) for k in (0.29, 0.01, 0.15)] == [28, 1, 15]
    # equal scores: the lowest flat indices win
    tied = torch.full((4, 5), 0.5, dtype=torch.bfloat16)
    tied[3, 4] = 0.75
    levels = mathneuro.levels_bf16(tied, [0.25])
    assert np.flatnonzero(levels.reshape(-1)).tolist() == [0, 1, 2, 3, 19]


def test_level_codes_counts_keyword_leaves_default_alone():
    rng = np.random.default_rng(0)
    scores = rng.random((30, 40), dtype=np.float32)
    default = selection.level_codes(scores, KS)
    explicit = selection.level_codes(scores, KS, counts=[selection.top_count(scores.size, k) for k in KS])
    np.testing.assert_array_equal(default, explicit)
    with pytest.raises(ValueError):
        selection.level_codes(scores, KS, counts=[5, 3, 9])


def test_refusals():
    methods.check_rethreshold("r1", "mathneuro", 0.07, [0.01])  # exact runs re-threshold freely
    methods.check_rethreshold("r1", mathneuro.METHOD, 0.01, [0.01, 0.05])
    with pytest.raises(UsageError) as err:
        methods.check_rethreshold("r1", mathneuro.METHOD, 0.07, [0.01, 0.05])
    assert "r1" in str(err.value) and "0.01, 0.05" in str(err.value) and "top_k=" in str(err.value)
    assert not methods.rethresholdable(mathneuro.METHOD) and methods.rethresholdable("mathneuro")
    with pytest.raises(UsageError, match="mathneuro, mathneuro-bf16"):
        methods.check_method("wanda")
    assert mathneuro.describe()["name"] == "mathneuro-bf16" and methods.PAPER_COMPAT["max_length"] is None
    # the query side checks the method without importing torch
    code = "import sys, mlarch.methods; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_refuses_a_float32_model(model_dir, texts):
    model = AutoModelForCausalLM.from_pretrained(model_dir["gpt2"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir["gpt2"])
    with pytest.raises(UsageError, match="dtype='bfloat16'"):
        mathneuro.run_pass_bf16(model, tokenizer, scoring.scored_modules(model), texts, batch_size=1,
                                max_length=None, device=CPU)


def exact_reference_norms(model, tokenizer, texts, max_length):
    """Sum over samples of ||X_s[:, j]||_2 in float64, one truncated sample at a time."""
    inputs, handles = {}, []
    for name, module in scored_names(model):
        handles.append(module.register_forward_hook(
            lambda mod, args, out, name=name: inputs.__setitem__(name, args[0][0].double().numpy())))
    norms = {}
    try:
        with torch.no_grad():
            for text in texts:
                model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length))
                for name, x in inputs.items():
                    norms[name] = norms.get(name, 0) + np.sqrt((x**2).sum(axis=0))
    finally:
        for handle in handles:
            handle.remove()
    return norms


def test_exact_method_unchanged(model_dir, texts):
    """The exact pass still truncates at max_length, still equals the float64 reference and the
    stable-sort sets, and is bit for bit the same before and after a bf16 pass on the same model."""
    path = model_dir["llama"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    modules = scoring.scored_modules(model)
    before = scoring.run_pass(model, tokenizer, modules, texts, batch_size=4, max_length=40, device=CPU)
    long = sum(len(tokenizer.encode(t)) > 40 for t in texts)
    assert before.n_truncated == long >= 2  # the long items were cut
    reference = exact_reference_norms(model, tokenizer, texts, 40)
    for m in modules:
        np.testing.assert_allclose(before.norms[m.name], reference[m.name], rtol=2e-5, atol=1e-6)
        scores = selection.scores(m.magnitudes(), before.norms[m.name])
        levels = selection.level_codes(scores, KS)
        for j, k in enumerate(KS):
            order = np.argsort(-scores.reshape(-1), kind="stable")[: math.floor(round(scores.size * k, 9))]
            expected = np.zeros(scores.size, bool)
            expected[order] = True
            np.testing.assert_array_equal(selection.in_top(levels, j).reshape(-1), expected)
    # on a bf16 model (--dtype bfloat16 with the exact method): a bf16 pass in between changes nothing
    model, _ = load_bf16(path)
    modules = scoring.scored_modules(model)
    before = scoring.run_pass(model, tokenizer, modules, texts, batch_size=4, max_length=40, device=CPU)
    mathneuro.run_pass_bf16(model, tokenizer, modules, texts, batch_size=4, max_length=None, device=CPU)
    after = scoring.run_pass(model, tokenizer, modules, texts, batch_size=4, max_length=40, device=CPU)
    for m in modules:
        np.testing.assert_array_equal(after.norms[m.name], before.norms[m.name])


def test_max_length_none_keeps_every_token(model_dir, texts):
    tokenizer = AutoTokenizer.from_pretrained(model_dir["llama"])
    full = [len(tokenizer.encode(t)) for t in texts]
    assert max(full) > 40
    kept, n_cut = scoring.batches(tokenizer, texts, batch_size=1, max_length=None, vocab=384)
    assert n_cut == 0 and sorted(int(b.attention.sum()) for b in kept) == sorted(full)
    cut, n_cut = scoring.batches(tokenizer, texts, batch_size=1, max_length=40, vocab=384)
    assert n_cut == sum(n > 40 for n in full) >= 2
    assert sorted(int(b.attention.sum()) for b in cut) == sorted(min(n, 40) for n in full)
