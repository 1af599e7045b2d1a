"""Atomic files and training checkpoints.

Everything a run writes that someone may read later (checkpoints, summary.json, tables, tokenizer and token-id
caches) goes through ``atomic_write`` (``atomic_torch_save`` for torch objects): write a temp file in the same
folder, fsync, then ``os.replace`` — a crash leaves either the old file or the new one, never half of one.
Checkpoints hold only tensors, numbers, strings and plain containers, so ``torch.load(path,
weights_only=True)`` reads them.

Layout: ``RUN_DIR/checkpoints/step_000100.pt`` plus ``latest`` (a text file naming the newest). Sharded
(FSDP) checkpoints are folders ``step_000100/`` written with torch.distributed.checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch

LATEST = "latest"


def atomic_write(path: Path | str, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    _write_then_replace(path, lambda f: f.write(raw))


def atomic_torch_save(path: Path | str, obj: Any) -> None:
    """``torch.save(obj)`` with the same guarantee, written straight to the temp file (no copy in memory)."""
    _write_then_replace(path, lambda f: torch.save(obj, f))


def _write_then_replace(path: Path | str, write: Callable[[BinaryIO], Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path | str, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------ run folder files
def write_overrides(run_dir: Path | str, overrides) -> None:
    """overrides.txt: the user's overrides, one per line (a value may hold spaces)."""
    atomic_write(Path(run_dir) / "overrides.txt", "".join(o + "\n" for o in overrides))


def read_overrides(run_dir: Path | str) -> list:
    """The overrides a run was started with ([] when the folder has no overrides.txt)."""
    path = Path(run_dir) / "overrides.txt"
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_summary(run_dir: Path | str) -> Optional[dict]:
    """The run's summary.json, or None when it has none yet."""
    path = Path(run_dir) / "summary.json"
    return read_json(path) if path.is_file() else None


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(ckpt_dir: Path, step: int, state: dict) -> Path:
    """Save a full (unsharded) checkpoint atomically and point ``latest`` at it."""
    path = ckpt_dir / f"{checkpoint_name(step)}.pt"
    atomic_torch_save(path, state)
    atomic_write(ckpt_dir / LATEST, path.name + "\n")
    return path


def mark_latest(ckpt_dir: Path, name: str) -> None:
    atomic_write(ckpt_dir / LATEST, name + "\n")


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    marker = ckpt_dir / LATEST
    if not marker.is_file():
        return None
    path = ckpt_dir / marker.read_text().strip()
    return path if path.exists() else None


def resolve_checkpoint(path_or_run: Path | str) -> Path:
    """A checkpoint file/folder, or a run folder (-> its latest checkpoint)."""
    path = Path(path_or_run)
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path / 'checkpoints'}")
        return found
    if path.exists():
        return path
    raise FileNotFoundError(f"{path} is neither a run folder nor a checkpoint")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def stored_config(checkpoint: Path) -> dict:
    """The run config (a plain container) saved with either kind of checkpoint."""
    return load_checkpoint(checkpoint / "extra.pt" if checkpoint.is_dir() else checkpoint)["config"]


def run_dir_of(checkpoint: Path) -> Path:
    """RUN_DIR for RUN_DIR/checkpoints/step_N(.pt)."""
    return checkpoint.resolve().parent.parent


# ------------------------------------------------------------------------------ training state
def save_training_state(ckpt_dir: Path, step: int, model, optimizer, scheduler, extra: dict, rt,
                        fsdp: bool = False) -> Path:
    """model + optimizer + scheduler + ``extra`` (step, data position, RNG, config) at ``step``.

    One process or DDP: rank 0 writes one file. FSDP: every rank writes its shards with
    torch.distributed.checkpoint into a temp folder that rank 0 renames into place once all are done.
    """
    sched = scheduler.state_dict() if scheduler is not None else {}
    if not fsdp:
        path = ckpt_dir / f"{checkpoint_name(step)}.pt"
        if rt.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": sched, **extra}
            save_checkpoint(ckpt_dir, step, state)
        _barrier(rt)
        return path
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".{checkpoint_name(step)}.tmp"
    if rt.is_main:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    if rt.is_main:
        atomic_torch_save(tmp / "extra.pt", {"scheduler": sched, **extra})
    dist.barrier()
    if rt.is_main:
        import shutil

        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        mark_latest(ckpt_dir, final.name)
    dist.barrier()
    return final


def load_training_state(path: Path, model, optimizer, scheduler, rt, fsdp: bool = False) -> dict:
    """Restore what save_training_state wrote; return the extra entries (step, data, rng, ...)."""
    path = Path(path)
    if path.is_dir() != fsdp:
        raise ValueError(f"{path} is a {'sharded' if path.is_dir() else 'single-file'} checkpoint; "
                         f"resume it with train.parallel={'fsdp' if path.is_dir() else 'ddp'}")
    if not fsdp:
        state = load_checkpoint(path, map_location=rt.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        return state
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    extra = load_checkpoint(path / "extra.pt")
    if scheduler is not None:
        scheduler.load_state_dict(extra["scheduler"])
    return extra


def load_model_weights(path: Path, model) -> dict:
    """Model weights from either kind of checkpoint, into an unwrapped single-process model; returns the
    extra entries (config, step, ...)."""
    path = Path(path)
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])
        return load_checkpoint(path / "extra.pt")
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    return state


def _barrier(rt) -> None:
    if rt.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
