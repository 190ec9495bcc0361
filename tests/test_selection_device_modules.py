"""selection_device.weights_levels, the torch selection path ingest takes on CUDA, against
the numpy path (selection.model_levels over the host |W| buffer) on real models: the tied
tiny fixtures (tests/tied_models.py) loaded through transformers, norms from a real pass.

Needs only torch, transformers, tokenizers and numpy (no duckdb or zarr), so its CUDA cases
run on a lent GPU machine too (bench/gpu.sh); the CPU cases run everywhere."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mlarch import selection
from mlarch.ingest import loading
from mlarch.ingest.scoring import run_pass, scored_modules
from mlarch.selection_device import weights_levels
from mlarch.store.spans import layout, total_norms, total_params
from tied_models import KS, SAMPLED, build_tied, crowded_cuts

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
TEXTS = [f"Question {i}: what is {i} + {2 * i}? Answer: {i} + {2 * i} = {3 * i}." * (1 + i % 3) for i in range(6)]
PAPER_KS = [0.0001, 0.001, 0.01, 0.025, 0.05, 0.1, 0.15]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return build_tied(tmp_path_factory.mktemp("tied"))


def host_side(modules, result):
    """(spans, |W| buffer, concatenated norms) as ingest builds them for the numpy path."""
    spans = layout([(m.name, m.layer, m.n_rows, m.n_cols) for m in modules])
    magnitudes = np.empty(total_params(spans), np.float32)
    norms = np.empty(total_norms(spans), np.float32)
    for m, span in zip(modules, spans):
        m.magnitudes(out=magnitudes[span.params])
        norms[span.norms] = result.norms[m.name]
    return spans, magnitudes, norms


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("device,dtype", [
    ("cpu", "float32"), ("cpu", "bfloat16"),
    pytest.param("cuda", "float32", marks=[pytest.mark.cuda, CUDA]),
    pytest.param("cuda", "bfloat16", marks=[pytest.mark.cuda, CUDA]),
])
def test_weights_levels_match_the_numpy_path(tied, kind, device, dtype):
    target = torch.device(device)
    loaded = loading.load(str(tied[kind]), revision=None, device=target, dtype=dtype)
    modules = scored_modules(loaded.model)
    result = run_pass(loaded.model, loaded.tokenizer, modules, TEXTS, batch_size=2, max_length=64, device=target)
    spans, magnitudes, norms = host_side(modules, result)
    expected = selection.model_levels(spans, magnitudes, norms, KS)
    weights = [m.scored_weight() for m in modules]
    assert all(w.device.type == device for w in weights)
    np.testing.assert_array_equal(weights_levels(weights, spans, norms, KS), expected)
    # the premise: ties decide cuts here, in a sampled-size module too
    crowded = [(span.n_params, cut) for span in spans for cut in crowded_cuts(
        selection.scores(magnitudes[span.params].reshape(span.n_rows, span.n_cols), norms[span.norms]),
        [selection.top_count(span.n_params, k) for k in KS])]
    assert len(crowded) >= 5 and any(n >= SAMPLED for n, _ in crowded), crowded


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])])
def test_beside_a_forward_pass(tied, device):
    """Selection in a background thread while the next pass runs (ingest's overlap on an
    accelerator; on CUDA the selection's own stream beside the pass's): the same codes."""
    target = torch.device(device)
    loaded = loading.load(str(tied["llama"]), revision=None, device=target, dtype="float32")
    modules = scored_modules(loaded.model)

    def scored_pass():
        return run_pass(loaded.model, loaded.tokenizer, modules, TEXTS, batch_size=2, max_length=64, device=target)

    first = scored_pass()
    spans, magnitudes, norms = host_side(modules, first)
    expected = selection.model_levels(spans, magnitudes, norms, KS)
    with ThreadPoolExecutor(1) as background:
        for _ in range(3):
            future = background.submit(weights_levels, [m.scored_weight() for m in modules], spans, norms, KS)
            second = scored_pass()
            np.testing.assert_array_equal(future.result(), expected)
    for name, values in first.norms.items():  # the pass beside it was not disturbed either
        np.testing.assert_allclose(second.norms[name], values, rtol=1e-5, err_msg=name)


def test_weights_not_matching_the_spans_refused():
    spans = layout([("a", 0, 4, 3)])
    with pytest.raises(ValueError, match="span says"):
        weights_levels([torch.ones(3, 4)], spans, np.ones(3, np.float32), [0.5])
    with pytest.raises(ValueError, match="2 weights for 1 spans"):
        weights_levels([torch.ones(4, 3)] * 2, spans, np.ones(3, np.float32), [0.5])


@pytest.mark.cuda
@CUDA
def test_cuda_memory_is_about_one_module():
    """A 32 M-entry bf16 module: the device memory selection takes beyond the weight is about
    one module's float32 scores (the scores are freed before the candidates are sorted), and
    none is left allocated after."""
    rows, cols = 8192, 4096
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=generator)
    norms = np.random.default_rng(0).random(cols).astype(np.float32) * 10
    spans = layout([("w", 0, rows, cols)])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ours = weights_levels([weight], spans, norms, PAPER_KS)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / (4 * rows * cols)
    print(f"peak device memory beyond the weight: {extra:.2f} x one module's float32 scores")
    assert extra <= 2.5, extra
    assert torch.cuda.memory_allocated() == base
    magnitudes = weight.abs().float().cpu().numpy()
    expected = selection.level_codes(selection.scores(magnitudes, norms), PAPER_KS)
    np.testing.assert_array_equal(ours, expected.reshape(-1))


def test_modules_on_the_host_take_the_numpy_path(tied, monkeypatch):
    """With the |W| buffer given (ingest on CUDA), modules left on the CPU by a device map are
    selected by numpy, not by torch's far slower CPU sort; the codes are the same."""
    from mlarch import selection_device

    loaded = loading.load(str(tied["gpt2"]), revision=None, device=torch.device("cpu"), dtype="float32")
    modules = scored_modules(loaded.model)
    result = run_pass(loaded.model, loaded.tokenizer, modules, TEXTS, batch_size=2, max_length=64,
                      device=torch.device("cpu"))
    spans, magnitudes, norms = host_side(modules, result)
    expected = selection.model_levels(spans, magnitudes, norms, KS)

    def no_torch(*args):
        raise AssertionError("torch selection ran for a module on the host")

    monkeypatch.setattr(selection_device, "module_scores_torch", no_torch)
    weights = [m.scored_weight() for m in modules]
    np.testing.assert_array_equal(weights_levels(weights, spans, norms, KS, host_magnitudes=magnitudes), expected)
    with pytest.raises(AssertionError, match="on the host"):  # without the buffer: torch, wherever the weight is
        weights_levels(weights, spans, norms, KS)
