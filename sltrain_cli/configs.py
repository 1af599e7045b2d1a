"""Typed configuration schema for every sltrain command.

YAML files in conf/ only supply values; the dataclasses below define the keys, their types, defaults and
allowed ranges. Hydra composes the YAML (compose.py), OmegaConf merges it into this schema (so an unknown
key is rejected), and ``__post_init__`` checks ranges. A range error is raised as ``ConfigError`` naming
the full key, e.g. ``method.delta: must be in [0, 1], got 1.5``.

Each component receives only its own slice (ModelConfig for the model, MethodConfig for the method
swap, ...), never the whole RunConfig.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .choices import (  # the schema's value types
    DataName,
    EncodingErrors,
    MethodName,
    OptimName,
    Parallel,
    Precision,
    Schedule,
    TokenizerKind,
    _check,
    _enum,
)
from .errors import ConfigError, UserError
from .methods import all_methods, get_method
from .methods.fields import TARGET_MODULES, IndexDtype, KernelKind, ResetKind, SupportKind, validate

__all__ = ["ConfigError", "IndexDtype", "KernelKind", "ResetKind", "SupportKind", "TARGET_MODULES",
           "UserError"]  # re-exported: the method vocabulary lives in methods/fields.py


@dataclass
class ModelConfig:
    """LLaMA decoder dimensions."""

    name: str = field(default="tiny", metadata={"help": "config name (conf/model/), shown in tables and run names"})
    hidden_size: int = field(default=64, metadata={"help": "model width d"})
    intermediate_size: int = field(default=176, metadata={"help": "SwiGLU inner width"})
    num_layers: int = field(default=2, metadata={"help": "decoder blocks"})
    num_heads: int = field(default=4, metadata={"help": "attention heads; must divide hidden_size, head dim even"})
    vocab_size: int = field(default=32000, metadata={"help": "vocabulary size; replaced by the tokenizer's size at "
                                                             "run time"})
    max_seq_len: int = field(default=256, metadata={"help": "longest sequence in tokens the rotary cache covers; "
                                                            ">= data.seq_len"})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "epsilon added to the mean square in RMSNorm"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary embedding base frequency"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of dense weights and embeddings"})

    def __post_init__(self):
        for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size", "max_seq_len"):
            _check(getattr(self, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(self, k)}")
        _check(self.hidden_size % self.num_heads == 0, "model.num_heads",
               f"must divide model.hidden_size={self.hidden_size}, got {self.num_heads}")
        _check((self.hidden_size // self.num_heads) % 2 == 0, "model.num_heads",
               "head dim (hidden_size / num_heads) must be even for rotary embeddings")
        _check(self.rms_norm_eps > 0, "model.rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        _check(self.init_std > 0, "model.init_std", f"must be > 0, got {self.init_std}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


LOGGERS = ("jsonl", "tensorboard", "wandb")  # train.loggers; tracking.py starts each


def _method_config() -> type:
    """``method.*`` as the user sets it: ``name`` plus the union of every method's Config fields (methods/NAME.py;
    a field two methods share is defined once, in methods/fields.py). A run's method reads its own typed slice
    (``get_method(name).config(cfg)``); keys it does not read are marked unused in config.yaml."""
    union = {}
    for method in all_methods():
        hints = typing.get_type_hints(method.Config)
        for f in dataclasses.fields(method.Config):
            if f.name in union and (union[f.name][1].metadata.get("help"), union[f.name][0]) != (
                    f.metadata.get("help"), hints[f.name]):
                raise TypeError(f"methods define method.{f.name} twice, differently: define it in methods/fields.py")
            union.setdefault(f.name, (hints[f.name], f))
    union["warm_start"] = union.pop("warm_start")  # every method's: listed last
    name = ("name", MethodName, field(default=MethodName.full, metadata={"help": "parameterization of the target "
                                                                                 "layers"}))
    members = [name] + [(k, kind, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                     metadata=f.metadata)) for k, (kind, f) in union.items()]

    def __post_init__(self):
        self.name = _enum(self.name, MethodName, "method.name")
        validate(self)  # every field's range, whichever method reads it
        get_method(self.name).check(self)  # the method's own rules across its fields (methods/NAME.py)

    return dataclasses.make_dataclass("MethodConfig", members, namespace={
        "__post_init__": __post_init__, "__module__": __name__,
        "__doc__": "How the target linear layers are parameterized (conf/method/; the fields of methods/*.py)."})


MethodConfig = _method_config()


@dataclass
class TokenizerConfig:
    """Which tokenizer turns the corpus into token ids; its vocabulary size sets model.vocab_size."""

    kind: TokenizerKind = field(default=TokenizerKind.auto, metadata={"help": "tokenizer family"})
    path: Optional[str] = field(default=None, metadata={"help": "a tokenizer dir (spiece.model and/or "
                                                                "tokenizer.json) or file (kind=t5/pretrained)"})
    vocab_size: int = field(default=8000, metadata={"help": "BPE vocabulary size in tokens (kind=bpe), >= 260"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "where trained BPE tokenizers are cached; null = $SLTRAIN_CACHE_DIR or ~/.cache/sltrain"})

    def __post_init__(self):
        self.kind = _enum(self.kind, TokenizerKind, "tokenizer.kind")
        _check(self.vocab_size >= 260, "tokenizer.vocab_size", f"must be >= 260, got {self.vocab_size}")


@dataclass
class DataConfig:
    """The training corpus, its train/validation split and how documents become rows (conf/data/)."""

    name: DataName = field(default=DataName.sotu, metadata={"help": "corpus"})
    path: Optional[str] = field(default=None, metadata={
        "help": "data=local: a file, a directory or a glob (comma-separated for several); data=c4: a local "
                "allenai/c4 mirror (the folder holding en/, en/ itself, or a glob), null = the hub"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl / .parquet"})
    encoding_errors: EncodingErrors = field(default=EncodingErrors.strict, metadata={
        "help": "local .txt / .jsonl that is not UTF-8: strict = stop, naming the file and byte offset; "
                "replace = read bad bytes as U+FFFD"})
    streaming: bool = field(default=False, metadata={"help": "read local files / C4 as a stream"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence, <= model.max_seq_len"})
    packing: bool = field(default=True, metadata={
        "help": "concatenate documents with EOS and cut into seq_len chunks (false: one document per row)"})
    val_fraction: float = field(default=0.05, metadata={
        "help": "fraction of documents held out for validation (sotu, local), in (0, 1)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the document-level train/validation split"})
    seed: int = field(default=0, metadata={"help": "seed of the training data order"})
    shuffle_buffer: int = field(default=10000, metadata={
        "help": "streaming shuffle buffer in documents (C4 validation is shuffled with seed 42, as the harness)"})
    max_docs: Optional[int] = field(default=None, metadata={"help": "cap on documents read (quick runs); "
                                                                    "null = all"})
    num_workers: Optional[int] = field(default=None, metadata={
        "help": "threads tokenizing a stream (c4, local streaming) off the training thread; 0 = on it; "
                "null = 4 on CUDA, 1 on CPU (never more than the cores)"})

    def __post_init__(self):
        self.name = _enum(self.name, DataName, "data.name")
        self.encoding_errors = _enum(self.encoding_errors, EncodingErrors, "data.encoding_errors")
        _check(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        if self.max_docs is not None:
            _check(self.max_docs >= 2, "data.max_docs", f"must be >= 2, got {self.max_docs}")
        if self.name == DataName.local:
            _check(bool(self.path), "data.path", "is required for data=local (a file, directory or glob)")
        if self.num_workers is not None:
            _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0 (or null = auto), got {self.num_workers}")

    def workers(self, cuda: bool) -> int:
        """data.num_workers, its null resolved for the device (0 for an in-memory corpus, which is tokenized once)."""
        if self.num_workers is not None:
            return self.num_workers
        return min(4 if cuda else 1, max(1, (os.cpu_count() or 2) - 1))


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (conf/optim/); GaLore's projection settings are in method."""

    name: OptimName = field(default=OptimName.adamw, metadata={"help": "optimizer"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled (AdamW) weight decay on every trainable "
                                                               "parameter"})
    beta1: float = field(default=0.9, metadata={"help": "Adam decay rate of the first moment, in [0, 1)"})
    beta2: float = field(default=0.999, metadata={"help": "Adam decay rate of the second moment, in [0, 1)"})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon added to the denominator"})
    schedule: Schedule = field(default=Schedule.cosine, metadata={
        "help": "lr schedule after the linear warmup; relora always uses a jagged cosine"})
    warmup_steps: Optional[int] = field(default=None, metadata={"help": "linear warmup in optimizer steps; "
                                                                        "null = warmup_ratio * train.steps"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "warmup as a fraction of train.steps, in [0, 1), "
                                                               "when warmup_steps is null"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr = min_lr_ratio * lr (cosine, linear)"})
    grad_clip: Optional[float] = field(default=None, metadata={
        "help": "max global grad norm; 0 = off; null = 1.0, or off with train.layerwise (which cannot clip)"})

    def __post_init__(self):
        self.name = _enum(self.name, OptimName, "optim.name")
        self.schedule = _enum(self.schedule, Schedule, "optim.schedule")
        finite = ["lr", "eps", "weight_decay", "beta1", "beta2"] + ([] if self.grad_clip is None else ["grad_clip"])
        for k in finite:
            _check(math.isfinite(getattr(self, k)), f"optim.{k}", f"must be a finite number, got {getattr(self, k)}")
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {self.beta2}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        if self.warmup_steps is not None:
            _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip is None or self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass
class TrainConfig:
    """The training loop: length, batch, precision, device and the logging / eval / checkpoint cadence."""

    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    total_batch_size: int = field(default=8, metadata={
        "help": "global batch in sequences (all micro-batches, all ranks)"})
    micro_batch_size: Optional[int] = field(default=None, metadata={
        "help": "sequences per forward pass per rank; null = total_batch_size / processes (no accumulation)"})
    precision: Precision = field(default=Precision.fp32, metadata={"help": "numeric precision of weights and "
                                                                           "compute"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu) | cpu | cuda | "
                                                          "cuda:N"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics.jsonl rows"})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations (0 = only at the end)"})
    eval_tokens: int = field(default=65536, metadata={"help": "validation token budget (the same batches every "
                                                              "time)"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints (0 = only at the end)"})
    resume: str = field(default="", metadata={
        "help": '"" = fresh run; "true" = latest checkpoint in the run folder; or a checkpoint path'})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh over a run folder that holds an earlier run (deletes its checkpoints and metrics)"})
    keep_checkpoints: int = field(default=3, metadata={
        "help": "checkpoints kept besides the final one (older ones are deleted after each save); 0 = keep all"})
    layerwise: bool = field(default=False, metadata={"help": "optimizer step per parameter inside backward "
                                                             "(needs optim.grad_clip=0, one process)"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder block in "
                                                                            "backward"})
    compile: bool = field(default=False, metadata={"help": "run each decoder block under torch.compile (inductor; "
                                                           "SLTrain's kernels stay eager inside)"})
    parallel: Parallel = field(default=Parallel.ddp, metadata={"help": "multi-process strategy under torchrun"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default"})
    loggers: List[str] = field(default_factory=lambda: ["jsonl"], metadata={
        "help": "trackers that get the metrics rows: jsonl | tensorboard | wandb, e.g. [jsonl,tensorboard]"})
    peak_flops: float = field(default=0.0, metadata={
        "help": "device peak FLOP/s for the summary's MFU; 0 = the known-GPU table (bf16 dense), none on CPU"})

    def __post_init__(self):
        self.precision = _enum(self.precision, Precision, "train.precision")
        self.parallel = _enum(self.parallel, Parallel, "train.parallel")
        _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _check(self.total_batch_size >= 1, "train.total_batch_size", f"must be >= 1, got {self.total_batch_size}")
        if self.micro_batch_size is not None:
            _check(self.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
            _check(self.total_batch_size % self.micro_batch_size == 0, "train.total_batch_size",
                   f"must be a multiple of train.micro_batch_size={self.micro_batch_size}, got {self.total_batch_size}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "train.device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for k in ("log_every",):
            _check(getattr(self, k) >= 1, f"train.{k}", f"must be >= 1, got {getattr(self, k)}")
        bad = [name for name in self.loggers if name not in LOGGERS]
        _check(not bad, "train.loggers", f"allowed: {', '.join(LOGGERS)}; got {bad}")
        _check(math.isfinite(self.peak_flops) and self.peak_flops >= 0, "train.peak_flops",
               f"must be >= 0, got {self.peak_flops}")
        for k in ("eval_every", "save_every", "num_threads", "keep_checkpoints"):
            _check(getattr(self, k) >= 0, f"train.{k}", f"must be >= 0, got {getattr(self, k)}")
        _check(self.eval_tokens >= 1, "train.eval_tokens", f"must be >= 1, got {self.eval_tokens}")
        self.resume = "" if self.resume in (None, "false", "False") else str(self.resume)

    def micro_batch(self, world_size: int = 1) -> int:
        """Sequences per forward pass per rank: micro_batch_size, or (unset) the global batch split over the
        processes, one micro-batch per step."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        _check(self.total_batch_size % world_size == 0, "train.total_batch_size",
               f"must be divisible by the {world_size} processes, got {self.total_batch_size}")
        return self.total_batch_size // world_size

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank; the global batch must split evenly."""
        per_step = self.micro_batch(world_size) * world_size
        if self.total_batch_size % per_step:
            raise ConfigError("train.total_batch_size",
                              f"must be divisible by micro_batch_size x world_size = {per_step}, "
                              f"got {self.total_batch_size}")
        return self.total_batch_size // per_step


@dataclass
class RunConfig:
    """Everything one run needs; saved resolved as config.yaml in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": ModelConfig.__doc__})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": MethodConfig.__doc__})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": DataConfig.__doc__})
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig, metadata={"help": TokenizerConfig.__doc__})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": OptimConfig.__doc__})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": TrainConfig.__doc__})
    seed: int = field(default=0, metadata={"help": "seed of model init (and everything not seeded elsewhere)"})
    out_dir: str = field(default="outputs", metadata={"help": "root of run folders"})
    run_name: Optional[str] = field(default=None, metadata={"help": "run folder name (one name, no '/'), inside "
                                                                    "out_dir/COMMAND; null = derived from the "
                                                                    "overrides"})
    timestamp: bool = field(default=False, metadata={"help": "append a time stamp to the derived run name"})
    method_recipes: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "experiment presets only: {method name: {dotted key: value}} applied at compose time for that "
                "method (GaLore's recipe uses another lr than SLTrain's) unless the command line sets the key"})

    def __post_init__(self):
        if self.optim.grad_clip is None:  # unset: clip at 1 (the harness), except layer-wise, which cannot clip
            self.optim.grad_clip = 0.0 if self.train.layerwise else 1.0
        # A rank larger than a layer dimension is rejected when the model is built (core), so that a sweep
        # records such a trial as failed instead of refusing the whole grid.
        _check(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
               f"must be <= model.max_seq_len={self.model.max_seq_len}, got {self.data.seq_len}")
        ignored = self.tokenizer.path and self.tokenizer.kind == TokenizerKind.auto and self.data.name != DataName.c4
        _check(not ignored, "tokenizer.path", f"is read by tokenizer.kind=pretrained or t5; kind=auto trains a BPE for "
               f"data={self.data.name.value} and would ignore it: set tokenizer.kind=pretrained to use the path")
        get_method(self.method.name).check_run(self)  # what the method cannot combine with (methods/NAME.py)
        if self.run_name is not None:
            name = self.run_name
            _check(bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
                   and "\0" not in name, "run_name",
                   f"must be one folder name inside out_dir (no '/', not '.' or '..'), got {name!r}")


# ----------------------------------------------------------------------------- field help
