#!/usr/bin/env bash
# One prepared device run: correctness on CUDA, then the ViT-B-16 model benchmark (eager and compiled).
#
#   bash benchmarks/gpu_run.sh          # on the GPU machine; JSON into $OUT (default benchmarks/results)
#   bash benchmarks/gpu_run.sh --cpu    # dry run of the same steps on CPU with the tiny test backbone,
#                                       # JSON into $OUT (default a fresh temporary folder)
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; fi
PY=${PYTHON:-python3}
if [ "$MODE" = cpu ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
"$PY" -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
if [ "$MODE" = gpu ]; then
  OUT=${OUT:-benchmarks/results}
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 120 "$PY" benchmarks/gpu_check.py 2>&1 | grep -v "No pretrained"
  MODEL_ARGS=(--backbone ViT-B-16 --device cuda --train-batch 128 --classes 100 --iters 10 --tasks 11)
  EAGER=(--batch 256 --out "$OUT/model-vit-b-16-cuda.json")
  COMPILED=(--batch 512 --compile --out "$OUT/model-vit-b-16-cuda-compiled.json")
else
  OUT=${OUT:-$(mktemp -d -t diki-gpu-run-cpu-XXXXXX)}
  echo "CPU dry run (diki-test-tiny), results in $OUT; the CUDA correctness check needs a GPU: skipped"
  MODEL_ARGS=(--backbone diki-test-tiny --device cpu --train-batch 8 --classes 4 --iters 1 --tasks 3 --vit-b-batch 0)
  EAGER=(--batch 8 --out "$OUT/model-diki-test-tiny-cpu.json")
  COMPILED=(--batch 8 --compile --out "$OUT/model-diki-test-tiny-cpu-compiled.json")
fi
mkdir -p "$OUT"
timeout 200 "$PY" benchmarks/bench_model.py "${MODEL_ARGS[@]}" "${EAGER[@]}" 2>&1 | grep -v "No pretrained"
timeout 240 "$PY" benchmarks/bench_model.py "${MODEL_ARGS[@]}" "${COMPILED[@]}" 2>&1 | grep -v "No pretrained" | tail -25
