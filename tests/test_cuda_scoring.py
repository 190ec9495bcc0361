"""Scoring in another dtype, batch size and device against the CPU in float32 at batch 1,
without the archive layer. It needs only torch, transformers and tokenizers, so its CUDA
cases also run on a lent GPU machine, which cannot carry duckdb and polars (their wheels
pass its 64 MiB limit); the CPU cases run everywhere.

Tolerances, per module: float32 norms to rtol 1e-3 and the top-k sets pooled over modules
to Jaccard >= 0.99; bfloat16 norms to rtol 0.1 and sets to Jaccard >= 0.95. The tiny
fixtures' sets are small (15 parameters at k = 0.01 in a 32 x 48 matrix), so one swap
costs several points of Jaccard: on CPU, bfloat16 gave 0.975-1.0 and norms within 6%."""

import numpy as np
import pytest
import torch

from mlarch.ingest import loading
from mlarch.ingest.scoring import run_pass, scored_modules
from mlarch.selection import in_top, level_codes, scores

KS = [0.01, 0.05, 0.25]
TEXTS = [f"Question {i}: what is {i} + {2 * i}? Answer: {i} + {2 * i} = {3 * i}. Check {i * 7} apples." * (1 + i % 3)
         for i in range(12)]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


def scored(folder, device: str, dtype: str, batch_size: int):
    """(norms, level codes) per module, scored the way ingest scores a run."""
    target = torch.device(device)
    loaded = loading.load(str(folder), revision=None, device=target, dtype=dtype)
    modules = scored_modules(loaded.model)
    result = run_pass(loaded.model, loaded.tokenizer, modules, TEXTS, batch_size=batch_size, max_length=128,
                      device=target)
    return result.norms, {m.name: level_codes(scores(m.magnitudes(), result.norms[m.name]), KS) for m in modules}


def jaccards(a: dict, b: dict) -> np.ndarray:
    inter, union = np.zeros(len(KS)), np.zeros(len(KS))
    for name in a:
        for j in range(len(KS)):
            inter[j] += np.count_nonzero(in_top(a[name], j) & in_top(b[name], j))
            union[j] += np.count_nonzero(in_top(a[name], j) | in_top(b[name], j))
    return inter / union


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("device,dtype,rtol,min_jaccard", [
    ("cpu", "bfloat16", 0.1, 0.95),
    pytest.param("cuda", "float32", 1e-3, 0.99, marks=[pytest.mark.cuda, CUDA]),
    pytest.param("cuda", "bfloat16", 0.1, 0.95, marks=[pytest.mark.cuda, CUDA]),
])
def test_scoring_matches_cpu_float32(model_dir, kind, device, dtype, rtol, min_jaccard):
    cpu_norms, cpu_levels = scored(model_dir[kind], "cpu", "float32", batch_size=1)
    norms, levels = scored(model_dir[kind], device, dtype, batch_size=4)
    for name, expected in cpu_norms.items():
        np.testing.assert_allclose(norms[name], expected, rtol=rtol, atol=1e-3, err_msg=name)
    assert (jaccards(cpu_levels, levels) >= min_jaccard).all(), jaccards(cpu_levels, levels)
