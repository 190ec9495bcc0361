#!/usr/bin/env bash
# Selection on the scoring device, on a lent GPU machine (see the device tool): the CUDA cases
# of tests/test_selection_device.py (identical level codes to the numpy path), then
# bench/selection_device.py at 0.1 B and 1 B scored parameters (CUDA scores + codes + the
# copy of the uint8 codes to the host, against numpy's model_levels on the host CPU).
# Needs only python3 with torch, numpy and pytest. Results: bench/results/selection-device-<dev>.json,
# copied to $OUT.
#
#   bash bench/gpu_selection.sh                      # on the device: about 2 minutes
#   DEVICE=cpu QUICK=1 bash bench/gpu_selection.sh   # smoke test of the script itself, here
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
status=0
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
$PY -m pytest -q -p no:cacheprovider tests/test_selection_device.py -rs 2>&1 | tail -15 || status=1
$PY bench/selection_device.py --device "$DEVICE" $QUICK --out "bench/results/selection-device-$DEVICE${QUICK:+-quick}.json" || status=1
if [ -n "${OUT:-}" ]; then cp bench/results/selection-device-"$DEVICE"*.json "$OUT"/ 2>/dev/null; fi
exit $status
