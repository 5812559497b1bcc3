#!/usr/bin/env bash
# The GPU sweep on an offline GPU machine, from the repository root, with the wheels `make gpu-wheels`
# put in .whl/ (carried with the working tree): installs them into .whl/site (no registry needed,
# the machine's own torch is used) and runs eval/gpu_sweep.py.
#     bash eval/gpu_sweep.sh [OUT_JSON] [TIME_LIMIT_SECONDS]
set -euo pipefail
OUT=${1:-runs/gpu_sweep.json}
LIMIT=${2:-450}
if ls .whl/*.whl >/dev/null 2>&1; then
    python -m pip install --quiet --no-index --no-deps --target .whl/site .whl/*.whl \
        || echo "gpu_sweep.sh: some wheels did not install; the sweep records which kernels import"
    export PYTHONPATH="$PWD/.whl/site:${PYTHONPATH:-}"
else
    echo "gpu_sweep.sh: no wheels in .whl/ (run 'make gpu-wheels' where a registry is reachable); optional kernels will be reported missing"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python eval/gpu_sweep.py --out "$OUT" --time-limit "$LIMIT"
