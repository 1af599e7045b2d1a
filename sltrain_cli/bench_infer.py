"""`sltrain bench-infer`: the paper's Table 5 on your hardware -- inference memory and tokens/s per method.

    rows = bench_infer(size="1b", blocks=2, methods=["sltrain", "full"], batch=1, prompt_tokens=32, new_tokens=32)

Models: random weights at a paper shape (``--size``: the ``paper_SIZE`` preset's model and each method's settings
there, e.g. rank 512, delta 0.03 at 1B), optionally only ``--blocks`` decoder blocks (the embedding and head stay),
or a trained run in its own form beside its dense twin (``full``: the same weights multiplied out). Each variant is
timed the way `sltrain generate` runs it: one prefill of a batch of ``prompt_tokens`` random tokens, then
``new_tokens`` single-token steps with the KV cache (greedy), SLTrain layers' kernels chosen by ``auto`` for each
phase's token count (or fixed by ``kernel``: compose, factored, or dense = W built once and kept). Variants are
timed interleaved, after a warm-up, over ``rounds`` rounds; medians.

Row keys: method, params, weight_bytes (parameters and buffers as held for inference), peak_bytes (the peak of
one prefill + decode: CUDA's max allocated, or on CPU the resident-set high-water mark of a fresh process that
builds the model and runs it, above the same process before the build, the build's transients left out),
prefill_tokens_per_s, decode_tokens_per_s, and each one's ratio to the full-rank row (``*_vs_full``).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .configs import ConfigError

SIZES = ("60m", "130m", "350m", "1b", "7b")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KEYS = ("method", "params", "weight_bytes", "peak_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")
RATIOS = ("params", "weight_bytes", "peak_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")


def _configs(size: str, method: str, blocks: Optional[int]):
    """(ModelConfig, MethodConfig) of ``method`` in the paper_SIZE preset, with ``blocks`` decoder blocks."""
    from .compose import load_config

    cfg = load_config([f"experiment=paper_{size}", f"method={method}"])
    model = cfg.model
    if blocks is not None:
        model = dataclasses.replace(model, num_layers=blocks)
    return dataclasses.replace(model, vocab_size=32000), cfg.method


def _build(size, method, blocks, dtype, device) -> torch.nn.Module:
    from .runs import build_model

    model_cfg, method_cfg = _configs(size, method, blocks)
    model = build_model(model_cfg, method_cfg, seed=0, device=device)
    return model.to(DTYPES[dtype]).eval().requires_grad_(False)


def dense_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A full-rank LlamaForCausalLM computing what ``model`` (any method's form) computes: its weights multiplied
    out (``export``'s dense weights)."""
    from .core.model import LlamaForCausalLM
    from .export import _dense

    param = next(model.parameters())
    with torch.device("meta"):
        twin = LlamaForCausalLM(model.config)
    twin.to_empty(device=param.device)
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(module, torch.nn.Linear) or hasattr(module, "weight") and module is not twin:
                module.weight.copy_(_dense(model.get_submodule(name), name))
    return twin.to(param.dtype).eval().requires_grad_(False)


def _held_bytes(model) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return params, held


def _phases(model, batch: int, prompt_tokens: int, new_tokens: int, seed: int = 0) -> tuple[float, float]:
    """Seconds of one prefill and of ``new_tokens`` cached single-token steps (greedy)."""
    from .core.model import KVCache
    from .infer import prefill

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt_tokens), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cache = KVCache(model.config, batch, prompt_tokens + new_tokens, device, dtype)
    sync()
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache)  # the kernel choices (a cost formula per layer) are timed with it
    sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model.decode(logits.argmax(-1, keepdim=True), cache)
    sync()
    return t1 - t0, time.perf_counter() - t1


def _rss() -> int:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_child(spec: dict) -> int:
    """In a fresh process (CPU): the resident-set high-water mark while one variant, built, runs a prefill and its
    decoding, above the process before the build. The mark is reset after the build (Linux clear_refs), so the
    transient dense weights a method swap starts from do not count."""
    from pathlib import Path

    from .tracking import peak_memory

    device = torch.device(spec["device"])
    before = _rss()
    model = _variant(spec, device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
    except OSError:
        pass  # not Linux: the mark includes the build
    _phases(model, spec["batch"], spec["prompt_tokens"], spec["new_tokens"])
    return peak_memory(device)[0] - before


def _variant(spec: dict, device, run=None):
    """The model one spec measures; a trained run is loaded here unless given (the parent process loads it once)."""
    from .core.sparse_lowrank import set_kernels

    if spec.get("run"):
        from .runs import load_run

        run = run or load_run(spec["run"])
        model = run.model.to(device).to(DTYPES[spec["dtype"]]).eval().requires_grad_(False)
        model = dense_twin(model) if spec["method"] == "full" and run.cfg.method.name.value != "full" else model
    else:
        model = _build(spec["size"], spec["method"], spec["blocks"], spec["dtype"], device)
    set_kernels(model, spec["kernel"])
    return model


def _peak(spec: dict, model, device) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _phases(model, spec["batch"], spec["prompt_tokens"], spec["new_tokens"])
        return int(torch.cuda.max_memory_allocated(device)) - base + _held_bytes(model)[1]
    code = ("import json, sys, torch; from sltrain_cli.bench_infer import _peak_child; "
            f"torch.set_num_threads({torch.get_num_threads()}); print(_peak_child(json.loads(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the peak of {spec['method']} failed: {done.stderr.strip()[-500:]}")
    return int(done.stdout.split()[-1])


def check_shape(size: Optional[str], run: Optional[Path], blocks: Optional[int], batch: int, prompt_tokens: int,
                new_tokens: int, dtype: str, methods: Sequence[str], kernel: str):
    """The options' one-line refusals; returns the trained run when there is one (loaded once, here), else None."""
    from .core.kernel_choice import KERNELS
    from .methods import method_names

    if (size is None) == (run is None):
        raise ConfigError("--size", f"give --size ({', '.join(SIZES)}) or a RUN folder, not both" if size else
                                    f"give --size ({', '.join(SIZES)}) or a RUN folder")
    if size is not None and size not in SIZES:
        raise ConfigError("--size", f"must be one of {', '.join(SIZES)}, got {size!r}")
    if dtype not in DTYPES:
        raise ConfigError("--dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for key, value in (("--batch", batch), ("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens)):
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    if kernel not in KERNELS:
        raise ConfigError("--kernel", f"must be one of {', '.join(KERNELS)}, got {kernel!r}")
    unknown = [m for m in methods if m not in method_names()]
    if not methods or unknown:
        raise ConfigError("--methods", f"choose from {', '.join(method_names())}, got {','.join(methods)!r}")
    if run is not None and blocks is not None:
        raise ConfigError("--blocks", "applies to --size models; a run is measured whole")
    if run is not None:
        from .export import open_run

        loaded = open_run(run)
        model_cfg, known = loaded.cfg.model, {loaded.cfg.method.name.value, "full"}
        if set(methods) - known:
            raise ConfigError("--methods", f"a run is measured in its own form ({sorted(known - {'full'})[0]}) and "
                                           f"as its dense twin (full); got {','.join(methods)}")
    else:
        loaded, model_cfg = None, _configs(size, "full", None)[0]
    if blocks is not None and not 1 <= blocks <= model_cfg.num_layers:
        raise ConfigError("--blocks", f"must be in [1, {model_cfg.num_layers}] (the model's blocks), got {blocks}")
    if prompt_tokens + new_tokens > model_cfg.max_seq_len:
        raise ConfigError("--new-tokens", f"--prompt-tokens + --new-tokens = {prompt_tokens + new_tokens} is more "
                                          f"than the model's max_seq_len {model_cfg.max_seq_len}")
    return loaded


def bench_infer(size: Optional[str] = None, run: Optional[Path] = None, blocks: Optional[int] = None,
                methods: Sequence[str] = ("sltrain", "full"), batch: int = 1, prompt_tokens: int = 32,
                new_tokens: int = 32, dtype: str = "fp32", device: str = "cpu", rounds: int = 5,
                kernel: str = "auto") -> List[dict]:
    """The rows of the module doc, one per method (in ``methods`` order)."""
    from .distributed import resolve_device

    loaded = check_shape(size, run, blocks, batch, prompt_tokens, new_tokens, dtype, methods, kernel)
    dev = resolve_device(device)
    specs = [{"size": size, "run": str(run) if run else None, "method": m, "blocks": blocks, "dtype": dtype,
              "device": str(dev), "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "kernel": kernel}
             for m in methods]
    models = [_variant(spec, dev, loaded) for spec in specs]
    times = [([], []) for _ in specs]
    for model in models:  # warm-up: first calls allocate, pick kernels, fill caches
        _phases(model, batch, prompt_tokens, min(new_tokens, 4))
    for r in range(rounds):
        for i in [(r + k) % len(specs) for k in range(len(specs))]:  # the order rotates every round
            prefill, decode = _phases(models[i], batch, prompt_tokens, new_tokens, seed=r)
            times[i][0].append(prefill)
            times[i][1].append(decode)
    rows = []
    for spec, model, (prefill, decode) in zip(specs, models, times):
        params, held = _held_bytes(model)
        rows.append({"method": spec["method"], "params": params, "weight_bytes": held,
                     "peak_bytes": _peak(spec, model, dev),
                     "prefill_tokens_per_s": batch * prompt_tokens / statistics.median(prefill),
                     "decode_tokens_per_s": batch * new_tokens / statistics.median(decode)})
    full = next((r for r in rows if r["method"] == "full"), None)
    for row in rows:
        for key in RATIOS:
            row[f"{key}_vs_full"] = row[key] / full[key] if full and full[key] else None
    return rows


def rows_view(row: dict) -> dict:
    """The terminal's narrower view of a row."""
    gb = 1e9
    view = {"method": row["method"], "params (M)": row["params"] / 1e6, "weights GB": row["weight_bytes"] / gb,
            "peak GB": row["peak_bytes"] / gb, "prefill tok/s": row["prefill_tokens_per_s"],
            "decode tok/s": row["decode_tokens_per_s"]}
    for key, label in (("weight_bytes", "weights"), ("prefill_tokens_per_s", "prefill"),
                       ("decode_tokens_per_s", "decode")):
        if row.get(f"{key}_vs_full") is not None:
            view[f"{label} vs full"] = f"{row[f'{key}_vs_full']:.2f}x"
    return view

