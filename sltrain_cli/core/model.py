"""A LLaMA decoder for causal language modelling, numerically equal to Hugging Face's ``LlamaForCausalLM``.

Token embedding -> num_layers x [x + attn(RMSNorm(x)); x + mlp(RMSNorm(x))] -> RMSNorm -> untied lm_head.
Attention is causal ``F.scaled_dot_product_attention`` with rotary position embeddings (HF's rotate_half layout);
the MLP is SwiGLU ``down(silu(gate(x)) * up(x))``. Every projection is a bias-free ``nn.Linear`` named by its
short name (``attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down``): those names are what
``method.target_modules`` selects and what ``apply_method`` swaps.

One init path: the constructor calls ``init_weights()`` (unless built on the meta device; then ``to_empty`` and call
it yourself). It draws dense Linear/Embedding weights from N(0, init_std), sets RMSNorm weights to one and lets
swapped layers (SparseLowRankLinear, LowRankLinear, ...) re-initialize themselves with their ``reset_parameters``.

    model = LlamaForCausalLM(ModelConfig(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8))
    out = model(input_ids, labels=input_ids)      # out.logits (batch, seq, vocab), out.loss (scalar)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..configs import ModelConfig


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    loss: Optional[torch.Tensor] = None  # mean next-token cross-entropy over labels != -100


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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim)."""
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = apply_rotary(self.q(x).view(shape).transpose(1, 2), cos, sin)
        k = apply_rotary(self.k(x).view(shape).transpose(1, 2), cos, sin)
        v = self.v(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
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
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)
