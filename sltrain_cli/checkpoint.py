"""Training checkpoints: one file per step (one process, DDP) or a sharded folder (FSDP), written atomically.

Checkpoints hold only tensors, numbers, strings and plain containers, so ``torch.load(path,
weights_only=True)`` reads them. Files are written through files.py (temp file, fsync, rename).

Damaged bytes are detected, not only truncation: torch's zip format checks no checksum when it reads tensor
data, so a single-file checkpoint carries ``checksum`` (CRC-32 over every tensor's bytes, dtype and shape, in
the state's order) and a sharded one ``checksums.json`` (CRC-32 of each of its files). ``checkpoint_problem``
recomputes them; a checkpoint written before checksums existed is checked by loading it.

Layout: ``RUN_DIR/checkpoints/step_000100.pt`` plus ``latest`` (a text file naming the newest). Sharded
(FSDP) checkpoints are folders ``step_000100/`` written with torch.distributed.checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Callable, List, Optional

import torch

from .files import atomic_torch_save, atomic_write

LATEST = "latest"
_NAME = re.compile(r"^step_(\d{6,})(\.pt)?$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


CHECKSUM = "checksum"  # the key of a single-file checkpoint's CRC-32 over its tensors
SHARD_CHECKSUMS = "checksums.json"  # a sharded checkpoint's CRC-32 of each file


def tensor_checksum(state) -> int:
    """CRC-32 over every tensor in ``state`` (nested dicts / lists), its dtype and shape included, in order."""
    crc = 0

    def walk(obj) -> None:
        nonlocal crc
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            crc = zlib.crc32(f"{t.dtype}{tuple(obj.shape)}".encode(), crc)
            crc = zlib.crc32(t.view(torch.uint8).numpy(), crc)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                if key != CHECKSUM:
                    walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(state)
    return crc


def file_checksums(folder: Path) -> dict:
    """{relative path: CRC-32 of its bytes} of every file under ``folder`` but the checksum file itself."""
    sums = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != SHARD_CHECKSUMS):
        crc = 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
        sums[str(path.relative_to(folder))] = crc
    return sums


def save_checkpoint(ckpt_dir: Path, step: int, state: dict) -> Path:
    """Save a full (unsharded) checkpoint, with the checksum of its tensors, atomically and point ``latest`` at
    it."""
    path = ckpt_dir / f"{checkpoint_name(step)}.pt"
    atomic_torch_save(path, {**state, CHECKSUM: tensor_checksum(state)})
    atomic_write(ckpt_dir / LATEST, path.name + "\n")
    return path


def mark_latest(ckpt_dir: Path, name: str) -> None:
    atomic_write(ckpt_dir / LATEST, name + "\n")


def step_of(path: Path) -> Optional[int]:
    """100 for step_000100.pt or step_000100/, None for anything else."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_dir: Path) -> List[Path]:
    """The checkpoints in ``ckpt_dir``, newest (highest step) first."""
    found = [p for p in Path(ckpt_dir).iterdir() if step_of(p) is not None] if Path(ckpt_dir).is_dir() else []
    return sorted(found, key=step_of, reverse=True)


def checkpoint_problem(path: Path) -> Optional[str]:
    """None when ``path`` is a loadable, undamaged sltrain checkpoint, else why not (one short phrase). Reads
    every byte of it (the checksums), so a damaged file is caught here and not halfway through a load."""
    path = Path(path)
    if path.is_dir() and not (path / ".metadata").is_file():
        return "a sharded checkpoint folder without .metadata"
    if path.is_dir() and (path / SHARD_CHECKSUMS).is_file():
        try:
            expected = json.loads((path / SHARD_CHECKSUMS).read_text())
        except (OSError, ValueError):
            return f"its {SHARD_CHECKSUMS} is unreadable"
        found = file_checksums(path)
        bad = sorted(name for name in expected if found.get(name) != expected[name])
        if bad:
            return f"damaged: {bad[0]} does not match its checksum"
    try:
        state = torch.load(path / "extra.pt" if path.is_dir() else path, map_location="cpu", weights_only=True,
                           mmap=True)
    except Exception:  # noqa: BLE001 - truncated, empty, not a torch file, unreadable: all the same to us
        return "not a readable PyTorch checkpoint (truncated, damaged, or another kind of file)"
    if not isinstance(state, dict) or "config" not in state or "step" not in state:
        return "not an sltrain checkpoint (no config / step inside)"
    try:
        if CHECKSUM in state and tensor_checksum(state) != state[CHECKSUM]:
            return "damaged: its tensor data does not match its checksum"
        if CHECKSUM not in state and not path.is_dir():  # written before checksums: read every tensor
            tensor_checksum(state)
    except Exception as err:  # noqa: BLE001 - a tensor whose bytes cannot be read back
        return f"damaged: a tensor cannot be read ({type(err).__name__})"
    return None


def latest_checkpoint(ckpt_dir: Path, warn: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest checkpoint that loads: the one ``latest`` names, else the next older good one (each one
    skipped is reported through ``warn``). None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / LATEST
    named = [ckpt_dir / marker.read_text().strip()] if marker.is_file() else []
    for path in dict.fromkeys([*named, *list_checkpoints(ckpt_dir)]):
        if not path.exists():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if warn is not None:
            warn(f"checkpoint {path} cannot be loaded ({problem}); trying an older one")
    return None


def prune_checkpoints(ckpt_dir: Path, keep: int, final_step: int) -> List[Path]:
    """Delete all but the ``keep`` newest checkpoints (the final one, at ``final_step``, is always kept);
    ``keep`` 0 keeps everything. Returns what was deleted."""
    if keep <= 0:
        return []
    older = [p for p in list_checkpoints(ckpt_dir) if step_of(p) != final_step][keep:]
    for p in older:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return older


def resolve_checkpoint(path_or_run: Path | str, warn: Optional[Callable[[str], None]] = None) -> Path:
    """A checkpoint file/folder, or a run folder (-> its newest good checkpoint; each damaged one skipped is
    reported through ``warn``)."""
    path = Path(path_or_run)
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints", warn)
        if found is None:
            raise FileNotFoundError(f"no loadable checkpoint in {path / 'checkpoints'}")
        return found
    if path.is_dir() and not (path / ".metadata").is_file() and not (path / "extra.pt").is_file():
        raise FileNotFoundError(f"{path} holds no checkpoint (a run folder has checkpoints/; a sharded "
                                "checkpoint has .metadata)")
    if path.exists():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise FileNotFoundError(f"{path} is not a usable checkpoint: {problem}")
        return path
    raise FileNotFoundError(f"{path} is neither a run folder nor a checkpoint")


def is_newest(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is the highest step of its folder (damaged newer ones count: a fallback is not)."""
    found = list_checkpoints(Path(checkpoint).parent)
    return bool(found) and found[0].resolve() == Path(checkpoint).resolve()


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
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    if rt.is_main:
        atomic_torch_save(tmp / "extra.pt", {"scheduler": sched, **extra})
    dist.barrier()
    if rt.is_main:
        atomic_write(tmp / SHARD_CHECKSUMS, json.dumps(file_checksums(tmp), indent=1) + "\n")
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
        import warnings

        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        single = not (dist.is_available() and dist.is_initialized())
        with warnings.catch_warnings():  # DCP warns that it "assumes" one process even when told so (no_dist)
            warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized",
                                    UserWarning)
            dcp.load(state, checkpoint_id=str(path), no_dist=single)
        model.load_state_dict(state["model"])
        return load_checkpoint(path / "extra.pt")
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    return state


def _barrier(rt) -> None:
    if rt.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
