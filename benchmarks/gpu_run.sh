#!/usr/bin/env bash
# One prepared device run: correctness on CUDA, then the ViT-B-16 model benchmark (eager and compiled).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
timeout 120 python3 benchmarks/gpu_check.py 2>&1 | grep -v "No pretrained"
timeout 200 python3 benchmarks/bench_model.py --backbone ViT-B-16 --device cuda --batch 256 --train-batch 128 \
  --classes 100 --iters 10 --tasks 11 --out "$OUT/model-vit-b-16-cuda.json" 2>&1 | grep -v "No pretrained"
timeout 240 python3 benchmarks/bench_model.py --backbone ViT-B-16 --device cuda --batch 512 --train-batch 128 \
  --classes 100 --iters 10 --tasks 11 --compile --out "$OUT/model-vit-b-16-cuda-compiled.json" 2>&1 | grep -v "No pretrained" | tail -25
