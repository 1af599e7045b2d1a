"""The resume bundle: everything a checkpoint must hold for a resumed run to continue exactly where the saved one
stopped (the same batches, random numbers, counters, weights and optimizer state), saved and loaded by one call
each, and the config keys that may differ on resume.

    bundle = ResumeBundle(model, optimizer, scheduler, stream, config, rt, fsdp)
    bundle.load(checkpoint)                       # weights, optimizer, schedule, TrainState, data position, RNG
    bundle.save(ckpt_dir, step, keep, final_step) # the same, atomically; older checkpoints pruned
    bundle.state.step, bundle.last_checkpoint
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import load_training_state, prune_checkpoints, save_training_state

# Keys that may change when a run is resumed: how often it logs, evaluates and saves, where and how fast it
# runs. Anything else changes the numbers, so a resume with another value is refused.
# (train.compile too: it fuses the same ops, so only rounding moves, as with train.num_threads.)
RESUME_FREE_KEYS = ("train.log_every", "train.eval_every", "train.save_every", "train.eval_tokens",
                    "train.num_threads", "data.num_workers", "train.device", "train.keep_checkpoints",
                    "train.resume", "train.overwrite", "train.loggers", "train.peak_flops", "train.compile",
                    "tokenizer.cache_dir", "out_dir", "run_name", "timestamp", "method_recipes")


@dataclasses.dataclass
class TrainState:
    """What the loop carries from step to step, saved with every checkpoint so that a resumed run continues
    exactly where the saved one was: the same batches, the same random numbers, the same counters."""

    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed (all ranks)
    train_time: float = 0.0  # seconds spent in training steps (evaluation and checkpoints excluded)
    data_wait: float = 0.0  # of train_time, seconds the loop waited for its next batch
    data: dict = dataclasses.field(default_factory=dict)  # the training stream's position for the next step
    rng: dict = dataclasses.field(default_factory=dict)  # {"torch": the CPU generator state}

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "train_time": self.train_time, "data": self.data,
                "rng": self.rng, "data_wait": self.data_wait}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.train_time = int(state["step"]), int(state["tokens"]), float(state["train_time"])
        self.data, self.rng = state["data"], state["rng"]
        self.data_wait = float(state.get("data_wait", 0.0))  # absent from checkpoints before it was measured


class ResumeBundle:
    """The objects a checkpoint restores, and the TrainState of the run. ``config`` (a plain container) is stored
    with every checkpoint, so that a resume can be checked against it and a checkpoint loaded on its own."""

    def __init__(self, model, optimizer, scheduler, stream, config: dict, rt, fsdp: bool = False):
        self.model, self.optimizer, self.scheduler, self.stream = model, optimizer, scheduler, stream
        self.config, self.rt, self.fsdp = config, rt, fsdp
        self.state = TrainState()
        self.last_checkpoint: Optional[Path] = None

    def load(self, path: Path) -> None:
        """Restore everything from a checkpoint (the optimizer and scheduler must be built already)."""
        extra = load_training_state(path, self.model, self.optimizer, self.scheduler, self.rt, self.fsdp)
        self.state.load_state_dict(extra)
        self.stream.load_state_dict(self.state.data)
        torch.set_rng_state(self.state.rng["torch"])
        self.last_checkpoint = Path(path)

    def save(self, ckpt_dir: Path, step: int, keep: int, final_step: int) -> Path:
        """The state after ``step`` completed steps, atomically; then all but the ``keep`` newest (and the final)
        checkpoints are deleted."""
        self.state.step, self.state.data = step, self.stream.state_dict()
        self.state.rng = {"torch": torch.get_rng_state()}
        self.last_checkpoint = save_training_state(ckpt_dir, step, self.model, self.optimizer, self.scheduler,
                                                   {**self.state.state_dict(), "config": self.config}, self.rt,
                                                   self.fsdp)
        if self.rt.is_main:
            prune_checkpoints(ckpt_dir, keep, final_step=final_step)
        return self.last_checkpoint
