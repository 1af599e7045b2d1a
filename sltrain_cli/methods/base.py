"""What a training method is to sltrain: one object with its keys, its rules and its hooks.

Every module of this package defines ``METHOD = SomeMethod()``; the defaults below are a dense method that changes
nothing (method=full). A new method overrides what it needs:

    Config          its typed config: a dataclass of the ``method.*`` fields it reads, built from the shared groups
                    of fields.py plus its own fields (each with help and range); ``keys`` are its fields (besides
                    warm_start); the others are marked "(unused by method=...)" in config.yaml and blanked in tables
    check           rules across its fields, as ConfigError("method.KEY", ...) (each field's own range is in Config)
    swap            the layer that replaces one target nn.Linear (None: the target stays dense)
    projected_params  the weights whose Adam moments live in a projected space (GaLore, APOLLO); with
                    projected_group and projected_optimizer, the optimizer that steps them
    check_run       rules across the whole run config (e.g. an optimizer it cannot use)
    schedule        an lr schedule of its own (ReLoRA's jagged cosine), else None
    after_step      what happens after each optimizer step (ReLoRA's merge)
    paper_params    how the paper's memory table counts its parameters (ReLoRA: full + low-rank model)
    card_rows       its lines in an export's model card; describe: a short label for tables

Capabilities are plain attributes: ``fsdp`` (trains under train.parallel=fsdp), ``dense_weights`` (its target
layers stay plain nn.Linear: pruning studies start from such a run), ``builds_dense_weight`` (forms the
(out, in) weight per layer in forward/backward: memory), ``low_rank_activations`` (keeps the r-wide activation of
B A: memory). ``order`` places it in tables (dense baselines first).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

from . import fields


class Method:
    name: str = ""
    order: int = 100
    Config: type = fields.Common
    catalog_extras: Tuple[str, ...] = ()  # keys `sltrain list methods` shows beside rank / delta / alpha
    fsdp: bool = True
    projects_moments: bool = False  # Adam moments of projected_params live in a rank-r projection (GaLore)
    dense_weights: bool = True  # its target layers stay nn.Linear (swap builds nothing): full, galore
    builds_dense_weight: bool = False
    low_rank_activations: bool = False
    state_scalars: int = 0  # one-number tensors its optimizer keeps per projected weight (APOLLO's limiter norm)

    @property
    def keys(self) -> Tuple[str, ...]:
        """The ``method.*`` fields it reads, besides warm_start."""
        return tuple(f.name for f in dataclasses.fields(self.Config) if f.name != "warm_start")

    def uses(self, key: str) -> bool:
        """Whether the method reads ``method.<key>``."""
        return key in self.keys

    def config(self, cfg):
        """Its typed Config from a MethodConfig (the union every method's fields live in)."""
        return self.Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(self.Config)})

    @property
    def has_support(self) -> bool:
        """Its layers hold a sparse support (delta, support, support_seed...): support studies apply."""
        return self.uses("delta")

    def check(self, cfg) -> None:
        """Method-specific ranges of a MethodConfig (the shared ones are checked by MethodConfig itself)."""

    def swap(self, linear, path: str, cfg):
        """The module replacing the target ``linear`` (at ``path``), or None to keep it dense."""
        return None

    def projected_params(self, model, cfg) -> list:
        """Parameters whose optimizer moments are kept in a low-rank projection (GaLore); [] for plain Adam."""
        return []

    def projected_group(self, params: list, cfg) -> dict:
        """The optimizer parameter group of the projected params (their hyperparameters beside them)."""
        raise NotImplementedError(f"method={self.name} projects no parameters")

    def projected_optimizer(self, groups: list, optim_cfg):
        """The optimizer over ``groups`` (plain parameters first, then projected_group's)."""
        raise NotImplementedError(f"method={self.name} projects no parameters")

    def check_run(self, run_cfg) -> None:
        """Rules that need the whole RunConfig (an optimizer or training mode the method cannot use)."""

    def schedule(self, cfg, total_steps: int, warmup: int, min_lr_ratio: float) -> Optional[Callable[[int], float]]:
        """step -> lr factor, when the method has a schedule of its own; None: the run's optim.schedule."""
        return None

    def after_step(self, model, optimizer, cfg, step: int, total_steps: int, seed: int, device) -> None:
        """Called after optimizer step ``step`` (0-based) has been applied."""

    def paper_params(self, n_params: int, n_adapter: int, n_frozen: int, n_trainable: int) -> Tuple[int, int]:
        """(total, trainable) parameters as the paper's memory table counts them."""
        return n_params, n_trainable

    def card_rows(self, cfg) -> List[tuple]:
        """(label, value) lines of an export's model card after the method's name."""
        return [("rank", cfg.rank)] if self.uses("rank") else []

    def describe(self, cfg) -> str:
        """A short label: 'lowrank r=64', 'full'."""
        return f"{self.name} r={cfg.rank}" if self.uses("rank") else self.name


def require_rank(method: Method, cfg) -> None:
    """rank >= 1, for the methods whose layers or projections are rank-r."""
    from ..errors import ConfigError

    if cfg.rank < 1:
        raise ConfigError("method.rank", f"must be >= 1 for method={method.name}, got {cfg.rank}")


def require_32bit_moments(method: Method, run_cfg) -> None:
    """optim.name=adamw only: the method's optimizer keeps 32-bit moments (its reference has no 8-bit form)."""
    from ..errors import ConfigError

    if run_cfg.optim.name.value != "adamw":
        raise ConfigError("optim.name", f"method={method.name} keeps 32-bit moments (its reference has no 8-bit "
                                        f"form); use optim=adamw, got {run_cfg.optim.name.value}")


def linear_weights(method: Method, model, cfg) -> list:
    """Trainable 2-D weights of the nn.Linear modules whose attribute name is in ``target_modules``
    (``layers.0.attn.q`` -> ``q``), in module order: what GaLore and APOLLO project."""
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
        raise UserError(f"method={method.name} found no trainable nn.Linear named in method.target_modules="
                        f"{list(cfg.target_modules)}")
    return targets
