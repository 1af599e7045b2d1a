"""method=relora: W = W0 + (alpha/r) B A with W0 frozen; every merge_every steps B A is merged into W0, the adapters
are re-initialised, their Adam moments pruned, and the lr re-warms (a jagged cosine). core/relora.py has the
layer, the merge and the reset."""
from dataclasses import dataclass

from . import fields
from .base import Method, require_rank


@dataclass
class Config(fields.Common, fields.Targets, fields.Alpha, fields.Rank):
    """method=relora: the adapters (rank, alpha, targets) and the merge cycle."""

    merge_every: int = fields.option(1000, "relora: steps between merges of B A into W0", at_least=1)
    reset: fields.ResetKind = fields.option(fields.ResetKind.magnitude, "relora: what happens to the adapters' "
                                                                        "optimizer state at a merge")
    reset_ratio: float = fields.option(0.9, "relora: fraction of moment entries pruned by a magnitude/random "
                                            "reset, in [0, 1]", within=(0.0, 1.0))
    restart_warmup: int = fields.option(50, "relora: lr re-warmup steps after each merge (jagged schedule)",
                                        at_least=0)


class ReLoRA(Method):
    name, order = "relora", 2
    Config = Config
    dense_weights = False
    catalog_extras = ("merge_every", "restart_warmup", "reset")
    low_rank_activations = True

    def check(self, cfg) -> None:
        require_rank(self, cfg)

    def swap(self, linear, path, cfg):
        """A ReLoRALinear whose frozen W0 is the current dense weight (so a warm start carries over)."""
        import torch

        from ..core.relora import ReLoRALinear

        w, bias = linear.weight, linear.bias is not None
        with torch.device(w.device):
            layer = ReLoRALinear(linear.in_features, linear.out_features, cfg.rank, cfg.alpha, bias=bias)
        if layer.weight.dtype != w.dtype:  # a no-op .to() still walks every tensor
            layer.to(w.dtype)
        if not w.is_meta:
            with torch.no_grad():
                layer.weight.copy_(w)
                if bias:
                    layer.bias.copy_(linear.bias)
        return layer

    def schedule(self, cfg, total_steps, warmup, min_lr_ratio):
        from ..core.optim import relora_lr_factor

        every, rewarm = cfg.merge_every, cfg.restart_warmup
        return lambda s: relora_lr_factor(s, total_steps, warmup, min_lr_ratio, every, rewarm)

    def after_step(self, model, optimizer, cfg, step, total_steps, seed, device) -> None:
        """The merge after the lr-0 update k * merge_every, as the reference does it."""
        from ..core.relora import merge_after_update

        merge_after_update(model, optimizer, cfg, step, total_steps, seed, device)

    def paper_params(self, n_params, n_adapter, n_frozen, n_trainable):
        # ReLoRA's model = the full model (W0: the dense targets) + adapters = the low-rank model + W0; the paper
        # counts both models, and moments over the low-rank one
        full_total, lowrank_total = n_params - n_adapter, n_params - n_frozen
        return full_total + lowrank_total, lowrank_total

    def card_rows(self, cfg):
        return [("rank", cfg.rank), ("alpha", cfg.alpha), ("merge every (steps)", cfg.merge_every)]


METHOD = ReLoRA()
