"""Tokens/s of 1 process vs N DDP processes (torchrun, gloo on CPU) at the same global batch (prints only).

    python benchmarks/bench_ddp.py                  # llama_20m sltrain, global batch 16 x 256, 20 steps, 3 repeats
    python benchmarks/bench_ddp.py --nproc 2 --model tiny --steps 10

The single process uses all cores as torch threads; each of the N DDP processes gets cores / N threads, so
both sides use the same hardware. Every configuration runs --repeats times; medians are quoted. Each run's
tokens/s is the training throughput from its summary.json (evaluation and start-up excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, overrides: list[str], out: Path, name: str, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = ["pretrain", "--quiet", *overrides, f"out_dir={out}", f"run_name={name}", f"train.num_threads={threads}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "sltrain_cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "sltrain_cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads((out / "pretrain" / name / "summary.json").read_text())["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--method", default="sltrain")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="global batch in sequences")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    overrides = [f"model={args.model}", f"method={args.method}", f"steps={args.steps}",
                 f"train.total_batch_size={args.batch}", f"train.micro_batch_size={args.micro}",
                 "train.eval_every=0", "train.save_every=0", "train.eval_tokens=4096", "train.device=cpu"]
    results = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so drifting machine load hits both sides alike
            for n in (1, args.nproc):
                tps = run(n, overrides, Path(tmp), f"n{n}-{i}", max(1, cores // n))
                results[n].append(tps)
                print(f"repeat {i}: {n} process(es): {tps:,.0f} tokens/s", flush=True)
    one, many = statistics.median(results[1]), statistics.median(results[args.nproc])
    print(f"\n{args.model} {args.method}, global batch {args.batch} x 256, {args.steps} steps, {cores} cores, "
          f"median of {args.repeats}:")
    print("| processes | threads each | tokens/s (median) | ratio |\n|---|---|---|---|")
    print(f"| 1 | {cores} | {one:,.0f} | 1.00 |")
    print(f"| {args.nproc} (DDP, gloo) | {max(1, cores // args.nproc)} | {many:,.0f} | {many / one:.2f} |")


if __name__ == "__main__":
    main()
