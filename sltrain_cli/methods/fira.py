"""method=fira: dense weights; GaLore's projected Adam plus the rest of the gradient at full rank, scaled by the
projected update's norm ratio under a norm-growth limiter (core/fira.py has the optimizer). ``method.scale`` is
Fira's alpha."""
from dataclasses import dataclass

from . import fields
from .base import Method, linear_weights, require_rank


@dataclass
class Config(fields.Common, fields.Projection, fields.Targets, fields.Rank):
    """method=fira: the projection's rank, which weights it projects, how often its SVD is refreshed, its alpha."""


class Fira(Method):
    name, order = "fira", 7
    Config = Config
    catalog_extras = ("scale", "update_proj_gap")
    fsdp = False  # its SVD and channel norms need whole gradients
    projects_moments = True
    state_scalars = 1  # the norm-growth limiter's last norm

    def check(self, cfg) -> None:
        require_rank(self, cfg)

    def check_run(self, run_cfg) -> None:
        from ..errors import ConfigError

        if run_cfg.optim.name.value != "adamw":
            raise ConfigError("optim.name", f"method=fira keeps 32-bit moments (its reference has no 8-bit form); "
                                            f"use optim=adamw, got {run_cfg.optim.name.value}")

    def projected_params(self, model, cfg) -> list:
        return linear_weights(self, model, cfg)

    def projected_group(self, params, cfg) -> dict:
        return {"params": params, "galore": True, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
                "scale": cfg.scale}

    def projected_optimizer(self, groups, optim_cfg):
        from ..core.fira import FiraAdamW
        from ..core.optim import adam_kwargs

        return FiraAdamW(groups, **adam_kwargs(optim_cfg))

    def card_rows(self, cfg):
        return [("rank", cfg.rank), ("alpha (scale)", cfg.scale)]


METHOD = Fira()
