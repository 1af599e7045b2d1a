"""method=galore: dense weights; the Adam moments of the target weights live in a rank-r projection of their
gradients, refreshed by an SVD every update_proj_gap steps (core/galore.py has the optimizer)."""
import math
from dataclasses import dataclass

from . import fields
from .base import Method, require_rank


@dataclass
class Config(fields.Common, fields.Targets, fields.Rank):
    """method=galore: the projection's rank, which weights it projects, how often it is refreshed, its scale."""

    update_proj_gap: int = fields.option(200, "galore: steps between projector refreshes", at_least=1)
    scale: float = fields.option(0.25, "galore: scale of the projected-back update",
                                 lambda v: math.isfinite(v) and v > 0, "must be finite, > 0")


class GaLore(Method):
    name, order = "galore", 3
    Config = Config
    catalog_extras = ("update_proj_gap", "scale")
    fsdp = False  # its SVD needs whole gradients
    projects_moments = True

    def check(self, cfg) -> None:
        require_rank(self, cfg)

    def projected_params(self, model, cfg) -> list:
        """Trainable 2-D weights of the nn.Linear modules whose attribute name is in ``target_modules``
        (``layers.0.attn.q`` -> ``q``), in module order."""
        import torch.nn as nn

        from ..errors import UserError

        targets, seen = [], set()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.target_modules:
                w = module.weight
                if w.requires_grad and w.dim() == 2 and id(w) not in seen:
                    seen.add(id(w))
                    targets.append(w)
        if not targets:
            raise UserError(f"method={self.name} found no trainable nn.Linear named in method.target_modules="
                            f"{list(cfg.target_modules)}")
        return targets


METHOD = GaLore()
