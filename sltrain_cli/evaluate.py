"""Validation loss and perplexity.

Perplexity = exp(total next-token loss over all non-pad target tokens / their count). This is the exact
corpus perplexity. The reference scripts (GaLore's, reused by SLTrain) average per-batch mean losses and
divide by N+1 batches, which reads slightly low; we do not.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_ppl(model: torch.nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device | str = "cpu",
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 stop: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """Sum the loss over every non-pad target token of ``batches`` (all ranks when distributed), computed by the
    model's own chunked loss (the one training minimises).

    Returns {"loss": mean loss per token, "ppl": exp(loss), "tokens": number of target tokens}, or None when
    ``stop()`` turned true before the last batch (an interrupted run abandons its evaluation).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    for input_ids, labels in batches:
        if stop is not None and stop():
            model.train(was_training)
            return None
        input_ids, labels = input_ids.to(device), labels.to(device)
        count = (labels[:, 1:] != -100).sum()
        with autocast():  # the training loss itself: chunked over the vocabulary, never the (tokens, V) logits
            mean = model(input_ids, labels=labels).loss
        if count:
            total[0] += mean.double() * count
            total[1] += count
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train(was_training)
    tokens = int(total[1].item())
    mean = total[0].item() / max(tokens, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": tokens}


def evaluate_run(run: Path | str, overrides: Sequence[str] = ()) -> dict:
    """`sltrain eval-ppl`: load a run's checkpoint and tokenizer, evaluate on the configured corpus
    (the run's own unless overrides say otherwise) and write RUN_DIR/eval/<data>.json."""
    from . import data as data_lib
    from .checkpoint import checkpoint_name
    from .compose import load_config
    from .distributed import resolve_device
    from .files import read_overrides, write_json
    from .runs import autocast_for, load_run

    run = load_run(run)
    eval_cfg = load_config([*read_overrides(run.run_dir), *overrides])  # the run's data settings unless overridden
    stored, tokenizer, ckpt, run_dir = run.cfg, run.tokenizer, run.checkpoint, run.run_dir
    device = resolve_device(eval_cfg.train.device)
    model = run.model.to(device)
    # a local corpus the run did not train on is evaluated whole; otherwise the run's validation split
    data, trained_on = eval_cfg.data, stored.data
    corpus = data_lib.open_corpus(data)
    whole = corpus.whole_when_foreign and not corpus.streaming and (trained_on.name, trained_on.path) != (
        data.name, data.path)
    if whole:
        val_set = data_lib.build_whole_corpus_set(corpus, tokenizer)
    else:
        _, val_set = data_lib.build_datasets(corpus, tokenizer, rows_per_step=eval_cfg.train.total_batch_size,
                                             cache_root=data_lib.cache_root(eval_cfg.tokenizer))
    # a corpus the run never saw is scored whole; the run's own validation split within train.eval_tokens
    batches = val_set.batches(None if whole else eval_cfg.train.eval_tokens, eval_cfg.train.micro_batch())
    result = evaluate_ppl(model, batches, device, autocast_for(stored.train.precision, device))
    data_name = eval_cfg.data.name.value
    if eval_cfg.data.path:
        data_name += "_" + re.sub(r"[^A-Za-z0-9._-]", "_", Path(eval_cfg.data.path.split(",")[0]).stem)
    out = {"data": data_name, "data_path": eval_cfg.data.path, "split": "all" if whole else "validation",
           "val_loss": result["loss"], "val_ppl": result["ppl"],
           "tokens": result["tokens"], "checkpoint": str(ckpt), "step": run.step}
    # an earlier checkpoint (chosen, or fallen back to past a damaged newer one) gets its own file
    path = run_dir / "eval" / (f"{data_name}.json" if run.newest else f"{data_name}-{checkpoint_name(run.step)}.json")
    write_json(path, out)
    return {**out, "path": str(path)}
