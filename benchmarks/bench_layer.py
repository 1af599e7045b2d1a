"""Speed and memory of one layer: SparseLowRankLinear vs dense nn.Linear vs LowRankLinear, fwd + bwd.

For each shape (in -> out, rank), token count and dtype it prints the median wall time of forward + backward (input
gradient included, as inside a network) and the peak memory growth during that step (activations saved, the
transient dense weight, gradients), each with its ratio to dense. Methods run interleaved, round-robin, so load on
a shared machine hits them alike. Printed only, never asserted.

    python benchmarks/bench_layer.py                 # 60M and 1B-like shapes, 2048/8192 tokens, fp32 and bf16
    python benchmarks/bench_layer.py --quick         # a small subset (seconds)
    python benchmarks/bench_layer.py --shapes 60m --tokens 2048 --dtypes fp32 --repeats 9

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

SHAPES = {  # (in, out, rank)
    "60m": [(512, 512, 128), (512, 1376, 128), (1376, 512, 128)],
    "1b": [(2048, 2048, 512), (2048, 5461, 512)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("dense", "lowrank", "sltrain")


class _PeakStorage(TorchDispatchMode):
    """Peak bytes of tensor storage created (and still alive) while the mode is active."""

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
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
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
        layer = SparseLowRankLinear(n_in, n_out, rank, delta, alpha=32.0, support_seed=0)
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
    with _PeakStorage() as tracker:
        step()
    return tracker.peak


def bench_case(n_in, n_out, rank, tokens, dtype, device, args) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    g = torch.randn(tokens, n_out, generator=gen).to(device=device, dtype=dtype)
    steps = {m: make_step(build(m, n_in, n_out, rank, args.delta, device, dtype), x, g) for m in METHODS}
    times = {m: [] for m in METHODS}
    for _ in range(args.warmup):
        for m in METHODS:
            steps[m]()
    for _ in range(args.repeats):
        for m in METHODS:  # interleaved: noise from other processes lands on every method alike
            sync(device)
            t0 = time.perf_counter()
            steps[m]()
            sync(device)
            times[m].append(time.perf_counter() - t0)
    row = {m: statistics.median(times[m]) * 1e3 for m in METHODS}
    if not args.no_memory:
        row.update({f"{m}_mem": peak_growth(steps[m], device) / 2 ** 20 for m in METHODS})
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60M shapes, 2048 tokens, fp32, 3 repeats")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--delta", type=float, default=0.03)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.dtypes = ["60m"], [2048], ["fp32"]
    args.repeats = args.repeats or (3 if args.quick else 5)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.zeros(1, device=device).sum()  # create the CUDA context on this thread before autograd's does
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    print(f"# bench_layer: {where}, torch {torch.__version__}, delta {args.delta}, "
          f"median of {args.repeats} fwd+bwd steps (after {args.warmup} warm-up)")
    print("| shape (rank) | tokens | dtype | dense ms | lowrank ms (x dense) | sltrain ms (x dense) "
          + ("" if args.no_memory else "| dense MB | lowrank MB (x) | sltrain MB (x) ") + "|")
    print("|---|---|---|---|---|---" + ("" if args.no_memory else "|---|---|---") + "|")
    for shape_set in args.shapes:
        for n_in, n_out, rank in SHAPES[shape_set]:
            for tokens in args.tokens:
                for dname in args.dtypes:
                    r = bench_case(n_in, n_out, rank, tokens, DTYPES[dname], device, args)
                    line = (f"| {n_in}->{n_out} ({rank}) | {tokens} | {dname} | {r['dense']:.1f} | "
                            f"{r['lowrank']:.1f} ({r['lowrank'] / r['dense']:.2f}) | "
                            f"{r['sltrain']:.1f} ({r['sltrain'] / r['dense']:.2f}) ")
                    if not args.no_memory:
                        line += (f"| {r['dense_mem']:.1f} | {r['lowrank_mem']:.1f} "
                                 f"({r['lowrank_mem'] / r['dense_mem']:.2f}) | {r['sltrain_mem']:.1f} "
                                 f"({r['sltrain_mem'] / r['dense_mem']:.2f}) ")
                    print(line + "|", flush=True)


if __name__ == "__main__":
    main()
