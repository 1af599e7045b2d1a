"""Atomic file I/O, locks and the small files of a run folder.

Everything a run writes that someone may read later (checkpoints, summary.json, tables, tokenizer and token-id
caches) goes through ``atomic_write`` (``atomic_torch_save`` for torch objects): write a temp file in the same
folder, fsync, then ``os.replace`` -- a crash leaves either the old file or the new one, never half of one.
Files get the user's umask (a shared cache or run folder stays readable to colleagues). JSON is strict: a
non-finite number is written as null. ``RunLock`` keeps a second process out of a run folder; ``locked``
serialises read-modify-write updates of a shared table (results.csv).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional


def atomic_write(path: Path | str, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    _write_then_replace(path, lambda f: f.write(raw))


def atomic_torch_save(path: Path | str, obj: Any) -> None:
    """``torch.save(obj)`` with the same guarantee, written straight to the temp file (no copy in memory).

    torch's zip writer turns a failed write into ``RuntimeError: ... unexpected pos`` (a full disk among
    them); the OSError that caused it is raised instead, so that callers can tell a full disk by its errno."""

    import torch  # here, not at the top: listing configs or printing one should not load torch

    def write(f: BinaryIO) -> None:
        failed: list = []

        class _Recorded:  # the file as torch sees it, remembering the OSError its write raised
            def write(self, data):
                try:
                    return f.write(data)
                except OSError as err:
                    failed.append(err)
                    raise

            def flush(self):
                return f.flush()

        try:
            torch.save(obj, _Recorded())
        except RuntimeError:
            if failed:
                raise failed[0] from None
            raise

    _write_then_replace(path, write)


def _write_then_replace(path: Path | str, write: Callable[[BinaryIO], Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_disk_full(err: OSError) -> bool:
    """No space left on the device, or the user's quota used up."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def finite(obj: Any) -> Any:
    """``obj`` with every NaN / inf float replaced by None (strict JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_line(obj: Any) -> str:
    """One strict-JSON line (metrics.jsonl rows)."""
    return json.dumps(finite(obj), allow_nan=False, default=str)


def write_json(path: Path | str, obj: Any) -> None:
    atomic_write(path, json.dumps(finite(obj), indent=2, sort_keys=False, allow_nan=False, default=str) + "\n")


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


def remove_stale_temps(folder: Path | str) -> int:
    """Delete the temp files / folders that killed writes left under ``folder``; return how many."""
    stale = [p for p in Path(folder).rglob(".*.tmp")] if Path(folder).is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return len(stale)


# ------------------------------------------------------------------------------ locks
class FolderInUse(Exception):
    """Another process holds the lock of a run folder."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.lock`` for the life of a run: a second process on the
    same folder fails at once. The kernel drops the lock when the process dies, so a killed run leaves none."""

    def __init__(self, folder: Path | str):
        self.path = Path(folder) / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FolderInUse(f"{self.path.parent} is in use by another process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked(path: Path | str) -> Iterator[None]:
    """Hold an exclusive (blocking) lock on ``path``'s sibling ``.<name>.lock`` around a read-modify-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
