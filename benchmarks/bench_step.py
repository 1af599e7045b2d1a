"""A whole optimizer step (forward, backward, AdamW) of full vs sltrain vs lowrank on a slice of a real model.

A slice is the model's width (60M: d 512, m 1376, r 128; 1B: d 2048, m 5461, r 512; delta 0.03, the paper's recipes)
with a couple of decoder blocks, the real embedding and lm_head (32000-token vocabulary) and sequences of 256 tokens;
a micro-batch of 512 tokens is 2 sequences, one of 8192 is 32. Variants:

    full           dense weights (the loss chunked: no (tokens, vocab) fp32 logits)
    sltrain        SparseLowRankLinear, kernel auto (what `sltrain pretrain method=sltrain` runs)
    sltrain-today  the previous path: kernel compose and the plain loss (full logits -> F.cross_entropy)
    lowrank        W = B A
    full-plain     dense weights with the plain loss (to see the chunked loss's memory drop)
    X+compile      variant X with its decoder blocks under torch.compile (what train.compile=true runs), e.g.
                   full+compile, sltrain+compile; --compile adds full+compile and sltrain+compile

Each step is timed interleaved, round-robin across variants (noise lands on all alike), median reported with
tokens/s and its ratio to full. Peak memory: the peak of live tensor storage created during one (untimed) step on
CPU, tracked op by op -- forward + backward (activations, logits, gradients) and AdamW's update (its temporaries)
separately; on CUDA max_memory_allocated growth. "state MB" is what the step starts from: parameters, buffers and
AdamW moments. Printed only, never asserted.

    python benchmarks/bench_step.py --threads 1                          # 60m and 1b slices, 512 and 8192 tokens
    python benchmarks/bench_step.py --widths 1b --tokens 512 --repeats 7 --threads 1
    python benchmarks/bench_step.py --quick                              # 60m, 512 tokens, 2 repeats
    python benchmarks/bench_step.py --variants full sltrain --compile --threads 1   # does train.compile pay?
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_layer import PeakStorage, sync  # noqa: E402

from sltrain_cli.configs import MethodConfig, ModelConfig  # noqa: E402
from sltrain_cli.core.convert import apply_method  # noqa: E402
from sltrain_cli.core.model import LlamaForCausalLM  # noqa: E402
from sltrain_cli.core.sparse_lowrank import choose_kernels  # noqa: E402

# hidden, intermediate, heads, rank, alpha: the paper's recipes for these sizes (SLTrain, Han et al., NeurIPS 2024,
# arXiv:2406.02214, Table 2; rank and alpha from its reference scripts)
WIDTHS = {
    "60m": (512, 1376, 8, 128, 32.0),
    "1b": (2048, 5461, 32, 512, 8.0),
}
VARIANTS = ("full", "sltrain", "sltrain-today", "lowrank", "full-plain")
COMPILED = tuple(f"{v}+compile" for v in VARIANTS)
SEQ = 256


def plain_loss(model, ids):
    """The loss as it was computed before the chunked head: full logits, then fp32 cross-entropy."""
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


class Variant:
    def __init__(self, name, width, layers, tokens, vocab, delta, device, dtype):
        name, compiled = name.removesuffix("+compile"), name.endswith("+compile")
        d, m, heads, rank, alpha = WIDTHS[width]
        cfg = ModelConfig(name=f"{width}-slice", hidden_size=d, intermediate_size=m, num_layers=layers,
                          num_heads=heads, vocab_size=vocab, max_seq_len=SEQ)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        method = {"full": "full", "full-plain": "full", "lowrank": "lowrank"}.get(name, "sltrain")
        kernel = "compose" if name == "sltrain-today" else "auto"
        model = apply_method(model, MethodConfig(name=method, rank=rank, delta=delta, alpha=alpha, kernel=kernel))
        if method == "sltrain":
            for mod in model.modules():  # B starts at zero; any trained state has B != 0 (same cost either way)
                if hasattr(mod, "B") and mod.B is not None:
                    torch.nn.init.normal_(mod.B, std=0.02)
        self.model = model.to(device)
        if compiled:
            self.model.compile_blocks()
        self.kernels = choose_kernels(model, tokens, dtype, device) if method == "sltrain" else {}
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.plain = name in ("sltrain-today", "full-plain")
        self.autocast = dtype == torch.bfloat16
        self.device = device
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (tokens // SEQ, SEQ), generator=g).to(device)

    def forward_backward(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = plain_loss(self.model, self.ids) if self.plain else self.model(self.ids, labels=self.ids).loss
        loss.backward()

    def update(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self):
        self.forward_backward()
        self.update()

    def state_bytes(self) -> int:
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        n += sum(b.numel() * b.element_size() for b in self.model.buffers() if b is not None)
        for st in self.opt.state.values():
            n += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
        return n

    def peak_growth(self) -> tuple[int, int]:
        """Peak bytes created during forward + backward (activations, logits, gradients), then during AdamW's step."""
        if self.device.type == "cuda":
            peaks = []
            for part in (self.forward_backward, self.update):
                sync(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                part()
                sync(self.device)
                peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
            return tuple(peaks)
        with PeakStorage() as fb:
            self.forward_backward()
        with PeakStorage() as up:
            self.update()
        return fb.peak, up.peak


def bench(width, tokens, args, device, dtype) -> dict:
    variants = {}
    for name in args.variants:
        variants[name] = Variant(name, width, args.layers, tokens, args.vocab, args.delta, device, dtype)
    for _ in range(args.warmup):  # also creates the AdamW moments
        for v in variants.values():
            v.step()
    times = {n: [] for n in variants}
    for _ in range(args.repeats):
        for n, v in variants.items():
            sync(device)
            t0 = time.perf_counter()
            v.step()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n, v in variants.items():
        peaks = (None, None) if args.no_memory else [b / 2 ** 20 for b in v.peak_growth()]
        out[n] = dict(s=statistics.median(times[n]), state=v.state_bytes() / 2 ** 20, kernels=v.kernels,
                      peak=peaks[0], opt_peak=peaks[1])
    del variants
    gc.collect()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 8192], help="tokens per micro-batch (x 256)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS + COMPILED))
    p.add_argument("--compile", action="store_true", help="add full+compile and sltrain+compile (2 warm-up steps)")
    p.add_argument("--layers", type=int, default=2, help="decoder blocks in the slice")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--delta", type=float, default=0.03)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: bf16 autocast (bf16-mixed)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--quick", action="store_true", help="60m, 512 tokens, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.tokens, args.repeats = ["60m"], [512], 2
    if args.compile:
        args.variants += [v for v in ("full+compile", "sltrain+compile") if v not in args.variants]
    if any(v.endswith("+compile") for v in args.variants):
        args.warmup = max(args.warmup, 2)  # the first steps compile (forward, then backward)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    print(f"# bench_step: {where}, torch {torch.__version__}, {args.dtype}, {args.layers} blocks + embedding + "
          f"lm_head (vocab {args.vocab}), AdamW; median of {args.repeats} interleaved steps after "
          f"{args.warmup} warm-up")
    print("| width | tokens | variant | step s | tokens/s | x full (time) | state MB | fwd+bwd peak MB (x full) "
          "| AdamW peak MB | kernels |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        for tokens in args.tokens:
            r = bench(width, tokens, args, device, dtype)
            ref = r.get("full")
            for n, v in r.items():
                ratio = f"{v['s'] / ref['s']:.2f}" if ref else "-"
                peak = "-" if v["peak"] is None else f"{v['peak']:.0f}" + (
                    f" ({v['peak'] / ref['peak']:.2f})" if ref and ref["peak"] else "")
                kernels = ", ".join(f"{k}: {c}" for k, c in v["kernels"].items()) or "-"
                opt_peak = "-" if v["opt_peak"] is None else f"{v['opt_peak']:.0f}"
                print(f"| {width} | {tokens} | {n} | {v['s']:.2f} | {tokens / v['s']:,.0f} | {ratio} | "
                      f"{v['state']:.0f} | {peak} | {opt_peak} | {kernels} |", flush=True)


if __name__ == "__main__":
    main()
