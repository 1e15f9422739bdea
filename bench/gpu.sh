#!/usr/bin/env bash
# The GPU benchmark in one command (under 8 minutes on an H100): bench/results/gpu.json.
# Needs torch, timm and diffusers; nothing is downloaded (random weights). Extra arguments go to
# bench/gpu.py, e.g. --peak-tflops 756 on an H100 PCIe.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
# The checkout's venv where there is one (a developer machine); the device image's python3 otherwise.
py=python3
if [ -x .venv/bin/python3 ]; then py=.venv/bin/python3; fi
if ! "$py" -c "import torch, timm" 2>/dev/null; then
  echo "bench/gpu.sh: $py cannot import torch and timm; run it where they are installed (the GPU machine's image, or after 'make install')" >&2
  exit 2
fi
# A device image with torch and timm but no diffusers: install the wheels `make gpu-wheels` put in .whl.
if ! "$py" -c "import diffusers" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "bench/gpu.sh: diffusers is not installed here; run 'make gpu-wheels' on a machine with the venv and bring .whl/ along" >&2
    exit 2
  fi
  site="${TMPDIR:-/tmp}/raysmooth-site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$py" bench/gpu.py --budget-s 450 "$@"
