"""Measured memory of a training run: build the real model and optimizer, train a few steps, report the peak.

``measure_memory`` is what ``sltrain memory-estimate --measure`` adds to each row of memory.py's analytic
estimate (``ratio`` = measured / estimated). CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak of live
torch allocations from torch.profiler's allocation events (``_cpu_peak_bytes``).
"""
from __future__ import annotations

import os
from typing import List, Optional

from .configs import ConfigError, MethodConfig, ModelConfig, UserError
from .memory import GB, _short, default_recipe, estimate_memory, load_model_config
from .methods import all_methods


def _cpu_peak_bytes(prof, marker: str) -> int:
    """Peak of torch-allocated CPU bytes from the profiler's allocation events, over the marked region.

    The running sum of allocation (+) and free (-) events since the profiler started counts every tensor
    made after that point (model, optimizer state, batches); its maximum inside ``marker`` is the peak
    while training, like CUDA's max_memory_allocated after a reset.
    """
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    start = min(e["ts"] for e in events if e.get("name") == marker)
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                 key=lambda e: e["ts"])
    running, peak = 0, 0
    for e in mem:
        running += int(e["args"]["Bytes"])
        if e["ts"] >= start:
            peak = max(peak, running)
    return peak


def measure_device(device: Optional[str]) -> str:
    """The device a measurement trains on: None or 'auto' -> 'cuda' when this machine has CUDA, else 'cpu';
    'cpu', 'cuda' or 'cuda:N' as given, once checked against this machine (a ConfigError naming --device
    instead of torch's traceback when the device is unknown or not here)."""
    import torch

    name = str(device or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError("--device", f"must be auto, cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device", f"{name} is not available on this machine; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError("--device", f"{name}: this machine has {count} CUDA device(s), cuda:0 to "
                                          f"cuda:{count - 1}; use one of them, or --device auto")
    return str(dev)


def measure_memory(model_cfg: ModelConfig, method_cfg: MethodConfig, *, optimizer: str = "adamw",
                   layerwise: bool = False, batch_size: int = 1, seq_len: Optional[int] = None, steps: int = 3,
                   device: str = "cpu", precision: str = "bf16-pure", activation_checkpointing: bool = False,
                   seed: int = 0) -> dict:
    """Train the real model ``steps`` steps on random token ids and report the peak memory it used.

    The model is built directly on ``device`` in the run's dtype ('bf16-pure': everything bf16, as the
    paper; 'fp32'). CUDA: ``torch.cuda.max_memory_allocated`` after a peak reset once the model and
    optimizer are built (measure_kind 'cuda_max_allocated'). CPU: the peak of live torch allocations during
    the steps, from torch.profiler's allocation events (measure_kind 'cpu_profiler_alloc_peak'); the model
    is built inside the profiled region so its tensors count. Neither includes the CUDA context / allocator
    cache or Python objects.
    """
    import torch

    from .choices import optim_name
    from .configs import OptimConfig
    from .core.convert import apply_method
    from .core.model import LlamaForCausalLM
    from .core.optim import LayerwiseOptimizer, build_optimizer

    if precision not in ("bf16-pure", "fp32"):
        raise UserError(f"--precision: must be bf16-pure or fp32, got {precision!r}")

    seq_len = int(seq_len or min(256, model_cfg.max_seq_len))
    if not 2 <= seq_len <= model_cfg.max_seq_len:
        raise UserError(f"--seq-len: must be in [2, model.max_seq_len={model_cfg.max_seq_len}], got {seq_len}")
    dev = torch.device(measure_device(device))
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    optim_cfg = OptimConfig(name=optim_name(optimizer), grad_clip=0.0)
    marker = "sltrain.measure_memory.steps"

    def run() -> None:
        torch.manual_seed(seed)
        # built in place in the run's dtype: a 7B model never exists in fp32 or on the host
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with dev:
                model = apply_method(LlamaForCausalLM(model_cfg), method_cfg)
        finally:
            torch.set_default_dtype(previous)
        model.to(device=dev, dtype=dtype)
        _set_checkpointing(model, activation_checkpointing)
        if layerwise:  # steps each parameter from a hook inside backward and frees its gradient
            opt = LayerwiseOptimizer(model, optim_cfg, method_cfg)
        else:
            opt = build_optimizer(model, optim_cfg, method_cfg)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        batches = [torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len), generator=gen).to(dev)
                   for _ in range(steps)]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.profiler.record_function(marker):
            for ids in batches:
                model(ids, labels=ids).loss.backward()
                if not layerwise:
                    opt.step()
                opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if dev.type == "cuda":
        run()
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_allocated"
    else:
        from torch.profiler import ProfilerActivity, profile

        # libkineto logs "USDT: ... profiler_start/stop" to stderr at its highest level (USDT = 5) whatever the
        # build; 6 is above every level. Read when the profiler first starts, so set here; a user's value wins.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        peak, kind = _cpu_peak_bytes(prof, marker), "cpu_profiler_alloc_peak"
    return {"peak_bytes": int(peak), "measured_gb": peak / GB, "measure_kind": kind, "device": str(dev),
            "precision": precision, "steps": steps, "batch_size": batch_size, "seq_len": seq_len}


def _set_checkpointing(model, enabled: bool) -> None:
    if not enabled:
        return
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(True)
    elif hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = True
    else:
        raise UserError("--activation-checkpointing: this model does not support it")


def memory_rows(size: str, method: str = "all", rank: Optional[int] = None, delta: Optional[float] = None,
                optimizer: str = "adamw", layerwise: bool = False, index_dtype: str = "int64",
                batch_size: int = 1, seq_len: int = 256, activation_checkpointing: bool = False,
                measure: bool = False, device: Optional[str] = None) -> List[dict]:
    """One estimate row per method (``method='all'``: every method, in display order).

    rank / delta default to ``default_recipe`` (the size's paper preset). With ``measure`` each row also
    gets ``measured_gb`` (a few bf16-pure training steps of the real model on ``device``, measure.py),
    ``measure_kind`` and ``ratio`` = measured / full_total_gb (the estimate is then made for the measuring
    device). ``device`` None: cuda when available for measuring; estimates alone assume cuda (the paper's).
    """
    device = measure_device(device) if measure else device or "cuda"  # measuring: checked before any row
    cfg = load_model_config(size)
    short = _short(cfg.name)
    recipe = default_recipe(cfg)
    rank = int(recipe["rank"] if rank is None else rank)
    delta = float(recipe["delta"] if delta is None else delta)
    methods = [x.name for x in all_methods()] if method == "all" else [method]
    rows = []
    for m in methods:
        row = estimate_memory(cfg, m, rank, delta, optimizer=optimizer, layerwise=layerwise,
                              index_dtype=index_dtype, batch_size=batch_size, seq_len=seq_len,
                              activation_checkpointing=activation_checkpointing, device=device)
        row["size"] = short
        if measure:
            mcfg = MethodConfig(name=m, rank=rank if row["rank"] is None else row["rank"], delta=delta,
                                index_dtype=index_dtype)
            try:
                meas = measure_memory(cfg, mcfg, optimizer=optimizer, layerwise=layerwise, batch_size=batch_size,
                                      seq_len=seq_len, device=device, precision="bf16-pure",
                                      activation_checkpointing=activation_checkpointing)
            except UserError as e:  # a setting the core refuses: keep the estimate row
                row.update(measured_gb=None, measure_kind=None, ratio=None, measure_error=str(e))
            else:
                row.update(measured_gb=meas["measured_gb"], measure_kind=meas["measure_kind"],
                           ratio=meas["measured_gb"] / row["full_total_gb"])
        rows.append(row)
    return rows
