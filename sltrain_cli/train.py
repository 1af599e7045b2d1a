"""The training loop behind `sltrain pretrain` (and every trial of sweep / ablate-support).

    summary = train(cfg, run_dir)

build tokenizer + data -> build model -> apply_method -> optimizer (or layer-wise optimizers) -> DDP/FSDP
-> loop {global batch -> micro-batches (no_sync until the last) -> clip -> step -> schedule -> ReLoRA
merge -> log -> eval every k -> checkpoint every m} -> final eval -> summary.json.

Resume is exact: the checkpoint holds model, optimizer, scheduler, step, RNG and data position, so a run
resumed at step k continues with the same batches and the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import data as data_lib
from .checkpoint import (atomic_write, latest_checkpoint, load_training_state, save_training_state, write_json,
                         write_overrides)
from .compose import to_container, to_yaml
from .configs import MethodName, ModelConfig, Parallel, RunConfig, UserError
from .core import relora
from .core.convert import count_parameters
from .core.optim import (LayerwiseOptimizer, build_optimizer, build_scheduler, check_layerwise,
                         optimizer_state_bytes)
from .evaluate import evaluate_ppl
from .results import RunSummary
from .runs import autocast_for, build_model
from .tokenizer import build_tokenizer
from . import distributed


# ----------------------------------------------------------------------------------------- pieces
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


def estimated_memory_gb(model_cfg: ModelConfig, method_cfg) -> Optional[float]:
    """The paper-convention estimate (parameters + Adam state, bf16) for this model and method."""
    from .memory import estimate_memory

    est = estimate_memory(model_cfg, method_cfg.name.value, method_cfg.rank, method_cfg.delta)
    return round(float(est["total_mem_gb"]), 4)


def train_step(wrapped, input_ids: torch.Tensor, labels: torch.Tensor, accum: int, params, optimizer, scheduler,
               grad_clip: float, device: torch.device, autocast) -> tuple[torch.Tensor, Optional[float]]:
    """One optimizer step over ``accum`` micro-batches of the batch; gradients are all-reduced (DDP/FSDP) on
    the last micro-batch only. ``optimizer`` may be a LayerwiseOptimizer (it steps inside backward; then
    ``scheduler`` is None and there is no clipping). Returns (the batch's mean loss, grad norm or None)."""
    layerwise = isinstance(optimizer, LayerwiseOptimizer)
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(zip(input_ids.chunk(accum), labels.chunk(accum))):
        last = i == accum - 1
        if layerwise:
            optimizer.sync(last)
        with distributed.maybe_no_sync(wrapped, last), autocast():
            loss = wrapped(x.to(device), labels=y.to(device)).loss / accum
        loss.backward()
        loss_sum += loss.detach().float()
    if layerwise:
        optimizer.step_scheduler()
        return loss_sum, None
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip > 0 else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


@dataclasses.dataclass
class TrainState:
    """What the loop carries from step to step, saved with every checkpoint so that a resumed run continues
    exactly where the saved one was: the same batches, the same random numbers, the same counters."""

    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed (all ranks)
    train_time: float = 0.0  # seconds spent in training steps (evaluation and checkpoints excluded)
    data: dict = dataclasses.field(default_factory=dict)  # the training stream's position for the next step
    rng: dict = dataclasses.field(default_factory=dict)  # {"torch": the CPU generator state}

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "train_time": self.train_time, "data": self.data,
                "rng": self.rng}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.train_time = int(state["step"]), int(state["tokens"]), float(state["train_time"])
        self.data, self.rng = state["data"], state["rng"]


class _Metrics:
    """metrics.jsonl: one JSON object per logged step; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write(path, "".join(r + "\n" for r in rows))

    def log(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------- train
def train(cfg: RunConfig, run_dir: Path, overrides: Sequence[str] = (), progress: bool = True) -> RunSummary:
    """Train one model as ``cfg`` says, writing everything into ``run_dir``; return the summary."""
    rt = distributed.init(cfg.train.device)
    device = rt.device
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    tcfg, mcfg = cfg.train, cfg.method
    accum = tcfg.grad_accum_steps(rt.world_size)
    fsdp = tcfg.parallel == Parallel.fsdp and rt.world_size > 1
    if tcfg.layerwise:  # refuse what layer-wise updates cannot honour before any work is done
        check_layerwise(cfg.optim, rt.world_size)
    if fsdp and mcfg.name == MethodName.galore:
        raise UserError("train.parallel: fsdp does not support method=galore (its SVD needs whole gradients); "
                        "use train.parallel=ddp")

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not tcfg.resume:  # a fresh run replaces what an earlier run of the same name left
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            for stale in ("metrics.jsonl", "summary.json"):
                (run_dir / stale).unlink(missing_ok=True)
        atomic_write(run_dir / "config.yaml", to_yaml(cfg))
        write_overrides(run_dir, overrides)

    # data and tokenizer (rank 0 trains/caches the tokenizer first, the others then read the cache)
    with distributed.main_first(rt):
        corpus, cache_root = data_lib.open_corpus(cfg.data), data_lib.cache_root(cfg.tokenizer)
        tokenizer = build_tokenizer(corpus, cfg.tokenizer, cache_root)
        train_stream, val_set = data_lib.build_datasets(corpus, tokenizer, rows_per_step=tcfg.total_batch_size,
                                                        rank=rt.rank, world_size=rt.world_size, cache_root=cache_root)
    if rt.is_main:
        tokenizer.save(run_dir / "tokenizer")
    unigram = data_lib.unigram_perplexity(train_stream, val_set)
    val_batches = val_set.batches(tcfg.eval_tokens, tcfg.micro_batch_size, rank=rt.rank, world_size=rt.world_size)

    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    model = build_model(model_cfg, mcfg, cfg.seed, device, tcfg.precision, mcfg.warm_start)
    model.activation_checkpointing = tcfg.activation_checkpointing
    counts = count_parameters(model)
    distributed.check_supports_agree(model, rt)
    autocast = autocast_for(tcfg.precision, device)

    wrapped = distributed.wrap(model, rt, fsdp)
    if tcfg.layerwise:
        optimizer, scheduler = LayerwiseOptimizer(model, cfg.optim, mcfg, tcfg.steps, rt.world_size), None
    else:
        optimizer = build_optimizer(model, cfg.optim, mcfg)
        scheduler = build_scheduler(optimizer, cfg.optim, mcfg, tcfg.steps)

    # resume
    state = TrainState()
    resume_from = _resume_path(tcfg.resume, ckpt_dir, fsdp)
    if resume_from is not None:
        state.load_state_dict(load_training_state(resume_from, model, optimizer, scheduler, rt, fsdp))
        train_stream.load_state_dict(state.data)
        torch.set_rng_state(state.rng["torch"])
        rt.print(f"resumed from {resume_from} at step {state.step}")
    start_step = state.step
    metrics = _Metrics(run_dir / "metrics.jsonl", start_step, rt.is_main)

    def save(step: int, data_state: dict) -> None:
        state.step, state.data, state.rng = step, data_state, {"torch": torch.get_rng_state()}
        save_training_state(ckpt_dir, step, model, optimizer, scheduler,
                            {**state.state_dict(), "config": to_container(cfg)}, rt, fsdp)

    summary: RunSummary = {"command": "pretrain", "run": run_dir.name, "run_dir": str(run_dir), "model": cfg.model.name,
               "method": mcfg.name.value, "rank": mcfg.rank, "delta": mcfg.delta,
               "params_total": counts["total"], "params_trainable": counts["trainable"],
               "params_lowrank": counts["lowrank"], "params_sparse": counts["sparse_values"],
               "index_entries": counts["indices"], "vocab_size": tokenizer.vocab_size,
               "unigram_ppl": unigram, "world_size": rt.world_size, "device": str(device), "precision": tcfg.precision.value}
    summary["est_mem_gb"] = estimated_memory_gb(model_cfg, mcfg)
    tokens_per_step = tcfg.total_batch_size * cfg.data.seq_len
    params = [p for p in model.parameters() if p.requires_grad]
    step, status, val = start_step, "failed", None
    data_state = train_stream.state_dict()
    bar = distributed.progress_bar(rt, enabled=progress, total=tcfg.steps, completed=start_step)
    try:
        with bar:
            for step in range(start_step, tcfg.steps):
                data_state = train_stream.state_dict()  # where this step starts, for an interrupt
                t0 = time.perf_counter()
                loss_sum, grad_norm = train_step(wrapped, *train_stream.next_batch(), accum, params, optimizer,
                                                 scheduler, cfg.optim.grad_clip, device, autocast)
                if mcfg.name == MethodName.relora and (step + 1) % mcfg.merge_every == 0 and step + 1 < tcfg.steps:
                    # the same generator on every rank: re-initialised adapters and pruning masks agree
                    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
                    adapters = relora.merge_all(model, generator=gen)
                    relora.reset_optimizer_state(optimizer, adapters, mcfg.reset, mcfg.reset_ratio, generator=gen)
                state.train_time += time.perf_counter() - t0
                state.tokens += tokens_per_step
                done = step + 1
                if done % tcfg.log_every == 0 or done == tcfg.steps:
                    loss_val = distributed.mean_across_ranks(loss_sum, rt)
                    lr = optimizer.param_groups[0]["lr"] if not tcfg.layerwise else optimizer.current_lr()
                    row = {"step": done, "tokens": state.tokens, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": state.tokens / max(state.train_time, 1e-9), "elapsed_s": state.train_time}
                    metrics.log(row)
                    bar.update(done, loss=loss_val, lr=lr, tps=row["tokens_per_s"])
                else:
                    bar.update(done)
                if tcfg.eval_every and done % tcfg.eval_every == 0 and done < tcfg.steps:
                    val = evaluate_ppl(wrapped, val_batches, device, autocast)
                    metrics.log({"step": done, "tokens": state.tokens, "val_loss": val["loss"], "val_ppl": val["ppl"]})
                    bar.note(f"step {done}: val loss {val['loss']:.4f}  ppl {val['ppl']:.2f}")
                if tcfg.save_every and done % tcfg.save_every == 0 and done < tcfg.steps:
                    save(done, train_stream.state_dict())
            step = tcfg.steps
        save(tcfg.steps, train_stream.state_dict())
        val = evaluate_ppl(wrapped, val_batches, device, autocast)
        metrics.log({"step": tcfg.steps, "tokens": state.tokens, "val_loss": val["loss"], "val_ppl": val["ppl"]})
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        if not tcfg.layerwise:  # layer-wise steps inside backward: a half-stepped model is not a checkpoint
            optimizer.zero_grad(set_to_none=True)
            save(step, data_state)
    finally:
        peak, peak_kind = peak_memory(device)
        summary.update({"tokens": state.tokens, "steps": step if status != "completed" else tcfg.steps,
                        "val_loss": val["loss"] if val else None, "val_ppl": val["ppl"] if val else None,
                        "val_tokens": val["tokens"] if val else None,
                        "tokens_per_s": state.tokens / state.train_time if state.train_time else None,
                        "train_time_s": state.train_time, "peak_mem_bytes": peak, "peak_mem_kind": peak_kind,
                        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                        "status": status})
        if rt.is_main:
            write_json(run_dir / "summary.json", summary)
        distributed.shutdown(rt)
    return summary


def _resume_path(resume: str, ckpt_dir: Path, fsdp: bool) -> Optional[Path]:
    if not resume:
        return None
    if resume.lower() == "true":
        return latest_checkpoint(ckpt_dir)  # nothing saved yet: start fresh
    path = Path(resume)
    if not path.exists():
        raise UserError(f"train.resume: no checkpoint at {path}")
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise UserError(f"train.resume: no checkpoint in {path / 'checkpoints'}")
        return found
    return path

