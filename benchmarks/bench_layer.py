"""Speed and memory of one layer: SparseLowRankLinear's kernels (compose | factored | auto) vs dense nn.Linear.

For each shape (in -> out, rank, delta), token count and dtype it prints the median wall time of forward + backward
(input gradient included, as inside a network) and the peak memory growth during that step (activations saved,
transient tensors, gradients), each with its ratio to dense. Variants run interleaved, round-robin, so load on a
shared machine hits them alike; each case runs at least --repeats rounds, and as many as fit --min-seconds (at
most 50), so cheap cases get steadier medians. ``auto`` is the kernel SparseLowRankLinear(kernel="auto") picks at
its first call for that token count (the analytic cost model in sltrain_cli/core/sparse_kernels.py); its time is
the measured time of that kernel (the same code), unless --time-auto times it as a separate layer. Printed only,
never asserted.

    python benchmarks/bench_layer.py --threads 1                   # 60M, 1B and 7B shapes, 512/2048/8192 tokens
    python benchmarks/bench_layer.py --quick                       # a small subset (seconds)
    python benchmarks/bench_layer.py --shapes 1b --tokens 512 --dtypes fp32 --repeats 9 --threads 1

Memory: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the step; on CPU the peak of
live tensor storage created during the step, tracked op by op with a dispatch mode (a separate, untimed run).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sltrain_cli.core.lowrank import LowRankLinear  # noqa: E402
from sltrain_cli.core.sparse_lowrank import SparseLowRankLinear  # noqa: E402

SHAPES = {  # (in, out, rank, delta): the paper's recipes (1B: r 512, delta 0.03; 7B: r 1024, delta 0.05)
    "60m": [(512, 512, 128, 0.03), (512, 1376, 128, 0.03), (1376, 512, 128, 0.03)],
    "1b": [(2048, 2048, 512, 0.03), (2048, 5461, 512, 0.03), (5461, 2048, 512, 0.03)],
    "7b": [(4096, 4096, 1024, 0.05), (4096, 11008, 1024, 0.05)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("dense", "lowrank", "compose", "factored")


class PeakStorage(TorchDispatchMode):
    """Peak bytes of (strided) tensor storage created and still alive while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided:
                s = t.untyped_storage()
                key, nbytes = s.data_ptr(), s.nbytes()
                # views and in-place results share an input's storage: not an allocation
                if nbytes and key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(s, self._free, key, nbytes)
        return out


def build(method: str, n_in: int, n_out: int, rank: int, delta: float, device, dtype) -> nn.Module:
    if method == "dense":
        layer = nn.Linear(n_in, n_out, bias=False)
    elif method == "lowrank":
        layer = LowRankLinear(n_in, n_out, rank)
    else:
        layer = SparseLowRankLinear(n_in, n_out, rank, delta, alpha=32.0, support_seed=0,
                                    kernel="auto" if method == "auto" else method)
        nn.init.normal_(layer.B, std=0.02)
    return layer.to(device=device, dtype=dtype)


def make_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def clear():
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    def step():
        clear()
        layer(x).backward(g)
    step.clear = clear
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_growth(step, device) -> int:
    """Peak bytes allocated by one fwd+bwd beyond what existed before it (gradients of the last step freed first)."""
    step.clear()
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakStorage() as tracker:
        step()
    return tracker.peak


def interleaved_medians(steps: dict, repeats: int, warmup: int, device, min_seconds: float = 0.0,
                        max_rounds: int = 50) -> tuple:
    """(median seconds per step of each variant, rounds), timed round-robin so that noise lands on every variant
    alike. Cheap cases get more rounds: at least ``repeats``, and more while the timed rounds have taken under
    ``min_seconds``, up to ``max_rounds``."""
    times = {m: [] for m in steps}
    for _ in range(warmup):
        for m in steps:
            steps[m]()
    rounds, start = 0, time.perf_counter()
    while rounds < repeats or (rounds < max_rounds and time.perf_counter() - start < min_seconds):
        for m in steps:
            sync(device)
            t0 = time.perf_counter()
            steps[m]()
            sync(device)
            times[m].append(time.perf_counter() - t0)
        rounds += 1
    return {m: statistics.median(v) for m, v in times.items()}, rounds


def bench_case(n_in, n_out, rank, delta, tokens, dtype, device, args) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    g = torch.randn(tokens, n_out, generator=gen).to(device=device, dtype=dtype)
    methods = [m for m in METHODS if m in args.methods] + (["auto"] if args.time_auto else [])
    layers = {m: build(m, n_in, n_out, rank, delta, device, dtype) for m in methods}
    probe = build("auto", n_in, n_out, rank, delta, "meta", dtype)
    picked = probe.choose_kernel(tokens, dtype, device)
    steps = {m: make_step(layers[m], x, g) for m in methods}
    medians, rounds = interleaved_medians(steps, args.repeats, args.warmup, device, args.min_seconds)
    row = {m: t * 1e3 for m, t in medians.items()}
    row["rounds"] = rounds
    if not args.time_auto and picked in row:
        row["auto"] = row[picked]
    row["picked"] = picked
    if not args.no_memory:
        row.update({f"{m}_mem": peak_growth(steps[m], device) / 2 ** 20 for m in methods})
        if not args.time_auto and f"{picked}_mem" in row:
            row["auto_mem"] = row[f"{picked}_mem"]
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60M shapes, 2048 tokens, fp32, 3 rounds")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-seconds", type=float, default=10.0,
                   help="time cheap cases for more rounds than --repeats, while the rounds take under this (max 50)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--time-auto", action="store_true", help="time auto as its own layer instead of reusing the "
                                                             "time of the kernel it picks")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.dtypes, args.min_seconds = ["60m"], [2048], ["fp32"], 0.0
    args.repeats = args.repeats or (3 if args.quick else 5)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.zeros(1, device=device).sum()  # create the CUDA context on this thread before autograd's does
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    print(f"# bench_layer: {where}, torch {torch.__version__}, median of interleaved fwd+bwd steps (at least "
          f"{args.repeats} rounds, more where {args.min_seconds:g} s fit more, after {args.warmup} warm-up); ratios "
          f"to dense")
    cols = ["dense"] + [m for m in METHODS[1:] if m in args.methods] + ["auto"]
    head = "| shape (rank, delta) | tokens | dtype | rounds | " + " | ".join(
        f"{m} ms" + ("" if m == "dense" else " (x)") for m in cols)
    if not args.no_memory:
        head += " | " + " | ".join(f"{m} MB" + ("" if m == "dense" else " (x)") for m in cols)
    print(head + " |")
    print("|" + "---|" * (head.count("|")))
    for shape_set in args.shapes:
        for n_in, n_out, rank, delta in SHAPES[shape_set]:
            for tokens in args.tokens:
                for dname in args.dtypes:
                    r = bench_case(n_in, n_out, rank, delta, tokens, DTYPES[dname], device, args)
                    cells = []
                    for m in cols:
                        if m not in r:
                            cells.append("-")
                            continue
                        label = f" {r['picked']}" if m == "auto" else ""
                        cells.append(f"{r[m]:.1f}" if m == "dense" else f"{r[m]:.1f} ({r[m] / r['dense']:.2f}{label})")
                    if not args.no_memory:
                        for m in cols:
                            key = f"{m}_mem"
                            cells.append("-" if key not in r else f"{r[key]:.1f}" if m == "dense" else
                                         f"{r[key]:.1f} ({r[key] / max(r['dense_mem'], 1e-9):.2f})")
                    lead = f"| {n_in}->{n_out} ({rank}, {delta:g}) | {tokens} | {dname} | {r['rounds']} | "
                    print(lead + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
