"""`sltrain ablate-support`: does the choice of the sparse support matter? (the paper's Table 1, Figs. 2, 4, 10)

    sltrain ablate-support study=seeds n=5 model=llama_20m steps=500       # Fig. 4: random supports, 5 seeds
    sltrain ablate-support study=pruning from=outputs/pretrain/RUN rank=32  # Table 1 on a trained full-rank run
    sltrain ablate-support study=strategy model=llama_20m steps=500        # random vs row_balanced/block/top
    sltrain ablate-support study=spectrum runs=RUN_A,RUN_B                  # Figs. 2/10: singular values

Each study writes ``<out_dir>/ablate/<study>-<name>/`` (name from the arguments) with a table (CSV + Markdown,
printed) and PNG(s). The study's own keys (study, n, from, runs, warmup, layer) are taken out; the rest are
ordinary pretrain overrides. Trained variants (seeds, strategy) are ordinary pretrain trials run by the sweep's
``run_trials`` (one fresh process each, skipped when already completed) under ``<folder>/pretrain/``.

- seeds: one config, ``method.support_seed = 0..n-1`` (default n=5); every loss curve on one plot; final
  perplexity per seed with mean and standard deviation.
- pruning: for every target weight W0 of a trained full-rank run, L0 = its best rank-r approximation (SVD,
  r = method.rank) and R = W0 - L0. Pruned: L0 + R kept on the top-delta |R| entries, or on a random delta
  support, materialized into a copy of the model and evaluated on the run's validation rows. Trained: each
  target becomes a SparseLowRankLinear with B, A fixed to the SVD factors (requires_grad False), its values
  started at R on the support (the pruned point) and only those values trained for train.steps with the core
  optimizer and schedule on the run's training stream (a short loop here: train() has no hook to freeze the
  low-rank part). Reported: perplexity and ||W0 - W||_F / ||W0||_F averaged over the target weights.
- strategy: SLTrain with support=random against row_balanced, block and top, all with the same steps. top:
  a full-rank warm-up of ``warmup`` steps (default train.steps // 4, at least 1) is trained first; the top
  support of each target weight is the top-delta entries of |W - SVD_r(W)| of its warm-up weight (the
  residual SLTrain's sparse part has to carry, as in Table 1). Only the support comes from the warm-up:
  every variant starts from the same fresh initialization (``model_init.pt``, the seed's init with the target
  weights replaced by those residuals, passed as ``method.warm_start`` so that core's top support picks them).
- spectrum: singular values of every target weight (``dense_weight()`` for SLTrain / low-rank / ReLoRA,
  ``weight`` for dense layers) of each run's latest checkpoint; one log-y plot of s_i / s_1 (averaged over the
  layers, or ``layer=i``) and a table: effective rank (exp of the entropy of s / sum s), stable rank
  (||W||_F^2 / ||W||_2^2) and the fraction of spectral energy in the top r (r = rank=..., else the first
  low-rank run's rank).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from rich.console import Console

from . import data as data_lib
from .checkpoint import (atomic_write, latest_checkpoint, load_checkpoint, load_model_weights, resolve_checkpoint,
                         run_dir_of)
from .compose import from_container, load_config, run_name
from .configs import ConfigError, MethodName, UserError
from .core.model import LlamaForCausalLM
from .core.optim import build_optimizer, build_scheduler
from .core.sparse_lowrank import SparseLowRankLinear, sample_support
from .distributed import resolve_device
from .evaluate import evaluate_ppl
from .results import plot_lines, print_table, write_table
from .sweep import Trial, drop_keys, find_override, frame, out_root, quote, run_trials, validate_trials
from .train import autocast_for, build_model

STUDIES = ("seeds", "pruning", "strategy", "spectrum")
OWN_KEYS = {"seeds": ("n",), "pruning": ("from",), "strategy": ("warmup",), "spectrum": ("runs", "layer")}
ALL_OWN = ("study", "n", "from", "runs", "warmup", "layer")
SUPPORTS = ("random", "row_balanced", "block", "top")
RUN_KEYS = ("out_dir", "run_name", "timestamp", "train.resume", "method.warm_start")


# ----------------------------------------------------------------------------------------- arguments
def split_args(overrides: Sequence[str]) -> Tuple[str, Dict[str, List[str]], List[str]]:
    """(study, the study's own keys -> values (a key may repeat), the remaining pretrain overrides)."""
    own: Dict[str, List[str]] = {}
    rest = []
    for o in overrides:
        key = o.split("=", 1)[0].strip() if "=" in o else None
        if key in ALL_OWN:
            own.setdefault(key, []).append(o.split("=", 1)[1])
        else:
            rest.append(o)
    study = (own.pop("study", [None]))[-1]
    if study not in STUDIES:
        raise ConfigError("study", f"must be one of {', '.join(STUDIES)}, got {study!r}")
    for key in own:
        if key not in OWN_KEYS[study]:
            owner = next(s for s, keys in OWN_KEYS.items() if key in keys)
            raise ConfigError(key, f"belongs to study={owner}, not study={study}")
    return study, own, rest


def _int_arg(own: Dict[str, List[str]], key: str, default: Optional[int], minimum: int) -> Optional[int]:
    if key not in own:
        return default
    try:
        value = int(own[key][-1])
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}, got {own[key][-1]!r}")
    return value


def split_paths(value: str, key: str = "runs") -> List[Path]:
    """'DIR1,DIR2' -> paths; run folder names hold commas, so take the longest existing path each time."""
    parts, out, i = value.split(","), [], 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            if Path(",".join(parts[i:j])).exists():
                out.append(Path(",".join(parts[i:j])))
                i = j
                break
        else:
            raise ConfigError(key, f"no run folder or checkpoint at {parts[i]!r}")
    return out


def study_folder(study: str, own: Dict[str, List[str]], rest: Sequence[str]) -> Path:
    parts = []
    for key, values in own.items():
        shown = ("+".join(p.name for v in values for p in split_paths(v, key)) if key in ("from", "runs")
                 else values[-1])
        parts.append(f"{key}={shown}")
    return out_root(rest) / "ablate" / f"{study}-{run_name([*parts, *drop_keys(rest, ['out_dir'])])}"


def run_study(overrides: Sequence[str], console: Optional[Console] = None) -> List[dict]:
    """Parse, run the chosen study, write its table and plots; return the table rows."""
    console = console or Console()
    study, own, rest = split_args(list(overrides))
    if study in ("pruning", "spectrum"):
        need = {"pruning": "from", "spectrum": "runs"}[study]
        if need not in own:
            raise ConfigError(need, f"is required for study={study} "
                                    f"({'a trained full-rank run folder' if need == 'from' else 'RUN_DIR1,RUN_DIR2,...'})")
    cfg = load_config(rest)  # the pretrain overrides are checked before anything runs
    if cfg.train.num_threads:  # for the work done in this process (pruning, spectrum), as train() does
        torch.set_num_threads(cfg.train.num_threads)
    folder = study_folder(study, own, rest)
    fn = {"seeds": study_seeds, "pruning": study_pruning, "strategy": study_strategy, "spectrum": study_spectrum}
    rows = fn[study](own, rest, folder, console)
    console.print(f"-> {folder}", highlight=False)
    return rows


def _write(rows: List[dict], folder: Path, title: str, console: Console, columns=None) -> None:
    write_table(frame(rows), folder / "results", columns=columns)
    print_table(frame(rows), title=title, columns=columns, console=console)


def loss_curve(run_dir: Path) -> Tuple[List[int], List[float]]:
    """(steps, training losses) from a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [r for r in rows if r.get("loss") is not None]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _final_loss(run_dir: Path) -> Optional[float]:
    _, losses = loss_curve(run_dir)
    return losses[-1] if losses else None


def _need_sparse(cfg, study: str) -> None:
    if cfg.method.name not in (MethodName.sltrain, MethodName.sparse):
        raise ConfigError("method", f"study={study} varies the sparse support: use method=sltrain or method=sparse, "
                                    f"got {cfg.method.name.value}")


# ----------------------------------------------------------------------------------------- seeds
def study_seeds(own, rest, folder: Path, console: Console) -> List[dict]:
    n = _int_arg(own, "n", 5, 1)
    _need_sparse(load_config(rest), "seeds")
    base = drop_keys(rest, ["out_dir", "method.support_seed"])
    trials = [Trial(f"support_seed={i}", [*base, f"method.support_seed={i}"], {"support_seed": i}) for i in range(n)]
    validate_trials(trials, folder)
    results = run_trials(trials, folder, console, label="seed")
    curves = {f"support seed {r.trial.swept['support_seed']}": loss_curve(r.trial.run_dir(folder)) for r in results}
    plot_lines(curves, folder / "loss_curves.png", xlabel="step", ylabel="training loss", marker=".",
               title=f"random support, {n} seeds")
    rows = [{"support_seed": r.trial.swept["support_seed"], "val_ppl": (r.summary or {}).get("val_ppl"),
             "val_loss": (r.summary or {}).get("val_loss"), "final_train_loss": _final_loss(r.trial.run_dir(folder)),
             "status": r.status} for r in results]
    done = [r for r in rows if r["val_ppl"] is not None]
    for label, fn in (("mean", _mean), ("std", _std)):
        rows.append({"support_seed": label, **{k: fn([r[k] for r in done if r[k] is not None])
                                               for k in ("val_ppl", "val_loss", "final_train_loss")},
                     "status": f"{len(done)}/{n} completed" if label == "mean" else None})
    _write(rows, folder, f"support seeds ({folder.name})", console)
    if done:
        mean, std = rows[-2]["val_ppl"], rows[-1]["val_ppl"]
        console.print(f"validation perplexity over {len(done)} support seeds: {mean:.2f} ± {std:.2f} "
                      f"({100 * std / mean:.2f}% of the mean)", highlight=False)
    return rows


def _mean(xs: List[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _std(xs: List[float]) -> Optional[float]:
    """Sample standard deviation (0 for one value)."""
    if not xs:
        return None
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------------------- loading runs
@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: Path
    cfg: object  # the run's RunConfig
    tokenizer: object
    model: torch.nn.Module  # fp32, on CPU, the run's method applied, weights loaded


def load_run(path: Path | str, key: str = "from") -> LoadedRun:
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise ConfigError(key, str(err)) from None
    run_dir = run_dir_of(ckpt)
    cfg = from_container(load_checkpoint(ckpt / "extra.pt" if ckpt.is_dir() else ckpt)["config"])
    tokenizer = data_lib.load_tokenizer(run_dir / "tokenizer")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    model = build_model(model_cfg, dataclasses.replace(cfg.method, warm_start=None), cfg.seed, torch.device("cpu"))
    load_model_weights(ckpt, model)
    model.eval()
    return LoadedRun(run_dir, ckpt, cfg, tokenizer, model)


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
    saved_path = run.run_dir / "overrides.txt"
    saved = [s for s in saved_path.read_text().splitlines() if s.strip()] if saved_path.is_file() else []
    user_keys = [o.split("=", 1)[0].strip().lstrip("+~") for o in rest if "=" in o]
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
    run = load_run(own["from"][-1])
    if run.cfg.method.name != MethodName.full:
        raise ConfigError("from", f"study=pruning needs a full-rank run (method=full); {run.run_dir} is "
                                  f"method={run.cfg.method.name.value}")
    cfg = _pruning_config(run, rest)
    rank, delta = cfg.method.rank, cfg.method.delta
    if rank < 1 or delta <= 0:
        raise ConfigError("method.rank", f"study=pruning needs rank >= 1 and delta > 0, got rank={rank}, delta={delta}")
    gen = torch.Generator().manual_seed(cfg.method.support_seed)
    targets = {}
    for qual, module in target_modules(run.model, cfg.method.target_modules):
        w0 = dense_of(module)
        left, right, res = svd_split(w0, rank)
        supports = {"top": sample_support(*w0.shape, delta, "top", reference=res),
                    "random": sample_support(*w0.shape, delta, "random", gen)}
        targets[qual] = _Target(w0, left, right, res, supports)
    if any(rank >= min(t.w0.shape) for t in targets.values()):
        console.print(f"[yellow]warning:[/yellow] rank={rank} >= a target's smaller side: L0 is exact there",
                      highlight=False)

    device = resolve_device(cfg.train.device)
    autocast = autocast_for(cfg.train.precision, device)
    _, val_set = data_lib.build_datasets(run.cfg.data, run.tokenizer, rows_per_step=cfg.train.total_batch_size)
    val_batches = val_set.batches(cfg.train.eval_tokens, cfg.train.micro_batch_size)

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
    _write(rows, folder, f"Table 1: rank {rank}, delta {delta:g}, {run.run_dir.name}", console)
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
    """train.steps of the core optimizer + schedule on the run's training stream, updating only the
    trainable (sparse value) parameters; returns the loss curve."""
    torch.manual_seed(cfg.seed)
    stream, _ = data_lib.build_datasets(run.cfg.data, run.tokenizer, rows_per_step=cfg.train.total_batch_size)
    method = dataclasses.replace(cfg.method, name=MethodName.sltrain)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.optim, method)
    scheduler = build_scheduler(optimizer, cfg.optim, method, cfg.train.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    accum = cfg.train.grad_accum_steps(1)
    steps, losses = [], []
    for step in range(cfg.train.steps):
        input_ids, labels = stream.next_batch()
        total = 0.0
        for x, y in zip(input_ids.chunk(accum), labels.chunk(accum)):
            with autocast():
                loss = model(x.to(device), labels=y.to(device)).loss / accum
            loss.backward()
            total += float(loss.detach())
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(step + 1)
        losses.append(total)
    model.eval().to("cpu")
    return steps, losses


# ----------------------------------------------------------------------------------------- strategy
def study_strategy(own, rest, folder: Path, console: Console) -> List[dict]:
    cfg = load_config(rest)
    _need_sparse(cfg, "strategy")
    warmup = _int_arg(own, "warmup", max(1, cfg.train.steps // 4), 1)
    base = drop_keys(rest, ["out_dir", "method.support", "method.warm_start"])
    warm = Trial("warmup=full", [*drop_keys(base, ["method", "train.steps"]), "method=full",
                                 f"train.steps={warmup}"], {})
    init_path = folder / "model_init.pt"
    trials = [Trial(f"support={k}", [*base, f"method.support={k}"], {"support": k}) for k in SUPPORTS[:3]]
    trials.append(Trial("support=top", [*base, "method.support=top",
                                        f"method.warm_start={quote(str(init_path))}"], {"support": "top"}))
    validate_trials([warm, *trials], folder)
    warm_result = run_trials([warm], folder, console, label="warm-up")[0]
    if warm_result.status != "completed":
        raise UserError(f"study=strategy: the full-rank warm-up failed: {warm_result.error}")
    build_top_init(latest_checkpoint(warm.run_dir(folder) / "checkpoints"), load_config(trials[-1].argv(folder)),
                   init_path)
    results = run_trials(trials, folder, console, label="support")
    curves = {r.trial.swept["support"]: loss_curve(r.trial.run_dir(folder)) for r in results}
    plot_lines(curves, folder / "loss_curves.png", xlabel="step", ylabel="training loss", marker=".",
               title=f"SLTrain supports (top from a {warmup}-step full-rank warm-up)")
    rows = [{"support": r.trial.swept["support"], "val_ppl": (r.summary or {}).get("val_ppl"),
             "val_loss": (r.summary or {}).get("val_loss"), "final_train_loss": _final_loss(r.trial.run_dir(folder)),
             "params_trainable": (r.summary or {}).get("params_trainable"),
             "steps": (r.summary or {}).get("steps"), "extra_full_rank_steps": warmup if r.trial.swept["support"] == "top" else 0,
             "status": r.status, "error": r.error} for r in results]
    _write(rows, folder, f"support strategies ({folder.name})", console)
    return rows


def build_top_init(warm_ckpt: Path, cfg, path: Path) -> None:
    """A full-model checkpoint for the top-support trial: the seed's fresh initialization, with each target
    weight replaced by the residual of the warm-up weight after its rank-r SVD (what top support ranks)."""
    tokenizer = data_lib.load_tokenizer(warm_ckpt.parent.parent / "tokenizer")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    warm = LlamaForCausalLM(model_cfg)
    load_model_weights(warm_ckpt, warm)
    torch.manual_seed(cfg.seed)  # the same init build_model gives every other variant
    fresh = LlamaForCausalLM(model_cfg)
    with torch.no_grad():
        for qual, module in target_modules(fresh, cfg.method.target_modules):
            _, _, res = svd_split(dense_of(warm.get_submodule(qual)), cfg.method.rank)
            module.weight.copy_(res)
    buf = io.BytesIO()
    torch.save({"model": fresh.state_dict()}, buf)
    atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------------------- spectrum
def study_spectrum(own, rest, folder: Path, console: Console) -> List[dict]:
    paths = [p for value in own["runs"] for p in split_paths(value)]
    layer = _int_arg(own, "layer", None, 0)
    explicit_rank = find_override(rest, "rank")
    r_fixed = int(explicit_rank) if explicit_rank is not None else None
    runs = [load_run(p, key="runs") for p in paths]
    if r_fixed is None:
        lowrank = [x.cfg.method.rank for x in runs if x.cfg.method.name != MethodName.full and x.cfg.method.rank > 0]
        r_fixed = lowrank[0] if lowrank else None
    series, rows = {}, []
    for run in runs:
        mods = target_modules(run.model, run.cfg.method.target_modules, layer)
        if not mods:
            raise ConfigError("layer", f"no target weights in layer {layer} of {run.run_dir}")
        spectra = [torch.linalg.svdvals(dense_of(m).double()) for _, m in mods]
        k = min(s.numel() for s in spectra)
        r = min(r_fixed if r_fixed is not None else max(1, k // 4), k)
        normalized = torch.stack([s[:k] / s[0] for s in spectra]).mean(0)
        label = f"{len(rows) + 1}: {_describe(run.cfg.method)}"  # the table names the run in full
        series[label] = (list(range(1, k + 1)), normalized.tolist())
        eff = [math.exp(float(-(p * p.clamp_min(1e-300).log()).sum())) for p in (s / s.sum() for s in spectra)]
        rows.append({"#": len(rows) + 1, "run": run.run_dir.name, "method": run.cfg.method.name.value,
                     "rank": run.cfg.method.rank if run.cfg.method.name != MethodName.full else None,
                     "matrices": len(spectra), "min_side": k, "eff_rank": _mean(eff), "eff_rank_frac": _mean(eff) / k,
                     "stable_rank": _mean([float((s ** 2).sum() / s[0] ** 2) for s in spectra]),
                     "r": r, "energy_top_r": _mean([float((s[:r] ** 2).sum() / (s ** 2).sum()) for s in spectra])})
    where = f"layer {layer}" if layer is not None else "mean over layers"
    plot_lines(series, folder / "spectrum.png", xlabel="index i", ylabel="s_i / s_1", logy=True,
               title=f"singular values of the target weights ({where})")
    _write(rows, folder, f"spectra ({where})", console)
    return rows


def _describe(method) -> str:
    """'sltrain r=8 delta=0.1' / 'lowrank r=64' / 'full'."""
    name = method.name.value
    if method.name in (MethodName.full,):
        return name
    if method.name in (MethodName.sltrain, MethodName.sparse):
        rank = f" r={method.rank}" if method.name == MethodName.sltrain else ""
        return f"{name}{rank} delta={method.delta:g} ({method.support.value} support)"
    return f"{name} r={method.rank}"
