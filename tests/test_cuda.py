"""The CUDA path: same semantics on a GPU as on the CPU (skipped without CUDA).

Tolerances: norms agree to rtol 1e-3 in float32 and 3e-2 in bfloat16 (different kernels
sum in different orders); the top-k sets, pooled over modules, agree to Jaccard >= 0.99."""

import numpy as np
import pytest
import torch

import mlarch
from mlarch.selection import in_top

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]
KS = [0.01, 0.05, 0.25]


def ingest(root, model_dir, data, device, dtype):
    archive = mlarch.open(root)
    archive.ingest(str(model_dir["llama"]), ["en", "de"], data["math"], data["control"], samples=8,
                   top_k=KS, device=device, dtype=dtype, batch_size=4)
    return archive


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-3), ("bfloat16", 3e-2)])
def test_cuda_matches_cpu(model_dir, data, tmp_path, dtype, rtol):
    cpu = ingest(tmp_path / "cpu", model_dir, data, "cpu", dtype)
    gpu = ingest(tmp_path / "gpu", model_dir, data, "cuda", dtype)
    query = "SELECT lang, role, run_id FROM runs ORDER BY lang, role"
    for a, b in zip(cpu.sql(query).iter_rows(named=True), gpu.sql(query).iter_rows(named=True)):
        na, nb = cpu.norms(a["run_id"]), gpu.norms(b["run_id"])
        inter, union = np.zeros(len(KS)), np.zeros(len(KS))
        for module in na:
            np.testing.assert_allclose(nb[module], na[module], rtol=rtol, atol=1e-4)
            la, lb = cpu.levels(a["run_id"], module), gpu.levels(b["run_id"], module)
            for j in range(len(KS)):
                inter[j] += np.count_nonzero(in_top(la, j) & in_top(lb, j))
                union[j] += np.count_nonzero(in_top(la, j) | in_top(lb, j))
        assert (inter / union >= 0.99).all(), (a["lang"], a["role"], inter / union)
    assert "cuda" in gpu.run(gpu.sql(query)["run_id"][0])["provenance"]["device"]
