"""method=fira: dense weights; GaLore's projected Adam plus the rest of the gradient at full rank, scaled by the
projected update's norm ratio under a norm-growth limiter (core/fira.py has the optimizer). Its config and its
projected group are GaLore's; ``method.scale`` is Fira's alpha."""
from .base import require_32bit_moments
from .galore import GaLore


class Fira(GaLore):
    name, order = "fira", 7
    state_scalars = 1  # the norm-growth limiter's last norm

    def check_run(self, run_cfg) -> None:
        require_32bit_moments(self, run_cfg)

    def projected_optimizer(self, groups, optim_cfg):
        from ..core.fira import FiraAdamW
        from ..core.optim import adam_kwargs

        return FiraAdamW(groups, **adam_kwargs(optim_cfg))

    def card_rows(self, cfg):
        return [("rank", cfg.rank), ("alpha (scale)", cfg.scale)]


METHOD = Fira()
