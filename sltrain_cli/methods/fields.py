"""The ``method.*`` fields several methods share, each defined once (type, default, help, range), and the
vocabulary they take. A method's ``Config`` (in its module) is a dataclass built from these groups plus its own
fields; configs.MethodConfig, the user's view of ``method.*``, is the union of every method's Config.

    @dataclass
    class Config(fields.LowRank, fields.Targets):          # rank, alpha, target_modules
        merge_every: int = fields.option(1000, "relora: steps between merges", at_least=1)

``option(default, help, check=..., at_least=..., within=...)`` states a field's rule beside it; ``validate``
applies the rules (and turns enum values into members) for any of these dataclasses.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, List, Optional, Tuple

from ..errors import ConfigError, _accept_values

TARGET_MODULES = ("q", "k", "v", "o", "gate", "up", "down")


@_accept_values
class SupportKind(str, Enum):
    random = "random"  # uniformly random positions (the paper)
    row_balanced = "row_balanced"  # random positions, the same count in every output row
    block = "block"  # random square blocks of size method.block_size
    top = "top"  # largest-magnitude entries of a given dense matrix (needs a reference weight)


@_accept_values
class IndexDtype(str, Enum):
    int64 = "int64"  # the paper's choice
    int32 = "int32"  # half the index memory; fine while in*out < 2**31


@_accept_values
class KernelKind(str, Enum):
    auto = "auto"  # per layer shape, the cheaper of the two for the micro-batch's tokens (an analytic cost model)
    compose = "compose"  # build the dense W, one dense matmul (the paper's)
    factored = "factored"  # never build W: rank-r products plus CSR sparse products at the fixed support
    dense = "dense"  # inference only: W built once at load and kept (a dense layer's memory on top; fastest decode)


@_accept_values
class ResetKind(str, Enum):
    zero = "zero"  # zero the adapters' Adam moments
    magnitude = "magnitude"  # keep the largest (1 - reset_ratio) fraction of each moment
    random = "random"  # keep a random (1 - reset_ratio) fraction of each moment


def option(default, help: str, check: Optional[Callable] = None, message: str = "", *,
           at_least: Optional[float] = None, within: Optional[Tuple[float, float]] = None, factory=None):
    """A config field with its help and its rule: ``check(value)`` must hold (else ``message``), or the value must
    be ``>= at_least``, or lie in the closed interval ``within``."""
    if at_least is not None:
        check, message = (lambda v: v >= at_least), f"must be >= {at_least:g}"
    elif within is not None:
        lo, hi = within
        check, message = (lambda v: lo <= v <= hi), f"must be in [{lo:g}, {hi:g}]"
    meta = {"help": help, "check": check, "message": message}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def validate(cfg, prefix: str = "method.") -> None:
    """Turn enum values of ``cfg``'s fields into members and apply every field's rule, as ConfigError(KEY)."""
    types = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), types[f.name]
        if isinstance(kind, type) and issubclass(kind, Enum) and not isinstance(value, kind):
            try:
                value = kind(value)
            except ValueError:
                allowed = ", ".join(m.value for m in kind)
                raise ConfigError(prefix + f.name, f"must be one of {allowed}, got {value!r}") from None
            setattr(cfg, f.name, value)
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise ConfigError(prefix + f.name, f"{f.metadata['message']}, got {value}")


def _targets_ok(values) -> bool:
    return not [m for m in values if m not in TARGET_MODULES]


@dataclass
class Common:
    """Every method."""

    warm_start: Optional[str] = option(None, "checkpoint whose dense weights initialize the model before the method "
                                             "swap (ReLoRA's full-rank start; support=top picks its largest "
                                             "entries); null = random init")


@dataclass
class Targets:
    """Methods that act on chosen linear layers."""

    target_modules: List[str] = option(None, "linear layers the method replaces, a subset of q, k, v, o "
                                             "(attention), gate, up, down (MLP)", _targets_ok,
                                       f"allowed: {', '.join(TARGET_MODULES)}", factory=lambda: list(TARGET_MODULES))


@dataclass
class Rank:
    rank: int = option(128, "r of B (out, r) @ A (r, in); 0 = no low-rank part", at_least=0)


@dataclass
class Alpha:
    alpha: float = option(32.0, "low-rank scale numerator: W_lr = (alpha / rank) B A",
                          lambda v: math.isfinite(v) and v > 0, "must be > 0")


@dataclass
class Sparse:
    """A fixed sparse support (sltrain, sparse)."""

    delta: float = option(0.03, "fraction of entries in the sparse support, in [0, 1]", within=(0.0, 1.0))
    support: SupportKind = option(SupportKind.random, "how the sparse support is chosen")
    support_seed: int = option(0, "seed of the dedicated generator that draws the sparse support")
    index_dtype: IndexDtype = option(IndexDtype.int64, "dtype of the sparse support's flat indices")
    block_size: int = option(16, "support=block: side of each square block, in entries", at_least=1)
    kernel: KernelKind = option(KernelKind.auto, "how sltrain/sparse layers compute; auto picks per layer shape, "
                                                 "once per run (summary.json kernels)")


@dataclass
class Projection:
    """Methods whose optimizer keeps its moments in a rank-r projection of the gradient (galore, apollo, fira);
    the conf/method/NAME.yaml of each sets its own values."""

    update_proj_gap: int = option(200, "steps between projector refreshes (galore: an SVD of the gradient; apollo: "
                                       "a new random draw)", at_least=1)
    scale: float = option(0.25, "galore, fira (its alpha): the projected-back update times scale (0.25); apollo: "
                                "the update times sqrt(scale) (1; APOLLO-Mini 128)",
                          lambda v: math.isfinite(v) and v > 0, "must be finite, > 0")
