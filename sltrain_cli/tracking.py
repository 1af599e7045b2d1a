"""What a run reports besides its numbers: experiment trackers, run metadata, model FLOPs and memory readings.

metrics.jsonl is the source of truth; ``Trackers`` sends the same rows to the trackers ``train.loggers`` names:

  jsonl        nothing more (metrics.jsonl is always written)
  tensorboard  torch's SummaryWriter, events in RUN_DIR/tensorboard/ (pip install 'sltrain[tensorboard]')
  wandb        Weights & Biases, files in RUN_DIR/wandb/; offline when WANDB_MODE=offline or the service is
               unreachable (pip install 'sltrain[wandb]')

A tracker that fails to start is one line on stderr and the run goes on without it.

``run_metadata`` is what every summary.json records about the software and hardware that produced it;
``flops_per_token`` is the model's training FLOPs per token (6N plus attention, as in the PaLM appendix), and
``peak_flops`` the device's dense bf16 peak, from which the summary's MFU follows on CUDA.
"""
from __future__ import annotations

import importlib.metadata
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, from the vendors' data sheets (no sparsity).
# Matched by substring of torch.cuda.get_device_name(); train.peak_flops overrides.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
                 "A10": 125e12, "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12}


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The commit of the sltrain checkout this code runs from (None for an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) or None if out.returncode == 0 else None


def run_metadata(device: torch.device, world_size: int) -> Dict[str, Any]:
    """Software and hardware of this run, for summary.json."""
    cuda = device.type == "cuda"
    return {
        "sltrain_version": _version("sltrain"), "git_commit": _git_commit(), "python": sys.version.split()[0],
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "bitsandbytes": _version("bitsandbytes"), "transformers": _version("transformers"),
        "datasets": _version("datasets"),  # a stream's document order (c4's shuffle) is a property of its version
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "device_count": torch.cuda.device_count() if cuda else 1, "world_size": world_size,
        "hostname": socket.gethostname(), "pid": os.getpid(), "argv": list(sys.argv),
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def flops_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """Training FLOPs per token: 6 N (forward + backward over the parameters that multiply, i.e. all but the
    input embedding) plus attention's 12 L d T (QK^T and AV, forward and backward)."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed_tokens"))
    return int(6 * n + 12 * cfg.num_layers * cfg.hidden_size * seq_len)


def peak_flops(device: torch.device, configured: float = 0.0) -> Optional[float]:
    """The device's dense bf16 peak: ``configured`` when > 0, else the GPU table; None on CPU or unknown GPUs."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)


def memory_now(device: torch.device) -> Dict[str, int]:
    """Memory in use right now, for a metrics row: CUDA allocated and reserved, or this process's resident set."""
    if device.type == "cuda":
        return {"cuda_allocated_bytes": int(torch.cuda.memory_allocated(device)),
                "cuda_reserved_bytes": int(torch.cuda.memory_reserved(device))}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return {"cpu_rss_bytes": pages * os.sysconf("SC_PAGE_SIZE")}
    except (OSError, ValueError, IndexError):
        return {}


# ----------------------------------------------------------------------------------------- trackers
class Trackers:
    """The trackers of ``train.loggers`` (besides metrics.jsonl); every row logged goes to all of them."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: dict, run_name: str, enabled: bool = True):
        self._sinks: List[Any] = []
        if not enabled:
            return
        for name in dict.fromkeys(names):
            if name == "jsonl":
                continue
            try:
                self._sinks.append(_START[name](Path(run_dir), config, run_name))
            except Exception as err:  # noqa: BLE001 - a tracker never stops a run
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                print(f"note: train.loggers: {name} did not start ({first}); going on without it",
                      file=sys.stderr, flush=True)

    def log(self, row: Dict[str, Any]) -> None:
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
        for sink in self._sinks:
            sink.log(numbers, int(row["step"]))

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, run_name: str):
        import tensorboard  # noqa: F401 - SummaryWriter needs the package; fail here with its own message
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```")

    def log(self, numbers: Dict[str, float], step: int) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict, run_name: str):
        import wandb

        online = os.environ.get("WANDB_MODE", "").lower() != "offline" and _reachable("api.wandb.ai", 443)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sltrain"), name=run_name, config=config,
                              dir=str(run_dir), mode="online" if online else "offline", reinit=True)

    def log(self, numbers: Dict[str, float], step: int) -> None:
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


_START = {"tensorboard": _TensorBoard, "wandb": _WandB}  # the names configs.LOGGERS allows, besides jsonl


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes and what it measures."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    # VmHWM is this process's own high-water mark; ru_maxrss would also carry the RSS of the parent that
    # forked us (Linux keeps it across exec), which inflates every trial a sweep starts.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "cpu_peak_rss"
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"
