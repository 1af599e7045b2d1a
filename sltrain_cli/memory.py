"""Memory of a training run: the paper's analytic estimate and a fuller analytic estimate.

Estimates count the tensors of the real model, built on the meta device (``apply_method(LlamaForCausalLM(cfg),
method)``: shapes only, nothing is allocated, so 7B takes a fraction of a second). Two sets of figures:

* **Paper convention** (SLTrain Appendix F; keys ``params_total, params_trainable, param_mem_gb,
  optimizer_mem_gb, total_mem_gb``): parameter memory + Adam state, bf16 = 2 B per number, int64 index
  = 8 B, 1G = 1e9 B, 2 moments per trainable number, no gradients, no activations. ReLoRA counts the
  full model plus the low-rank model (embeddings twice); GaLore keeps, per target matrix (out x in), two
  r x max(in, out) moments and the r x min(in, out) projection. These figures ignore ``optimizer``,
  ``layerwise``, ``index_dtype`` and ``param_bytes`` on purpose: they are the paper's table.
* **Fuller** (keys ``full_*``, ``activation_mem_gb``, ``workspace_mem_gb``, ``step_temp_mem_gb``,
  ``kernel_cache_mem_gb``): what a bf16-pure (or fp32, ``param_bytes=4``) run of core/ holds -- parameters and
  index buffers in the chosen dtypes, gradients, the optimizer state exactly as core/optim.py allocates it (torch
  AdamW, GaLoreAdamW or bitsandbytes AdamW8bit; equal to ``optimizer_state_bytes`` of the real optimizer), saved
  activations (the chunked loss's too), the dense matrices SLTrain layers build for one matmul, the CSR structure
  of factored layers, the step's temporaries. ``full_total_gb`` is the peak over the phases of a step, not a sum.
  On CPU it lands within a few percent of ``measure_memory``; on CUDA it reproduces the paper's measured
  7B peaks (Figure 3: 67.4 / 29.4 / 22 / 18.3 GB) within 1-7%. Its 350M and 1B peaks are 1.2-2.2x ours;
  activations at batch 1 cannot explain that, and the paper does not give the setup of those runs.

The default (rank, delta) of a size is its ``conf/experiment/paper_<size>.yaml`` preset. ``memory_rows``
(measure.py) is what ``sltrain memory-estimate`` prints, estimates beside measurements.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .choices import optim_name
from .configs import (
    TARGET_MODULES,
    ConfigError,
    MethodConfig,
    MethodName,
    ModelConfig,
    OptimName,
    UserError,
)
from .core.convert import method_rank_limit, stored_tensors
from .core.kernel_choice import choose_kernel
from .core.model import LOSS_CHUNK_LOGITS, LOSS_CHUNK_MIN
from .core.optim import BNB_BLOCKSIZE, BNB_MIN_8BIT_SIZE
from .methods import all_methods, get_method, method_names

GB = 1e9  # 1G = 1e9 B, the paper's convention

# Sizes without a conf/experiment/paper_<size>.yaml preset (the paper trains none of them) take our rule:
# rank hidden_size // 4, delta 0.03. One exception: 3b has always used rank 768 (its hidden/4 is 640).
DEFAULT_DELTA = 0.03
RANK_OVERRIDES = {"3b": 768}

# bitsandbytes shares two 256-entry fp32 quantization maps (one per moment) within one optimizer; the
# per-tensor layout (BNB_BLOCKSIZE, BNB_MIN_8BIT_SIZE) is described in core/optim.py.
BNB_QMAP_BYTES = 2 * 256 * 4


# ----------------------------------------------------------------------------------------------- configs
def _short(name: str) -> str:
    return name[len("llama_"):] if name.startswith("llama_") else name


def load_model_config(size: str) -> ModelConfig:
    """The conf/model config for ``size``: '60m', '60M', 'llama_60m' or 'tiny' (composed like every run's)."""
    from .compose import group_options, load_config  # kept local: compose is the one hydra import

    names = group_options("model")
    key = str(size).strip().lower()
    match = next((n for n in names if n.lower() in (key, f"llama_{key}")), None)
    if match is None:
        shorts = sorted({_short(n) for n in names}, key=_size_order)
        raise UserError(f"--size: unknown model {size!r}; choose from {', '.join(shorts)}")
    return load_config([f"model={match}"]).model


@functools.lru_cache(maxsize=None)
def _preset(conf: str, short: str) -> Optional[Tuple[int, float]]:
    """(method.rank, method.delta) of experiment=paper_<short> in the conf/ folder ``conf``; None without one.
    Read from the preset file itself; composed (slower) only when the file leaves one of them to its defaults."""
    from .compose import group_options, load_config, option_values

    if f"paper_{short}" not in group_options("experiment"):
        return None
    method = option_values("experiment", f"paper_{short}").get("method") or {}
    if "rank" not in method or "delta" not in method:
        composed = load_config([f"experiment=paper_{short}", "method=sltrain"]).method
        method = {"rank": composed.rank, "delta": composed.delta}
    return int(method["rank"]), float(method["delta"])


def _paper_recipe(short: str) -> Optional[Dict[str, float]]:
    from .compose import conf_dir

    found = _preset(str(conf_dir()), short)  # keyed by the conf/ folder: SLTRAIN_CONF_DIR may change
    return found and {"rank": found[0], "delta": found[1]}


def default_recipe(model_cfg: ModelConfig) -> Dict[str, float]:
    """The size's paper preset (rank, delta); without one, rank hidden/4 (RANK_OVERRIDES aside), delta 0.03."""
    short = _short(model_cfg.name)
    rank = RANK_OVERRIDES.get(short, max(1, model_cfg.hidden_size // 4))
    return _paper_recipe(short) or {"rank": rank, "delta": DEFAULT_DELTA}


def _size_order(short: str):
    """Sort '9m' < '60m' < '1b' < '7b' < anything else (alphabetically)."""
    unit = {"k": 1e3, "m": 1e6, "b": 1e9}.get(short[-1:].lower())
    try:
        return (0, float(short[:-1]) * unit, short) if unit else (1, 0.0, short)
    except ValueError:
        return (1, 0.0, short)


# ------------------------------------------------------------------------------------------- inventory
@dataclass(frozen=True)
class _Tensor:
    """One parameter or index buffer of the converted model, by shape only."""

    name: str  # its path in the model, e.g. layers.0.attn.q.A
    numel: int
    kind: str  # dense | lowrank | sparse_values | indices | frozen
    trainable: bool
    galore_shape: Optional[tuple] = None  # (out, in) of a GaLore-projected matrix


def _inventory(cfg: ModelConfig, method: str, rank: int, delta: float, vocab: int,
               target_modules=None) -> Tuple[Tuple[_Tensor, ...], int, tuple]:
    """Every tensor the converted LlamaForCausalLM holds (parameters + sparse index buffers), the largest (out, in)
    entry count of its SparseLowRankLinear layers (0 without one) and each such layer's (out, in, rank, nnz).

    The model is built on the meta device; kinds follow core.convert.count_parameters (A, B of a swapped
    layer: lowrank; values: sparse_values; a parameter without requires_grad, ReLoRA's W0: frozen). GaLore's
    projected matrices are the method's own ``projected_params`` (what the optimizer projects).
    """
    cfg = dataclasses.replace(cfg, vocab_size=int(vocab))
    targets = tuple(target_modules or TARGET_MODULES)
    return _build_inventory(dataclasses.astuple(cfg), method, rank, delta, targets)


@functools.lru_cache(maxsize=64)  # keyed by values: memory-estimate and the tests ask for the same model often
def _build_inventory(cfg_values: tuple, method: str, rank: int, delta: float, targets: Tuple[str, ...]):
    import torch

    from .core.convert import apply_method
    from .core.model import LlamaForCausalLM
    from .core.sparse_lowrank import SparseLowRankLinear

    cfg = ModelConfig(*cfg_values)
    method_cfg = MethodConfig(name=method, rank=rank, delta=delta, target_modules=list(targets))
    try:
        with torch.device("meta"):
            model = apply_method(LlamaForCausalLM(cfg), method_cfg)
    except ValueError as err:  # e.g. a sparse layer whose int(delta * in * out) is 0
        raise UserError(f"--delta: {err}") from None
    projected = {}
    if get_method(method).projects_moments:
        projected = {id(p): tuple(p.shape) for p in get_method(method).projected_params(model, method_cfg)}
    out = [_Tensor(path, t.numel(), "frozen" if kind != "indices" and not t.requires_grad else kind,
                   kind != "indices" and t.requires_grad, projected.get(id(t)))
           for path, t, kind in stored_tensors(model)]  # the same inventory count_parameters sums
    layers = [m for m in model.modules() if isinstance(m, SparseLowRankLinear)]
    widest = max((m.in_features * m.out_features for m in layers), default=0)
    sparse_layers = [(m.out_features, m.in_features, m.rank, m.nnz) for m in layers]
    return tuple(out), widest, tuple(sparse_layers)


def _check_method(cfg: ModelConfig, method: str, rank: int, delta: float) -> None:
    allowed = [m.value for m in MethodName]
    if method not in allowed:
        raise UserError(f"--method: unknown method {method!r}; choose from {', '.join(allowed)}, all")
    try:  # the same rules as a run's method config, reported under this command's flags
        method_cfg = MethodConfig(name=method, rank=rank, delta=delta)
    except ConfigError as err:
        raise UserError(f"--{err.key.rsplit('.', 1)[-1]}: {str(err).split(': ', 1)[1]}") from None
    small = method_rank_limit(cfg, method_cfg)
    if small is not None and rank > small:
        raise UserError(f"--rank: {rank} exceeds the smallest layer dimension {small} of {cfg.name}")


# --------------------------------------------------------------------------------------------- estimate
def _adam8bit_bytes(numel: int) -> int:
    """Bytes of bitsandbytes AdamW8bit state for one tensor (two moments; qmaps counted once elsewhere)."""
    if numel < BNB_MIN_8BIT_SIZE:
        return 2 * numel * 4
    return 2 * (numel + 4 * math.ceil(numel / BNB_BLOCKSIZE))


def _activation_parts(cfg: ModelConfig, batch_size: int, seq_len: int, act_bytes: int, vocab: int,
                      adapter_rank: int = 0) -> tuple:
    """(per block, per checkpointed block input, head, backward temporaries) bytes, batch_size x seq_len tokens.

    Counted from core/model.py's autograd graph (a = activation bytes, d hidden, m intermediate, h heads):
    each RMSNorm keeps its fp32 input copy and inverse rms and the normalized a-byte tensor (4d + ad + 4);
    attention keeps the norm output (ad, shared by q, k, v), rotated q, k and v (3ad), the SDPA output
    (ad, also o's input) and its fp32 log-sum-exp (4h); the SwiGLU MLP keeps the norm output (ad), gate,
    silu(gate), up and their product (4am). Per block and token: ``8d + 8ad + 8 + 4h + 4am`` bytes
    (checked against autograd's saved tensors and the CPU allocator), plus ``7ra`` for the (tokens, r)
    intermediates of LowRankLinear / ReLoRALinear (SparseLowRankLinear keeps only its input). No S x S
    matrix: SDPA runs a flash / memory-efficient kernel (CUDA) or the CPU flash kernel.
    Head: final norm and output (4d + 2ad + 4) per token, then core/model.py's chunked loss over N = batch x (seq - 1)
    rows: dL/dh, formed in forward (Nad; + an (N, d) copy of the shifted h when batch > 1), and one chunk of c = min(N,
    max(LOSS_CHUNK_MIN, LOSS_CHUNK_LOGITS // V)) rows of fp32 logits + logsumexp's fp32 temporary (8cV) at its peak.
    Activation checkpointing: each block keeps only its input (ad); one block's set is rebuilt at a time.
    Backward through a block also holds gradient temporaries: about two (tokens, m) and two (tokens, d)
    a-byte tensors at once (the SwiGLU product's two input gradients, the residual and norm gradients),
    returned as the fourth part.
    """
    d, m, a = cfg.hidden_size, cfg.intermediate_size, act_bytes
    tokens, rows = batch_size * seq_len, batch_size * (seq_len - 1)
    chunk = min(rows, max(LOSS_CHUNK_MIN, LOSS_CHUNK_LOGITS // vocab))
    block = tokens * (8 * d + 8 * a * d + 8 + 4 * cfg.num_heads + 4 * a * m + 7 * adapter_rank * a)
    head = tokens * (4 * d + 2 * a * d + 4) + (2 if batch_size > 1 else 1) * rows * a * d + 8 * chunk * vocab
    return block, tokens * a * d, head, tokens * (2 * a * m + 2 * a * d)


def _step_temp_bytes(trainable, method: str, optimizer: str, layerwise: bool, device: str, rank: int,
                     a: int) -> int:
    """Transient bytes of one optimizer step (alive with all gradients, after the activations are freed).

    torch AdamW: on CUDA the foreach path builds one sqrt(v) list the size of all moments (n x a; with
    layer-wise updates each optimizer holds one parameter, so the largest one); on CPU the single-tensor
    path builds sqrt(v) and its quotient for one parameter at a time (2 x largest). GaLore (per parameter):
    2 x state (32-bit: denominator, direction; 8-bit: R, update scratch) plus, when projected, the (out, in)
    back-projection; every update_proj_gap steps (step 0 included) the projector refresh takes an fp32
    SVD of the largest target gradient: its fp32 copy, U, Vh and a matrix-sized solver workspace.
    bitsandbytes 8-bit: fused CUDA kernel (nothing); the CPU backend dequantizes both moments, upcasts the
    gradient and the parameter to fp32 and forms an fp32 denominator (~6 x 4 B x largest, or x state).
    """
    if not trainable:
        return 0
    largest = max(t.numel for t in trainable)
    if get_method(method).projects_moments:
        def one(t):
            if t.galore_shape:
                o, i = t.galore_shape
                k, n = min(o, i), rank * max(o, i)
                svd = 4 * (2 * o * i + o * k + k * i)
                update = a * (2 * n + o * i) + (24 * n if optimizer == OptimName.adamw8bit and device == "cpu" else 0)
                return max(svd, update)
            return 2 * a * t.numel if optimizer == OptimName.adamw else (24 * t.numel if device == "cpu" else 0)
        return max(one(t) for t in trainable)
    if optimizer == OptimName.adamw8bit:
        return 24 * largest if device == "cpu" else 0
    if device == "cpu":
        return 2 * a * largest
    return a * (largest if layerwise else sum(t.numel for t in trainable))


def estimate_memory(model_cfg: ModelConfig, method: str, rank: Optional[int] = None,
                    delta: Optional[float] = None, *, vocab_size: Optional[int] = None,
                    optimizer: str = "adamw", layerwise: bool = False, index_dtype: str = "int64",
                    batch_size: int = 1, seq_len: int = 256, activation_checkpointing: bool = False,
                    param_bytes: int = 2, device: str = "cuda", target_modules=None) -> dict:
    """Analytic memory of training ``model_cfg`` with ``method``; see the module docstring.

    ``param_bytes``: 2 = bf16-pure (the paper), 4 = fp32. Parameters, gradients, torch-Adam moments,
    GaLore projections and activations use it. ``optimizer``: 'adam' (torch AdamW: moments in the
    parameter dtype) or 'adamw8bit' (bitsandbytes AdamW8bit layout). ``layerwise``: the optimizer steps
    each parameter inside backward, so gradients are never all alive; we count the largest single
    trainable parameter's gradient. GaLore under adamw8bit quantizes its projected moments the same way.
    ``device``: 'cuda' (the paper's setting) or 'cpu' -- which optimizer-step and SLTrain-layer
    temporaries torch / bitsandbytes create there, and the kernel ``auto`` picks per SLTrain layer (a factored one
    keeps its CSR structure: ``kernel_cache_mem_gb``). ``full_total_gb`` is parameters + optimizer state + that +
    the largest of four phases of a step (``peak_phase``: loss, backward_start, backward_end, optimizer_step), not
    the sum of the parts; ``activation_mem_gb`` is the most activation memory alive at once.
    """
    import torch

    method = getattr(method, "value", method)
    index_dtype = getattr(index_dtype, "value", index_dtype)
    size = _short(model_cfg.name)
    recipe = default_recipe(model_cfg) if rank is None or delta is None else {}
    rank = int(recipe["rank"] if rank is None else rank)
    delta = float(recipe["delta"] if delta is None else delta)
    if method not in method_names():
        allowed = ", ".join(x.name for x in all_methods())
        raise UserError(f"--method: unknown method {method!r}; choose from {allowed}, all")
    m = get_method(method)
    rank = rank if m.uses("rank") or not m.has_support else 0  # a support without a low-rank part: rank 0
    _check_method(model_cfg, method, rank, delta)
    optimizer = optim_name(optimizer)
    if index_dtype not in ("int64", "int32"):
        raise UserError(f"--index-dtype: must be int64 or int32, got {index_dtype!r}")
    device = "cpu" if str(device).startswith("cpu") else "cuda"
    if param_bytes not in (2, 4):
        raise UserError(f"param_bytes: must be 2 (bf16) or 4 (fp32), got {param_bytes}")
    vocab = int(vocab_size or model_cfg.vocab_size)
    inv, biggest, sparse_layers = _inventory(model_cfg, method, rank, delta, vocab, target_modules)

    params = [t for t in inv if t.kind != "indices"]
    trainable = [t for t in params if t.trainable]
    n_params = sum(t.numel for t in params)
    n_train = sum(t.numel for t in trainable)
    n_index = sum(t.numel for t in inv if t.kind == "indices")
    n_frozen = sum(t.numel for t in params if t.kind == "frozen")
    n_adapter = sum(t.numel for t in params if t.kind == "lowrank")

    # ---- paper convention (fixed: bf16, int64 indices, 2 moments, no grads/activations)
    paper_total, paper_train = m.paper_params(n_params, n_adapter, n_frozen, n_train)  # ReLoRA: two models
    moments = (sum(2 * rank * max(t.galore_shape) + rank * min(t.galore_shape) if t.galore_shape else 2 * t.numel
                   for t in trainable) if m.projects_moments else 2 * paper_train)
    paper_param_b, paper_opt_b = 2 * paper_total + 8 * n_index, 2 * moments

    # ---- fuller figures
    index_bytes = 8 if index_dtype == "int64" else 4
    full_param_b = param_bytes * n_params + index_bytes * n_index
    full_grad_b = param_bytes * (max((t.numel for t in trainable), default=0) if layerwise else n_train)
    # Optimizer state as core/optim.py builds it: torch AdamW keeps its moments in the parameter dtype
    # and a 4-byte fp32 `step` tensor per parameter; GaLoreAdamW (every parameter under method=galore)
    # keeps moments in the gradient dtype, the projector in the weight dtype and an int step; bitsandbytes
    # shares its two quantization maps within one optimizer -- one per parameter under layer-wise updates.
    full_opt_b = n_8bit = 0
    for t in trainable:
        if t.galore_shape:
            state_numel = rank * max(t.galore_shape)
            full_opt_b += param_bytes * rank * min(t.galore_shape)  # the projection, in the weight dtype
            full_opt_b += param_bytes * m.state_scalars  # one-number tensors (APOLLO's limiter norm)
        else:
            state_numel = t.numel
        if optimizer == OptimName.adamw:
            full_opt_b += 2 * param_bytes * state_numel + (0 if m.projects_moments else 4)
        else:
            full_opt_b += _adam8bit_bytes(state_numel)
            n_8bit += state_numel >= BNB_MIN_8BIT_SIZE
    full_opt_b += BNB_QMAP_BYTES * (n_8bit if layerwise else min(n_8bit, 1))
    # SLTrain / sparse layers build the dense (out, in) W for one matmul in forward, and W then the weight
    # gradient G^T x in backward, one layer at a time. On CPU in bf16 the rank-r product is done in fp32
    # and cast down (6 B per entry alive).
    per_entry = 6 if (device == "cpu" and param_bytes == 2) else param_bytes
    work_b = biggest * per_entry if m.builds_dense_weight else 0
    temp_b = _step_temp_bytes(trainable, method, optimizer, layerwise, device, rank, param_bytes)
    # A layer on the factored kernel (kernel="auto" picks per layer) keeps a CsrPlan: S's and S^T's column indices,
    # the permutation into S^T's order (3 nnz) and both row pointers, int32 where they fit (core/sparse_kernels.py)
    dt = torch.bfloat16 if param_bytes == 2 else torch.float32
    csr_b = sum((4 if max(o, i, k) < 2 ** 31 - 1 else 8) * (3 * k + o + i + 2) for o, i, r, k in sparse_layers
                if k and choose_kernel(batch_size * seq_len, i, o, r, k, dt, device) == "factored")

    # The peak over the phases of one step. Always alive: parameters and optimizer state. The loop sets
    # gradients to None after each step, so backward starts with none; walking back through the blocks,
    # saved activations are freed while gradients pile up, so the largest sum is at one end of that walk.
    # Under layer-wise updates a gradient lives only until its hook has stepped it.
    L = model_cfg.num_layers
    block, ck_in, head, bwd_tmp = _activation_parts(model_cfg, batch_size, seq_len, param_bytes, vocab,
                                                    rank if m.low_rank_activations else 0)
    saved = L * ck_in if activation_checkpointing else L * block  # saved by the blocks at the loss
    rebuilt = block if activation_checkpointing else 0  # one block recomputed in backward
    g = {k: param_bytes * sum(t.numel for t in trainable if t.name.split(".")[0] == k)
         for k in ("embed_tokens", "layers", "norm", "lm_head")}
    g_head, g_block = g["norm"] + g["lm_head"], g["layers"] // max(L, 1)
    if layerwise:  # one gradient and its optimizer's temporaries at a time
        g_last = g_first = g_step = full_grad_b + temp_b
    else:
        g_last, g_first, g_step = g_head, g_head + (L - 1) * g_block, full_grad_b + temp_b
    phases = {
        "loss": saved + head + g["lm_head"],  # the chunked loss: its only gradient yet is the head's
        "backward_start": saved + rebuilt + bwd_tmp + work_b + g_last,  # last block's backward
        "backward_end": (ck_in + block if activation_checkpointing else block) + bwd_tmp + work_b + g_first,
        "optimizer_step": g_step,  # all gradients + step temporaries (layer-wise: the embedding's)
    }
    peak_phase = max(phases, key=phases.get)
    peak_b = full_param_b + full_opt_b + csr_b + phases[peak_phase]
    act_b = max(saved + head, saved + rebuilt)

    return {
        "method": method, "size": size, "rank": rank if m.uses("rank") or m.has_support else None,
        "delta": delta if m.has_support else None,
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
        "kernel_cache_mem_gb": csr_b / GB, "full_total_gb": peak_b / GB, "peak_phase": peak_phase, "device": device,
    }


# ---------------------------------------------------------------------------------------------- the CLI
