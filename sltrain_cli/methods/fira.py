"""method=fira: dense weights; GaLore's projected Adam plus the rest of the gradient at full rank, scaled by the
projected update's norm ratio under a norm-growth limiter (core/fira.py has the optimizer). Its config and its
projected group are GaLore's; ``method.scale`` is Fira's alpha."""
from .galore import GaLore


class Fira(GaLore):
    name, order = "fira", 7
    state_scalars = 1  # the norm-growth limiter's last norm

    def check_run(self, run_cfg) -> None:
        from ..errors import ConfigError

        if run_cfg.optim.name.value != "adamw":
            raise ConfigError("optim.name", f"method=fira keeps 32-bit moments (its reference has no 8-bit form); "
                                            f"use optim=adamw, got {run_cfg.optim.name.value}")

    def projected_optimizer(self, groups, optim_cfg):
        from ..core.fira import FiraAdamW
        from ..core.optim import adam_kwargs

        return FiraAdamW(groups, **adam_kwargs(optim_cfg))

    def card_rows(self, cfg):
        return [("rank", cfg.rank), ("alpha (scale)", cfg.scale)]


METHOD = Fira()
