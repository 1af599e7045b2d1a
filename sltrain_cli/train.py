"""The training loop behind `sltrain pretrain` (and every trial of sweep / ablate-support).

    summary = train(cfg, run_dir)

check the run folder -> build tokenizer + data -> lock and fill the run folder -> build model ->
apply_method -> optimizer (or layer-wise optimizers) -> DDP/FSDP -> loop {global batch -> micro-batches
(no_sync until the last) -> clip -> step -> schedule -> ReLoRA merge -> log -> eval every k -> checkpoint
every m} -> final eval -> summary.json.

Resume is exact: the checkpoint holds model, optimizer, scheduler and the TrainState (step, tokens, data
position, RNG), so a run resumed at step k continues with the same batches and the same numbers as an
uninterrupted one. Signals (SIGINT, SIGTERM, SIGUSR1) only set a flag: the loop stops at the next step
boundary (abandoning an evaluation in progress), saves the state after the last completed step and returns
status ``interrupted``; a second signal aborts at once. A non-finite loss or gradient norm stops the run
with status ``diverged`` and keeps the last good checkpoint. The run folder is locked while a run uses it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import data as data_lib
from . import distributed
from .collapse import CollapseWatch
from .config_io import to_container, to_yaml
from .configs import ModelConfig, Parallel, RunConfig, UserError
from .core.convert import check_method_fits, count_parameters
from .core.optim import (
    LayerwiseOptimizer,
    build_optimizer,
    build_scheduler,
    check_layerwise,
    optimizer_state_bytes,
    warmup_steps,
)
from .core.sparse_lowrank import choose_kernels
from .data.tokenizer import build_tokenizer
from .evaluate import evaluate_ppl
from .files import (
    atomic_write,
    is_disk_full,
    json_line,
    read_summary,
    write_overrides,
)
from .methods import get_method
from .runs import (
    autocast_for,
    build_model,
    check_run_dir,
    check_warm_start,
    check_writable,
    disk_full_error,
    open_run_dir,
)
from .signals import Interrupted, StopSignal
from .state import ResumeBundle
from .summary import RunSummary, write_summary
from .tracking import Trackers, flops_per_token, memory_now, peak_flops, peak_memory, run_metadata


# ----------------------------------------------------------------------------------------- pieces
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


class _Metrics:
    """metrics.jsonl: one JSON object per logged step, the same rows to the trackers; on resume, rows past the
    checkpoint are dropped (the ones before it are kept byte for byte)."""

    def __init__(self, path: Path, resume_step: int, enabled: bool, trackers: Optional[Trackers] = None):
        self.path, self.enabled, self.trackers = path, enabled, trackers
        if enabled and path.exists():
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write(path, "".join(r + "\n" for r in rows))

    def log(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json_line(row) + "\n")
            if self.trackers is not None:
                self.trackers.log(row)


# ----------------------------------------------------------------------------------------- train
def train(cfg: RunConfig, run_dir: Path, overrides: Sequence[str] = (), progress=None,
          stop: Optional[StopSignal] = None) -> RunSummary:
    """Train one model as ``cfg`` says, writing everything into ``run_dir``; return the summary.

    ``summary["status"]`` is completed, interrupted (``summary["exit_code"]`` 130 / 143 / 138 by signal),
    diverged (exit code 3) or failed; an identical run that already completed in ``run_dir`` is not trained
    again (its summary comes back with ``skipped`` true). ``progress``: a display factory ``(total, completed) ->
    bar`` (the CLI passes progress.TrainProgress), None for none. ``stop``: signal handlers the caller installed
    before its own work (the CLI does); else this call installs its own for its duration.
    """
    if stop is None:
        with StopSignal() as own:
            return train(cfg, run_dir, overrides, progress, own)
    stop.abort_now()  # until the loop starts, a signal drops the work at once: nothing is worth saving yet
    rt = distributed.init(cfg.train.device)
    # an unset micro-batch is the global batch split over the processes: the resolved config records it
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=cfg.train.micro_batch(
        rt.world_size)))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    tcfg, mcfg = cfg.train, cfg.method
    accum = tcfg.grad_accum_steps(rt.world_size)
    fsdp = tcfg.parallel == Parallel.fsdp and rt.world_size > 1
    if tcfg.layerwise:  # refuse what layer-wise updates cannot honour before any work is done
        check_layerwise(cfg.optim, rt.world_size)
        rt.print("train.layerwise: gradient clipping is off (a global norm needs every gradient at once)")
    method = get_method(mcfg.name)
    if fsdp and not method.fsdp:
        raise UserError(f"train.parallel: fsdp does not support method={method.name}; use train.parallel=ddp")
    check_method_fits(cfg.model, mcfg)
    warm_start = check_warm_start(mcfg.warm_start)

    run_dir = Path(run_dir)
    check_writable(run_dir)
    resume_from, done_before = check_run_dir(cfg, run_dir, rt.print, probe_lock=rt.is_main)
    if done_before is not None:
        rt.print(f"{run_dir} already holds this run, completed (val ppl {done_before.get('val_ppl')}); "
                 "not training it again (train.overwrite=true to retrain)")
        distributed.shutdown(rt)
        return {**done_before, "skipped": True}

    lock = None
    try:
        # data and tokenizer (rank 0 trains/caches the tokenizer first, the others then read the cache); a bad
        # corpus fails here, before the run folder is touched
        with distributed.main_first(rt):
            corpus, cache_root = data_lib.open_corpus(cfg.data), data_lib.cache_root(cfg.tokenizer)
            tokenizer = build_tokenizer(corpus, cfg.tokenizer, cache_root)
            train_stream, val_set = data_lib.build_datasets(corpus, tokenizer, rows_per_step=tcfg.total_batch_size,
                                                            rank=rt.rank, world_size=rt.world_size,
                                                            cache_root=cache_root,
                                                            num_workers=cfg.data.workers(rt.device.type == "cuda"))
            unigram = data_lib.unigram_perplexity(train_stream, val_set)  # reads the start of both splits
        if rt.is_main:
            lock = open_run_dir(run_dir, fresh=resume_from is None)
            atomic_write(run_dir / "config.yaml", to_yaml(cfg))
            write_overrides(run_dir, overrides)
            tokenizer.save(run_dir / "tokenizer")
        distributed.barrier(rt)
        return _train_in(cfg, run_dir, rt, accum, fsdp, resume_from, warm_start, tokenizer, train_stream, val_set,
                         unigram, progress, stop)
    except Interrupted as err:  # before the loop: the run folder keeps what it had (the checkpoint resumed from)
        summary = _stopped_before_training(cfg, run_dir, resume_from, err, rt.world_size)
        if rt.is_main:
            try:
                lock = lock or open_run_dir(run_dir, fresh=resume_from is None)
                if resume_from is not None:  # what the run had reached stays described
                    summary = {**(read_summary(run_dir) or {}), **summary}
                write_summary(run_dir, summary)
            except (OSError, UserError, ValueError) as write_err:  # ValueError: an unreadable summary.json
                print(f"summary.json not written: {write_err}", flush=True)
        return summary
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(run_dir, None, resume_from) from None
        raise
    finally:
        if lock is not None:
            lock.release()
        distributed.shutdown(rt)


def _stopped_before_training(cfg: RunConfig, run_dir: Path, resume_from: Optional[Path], err: Interrupted,
                             world_size: int) -> RunSummary:
    from .checkpoint import step_of

    return {"command": "pretrain", "run": run_dir.name, "run_dir": str(run_dir), "model": cfg.model.name,
            "method": cfg.method.name.value, "world_size": world_size,
            "steps": step_of(resume_from) if resume_from else 0, "status": "interrupted", "exit_code": err.exit_code,
            "signal": err.name, "last_checkpoint": str(resume_from) if resume_from else None,
            "resumed_from_step": step_of(resume_from) if resume_from else None, "val_ppl": None, "val_loss": None,
            "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@dataclasses.dataclass
class _Parts:
    """What the loop trains: the model (and its DDP/FSDP wrapper), optimizer, schedule and their facts."""

    model_cfg: ModelConfig
    model: torch.nn.Module
    wrapped: torch.nn.Module
    optimizer: object
    scheduler: object
    autocast: object
    counts: dict
    kernels: dict


def _build(cfg: RunConfig, rt, fsdp: bool, vocab_size: int, warm_start: Optional[Path]) -> _Parts:
    """Model (seeded init, warm start, method swap), kernels, wrapper, optimizer and schedule."""
    tcfg, mcfg, device = cfg.train, cfg.method, rt.device
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    model = build_model(model_cfg, mcfg, cfg.seed, device, tcfg.precision, warm_start)
    model.activation_checkpointing = tcfg.activation_checkpointing
    if tcfg.compile:  # before DDP/FSDP2 wrap the blocks; compiles lazily, at the first step
        model.compile_blocks()
        rt.print("train.compile: the decoder blocks compile during the first step (tens of seconds)")
    counts = count_parameters(model)
    distributed.check_supports_agree(model, rt)
    # SLTrain layers fix their kernel once, from the micro-batch's token count (the same on resume)
    kernels = choose_kernels(model, tcfg.micro_batch_size * cfg.data.seq_len, tcfg.precision.value, device)
    wrapped = distributed.wrap(model, rt, fsdp)
    if tcfg.layerwise:
        optimizer, scheduler = LayerwiseOptimizer(model, cfg.optim, mcfg, tcfg.steps, rt.world_size), None
    else:
        optimizer = build_optimizer(model, cfg.optim, mcfg)
        scheduler = build_scheduler(optimizer, cfg.optim, mcfg, tcfg.steps)
    return _Parts(model_cfg, model, wrapped, optimizer, scheduler, autocast_for(tcfg.precision, device), counts,
                  kernels)


def _summary_head(cfg: RunConfig, run_dir: Path, rt, parts: _Parts, unigram: Optional[float],
                  resumed_from_step: Optional[int]) -> RunSummary:
    """The summary's facts known before the first step."""
    method, counts, device = get_method(cfg.method.name), parts.counts, rt.device
    return {
        "command": "pretrain", "run": run_dir.name, "run_dir": str(run_dir), "model": cfg.model.name,
        "method": method.name, **{k: getattr(cfg.method, k) if method.uses(k) else None
                                  for k in ("rank", "delta")},  # None where the method does not use it
        "params_total": counts["total"], "params_trainable": counts["trainable"],
        "params_lowrank": counts["lowrank"], "params_sparse": counts["sparse_values"],
        "index_entries": counts["indices"], "vocab_size": parts.model_cfg.vocab_size, "unigram_ppl": unigram,
        "world_size": rt.world_size, "device": str(device), "precision": cfg.train.precision.value,
        "kernels": parts.kernels, **run_metadata(device, rt.world_size),
        "flops_per_token": flops_per_token(parts.model, cfg.data.seq_len),
        "peak_flops": peak_flops(device, cfg.train.peak_flops), "resumed_from_step": resumed_from_step,
        "est_mem_gb": estimated_memory_gb(parts.model_cfg, cfg.method)}


def _train_in(cfg: RunConfig, run_dir: Path, rt, accum: int, fsdp: bool, resume_from: Optional[Path],
              warm_start: Optional[Path], tokenizer, train_stream, val_set, unigram: float, progress,
              stop: StopSignal) -> RunSummary:
    """The loop proper, in a locked run folder."""
    tcfg, mcfg, device, method = cfg.train, cfg.method, rt.device, get_method(cfg.method.name)
    val_batches = val_set.batches(tcfg.eval_tokens, tcfg.micro_batch_size, rank=rt.rank, world_size=rt.world_size)
    parts = _build(cfg, rt, fsdp, tokenizer.vocab_size, warm_start)
    model, wrapped, optimizer, autocast = parts.model, parts.wrapped, parts.optimizer, parts.autocast
    bundle = ResumeBundle(model, optimizer, parts.scheduler, train_stream, to_container(cfg), rt, fsdp)
    if resume_from is not None:
        bundle.load(resume_from)
        rt.print(f"resumed from {resume_from} at step {bundle.state.step}")
    state, start_step = bundle.state, bundle.state.step
    trackers = Trackers(tcfg.loggers, run_dir, to_container(cfg), run_dir.name, enabled=rt.is_main)
    metrics = _Metrics(run_dir / "metrics.jsonl", start_step, rt.is_main, trackers)
    summary = _summary_head(cfg, run_dir, rt, parts, unigram, start_step if resume_from else None)

    def save(step: int) -> None:
        bundle.save(run_dir / "checkpoints", step, tcfg.keep_checkpoints, tcfg.steps)

    tokens_per_step = tcfg.total_batch_size * cfg.data.seq_len
    params = [p for p in model.parameters() if p.requires_grad]
    watch = CollapseWatch(tokenizer.vocab_size, unigram, warmup_steps(cfg.optim, tcfg.steps))
    done, status, val, last_eval, reason, waited_before = start_step, "failed", None, None, None, state.data_wait
    # one process abandons an evaluation at a signal; ranks of a group finish it (its forwards are collective)
    eval_stop = (lambda: stop.requested) if rt.world_size == 1 else None
    bar = distributed.progress_bar(rt, progress, total=tcfg.steps, completed=start_step)
    stop.defer()  # from here a signal stops the loop at the next step boundary, which saves first
    try:
        with bar:
            for step in range(start_step, tcfg.steps):
                t0 = time.perf_counter()
                batch = train_stream.next_batch()
                state.data_wait += time.perf_counter() - t0  # how long the loop waited for its data
                loss_sum, grad_norm = train_step(wrapped, *batch, accum, params, optimizer,
                                                 parts.scheduler, cfg.optim.grad_clip, device, autocast)
                method.after_step(model, optimizer, mcfg, step, tcfg.steps, cfg.seed, device)  # ReLoRA's merge
                state.train_time += time.perf_counter() - t0
                state.tokens += tokens_per_step
                bad = not bool(torch.isfinite(loss_sum)) or (grad_norm is not None and not math.isfinite(grad_norm))
                diverged, stopping = distributed.any_across_ranks([bad, stop.requested], rt)
                if diverged:
                    done, status, reason = step + 1, "diverged", "non-finite loss or gradient norm"
                    break
                done = step + 1
                if done % tcfg.log_every == 0 or done == tcfg.steps:
                    loss_val = distributed.mean_across_ranks(loss_sum, rt)  # the same on every rank
                    lr = optimizer.param_groups[0]["lr"] if not tcfg.layerwise else optimizer.current_lr()
                    row = {"step": done, "tokens": state.tokens, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": state.tokens / max(state.train_time, 1e-9), "elapsed_s": state.train_time,
                           "data_wait_s": state.data_wait - waited_before, **memory_now(device)}
                    metrics.log(row)
                    waited_before = state.data_wait
                    bar.update(done, loss=loss_val, lr=lr, tps=row["tokens_per_s"])
                    reason = watch.logged(done, loss_val)
                    if reason is not None:
                        status = "diverged"
                        break
                else:
                    bar.update(done)
                if tcfg.eval_every and done % tcfg.eval_every == 0 and done < tcfg.steps and not stopping:
                    result = evaluate_ppl(wrapped, val_batches, device, autocast, stop=eval_stop)
                    if result is not None:
                        last_eval = {"step": done, "val_loss": result["loss"], "val_ppl": result["ppl"]}
                        metrics.log({"step": done, "tokens": state.tokens, "val_loss": result["loss"],
                                     "val_ppl": result["ppl"]})
                        bar.note(f"step {done}: val loss {result['loss']:.4f}  ppl {result['ppl']:.2f}")
                saved = False
                if tcfg.save_every and done % tcfg.save_every == 0 and done < tcfg.steps:
                    save(done)
                    saved = True
                if stopping or distributed.any_across_ranks([stop.requested], rt)[0]:
                    if not saved:
                        save(done)
                    status = "interrupted"
                    break
            if status not in ("interrupted", "diverged"):
                save(tcfg.steps)
                if not stop.requested:
                    val = evaluate_ppl(wrapped, val_batches, device, autocast, stop=eval_stop)
                if val is None or stop.requested:  # a signal during the final evaluation: resume re-evaluates
                    val, status = None, "interrupted"
                else:
                    metrics.log({"step": tcfg.steps, "tokens": state.tokens, "val_loss": val["loss"],
                                 "val_ppl": val["ppl"]})
                    reason = watch.final(val["ppl"], unigram)
                    status = "completed" if reason is None else "diverged"
    except Interrupted:  # a second signal: nothing more is saved
        status = "interrupted"
    except OSError as err:
        if is_disk_full(err):  # torch's own wording of it is turned back into OSError (files.atomic_torch_save)
            summary["error"] = "no space left on device"
            raise disk_full_error(run_dir, done, bundle.last_checkpoint) from None
        raise
    finally:
        train_stream.close()
        trackers.close()
        _finish(summary, status, done, val, last_eval, reason, bundle, optimizer, stop, rt, run_dir)
    return summary


def _finish(summary: RunSummary, status: str, done: int, val: Optional[dict], last_eval: Optional[dict],
            reason: Optional[str], bundle: ResumeBundle, optimizer, stop: StopSignal, rt, run_dir: Path) -> None:
    """The summary's outcome (status, steps, perplexity, speed, memory, exit code) and summary.json (rank 0)."""
    state = bundle.state
    peak, peak_kind = peak_memory(rt.device)
    summary.update({"tokens": state.tokens, "steps": done,
                    "val_loss": val["loss"] if val else None, "val_ppl": val["ppl"] if val else None,
                    "val_tokens": val["tokens"] if val else None, "last_eval": last_eval,
                    "tokens_per_s": state.tokens / state.train_time if state.train_time else None,
                    "train_time_s": state.train_time, "data_wait_s": state.data_wait, "peak_mem_bytes": peak,
                    "peak_mem_kind": peak_kind, "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                    "last_checkpoint": str(bundle.last_checkpoint) if bundle.last_checkpoint else None,
                    "status": status, "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    summary["data_wait_share"] = state.data_wait / state.train_time if state.train_time else None
    if summary["tokens_per_s"] and summary["peak_flops"]:  # model FLOPs utilisation, all devices together
        achieved = summary["tokens_per_s"] * summary["flops_per_token"]
        summary["mfu"] = achieved / (summary["peak_flops"] * rt.world_size)
    if stop.requested and status == "completed":  # the signal came after the final evaluation, before
        summary.update({"status": "interrupted", "val_loss": None, "val_ppl": None, "val_tokens": None})
    if summary["status"] == "interrupted":  # summary.json: resume re-evaluates (cheap, exact)
        summary["exit_code"] = stop.exit_code
        summary["signal"] = stop.name
    if summary["status"] == "diverged":
        summary.update({"exit_code": 3, "diverged_step": done, "diverged_reason": reason})
    if rt.is_main:
        try:
            write_summary(run_dir, summary)
        except OSError as err:  # a full disk must not hide the run's real outcome
            print(f"summary.json not written: {err.strerror}", flush=True)
