#!/usr/bin/env bash
# Issue 18's GPU check in one command, for a bare CUDA machine with PyTorch (torch, torchvision,
# numpy, scipy, safetensors; nothing else of this project's stack): the paper's setting through the
# worker's engine, sequential and stacked, fp32 and bf16 (bench/gpu.py; README, "The paper's
# setting on a GPU"). About 2-4 minutes on an H100/H200; never more than 7.
#
# Prepare once where the data are (Fashion-MNIST from Debian, or CIFAR-10), 2.5 MiB:
#   python bench/gpu.py --export-records .gpu/records.npz
# then on the GPU machine, from the repository root (the device tool: carry [".gpu"]):
#   bash scripts/gpu_check.sh          # results in $OUT (default bench/out/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.csv"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
records=()
if [ -f .gpu/records.npz ]; then
  records=(--records-file .gpu/records.npz)
fi
timeout --kill-after=10 420 "$PY" bench/gpu.py "${records[@]}" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
