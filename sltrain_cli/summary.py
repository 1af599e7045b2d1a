"""summary.json: the schema of a run's summary, how it is written (a resumed run keeps one record with its
segments) and its row in results.csv (plain Python: the training runtime writes it, the presentation modules
read it)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, TypedDict

from .files import read_summary, write_json


class RunSummary(TypedDict, total=False):
    """summary.json of a pretrain run (train() returns it; cli, sweep and the tables read it)."""

    command: str  # "pretrain"
    run: str  # the run folder's name
    run_dir: str
    model: str
    method: str
    rank: int
    delta: float
    params_total: int
    params_trainable: int
    params_lowrank: int
    params_sparse: int
    index_entries: int
    vocab_size: int
    unigram_ppl: float  # add-one unigram baseline of the corpus
    world_size: int
    device: str
    precision: str
    est_mem_gb: Optional[float]  # paper-convention estimate (parameters + Adam state, bf16)
    tokens: int
    steps: int
    val_loss: Optional[float]
    val_ppl: Optional[float]
    val_tokens: Optional[int]
    tokens_per_s: Optional[float]
    train_time_s: float
    peak_mem_bytes: int
    peak_mem_kind: str  # cuda_max_memory_allocated | cpu_peak_rss
    optimizer_state_bytes: int
    kernels: Dict[str, str]  # SparseLowRankLinear kernel per layer shape ("in->out": compose | factored)
    # software and hardware (tracking.run_metadata)
    sltrain_version: Optional[str]
    git_commit: Optional[str]  # -dirty when the checkout had uncommitted changes
    python: str
    torch: str
    cuda: Optional[str]
    bitsandbytes: Optional[str]
    transformers: Optional[str]
    device_name: str
    device_count: int
    hostname: str
    pid: int  # of the process that trained (rank 0)
    argv: List[str]
    start_time: str
    end_time: str
    flops_per_token: int  # 6 N + attention
    peak_flops: Optional[float]  # the device's dense bf16 peak (CUDA) or train.peak_flops
    mfu: float  # tokens_per_s * flops_per_token / (peak_flops * world_size), when peak_flops is known
    status: str  # completed | failed | interrupted | diverged
    exit_code: int  # interrupted: 128 + signal number; diverged: 3
    signal: str  # interrupted: SIGINT | SIGTERM | SIGUSR1
    diverged_step: int
    diverged_reason: str  # which rule: non-finite loss or gradient norm, or a collapse (collapse.py)
    last_checkpoint: Optional[str]  # the newest checkpoint the run saved (or resumed from)
    last_eval: Optional[dict]  # the last intermediate evaluation: {step, val_loss, val_ppl}
    resumed_from_step: Optional[int]  # where this segment started (None: a fresh start)
    segments: List[dict]  # one entry per process that trained the run: start/end, argv, steps, status, peak
    error: str  # failed: why (e.g. no space left on device)
    skipped: bool  # train() found this run already completed and did not train it again


SUMMARY_ROW_KEYS = ("model", "method", "rank", "delta", "params_total", "params_trainable", "tokens", "val_ppl",
                    "tokens_per_s", "peak_mem_bytes", "est_mem_gb", "status")


def summary_row(summary: RunSummary) -> dict:
    """The row of results.csv for one run."""
    return {"run": summary.get("run"), **{k: summary.get(k) for k in SUMMARY_ROW_KEYS}}


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    """summary.json; a resumed run keeps its first segment's start, argv and the peak over all its segments,
    and lists every segment."""
    try:
        earlier = read_summary(run_dir) or {}
    except ValueError:
        earlier = {}
    segment = {k: summary.get(k) for k in SEGMENT_KEYS}
    if earlier and summary.get("resumed_from_step") is not None:
        segments = [*earlier.get("segments", [{k: earlier.get(k) for k in SEGMENT_KEYS}]), segment]
        for key in ("start_time", "argv"):
            if earlier.get(key) is not None:
                summary[key] = earlier[key]
        peaks = [s.get("peak_mem_bytes") for s in segments if s.get("peak_mem_bytes") is not None]
        summary["peak_mem_bytes"] = max(peaks) if peaks else summary.get("peak_mem_bytes")
    else:
        segments = [segment]
    summary["segments"] = segments
    write_json(run_dir / "summary.json", summary)


SEGMENT_KEYS = ("start_time", "end_time", "argv", "pid", "hostname", "resumed_from_step", "steps", "status",
                "peak_mem_bytes", "train_time_s")
