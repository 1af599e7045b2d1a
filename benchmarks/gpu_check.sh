#!/usr/bin/env bash
# The CUDA checks, batched into one script for a lent GPU machine (about 10 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh            (from the repository root)
# It uses the machine's own python3 and CUDA torch (PY=... to choose another) with this checkout on
# PYTHONPATH; packages that machine lacks (hydra-core, typer, ... see the device tool's README) must travel
# as wheels. Never `pip install` the project there: an unpinned torch would replace the CUDA build.
# CUDA tests, a short bf16-pure pretrain on the GPU + eval-ppl, the layer benchmark on CUDA, and measured
# vs estimated memory for 350m. Outputs go under ${OUT:-outputs/gpu_check}.
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SLTRAIN_CONF_DIR="$PWD/conf" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" | tee "$OUT/torch.txt"
timeout 180 $PY -m pytest -q -rs tests/test_sparse_lowrank.py tests/test_convert.py tests/test_model.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
timeout 180 $PY -m sltrain_cli pretrain --quiet model=llama_60m rank=128 steps=60 train.device=cuda \
  train.precision=bf16-pure train.total_batch_size=32 train.micro_batch_size=32 out_dir="$OUT/runs" \
  run_name=cuda 2>&1 | tail -20 | tee "$OUT/pretrain.txt"
timeout 60 $PY -m sltrain_cli eval-ppl "$OUT/runs/pretrain/cuda" 2>&1 | tail -2 | tee -a "$OUT/pretrain.txt"
timeout 180 $PY benchmarks/bench_layer.py --device cuda --repeats 20 --warmup 3 2>&1 | tee "$OUT/bench_layer.txt"
timeout 150 $PY -m sltrain_cli memory-estimate --size 350m --method all --measure --device cuda --format md \
  2>&1 | tee "$OUT/memory_350m.md"
timeout 150 $PY -m sltrain_cli memory-estimate --size 350m --method all --measure --device cuda \
  --optimizer adam8bit --layerwise --format md 2>&1 | tee "$OUT/memory_350m_8bit_layerwise.md"
