#!/usr/bin/env bash
# The GPU benchmark in one command (under 8 minutes on an H100): bench/results/gpu.json.
# Needs torch, timm and diffusers; nothing is downloaded (random weights). Extra arguments go to
# bench/gpu.py, e.g. --peak-tflops 756 on an H100 PCIe.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
exec python3 bench/gpu.py --budget-s 450 "$@"
