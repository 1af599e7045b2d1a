"""Runs: build a model for training, load a trained one back from its folder, and guard the folder itself.

    run = load_run("outputs/pretrain/default")      # a run folder, a checkpoint file or a sharded folder
    run.model(input_ids).logits; run.tokenizer.encode("text"); run.cfg.method.rank; run.step

``build_model`` is the one recipe for a model (seeded init -> optional full-rank warm start -> method swap
-> device and dtype); ``load_run`` is the one way to turn a run folder or checkpoint into that model with
the trained weights, its tokenizer and its config. eval-ppl, ablate-support, export and generate use it.

``check_run_dir`` decides, before any work, what a new `pretrain` does with the folder it is given: resume
(only with the checkpoint's own config), skip an identical completed run, or refuse to clobber another one;
``open_run_dir`` then creates and locks it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import (
    checkpoint_problem,
    is_newest,
    latest_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    run_dir_of,
    stored_config,
)
from .config_io import config_changes, from_container, read_config_file, to_container
from .configs import ConfigError, ModelConfig, Precision, RunConfig, UserError
from .core.convert import apply_method
from .core.model import LlamaForCausalLM
from .data.tokenizer import Tokenizer, load_tokenizer
from .files import FolderInUse, RunLock, read_summary, remove_stale_temps
from .state import RESUME_FREE_KEYS
from .summary import RunSummary


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
    newest: bool = True  # the run's highest-step checkpoint (False: an earlier one, chosen or fallen back to)


def _to_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _state_dict_mismatch(err: RuntimeError) -> str:
    """The first difference load_state_dict reports, in a few words."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    first = lines[0] if lines else str(err).splitlines()[0]
    found = re.match(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from "
                     r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", first)
    if found:
        return f"{found[1]} is {found[2]} in the checkpoint, {found[3]} in the model"
    return first.rstrip(".")


def load_run(path: Path | str, *, key: str = "RUN", precision: Optional[Precision] = None,
             device: torch.device | str = "cpu", warn=_to_stderr) -> LoadedRun:
    """A run folder (its newest good checkpoint), a checkpoint file or a sharded checkpoint folder -> LoadedRun.

    The model has the run's vocabulary and method; its dtype is the run's (bf16 for bf16-pure) unless
    ``precision`` says otherwise. A path that holds no checkpoint is a ConfigError naming ``key``; a damaged
    checkpoint of a run folder is skipped with one line through ``warn`` (stderr by default).
    """
    try:
        ckpt = resolve_checkpoint(path, warn)
    except FileNotFoundError as err:
        raise ConfigError(key, str(err)) from None
    run_dir = run_dir_of(ckpt)
    cfg = from_container(stored_config(ckpt))
    tokenizer = load_tokenizer(run_dir / "tokenizer", key=key)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    method_cfg = dataclasses.replace(cfg.method, warm_start=None)  # the checkpoint holds the weights
    model = build_model(model_cfg, method_cfg, cfg.seed, torch.device("cpu"),
                        cfg.train.precision if precision is None else precision)
    try:
        extra = load_model_weights(ckpt, model)
    except RuntimeError as err:  # load_state_dict: the weights are of another model than the folder describes
        if "Error(s) in loading state_dict" not in str(err):
            raise
        raise ConfigError(key, f"{ckpt}: the checkpoint does not fit the model of its run folder "
                               f"({_state_dict_mismatch(err)}); are its tokenizer/ and checkpoints/ from "
                               "different runs?") from None
    model.to(device).eval()
    return LoadedRun(model, tokenizer, cfg, run_dir, int(extra.get("step", 0)), ckpt, is_newest(ckpt))


# ----------------------------------------------------------------------------------------- the run folder
def resume_path(resume: str, ckpt_dir: Path, warn) -> Optional[Path]:
    """The checkpoint train.resume names (the newest good one of a run folder), or None for a fresh start."""
    if not resume:
        return None
    if resume.lower() == "true":
        found = latest_checkpoint(ckpt_dir, warn)
        if found is None:
            warn(f"train.resume=true: no checkpoint in {ckpt_dir}; starting fresh")
        return found
    path = Path(resume)
    if not path.exists():
        raise ConfigError("train.resume", f"no checkpoint at {path}")
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints", warn)
        if found is None:
            raise ConfigError("train.resume", f"no loadable checkpoint in {path / 'checkpoints'}")
        return found
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError("train.resume", f"{path} is not a usable checkpoint: {problem}")
    return path


def _describe_changes(changes) -> str:
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:8])
    return shown + (f" (and {len(changes) - 8} more)" if len(changes) > 8 else "")


def check_run_dir(cfg: RunConfig, run_dir: Path, warn, probe_lock: bool = True
                  ) -> tuple[Optional[Path], Optional[RunSummary]]:
    """Decide, before any work and without writing, what this run does with its folder.

    Returns (checkpoint to resume from or None, summary of an identical completed run to return instead of
    training). Refuses (exit 2) a folder another process holds (``probe_lock``: rank 0 only), a resume whose
    config differs from the checkpoint's, and a fresh start over a folder that holds another run unless
    train.overwrite=true.
    """
    tcfg, ckpt_dir = cfg.train, run_dir / "checkpoints"
    if probe_lock and (run_dir / ".lock").is_file():
        try:
            RunLock(run_dir).acquire().release()
        except FolderInUse as err:
            raise UserError(f"run folder: {err}; wait for it to finish or choose another run_name") from None
    current = to_container(cfg)
    resume_from = resume_path(tcfg.resume, ckpt_dir, warn)
    if resume_from is not None:
        stored = to_container(from_container(stored_config(resume_from)))  # keys added since: defaults
        changes = config_changes(stored, current, RESUME_FREE_KEYS)
        if changes:
            raise ConfigError("train.resume", f"the checkpoint {resume_from.name} was trained with another config "
                                              f"({_describe_changes(changes)}); resume with the same settings, or "
                                              "start over with train.overwrite=true or another run_name")
        return resume_from, None
    if tcfg.overwrite or tcfg.resume or not run_dir.is_dir():
        return None, None
    try:
        earlier = read_summary(run_dir)
    except ValueError:
        earlier = None
    has_ckpt = latest_checkpoint(ckpt_dir) is not None
    status = (earlier or {}).get("status", "interrupted")
    step = (earlier or {}).get("steps", "?")
    if status == "diverged":
        raise ConfigError("run_name", f"{run_dir} holds a run that diverged at step {step} "
                                      f"({earlier.get('diverged_reason') or 'non-finite loss'}); the same settings "
                                      "diverge again: change them (e.g. a lower lr=), or start over with "
                                      "train.overwrite=true")
    if status != "completed" and not has_ckpt:
        if earlier is not None:
            warn(f"{run_dir} holds an {status} run that saved no checkpoint; starting fresh")
        return None, None  # nothing of value there (a run that never got going)
    if status == "completed":
        changes = config_changes(read_config_file(run_dir / "config.yaml"), current, RESUME_FREE_KEYS) \
            if (run_dir / "config.yaml").is_file() else [("config.yaml", "missing", "")]
        if not changes:
            return None, earlier
        raise ConfigError("run_name", f"{run_dir} holds a completed run with another config "
                                      f"({_describe_changes(changes)}); choose another run_name or set "
                                      "train.overwrite=true to replace it")
    raise ConfigError("train.resume", f"{run_dir} holds an {status} run (step {step}); continue it with "
                                      "train.resume=true or start over with train.overwrite=true")


def open_run_dir(run_dir: Path, fresh: bool) -> RunLock:
    """Create and lock the run folder (rank 0); a fresh run clears what an earlier one left."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("out_dir", f"cannot create {run_dir}: {err.strerror}") from None
    try:
        lock = RunLock(run_dir).acquire()
    except FolderInUse as err:
        raise UserError(f"run folder: {err}; wait for it to finish or choose another run_name") from None
    except OSError as err:
        raise ConfigError("out_dir", f"cannot write in {run_dir}: {err.strerror}") from None
    remove_stale_temps(run_dir)
    if fresh:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        for stale in ("metrics.jsonl", "summary.json"):
            (run_dir / stale).unlink(missing_ok=True)
    return lock


def check_writable(path: Path) -> None:
    """out_dir must be creatable before any work is done."""
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise ConfigError("out_dir", f"cannot create {path}: {parent} is not a writable folder")


def disk_full_error(run_dir: Path, step: Optional[int], last_good: Optional[Path]) -> UserError:
    free = shutil.disk_usage(run_dir).free if run_dir.exists() else 0
    when = f"after step {step}" if step is not None else "while preparing the run"
    return UserError(f"out_dir: no space left on the device of {run_dir} ({free / 2**20:.0f} MiB free) {when}; "
                     f"the last good checkpoint is {last_good or 'none'}; free some space and resume with "
                     "train.resume=true")


def check_warm_start(path: Optional[str]) -> Optional[Path]:
    """method.warm_start (a checkpoint, a run folder, or a file holding {"model": state_dict}) -> the file or
    sharded folder to load, checked before any work."""
    if not path:
        return None
    found = Path(path)
    try:
        if found.is_dir():
            return resolve_checkpoint(found)
        if not found.is_file():
            raise FileNotFoundError(f"no such file or run folder: {found}")
        state = torch.load(found, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as err:
        raise ConfigError("method.warm_start", str(err)) from None
    except Exception:  # noqa: BLE001 - anything torch cannot read is the same mistake to the user
        raise ConfigError("method.warm_start", f"{found} is not a readable PyTorch checkpoint") from None
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict)):
        raise ConfigError("method.warm_start", f"{found} holds no model weights (no 'model' entry)")
    return found
