#!/usr/bin/env bash
# GPU check: fp16 on the GPU against fp32 on the CPU (same random SD 1.5 weights), then
# sampling it/s at 512x512, 20 steps, batch 1, CFG, fp16: sdcli against diffusers, eager and compiled.
# Needs only torch, diffusers and transformers on the machine (plus safetensors, typer, pillow, rich, which
# diffusers/transformers bring); installs this repo without dependencies if sdcli is not importable.
# Builds the 2.1 GB random checkpoint into bench/.cache on first use. Sized to finish well inside 10 minutes;
# not yet run on a GPU (no device was available when it was written).
#   bash bench/gpu.sh [--skip-compile] [--repeats N] [--compile-mode max-autotune] ...
# SDXL=1 adds bench/sdxl.py in fp16 on the GPU (UNet step against diffusers', a 1024x1024 job's peak GPU memory
# with and without --low-memory); it builds a 6.9 GB random SDXL checkpoint first, so allow minutes more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
if ! "$PY" -c "import sdcli.pipeline" 2>/dev/null; then
    "$PY" -m pip install -q -e . --no-deps --no-build-isolation
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" bench/gpu_check.py "$@"
if [ "${SDXL:-0}" = 1 ]; then
    "$PY" bench/sdxl.py --device cuda --full
fi
