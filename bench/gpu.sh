#!/usr/bin/env bash
# rafale on one GPU (H100 / H200): pythia-160m, T=2048, bf16.
#   MFU eager vs torch.compile; SDPA FLASH_ATTENTION vs MATH; rafale in the Composer Trainer vs HF GPTNeoX + plain loop.
# Usage (from the repository root, with a Python that has the project installed, e.g. cuda-requirements.txt):
#   bash bench/gpu.sh            # PY=python BATCH=8 STEPS=20 WARMUP=5 OUT=bench/gpu-results.json
# Budget: about 3-5 minutes on an H100 (the compile row dominates). Set SKIP=compile,math to shorten it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
BATCH=${BATCH:-8}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
OUT=${OUT:-${OUT_DIR:-bench}/gpu-results.json}
SKIP=${SKIP:-}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
"$PY" -c "import torch, composer, transformers; print('torch', torch.__version__, 'composer', composer.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
"$PY" bench/gpu_bench.py --preset pythia-160m --seq 2048 --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" \
    --skip "$SKIP" --json "$OUT" 2>&1 | grep -v "^$"
echo "rows written to $OUT"
