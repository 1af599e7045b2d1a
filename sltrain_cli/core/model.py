"""A LLaMA decoder for causal language modelling, numerically equal to Hugging Face's ``LlamaForCausalLM``.

Token embedding -> num_layers x [x + attn(RMSNorm(x)); x + mlp(RMSNorm(x))] -> RMSNorm -> untied lm_head.
Attention is causal ``F.scaled_dot_product_attention`` with rotary position embeddings (HF's rotate_half layout);
the MLP is SwiGLU ``down(silu(gate(x)) * up(x))``. Every projection is a bias-free ``nn.Linear`` named by its
short name (``attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down``): those names are what
``method.target_modules`` selects and what ``apply_method`` swaps.

One init path: the constructor calls ``init_weights()`` (unless built on the meta device; then ``to_empty`` and call
it yourself). It draws dense Linear/Embedding weights from N(0, init_std), sets RMSNorm weights to one and lets
swapped layers (SparseLowRankLinear, LowRankLinear, ...) re-initialize themselves with their ``reset_parameters``.

The loss never materializes the micro-batch's logits: with labels, ``_ChunkedLMHeadLoss`` runs the lm_head and the
fp32 cross-entropy a chunk of tokens at a time (about 16M logits per chunk) and forms the gradients of the hidden
states and of the lm_head weight in the same pass (the loss is a scalar, so backward only scales them). Same loss
and gradients as ``F.cross_entropy(lm_head(h).float())``; the (tokens, vocab) fp32 logits, log-softmax and their
gradients are gone from the peak. ``out.logits`` is still there when asked for: computed on first access (under the
forward's autocast and grad mode).

    model = LlamaForCausalLM(ModelConfig(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8))
    out = model(input_ids, labels=input_ids)      # out.loss (scalar); out.logits (batch, seq, vocab) on demand

Decoding keeps a ``KVCache``: the prompt is run once (prefill), then one token at a time; each step attends over
the cached keys and values and computes the logits of the last position only (HF's ``generate`` equivalent).

    cache = KVCache(model.config, batch=2, capacity=64, device=..., dtype=...)
    logits = model.decode(prompt_ids, cache, mask=left_pad_mask)    # (batch, vocab): the next token's logits
    logits = model.decode(next_ids[:, None], cache)                 # one more position
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..configs import ModelConfig


class CausalLMOutput:
    """``.loss``: mean next-token cross-entropy over labels != -100 (None without labels); ``.logits`` (batch, seq,
    vocab): given without labels, computed on first access with labels."""

    def __init__(self, logits: Optional[torch.Tensor] = None, loss: Optional[torch.Tensor] = None,
                 logits_fn: Optional[Callable[[], torch.Tensor]] = None):
        self._logits, self.loss, self._logits_fn = logits, loss, logits_fn

    @property
    def logits(self) -> Optional[torch.Tensor]:
        if self._logits is None and self._logits_fn is not None:
            self._logits, self._logits_fn = self._logits_fn(), None
        return self._logits


# Logits per chunk of the loss (64 MB in fp32), and never fewer tokens than LOSS_CHUNK_MIN: smaller chunks measured
# slower at 1B width (the head's weight-gradient GEMM gets a thin inner dimension and is re-accumulated per chunk).
LOSS_CHUNK_LOGITS = 1 << 24
LOSS_CHUNK_MIN = 256


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """mean over targets != -100 of cross_entropy((h @ weight^T).float(), targets), a chunk of rows at a time.

    h: (N, d) hidden states; weight: (V, d) lm_head weight (cast to ``dtype``, the compute dtype, inside); targets:
    (N,) int64. With gradients needed, forward also forms dL/dh and dL/dweight (summed in weight's dtype) chunk by
    chunk, so no (N, V) tensor outlives a chunk; backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype: torch.dtype, chunk: int):
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(h.device.type, enabled=False):
            w, hc = weight.to(dtype), h.to(dtype)
            valid = targets != -100
            count = valid.sum().float()
            safe = targets.clamp(min=0)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hc) if need_h else None
            # in the weight's own dtype (fp32 master weights: fp32; bf16-pure: bf16, one rounding per chunk): no
            # second copy of the head's gradient beyond the one the optimizer gets anyway
            grad_w = torch.zeros_like(weight) if need_w else None
            for s in range(0, h.shape[0], chunk):
                e = min(s + chunk, h.shape[0])
                logits = torch.mm(hc[s:e], w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe[s:e, None]).squeeze(1)
                total += torch.where(valid[s:e], lse - picked, 0.0).sum()
                if need_h or need_w:
                    p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    p[torch.arange(e - s, device=h.device), safe[s:e]] -= 1.0
                    p.mul_((valid[s:e].float() / count)[:, None])  # mean over valid targets; ignored rows -> 0
                    p = p.to(dtype)
                    if need_h:
                        torch.mm(p, w, out=grad_h[s:e])
                    if need_w and p.dtype == grad_w.dtype:
                        grad_w.addmm_(p.t(), hc[s:e])
                    elif need_w:
                        grad_w.add_(torch.mm(p.t(), hc[s:e]))
                    del p
                del logits
        ctx.grads = (grad_h, grad_w)
        ctx.h_dtype = h.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        dh = None if grad_h is None else grad_h.mul_(grad_out.to(grad_h.dtype)).to(ctx.h_dtype)
        dw = None if grad_w is None else grad_w.mul_(grad_out.to(grad_w.dtype))
        return dh, dw, None, None, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (seq_len, head_dim) cos and sin tables, frequencies repeated twice (HF's rotate_half layout).

    Computed per forward (a few KB) rather than cached in a buffer, so dtype casts, meta init and checkpoints never
    touch them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_at(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin (batch, 1, seq, head_dim) at given (batch, seq) positions (rows may start anywhere)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


class KVCache:
    """Keys and values of every layer for a batch being decoded: (batch, heads, capacity, head_dim) each, the first
    ``length`` positions filled. ``valid`` (batch, capacity) is False at left padding; ``next_pos`` (batch,) is each
    row's next rotary position (its real tokens so far), as HF counts positions under an attention mask."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device=None, dtype=torch.float32):
        shape = (batch, cfg.num_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length, self.capacity, self.padded = 0, capacity, False

    def append(self, mask: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Room for mask.shape[1] new positions (mask: (batch, t) bool, False = padding): their rotary positions
        (batch, t) and the attention mask (batch, 1, t, length) over the cache, or None where SDPA's own rule is
        the same (no padding, and either a prefill from position 0 -- causal -- or one new token -- all)."""
        b, t = mask.shape
        start = self.length
        if start + t > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {start + t} asked for")
        self.valid[:, start:start + t] = mask
        positions = self.next_pos[:, None] + mask.long().cumsum(1) - 1
        self.next_pos += mask.long().sum(1)
        self.padded |= not bool(mask.all())
        self.length = start + t
        if not self.padded and (start == 0 or t == 1):
            return positions, None
        key_pos = torch.arange(self.length, device=mask.device)
        query_pos = torch.arange(start, self.length, device=mask.device)
        causal = key_pos[None, :] <= query_pos[:, None]  # (t, length)
        allowed = causal[None] & self.valid[:, None, :self.length]
        allowed |= key_pos[None, None, :] == query_pos[None, :, None]  # a padded query attends itself: no NaN rows
        return positions.clamp(min=0), allowed[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim) or (batch, 1, seq, head_dim)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With ``cache`` (decoding): the new positions' keys and values go into it (after cache.append), and the
        queries attend over everything cached, under ``mask`` (cache.append's; None: SDPA's causal rule)."""
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = apply_rotary(self.q(x).view(shape).transpose(1, 2), cos, sin)
        k = apply_rotary(self.k(x).view(shape).transpose(1, 2), cos, sin)
        v = self.v(x).view(shape).transpose(1, 2)
        if cache is not None:
            end = cache.length
            cache.k[layer][:, :, end - t:end] = k
            cache.v[layer][:, :, end - t:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # no cache, a prefill from position 0, or one new token over the whole cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, m = cfg.hidden_size, cfg.intermediate_size
        self.gate = nn.Linear(d, m, bias=False)
        self.up = nn.Linear(d, m, bias=False)
        self.down = nn.Linear(m, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.mlp_norm(x))


class LlamaForCausalLM(nn.Module):
    """LLaMA decoder + untied lm_head, built from a ModelConfig. See the module docstring."""

    def __init__(self, model_cfg: ModelConfig):
        super().__init__()
        self.config = model_cfg
        # on the meta device, skip nn.Embedding's own N(0, 1) draw: a meta normal_ imports torch._dynamo (~2 s)
        meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(model_cfg.vocab_size, model_cfg.hidden_size, _weight=torch.empty(
            model_cfg.vocab_size, model_cfg.hidden_size) if meta else None)
        self.layers = nn.ModuleList(DecoderBlock(model_cfg) for _ in range(model_cfg.num_layers))
        self.norm = RMSNorm(model_cfg.hidden_size, model_cfg.rms_norm_eps)
        self.lm_head = nn.Linear(model_cfg.hidden_size, model_cfg.vocab_size, bias=False)
        self.activation_checkpointing = False  # recompute each block in backward (training only)
        self.loss_chunk_tokens: Optional[int] = None  # tokens per chunk of the loss; None: ~16M logits per chunk
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one init path: N(0, init_std) for dense Linear/Embedding, ones for RMSNorm, and
        ``reset_parameters()`` for every other module that owns parameters (the swapped layers)."""
        std = self.config.init_std
        for module in self.modules():
            if module is self:
                continue
            if type(module) in (nn.Linear, nn.Embedding):  # exact types: subclasses are swapped layers
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False)):
                module.reset_parameters()

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` every decoder block in place (regional compilation: the identical blocks share one
        compiled graph, and parameter names, state dicts, DDP and FSDP2 see no change). Layers with a
        ``prepare_compile`` hook run it first (SparseLowRankLinear stays eager inside). The embedding and the chunked
        loss stay eager."""
        for module in self.modules():
            if hasattr(module, "prepare_compile"):
                module.prepare_compile()
        for block in self.layers:
            block.compile(**options)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """input_ids, labels: (batch, seq) int64; the loss predicts labels[:, 1:] from positions [:, :-1]."""
        t = input_ids.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin = rotary_cos_sin(t, self.config.head_dim, self.config.rope_theta, input_ids.device)
        h = self.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            h = checkpoint(block, h, cos, sin, use_reentrant=False) if recompute else block(h, cos, sin)
        h = self.norm(h)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(h))
        return CausalLMOutput(loss=self.chunked_loss(h, labels), logits_fn=self._lazy_logits(h))

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache: KVCache, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run new positions (batch, t) through the model with ``cache`` (the prompt, then one token at a time):
        the logits (batch, vocab) of the last position. ``mask`` (batch, t) bool marks real tokens (False = left
        padding of a shorter prompt); None: all real."""
        if mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        if cache.length + input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"decoding past model.max_seq_len={self.config.max_seq_len}")
        positions, attn_mask = cache.append(mask)
        cos, sin = rotary_at(positions, self.config.head_dim, self.config.rope_theta)
        h = self.embed_tokens(input_ids)
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, cache, i, attn_mask)
        return self.lm_head(self.norm(h[:, -1]))

    def chunked_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of final hidden states h (batch, seq, d) against labels, without materializing the logits."""
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lm_head.weight.dtype
        d, vocab = h.shape[-1], self.lm_head.out_features
        chunk = self.loss_chunk_tokens or max(LOSS_CHUNK_MIN, LOSS_CHUNK_LOGITS // vocab)
        hs = h[:, :-1].reshape(-1, d)
        targets = labels[:, 1:].reshape(-1)
        if self.lm_head.bias is not None:  # never built so; a plain fallback keeps such a head correct
            logits = self.lm_head(hs)
            return F.cross_entropy(logits.float(), targets, ignore_index=-100)
        return _ChunkedLMHeadLoss.apply(hs, self.lm_head.weight, targets, dtype, chunk)

    def _lazy_logits(self, h: torch.Tensor) -> Callable[[], torch.Tensor]:
        device = h.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        grad = torch.is_grad_enabled()

        def logits() -> torch.Tensor:
            with torch.autocast(device, dtype=autocast[1], enabled=autocast[0]), torch.set_grad_enabled(grad):
                return self.lm_head(h)
        return logits
