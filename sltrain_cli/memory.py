"""Memory of a training run: the paper's analytic estimate, a fuller analytic estimate, and a measurement.

Estimates come from shapes only (no tensor is allocated, so 7B is instant). Two sets of figures:

* **Paper convention** (SLTrain Appendix F; keys ``params_total, params_trainable, param_mem_gb,
  optimizer_mem_gb, total_mem_gb``): parameter memory + Adam state, bf16 = 2 B per number, int64 index
  = 8 B, 1G = 1e9 B, 2 moments per trainable number, no gradients, no activations. ReLoRA counts the
  full model plus the low-rank model (embeddings twice); GaLore keeps, per target matrix (out x in), two
  r x max(in, out) moments and the r x min(in, out) projection. These figures ignore ``optimizer``,
  ``layerwise``, ``index_dtype`` and ``param_bytes`` on purpose: they are the paper's table.
* **Fuller** (keys ``full_*``, ``activation_mem_gb``, ``workspace_mem_gb``, ``step_temp_mem_gb``): what
  a bf16-pure (or fp32, ``param_bytes=4``) run of core/ holds -- parameters and index buffers in the
  chosen dtypes, gradients, the optimizer state exactly as core/optim.py allocates it (torch AdamW,
  GaLoreAdamW or bitsandbytes AdamW8bit; equal to ``optimizer_state_bytes`` of the real optimizer),
  activations saved for backward, the dense matrices SLTrain layers build for one matmul, and the
  optimizer step's temporaries. ``full_total_gb`` is the peak over the phases of a step, not a sum.
  On CPU it lands within a few percent of ``measure_memory``; on CUDA it reproduces the paper's measured
  7B peaks (Figure 3: 67.4 / 29.4 / 22 / 18.3 GB) within 1-7%. Its 350M and 1B peaks are 1.2-2.2x ours;
  activations at batch 1 cannot explain that, and the paper does not give the setup of those runs.

``measure_memory`` builds the real model and optimizer and reports the measured peak;
``memory_rows`` is what ``sltrain memory-estimate`` prints.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from .configs import ConfigError, MethodConfig, MethodName, ModelConfig, UserError

GB = 1e9
METHODS_ALL = ("full", "lowrank", "relora", "galore", "sltrain", "sparse")  # what method="all" expands to

# Default (rank, delta) per size. 60m..7b are the reference scripts' SLTrain recipe (PAPER.md); the
# 9m/20m/35m/3b/tiny values are ours (the paper trains none of them): rank ~ hidden/4, delta 0.03.
PAPER_RECIPE: Dict[str, Dict[str, float]] = {
    "tiny": {"rank": 16, "delta": 0.03},
    "9m": {"rank": 32, "delta": 0.03},
    "20m": {"rank": 64, "delta": 0.03},
    "35m": {"rank": 96, "delta": 0.03},
    "60m": {"rank": 128, "delta": 0.03},
    "130m": {"rank": 256, "delta": 0.03},
    "350m": {"rank": 256, "delta": 0.03},
    "1b": {"rank": 512, "delta": 0.03},
    "3b": {"rank": 768, "delta": 0.03},
    "7b": {"rank": 1024, "delta": 0.05},
}

# bitsandbytes 0.50 AdamW8bit (optim/optimizer.py, Optimizer2State.init_state): tensors with fewer than
# min_8bit_size = 4096 entries keep two fp32 moments; larger ones keep two uint8 moments plus one fp32
# absmax per 256-entry block per moment, and share two 256-entry fp32 quantization maps.
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
BNB_QMAP_BYTES = 2 * 256 * 4


# ----------------------------------------------------------------------------------------------- configs
def _short(name: str) -> str:
    return name[len("llama_"):] if name.startswith("llama_") else name


def load_model_config(size: str) -> ModelConfig:
    """The conf/model config for ``size``: '60m', '60M', 'llama_60m' or 'tiny' (composed like every run's)."""
    from .compose import group_options, load_config  # kept local so importing memory stays light

    names = group_options("model")
    key = str(size).strip().lower()
    match = next((n for n in names if n.lower() in (key, f"llama_{key}")), None)
    if match is None:
        shorts = sorted({_short(n) for n in names}, key=_size_order)
        raise UserError(f"--size: unknown model {size!r}; choose from {', '.join(shorts)}")
    return load_config([f"model={match}"]).model


def default_recipe(model_cfg: ModelConfig) -> Dict[str, float]:
    """PAPER_RECIPE's (rank, delta) for this size; for a config not listed, rank hidden/4 and delta 0.03."""
    return PAPER_RECIPE.get(_short(model_cfg.name)) or {"rank": max(1, model_cfg.hidden_size // 4), "delta": 0.03}


def _size_order(short: str):
    """Sort '9m' < '60m' < '1b' < '7b' < anything else (alphabetically)."""
    unit = {"k": 1e3, "m": 1e6, "b": 1e9}.get(short[-1:].lower())
    try:
        return (0, float(short[:-1]) * unit, short) if unit else (1, 0.0, short)
    except ValueError:
        return (1, 0.0, short)


# ------------------------------------------------------------------------------------------- inventory
@dataclass
class _Tensor:
    """One parameter or index buffer of the converted model, by shape only."""

    name: str
    numel: int
    kind: str  # dense | lowrank | sparse_values | indices | frozen
    trainable: bool
    galore_shape: Optional[tuple] = None  # (out, in) of a GaLore-projected matrix


def _targets(cfg: ModelConfig) -> List[tuple]:
    """(name, out, in) of the q,k,v,o,gate,up,down weights of one decoder block."""
    d, m = cfg.hidden_size, cfg.intermediate_size
    return [("q", d, d), ("k", d, d), ("v", d, d), ("o", d, d), ("gate", m, d), ("up", m, d), ("down", d, m)]


def _inventory(cfg: ModelConfig, method: str, rank: int, delta: float, vocab: int,
               target_modules=None) -> List[_Tensor]:
    """Every tensor a converted LlamaForCausalLM holds (parameters + sparse index buffers)."""
    d = cfg.hidden_size
    targets = set(target_modules or [t[0] for t in _targets(cfg)])
    out = [_Tensor("embed", vocab * d, "dense", True)]
    for i in range(cfg.num_layers):
        out += [_Tensor(f"layers.{i}.attn_norm", d, "dense", True), _Tensor(f"layers.{i}.mlp_norm", d, "dense", True)]
        for name, n_out, n_in in _targets(cfg):
            pre = f"layers.{i}.{name}"
            if name not in targets or method == "full":
                out.append(_Tensor(pre, n_out * n_in, "dense", True))
            elif method == "galore":
                out.append(_Tensor(pre, n_out * n_in, "dense", True, galore_shape=(n_out, n_in)))
            else:
                if method == "relora":
                    out.append(_Tensor(pre + ".W0", n_out * n_in, "frozen", False))
                if method in ("lowrank", "relora", "sltrain") and rank > 0:
                    out += [_Tensor(pre + ".A", rank * n_in, "lowrank", True),
                            _Tensor(pre + ".B", n_out * rank, "lowrank", True)]
                if method in ("sltrain", "sparse"):
                    nnz = int(delta * n_in * n_out)
                    out += [_Tensor(pre + ".values", nnz, "sparse_values", True),
                            _Tensor(pre + ".indices", nnz, "indices", False)]
    out += [_Tensor("norm", d, "dense", True), _Tensor("lm_head", vocab * d, "dense", True)]
    return out


def _check_method(cfg: ModelConfig, method: str, rank: int, delta: float) -> None:
    allowed = [m.value for m in MethodName]
    if method not in allowed:
        raise UserError(f"--method: unknown method {method!r}; choose from {', '.join(allowed)}, all")
    try:  # the same rules as a run's method config, reported under this command's flags
        MethodConfig(name=method, rank=rank, delta=delta)
    except ConfigError as err:
        raise UserError(f"--{err.key.rsplit('.', 1)[-1]}: {str(err).split(': ', 1)[1]}") from None
    small = min(cfg.hidden_size, cfg.intermediate_size)
    if method in ("lowrank", "relora", "galore", "sltrain") and rank > small:
        raise UserError(f"--rank: {rank} exceeds the smallest layer dimension {small} of {cfg.name}")


# --------------------------------------------------------------------------------------------- estimate
def _adam8bit_bytes(numel: int) -> int:
    """Bytes of bitsandbytes AdamW8bit state for one tensor (two moments; qmaps counted once elsewhere)."""
    if numel < BNB_MIN_8BIT_SIZE:
        return 2 * numel * 4
    return 2 * (numel + 4 * math.ceil(numel / BNB_BLOCK))


def _activation_parts(cfg: ModelConfig, tokens: int, act_bytes: int, vocab: int,
                      adapter_rank: int = 0) -> tuple:
    """(per block, per checkpointed block input, head, backward temporaries) bytes, for ``tokens`` tokens.

    Counted from core/model.py's autograd graph (a = activation bytes, d hidden, m intermediate, h heads):
    each RMSNorm keeps its fp32 input copy and inverse rms and the normalized a-byte tensor (4d + ad + 4);
    attention keeps the norm output (ad, shared by q, k, v), rotated q, k and v (3ad), the SDPA output
    (ad, also o's input) and its fp32 log-sum-exp (4h); the SwiGLU MLP keeps the norm output (ad), gate,
    silu(gate), up and their product (4am). Per block and token: ``8d + 8ad + 8 + 4h + 4am`` bytes
    (checked against autograd's saved tensors and the CPU allocator), plus ``7ra`` for the (tokens, r)
    intermediates of LowRankLinear / ReLoRALinear (SparseLowRankLinear keeps only its input). No S x S
    matrix: SDPA runs a flash / memory-efficient kernel (CUDA) or the CPU flash kernel.
    Head: final norm and its output (4d + 2ad + 4) and the fp32 cross-entropy at its peak in backward --
    log-softmax output, its gradient and the logits' gradient (12V). The bf16 logits held by a caller's
    output object (aV) are not counted.
    Activation checkpointing: each block keeps only its input (ad); one block's set is rebuilt at a time.
    Backward through a block also holds gradient temporaries: about two (tokens, m) and two (tokens, d)
    a-byte tensors at once (the SwiGLU product's two input gradients, the residual and norm gradients),
    returned as the fourth part.
    """
    d, m, a = cfg.hidden_size, cfg.intermediate_size, act_bytes
    block = tokens * (8 * d + 8 * a * d + 8 + 4 * cfg.num_heads + 4 * a * m + 7 * adapter_rank * a)
    head = tokens * (4 * d + 2 * a * d + 4 + 12 * vocab)
    return block, tokens * a * d, head, tokens * (2 * a * m + 2 * a * d)


def _step_temp_bytes(trainable, method: str, optimizer: str, layerwise: bool, device: str, rank: int,
                     a: int) -> int:
    """Transient bytes of one optimizer step (alive with all gradients, after the activations are freed).

    torch AdamW: on CUDA the foreach path builds one sqrt(v) list the size of all moments (n x a; with
    layer-wise updates each optimizer holds one parameter, so the largest one); on CPU the single-tensor
    path builds sqrt(v) and its quotient for one parameter at a time (2 x largest). GaLoreAdamW (per
    parameter): the denominator and direction (2 x state) plus, for a projected matrix, the back-projected
    (out, in) update; every update_proj_gap steps (step 0 included) the projector refresh takes an fp32
    SVD of the largest target gradient: its fp32 copy, U, Vh and a matrix-sized solver workspace.
    bitsandbytes 8-bit: fused CUDA kernel (nothing); the CPU backend dequantizes both moments, upcasts the
    gradient and the parameter to fp32 and forms an fp32 denominator (~6 x 4 B x largest).
    """
    if not trainable:
        return 0
    largest = max(t.numel for t in trainable)
    if method == "galore":
        def one(t):
            if t.galore_shape:
                o, i = t.galore_shape
                k = min(o, i)
                svd = 4 * (2 * o * i + o * k + k * i)
                update = a * (2 * rank * max(o, i) + o * i) if optimizer == "adam" else a * o * i
                return max(svd, update)
            return 2 * a * t.numel if optimizer == "adam" or device == "cpu" else 0
        return max(one(t) for t in trainable)
    if optimizer == "adam8bit":
        return 24 * largest if device == "cpu" else 0
    if device == "cpu":
        return 2 * a * largest
    return a * (largest if layerwise else sum(t.numel for t in trainable))


def estimate_memory(model_cfg: ModelConfig, method: str, rank: Optional[int] = None,
                    delta: Optional[float] = None, *, vocab_size: Optional[int] = None,
                    optimizer: str = "adam", layerwise: bool = False, index_dtype: str = "int64",
                    batch_size: int = 1, seq_len: int = 256, activation_checkpointing: bool = False,
                    param_bytes: int = 2, device: str = "cuda", target_modules=None) -> dict:
    """Analytic memory of training ``model_cfg`` with ``method``; see the module docstring.

    ``param_bytes``: 2 = bf16-pure (the paper), 4 = fp32. Parameters, gradients, torch-Adam moments,
    GaLore projections and activations use it. ``optimizer``: 'adam' (torch AdamW: moments in the
    parameter dtype) or 'adam8bit' (bitsandbytes AdamW8bit layout). ``layerwise``: the optimizer steps
    each parameter inside backward, so gradients are never all alive; we count the largest single
    trainable parameter's gradient. GaLore under adam8bit quantizes its projected moments the same way.
    ``device``: 'cuda' (the paper's setting) or 'cpu' -- which optimizer-step and SLTrain-layer
    temporaries torch / bitsandbytes create there. ``full_total_gb`` is parameters + optimizer state +
    the largest of four phases of a step (``peak_phase``: loss, backward_start, backward_end,
    optimizer_step), not the sum of the parts; ``activation_mem_gb`` is the most activation memory alive
    at once.
    """
    method = getattr(method, "value", method)
    index_dtype = getattr(index_dtype, "value", index_dtype)
    size = _short(model_cfg.name)
    recipe = default_recipe(model_cfg)
    rank = int(recipe["rank"] if rank is None else rank)
    delta = float(recipe["delta"] if delta is None else delta)
    if method == "sparse":
        rank = 0
    _check_method(model_cfg, method, rank, delta)
    if optimizer not in ("adam", "adam8bit"):
        raise UserError(f"--optimizer: must be adam or adam8bit, got {optimizer!r}")
    if index_dtype not in ("int64", "int32"):
        raise UserError(f"--index-dtype: must be int64 or int32, got {index_dtype!r}")
    device = "cpu" if str(device).startswith("cpu") else "cuda"
    if param_bytes not in (2, 4):
        raise UserError(f"param_bytes: must be 2 (bf16) or 4 (fp32), got {param_bytes}")
    vocab = int(vocab_size or model_cfg.vocab_size)
    inv = _inventory(model_cfg, method, rank, delta, vocab, target_modules)

    params = [t for t in inv if t.kind != "indices"]
    trainable = [t for t in params if t.trainable]
    n_params = sum(t.numel for t in params)
    n_train = sum(t.numel for t in trainable)
    n_index = sum(t.numel for t in inv if t.kind == "indices")

    # ---- paper convention (fixed: bf16, int64 indices, 2 moments, no grads/activations)
    if method == "relora":  # full model + low-rank model, moments over the low-rank model
        lr_inv = _inventory(model_cfg, "lowrank", rank, delta, vocab, target_modules)
        full_total = sum(t.numel for t in _inventory(model_cfg, "full", rank, delta, vocab))
        paper_total, paper_train = full_total + sum(t.numel for t in lr_inv), sum(t.numel for t in lr_inv)
    else:
        paper_total, paper_train = n_params, n_train
    if method == "galore":
        moments = sum(2 * rank * max(t.galore_shape) + rank * min(t.galore_shape) if t.galore_shape
                      else 2 * t.numel for t in trainable)
    else:
        moments = 2 * paper_train
    paper_param_b = 2 * paper_total + 8 * n_index
    paper_opt_b = 2 * moments

    # ---- fuller figures
    index_bytes = 8 if index_dtype == "int64" else 4
    full_param_b = param_bytes * n_params + index_bytes * n_index
    if layerwise:
        full_grad_b = param_bytes * max((t.numel for t in trainable), default=0)
    else:
        full_grad_b = param_bytes * n_train
    # Optimizer state as core/optim.py builds it: torch AdamW keeps its moments in the parameter dtype
    # and a 4-byte fp32 `step` tensor per parameter; GaLoreAdamW (every parameter under method=galore)
    # keeps moments in the gradient dtype, the projector in the weight dtype and an int step; bitsandbytes
    # shares its two quantization maps within one optimizer -- one per parameter under layer-wise updates.
    full_opt_b = 0
    n_8bit = 0
    for t in trainable:
        if t.galore_shape:
            state_numel = rank * max(t.galore_shape)
            full_opt_b += param_bytes * rank * min(t.galore_shape)  # the projection, in the weight dtype
        else:
            state_numel = t.numel
        if optimizer == "adam":
            full_opt_b += 2 * param_bytes * state_numel + (0 if method == "galore" else 4)
        else:
            full_opt_b += _adam8bit_bytes(state_numel)
            n_8bit += state_numel >= BNB_MIN_8BIT_SIZE
    full_opt_b += BNB_QMAP_BYTES * (n_8bit if layerwise else min(n_8bit, 1))
    # SLTrain / sparse layers build the dense (out, in) W for one matmul in forward, and W then the weight
    # gradient G^T x in backward, one layer at a time. On CPU in bf16 the rank-r product is done in fp32
    # and cast down (6 B per entry alive).
    biggest = max(o * i for _, o, i in _targets(model_cfg))
    per_entry = 6 if (device == "cpu" and param_bytes == 2) else param_bytes
    work_b = biggest * per_entry if method in ("sltrain", "sparse") else 0
    temp_b = _step_temp_bytes(trainable, method, optimizer, layerwise, device, rank, param_bytes)

    # The peak over the phases of one step. Always alive: parameters and optimizer state. The loop sets
    # gradients to None after each step, so backward starts with none; walking back through the blocks,
    # saved activations are freed while gradients pile up, so the largest sum is at one end of that walk.
    # Under layer-wise updates a gradient lives only until its hook has stepped it.
    L = model_cfg.num_layers
    block, ck_in, head, bwd_tmp = _activation_parts(model_cfg, batch_size * seq_len, param_bytes, vocab,
                                                    rank if method in ("lowrank", "relora") else 0)
    saved = L * ck_in if activation_checkpointing else L * block  # saved by the blocks at the loss
    rebuilt = block if activation_checkpointing else 0  # one block recomputed in backward
    g = {k: param_bytes * sum(t.numel for t in trainable if t.name.split(".")[0] == k)
         for k in ("embed", "layers", "norm", "lm_head")}
    g_head, g_block = g["norm"] + g["lm_head"], g["layers"] // max(L, 1)
    if layerwise:  # one gradient and its optimizer's temporaries at a time
        g_last = g_first = g_step = full_grad_b + temp_b
    else:
        g_last, g_first, g_step = g_head, g_head + (L - 1) * g_block, full_grad_b + temp_b
    phases = {
        "loss": saved + head,  # cross-entropy backward, no gradient yet
        "backward_start": saved + rebuilt + bwd_tmp + work_b + g_last,  # last block's backward
        "backward_end": (ck_in + block if activation_checkpointing else block) + bwd_tmp + work_b + g_first,
        "optimizer_step": g_step,  # all gradients + step temporaries (layer-wise: the embedding's)
    }
    peak_phase = max(phases, key=phases.get)
    peak_b = full_param_b + full_opt_b + phases[peak_phase]
    act_b = max(saved + head, saved + rebuilt)

    return {
        "method": method, "size": size, "rank": None if method == "full" else rank,
        "delta": delta if method in ("sltrain", "sparse") else None,
        "params_total": paper_total, "params_trainable": paper_train,
        "param_mem_gb": paper_param_b / GB, "optimizer_mem_gb": paper_opt_b / GB,
        "total_mem_gb": (paper_param_b + paper_opt_b) / GB,
        "model_params_total": n_params, "model_params_trainable": n_train, "index_entries": n_index,
        "optimizer": optimizer, "layerwise": layerwise, "index_dtype": index_dtype,
        "param_bytes": param_bytes, "batch_size": batch_size, "seq_len": seq_len,
        "activation_checkpointing": activation_checkpointing,
        "full_param_mem_gb": full_param_b / GB, "full_grad_mem_gb": full_grad_b / GB,
        "full_optimizer_mem_gb": full_opt_b / GB, "full_optimizer_bytes": full_opt_b,
        "activation_mem_gb": act_b / GB, "workspace_mem_gb": work_b / GB, "step_temp_mem_gb": temp_b / GB,
        "full_total_gb": peak_b / GB, "peak_phase": peak_phase, "device": device,
    }


# ------------------------------------------------------------------------------------------ measurement
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


def measure_memory(model_cfg: ModelConfig, method_cfg: MethodConfig, *, optimizer: str = "adam",
                   layerwise: bool = False, batch_size: int = 1, seq_len: Optional[int] = None, steps: int = 3,
                   device: str = "cpu", precision: str = "bf16-pure", activation_checkpointing: bool = False,
                   seed: int = 0) -> dict:
    """Train the real model ``steps`` steps on random token ids and report the peak memory it used.

    The model is built directly on ``device`` in the run's dtype ('bf16-pure': everything bf16, as the
    paper; 'fp32'). CUDA: ``torch.cuda.max_memory_allocated`` after a peak reset once the model and
    optimizer are built (measure_kind 'cuda_max_allocated'). CPU: the peak of live torch allocations during the steps, from torch.profiler's
    allocation events (measure_kind 'cpu_profiler_alloc_peak'); the model is built inside the profiled
    region so its tensors count. Neither includes the CUDA context / allocator cache or Python objects.
    """
    import torch

    from .configs import OptimConfig
    from .core.convert import apply_method
    from .core.model import LlamaForCausalLM
    from .core.optim import LayerwiseOptimizer, build_optimizer

    if precision not in ("bf16-pure", "fp32"):
        raise UserError(f"--precision: must be bf16-pure or fp32, got {precision!r}")
    if optimizer not in ("adam", "adam8bit"):
        raise UserError(f"--optimizer: must be adam or adam8bit, got {optimizer!r}")
    seq_len = int(seq_len or min(256, model_cfg.max_seq_len))
    if not 2 <= seq_len <= model_cfg.max_seq_len:
        raise UserError(f"--seq-len: must be in [2, model.max_seq_len={model_cfg.max_seq_len}], got {seq_len}")
    dev = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    optim_cfg = OptimConfig(name="adamw8bit" if optimizer == "adam8bit" else "adamw", grad_clip=0.0)
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


# ---------------------------------------------------------------------------------------------- the CLI
def memory_rows(size: str, method: str = "all", rank: Optional[int] = None, delta: Optional[float] = None,
                optimizer: str = "adam", layerwise: bool = False, index_dtype: str = "int64",
                batch_size: int = 1, seq_len: int = 256, activation_checkpointing: bool = False,
                measure: bool = False, device: Optional[str] = None) -> List[dict]:
    """One estimate row per method (``method='all'``: full, lowrank, relora, galore, sltrain, sparse).

    rank / delta default to PAPER_RECIPE[size]. With ``measure`` each row also gets ``measured_gb`` (a few
    bf16-pure training steps of the real model on ``device``), ``measure_kind`` and ``ratio`` =
    measured / full_total_gb (the estimate is then made for the measuring device). ``device`` None: cuda
    when available for measuring; estimates alone assume cuda (the paper's setting).
    """
    if measure and device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = device or "cuda"
    cfg = load_model_config(size)
    short = _short(cfg.name)
    recipe = default_recipe(cfg)
    rank = int(recipe["rank"] if rank is None else rank)
    delta = float(recipe["delta"] if delta is None else delta)
    methods = list(METHODS_ALL) if method == "all" else [method]
    rows = []
    for m in methods:
        row = estimate_memory(cfg, m, rank, delta, optimizer=optimizer, layerwise=layerwise,
                              index_dtype=index_dtype, batch_size=batch_size, seq_len=seq_len,
                              activation_checkpointing=activation_checkpointing, device=device)
        row["size"] = short
        if measure:
            mcfg = MethodConfig(name=m, rank=row["rank"] or (0 if m == "sparse" else rank), delta=delta,
                                index_dtype=index_dtype)
            try:
                meas = measure_memory(cfg, mcfg, optimizer=optimizer, layerwise=layerwise, batch_size=batch_size,
                                      seq_len=seq_len, device=device, precision="bf16-pure",
                                      activation_checkpointing=activation_checkpointing)
            except UserError as e:  # e.g. 8-bit GaLore, which core/optim.py refuses: keep the estimate row
                row.update(measured_gb=None, measure_kind=None, ratio=None, measure_error=str(e))
            else:
                row.update(measured_gb=meas["measured_gb"], measure_kind=meas["measure_kind"],
                           ratio=meas["measured_gb"] / row["full_total_gb"])
        rows.append(row)
    return rows
