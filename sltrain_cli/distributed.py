"""torch.distributed plumbing for training under torchrun: process group, DDP / FSDP2 wrapping,
gradient-sync control during accumulation, rank-0 output, and the start-up check that every rank holds
the same sparse supports.

One process (plain `sltrain pretrain`) is the world_size = 1 case of the same code: no process group,
no wrapper. Under `torchrun --nproc_per_node=N -m sltrain_cli pretrain ...` the env vars torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) select the process group; nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .configs import UserError


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args) -> None:
        """print0: only rank 0 talks."""
        if self.is_main:
            print(*args, flush=True)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device: {device} requested but CUDA is not available; use train.device=cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
    return torch.device(device)


def init(device: str = "auto") -> Runtime:
    """Join the torchrun process group if there is one; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Runtime(rank, world, local, dev, owns)


def shutdown(rt: Runtime) -> None:
    """Leave the process group together: a rank that destroys it while another still talks to it can die
    with "terminate called without an active exception"."""
    if rt.owns_group and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(rt: Runtime):
    """Rank 0 runs the block first (e.g. trains and caches the tokenizer); the others follow."""
    if not rt.is_main:
        barrier(rt)
    yield
    if rt.is_main:
        barrier(rt)


def support_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every sparse support (the ``indices`` buffers) in the model."""
    h = hashlib.sha256()
    for name, buf in model.named_buffers():
        if name.endswith("indices"):
            h.update(name.encode())
            h.update(buf.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()


def check_supports_agree(model: torch.nn.Module, rt: Runtime) -> None:
    """Fail fast if ranks drew different sparse supports (they are seeded, so they must not)."""
    if rt.world_size == 1:
        return
    mine = support_fingerprint(model)
    everyone = [None] * rt.world_size
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        raise RuntimeError(f"sparse supports differ across ranks (fingerprints {everyone}); "
                           "method.support_seed must be the same on every rank")


def wrap(model: torch.nn.Module, rt: Runtime, fsdp: bool) -> torch.nn.Module:
    """DDP (or FSDP2 per decoder block) when there are several processes; the model itself otherwise."""
    if rt.world_size == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Buffers (the sparse supports) are identical on every rank (checked at start-up): no re-broadcast before
    # every forward. torch >= 2.13 names that forward_sync_buffers (broadcast_buffers warns, per rank, that it
    # is deprecated); the one broadcast at construction it keeps copies rank 0's supports over equal ones.
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                   **{sync: False})


def maybe_no_sync(wrapped: torch.nn.Module, last_microbatch: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext() if last_microbatch else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(last_microbatch)
    return contextlib.nullcontext()


def any_across_ranks(flags: list, rt: Runtime) -> list:
    """Element-wise OR of a list of booleans over all ranks (every rank gets the same answer)."""
    if rt.world_size == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def mean_across_ranks(value: torch.Tensor, rt: Runtime) -> float:
    value = value.detach().float().clone()
    if rt.world_size > 1:
        dist.all_reduce(value)
        value /= rt.world_size
    return float(value)


class NoProgress:
    """The progress display of a run nobody watches (another rank, --quiet, the Python API): does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, completed: int, **stats) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def progress_bar(rt: Runtime, factory, total: int, completed: int):
    """``factory(total, completed)`` (the CLI passes progress.TrainProgress) on rank 0, else NoProgress."""
    return factory(total, completed) if factory is not None and rt.is_main else NoProgress()

