#!/usr/bin/env bash
# The GPU benchmark in one command (under 8 minutes on an H100): bench/results/gpu.json.
# Needs torch, timm and diffusers; nothing is downloaded (random weights). Extra arguments go to
# bench/gpu.py, e.g. --peak-tflops 756 on an H100 PCIe.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
# A device image with torch and timm but no diffusers: install the wheels `make gpu-wheels` put in .whl.
if ! python3 -c "import diffusers" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "bench/gpu.sh: diffusers is not installed here; run 'make gpu-wheels' on a machine with the venv and bring .whl/ along" >&2
    exit 2
  fi
  site="${TMPDIR:-/tmp}/raysmooth-site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 bench/gpu.py --budget-s 450 "$@"
