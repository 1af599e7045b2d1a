"""Models of runs: build one for training, or load a trained one back from its folder.

    run = load_run("outputs/pretrain/default")      # a run folder, a checkpoint file or a sharded folder
    run.model(input_ids).logits; run.tokenizer.encode("text"); run.cfg.method.rank; run.step

``build_model`` is the one recipe for a model (seeded init -> optional full-rank warm start -> method swap
-> device and dtype); ``load_run`` is the one way to turn a run folder or checkpoint into that model with
the trained weights, its tokenizer and its config. eval-ppl, ablate-support, export and generate use it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import load_model_weights, resolve_checkpoint, run_dir_of, stored_config
from .compose import from_container
from .configs import ConfigError, ModelConfig, Precision, RunConfig
from .core.convert import apply_method
from .core.model import LlamaForCausalLM
from .tokenizer import Tokenizer, load_tokenizer


def autocast_for(precision: Precision, device: torch.device):
    """A zero-argument context factory: bf16 autocast for bf16-mixed, nothing otherwise."""
    if precision == Precision.bf16_mixed:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_model(model_cfg: ModelConfig, method_cfg, seed: int, device: torch.device,
                precision: Precision = Precision.fp32, warm_start: Optional[str] = None) -> torch.nn.Module:
    """Seeded init, optional full-rank warm start (ReLoRA), method swap, device and dtype."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_cfg)
    if warm_start:
        load_model_weights(Path(warm_start), model)
    model = apply_method(model, method_cfg)
    model.to(device)
    if precision == Precision.bf16_pure:
        model.to(torch.bfloat16)
    return model


@dataclasses.dataclass
class LoadedRun:
    """A trained run: its model (the method's own form, weights loaded, eval mode), tokenizer and config."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    cfg: RunConfig  # the resolved config stored in the checkpoint
    run_dir: Path
    step: int  # optimizer steps completed at the checkpoint
    checkpoint: Path


def load_run(path: Path | str, *, key: str = "RUN", precision: Optional[Precision] = None,
             device: torch.device | str = "cpu") -> LoadedRun:
    """A run folder (its latest checkpoint), a checkpoint file or a sharded checkpoint folder -> LoadedRun.

    The model has the run's vocabulary and method; its dtype is the run's (bf16 for bf16-pure) unless
    ``precision`` says otherwise. A path that holds no checkpoint is a ConfigError naming ``key``.
    """
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise ConfigError(key, str(err)) from None
    run_dir = run_dir_of(ckpt)
    cfg = from_container(stored_config(ckpt))
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    method_cfg = dataclasses.replace(cfg.method, warm_start=None)  # the checkpoint holds the weights
    model = build_model(model_cfg, method_cfg, cfg.seed, torch.device("cpu"),
                        cfg.train.precision if precision is None else precision)
    extra = load_model_weights(ckpt, model)
    model.to(device).eval()
    return LoadedRun(model, tokenizer, cfg, run_dir, int(extra.get("step", 0)), ckpt)
