"""`sltrain ablate-support study=pruning`: Table 1 of the paper, on a trained full-rank run.

    sltrain ablate-support study=pruning from=outputs/pretrain/RUN rank=32

For every target weight W0 of the run, L0 = its best rank-r approximation (SVD, r = method.rank) and R = W0 - L0.
Pruned: L0 + R kept on the top-delta |R| entries, or on a random delta support, materialized into a copy of the
model and evaluated on the run's validation rows. Trained: each target becomes a SparseLowRankLinear with B, A
fixed to the SVD factors (requires_grad False), its values started at R on the support (the pruned point) and
only those values trained for train.steps with the core optimizer and schedule on the run's training stream (a
short loop here: train() has no hook to freeze the low-rank part). Reported: perplexity and
||W0 - W||_F / ||W0||_F averaged over the target weights; plots of the trained loss curves and of the residual's
distribution.

This module also reads the target weights of a trained run (``target_modules``, ``dense_of``, ``svd_split``);
the strategy and spectrum studies in ablate.py reuse those.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from rich.console import Console

from . import data as data_lib
from .compose import drop_keys, load_config, split_override
from .configs import ConfigError, Precision
from .core.optim import build_optimizer, build_scheduler
from .core.sparse_lowrank import SparseLowRankLinear, sample_support
from .distributed import resolve_device
from .evaluate import evaluate_ppl
from .files import read_overrides
from .methods import all_methods, get_method
from .results import frame, plot_lines, print_table, write_table
from .runs import LoadedRun, autocast_for, load_run
from .train import train_step

RUN_KEYS = ("out_dir", "run_name", "timestamp", "train.resume", "method.warm_start")  # a run's, not the study's


# ----------------------------------------------------------------------------------------- trained runs and weights
def target_modules(model: torch.nn.Module, names: Sequence[str], layer: Optional[int] = None):
    """[(qualified name, module)] of the target linear layers (attribute name in ``names``), in model order."""
    out = []
    for qual, module in model.named_modules():
        if qual.rsplit(".", 1)[-1] not in names:
            continue
        if not (hasattr(module, "dense_weight") or isinstance(getattr(module, "weight", None), torch.Tensor)):
            continue
        if layer is not None and f"layers.{layer}." not in f"{qual}.":
            continue
        out.append((qual, module))
    return out


@torch.no_grad()
def dense_of(module: torch.nn.Module) -> torch.Tensor:
    w = module.dense_weight() if hasattr(module, "dense_weight") else module.weight
    return w.detach().float().cpu()


def svd_split(w: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r sqrt(S_r), sqrt(S_r) Vh_r, residual W - L0) with L0 = the best rank-r approximation of W."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    left, right = u[:, :r] * root, root[:, None] * vh[:r]
    return left.float(), right.float(), (w.double() - left @ right).float()


# ----------------------------------------------------------------------------------------- pruning
def _pruning_config(run: LoadedRun, rest: Sequence[str]):
    """The run's own overrides (data, model, train settings) with the user's on top."""
    saved = read_overrides(run.run_dir)
    user_keys = [split_override(o)[0].lstrip("+~") for o in rest if "=" in o]
    saved = drop_keys(saved, [*RUN_KEYS, *user_keys])
    return load_config([*saved, *rest])


@dataclasses.dataclass
class _Target:
    """One target weight of the pruning study: W0 = left @ right (= L0) + residual."""

    w0: torch.Tensor
    left: torch.Tensor  # U_r sqrt(S_r)
    right: torch.Tensor  # sqrt(S_r) Vh_r
    residual: torch.Tensor
    supports: Dict[str, torch.Tensor]  # "top" / "random" -> flat positions

    def pruned(self, kind: Optional[str]) -> torch.Tensor:
        """L0, plus the residual on the ``kind`` support."""
        w = self.left @ self.right
        if kind is not None:
            idx = self.supports[kind]
            w.view(-1)[idx] += self.residual.reshape(-1)[idx]
        return w


def study_pruning(own, rest, folder: Path, console: Console) -> List[dict]:
    run = load_run(own["from"][-1], key="from", precision=Precision.fp32)
    if not get_method(run.cfg.method.name).dense_weights:
        dense = ", ".join(f"method={m.name}" for m in all_methods() if m.dense_weights)
        raise ConfigError("from", f"study=pruning needs a run with dense weights ({dense}); {run.run_dir} is "
                                  f"method={run.cfg.method.name.value}")
    cfg = _pruning_config(run, rest)
    rank, delta = cfg.method.rank, cfg.method.delta
    if rank < 1 or delta <= 0:
        raise ConfigError("method.rank", f"study=pruning needs rank >= 1 and delta > 0, got rank={rank}, delta={delta}")
    modules = target_modules(run.model, cfg.method.target_modules)
    smallest = min(min(dense_of(m).shape) for _, m in modules)
    if rank >= smallest:  # L0 would be W0 itself: every row of the table would equal full rank
        raise ConfigError("method.rank", f"study=pruning needs a rank below the smallest side {smallest} of the "
                                         f"target weights of {run.run_dir.name}, got {rank} (set rank=...)")
    gen = torch.Generator().manual_seed(cfg.method.support_seed)
    targets = {}
    for qual, module in modules:
        w0 = dense_of(module)
        left, right, res = svd_split(w0, rank)
        supports = {"top": sample_support(*w0.shape, delta, "top", reference=res),
                    "random": sample_support(*w0.shape, delta, "random", gen)}
        targets[qual] = _Target(w0, left, right, res, supports)

    device = resolve_device(cfg.train.device)
    autocast = autocast_for(cfg.train.precision, device)
    _, val_set = data_lib.build_datasets(data_lib.open_corpus(run.cfg.data), run.tokenizer,
                                         rows_per_step=cfg.train.total_batch_size,
                                         cache_root=data_lib.cache_root(run.cfg.tokenizer))
    val_batches = val_set.batches(cfg.train.eval_tokens, cfg.train.micro_batch())

    def evaluate(model: torch.nn.Module, label: str) -> dict:
        model.to(device)
        val = evaluate_ppl(model, val_batches, device, autocast)
        model.to("cpu")
        errors = [float(torch.linalg.norm(t.w0 - dense_of(model.get_submodule(q))) / torch.linalg.norm(t.w0))
                  for q, t in targets.items()]
        return {"weights": label, "val_ppl": val["ppl"], "val_loss": val["loss"],
                "rel_error": sum(errors) / len(errors)}

    rows = []
    for label, kind in (("Full-rank", "full"), ("L0 (low-rank)", None), (f"L0 + top-{delta:g} pruned", "top"),
                        (f"L0 + random-{delta:g} pruned", "random")):
        console.print(f"pruning: evaluating {label}", highlight=False)
        model = copy.deepcopy(run.model)
        with torch.no_grad():
            for qual, t in targets.items():
                model.get_submodule(qual).weight.copy_(t.w0 if kind == "full" else t.pruned(kind))
        rows.append(evaluate(model, label))

    curves = {}
    for kind in ("top", "random"):
        label = f"L0 + {kind}-{delta:g} trained"
        console.print(f"pruning: training the sparse values on the {kind} support ({cfg.train.steps} steps)",
                      highlight=False)
        model = _fixed_lowrank_model(run.model, targets, kind, delta, cfg.method.alpha)
        curves[label] = _train_values(model, cfg, run, device, autocast)
        rows.append(evaluate(model, label))

    plot_lines(curves, folder / "trained_loss.png", xlabel="step", ylabel="training loss", marker=".",
               title=f"L0 fixed (rank {rank}), sparse values trained")
    res_abs = torch.cat([t.residual.abs().flatten() for t in targets.values()]).sort().values
    pick = torch.linspace(0, res_abs.numel() - 1, min(2000, res_abs.numel())).long()
    plot_lines({f"|W0 - L0| entries (rank {rank})": (res_abs[pick].tolist(),
                                                      ((pick + 1).double() / res_abs.numel()).tolist())},
               folder / "residual_cdf.png", xlabel="|residual entry|", ylabel="fraction of entries <= x",
               title="residual after removing the top-r subspace (cf. Fig. 2)")
    write_table(frame(rows), folder / "results")
    print_table(frame(rows), title=f"Table 1: rank {rank}, delta {delta:g}, {run.run_dir.name}", console=console)
    q97 = float(res_abs[int(0.97 * (res_abs.numel() - 1))])
    console.print(f"97% of the residual entries |W0 - L0| are below {q97:.4f} "
                  f"(max {float(res_abs[-1]):.4f})", highlight=False)
    return rows


def _fixed_lowrank_model(base: torch.nn.Module, targets: Dict[str, _Target], kind: str, delta: float,
                         alpha: float) -> torch.nn.Module:
    """A copy of ``base`` whose targets are SparseLowRankLinear with (alpha/r) B A = L0 frozen and the values on
    the ``kind`` support started at the residual there; only those values are trainable."""
    model = copy.deepcopy(base)
    for qual, t in targets.items():
        out_f, in_f = t.w0.shape
        r = t.left.shape[1]
        layer = SparseLowRankLinear(in_f, out_f, rank=r, delta=delta, alpha=alpha, bias=False, support_seed=0)
        scale = math.sqrt(alpha / r)  # dense_weight() = (alpha / r) B A + S
        idx = t.supports[kind]
        with torch.no_grad():
            layer.B.copy_(t.left / scale)
            layer.A.copy_(t.right / scale)
        layer.set_support(idx, t.residual.reshape(-1)[idx].clone())
        parent, name = qual.rsplit(".", 1)
        setattr(model.get_submodule(parent), name, layer)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".values"))
    return model


def _train_values(model, cfg, run: LoadedRun, device, autocast) -> Tuple[List[int], List[float]]:
    """train.steps of train.train_step (core optimizer + schedule) on the run's training stream, updating only the
    trainable (sparse value) parameters; returns the loss curve."""
    torch.manual_seed(cfg.seed)
    stream, _ = data_lib.build_datasets(data_lib.open_corpus(run.cfg.data), run.tokenizer,
                                        rows_per_step=cfg.train.total_batch_size,
                                        cache_root=data_lib.cache_root(run.cfg.tokenizer))
    method = dataclasses.replace(cfg.method, name="sltrain")  # the study's subject: SLTrain's L0 + pruned S form
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.optim, method)
    scheduler = build_scheduler(optimizer, cfg.optim, method, cfg.train.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    accum = cfg.train.grad_accum_steps(1)
    steps, losses = [], []
    for step in range(cfg.train.steps):
        loss, _ = train_step(model, *stream.next_batch(), accum, params, optimizer, scheduler,
                             cfg.optim.grad_clip, device, autocast)
        steps.append(step + 1)
        losses.append(float(loss))
    model.eval().to("cpu")
    return steps, losses
