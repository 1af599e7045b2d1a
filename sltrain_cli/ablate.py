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
- pruning (ablate_pruning.py, with the helpers that load a trained run and split its weights): each target
  weight of a trained full-rank run is W0 = L0 (its best rank r) + R; L0 plus R on the top or a random delta
  support, pruned and with only those values trained; perplexity and relative weight error.
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

import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from rich.console import Console

from .ablate_pruning import dense_of, study_pruning, svd_split, target_modules
from .checkpoint import latest_checkpoint
from .compose import drop_keys, find_override, load_config, quote, run_name, split_override
from .configs import ConfigError, Precision, SupportKind, UserError
from .core.model import LlamaForCausalLM
from .files import atomic_torch_save
from .methods import all_methods, get_method
from .results import frame, make_console, plot_lines, print_table, write_table
from .runs import load_run
from .sweep import Trial, out_root, run_trials, validate_trials

STUDIES = ("seeds", "pruning", "strategy", "spectrum")
OWN_KEYS = {"seeds": ("n",), "pruning": ("from",), "strategy": ("warmup",), "spectrum": ("runs", "layer")}
ALL_OWN = ("study", "n", "from", "runs", "warmup", "layer")
SUPPORTS = tuple(kind.value for kind in SupportKind)  # random first (the paper's), top last (needs a warm-up)


# ----------------------------------------------------------------------------------------- arguments
def split_args(overrides: Sequence[str]) -> Tuple[str, Dict[str, List[str]], List[str]]:
    """(study, the study's own keys -> values (a key may repeat), the remaining pretrain overrides)."""
    own: Dict[str, List[str]] = {}
    rest = []
    for o in overrides:
        key, value = split_override(o) if "=" in o else (None, None)
        if key in ALL_OWN:
            own.setdefault(key, []).append(value)
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
    console = console or make_console()
    study, own, rest = split_args(list(overrides))
    if study in ("pruning", "spectrum"):
        need = {"pruning": "from", "spectrum": "runs"}[study]
        if need not in own:
            what = "a trained full-rank run folder" if need == "from" else "RUN_DIR1,RUN_DIR2,..."
            raise ConfigError(need, f"is required for study={study} ({what})")
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
    if not get_method(cfg.method.name).has_support:
        with_support = ", ".join(m.name for m in all_methods() if m.has_support)
        raise ConfigError("method", f"study={study} varies the sparse support: use a method that has one "
                                    f"({with_support}), got {cfg.method.name.value}")


# ----------------------------------------------------------------------------------------- seeds
CURVE_POINTS = 50  # logged points per trial when the user did not set train.log_every


def _with_log_cadence(overrides: List[str]) -> List[str]:
    """Trial overrides that log often enough for the study's loss curves to be curves."""
    if find_override(overrides, "train.log_every") is not None:
        return overrides
    steps = load_config(overrides).train.steps
    return [*overrides, f"train.log_every={max(1, steps // CURVE_POINTS)}"]


def study_seeds(own, rest, folder: Path, console: Console) -> List[dict]:
    n = _int_arg(own, "n", 5, 1)
    _need_sparse(load_config(rest), "seeds")
    base = _with_log_cadence(drop_keys(rest, ["out_dir", "method.support_seed"]))
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


# ----------------------------------------------------------------------------------------- strategy
def study_strategy(own, rest, folder: Path, console: Console) -> List[dict]:
    cfg = load_config(rest)
    _need_sparse(cfg, "strategy")
    warmup = _int_arg(own, "warmup", max(1, cfg.train.steps // 4), 1)
    base = _with_log_cadence(drop_keys(rest, ["out_dir", "method.support", "method.warm_start"]))
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
             "steps": (r.summary or {}).get("steps"),
             "extra_full_rank_steps": warmup if r.trial.swept["support"] == "top" else 0,
             "status": r.status, "error": r.error} for r in results]
    _write(rows, folder, f"support strategies ({folder.name})", console)
    return rows


def build_top_init(warm_ckpt: Path, cfg, path: Path) -> None:
    """A full-model checkpoint for the top-support trial: the seed's fresh initialization, with each target
    weight replaced by the residual of the warm-up weight after its rank-r SVD (what top support ranks)."""
    warm = load_run(warm_ckpt, precision=Precision.fp32).model  # the full-rank warm-up run
    model_cfg = dataclasses.replace(cfg.model, vocab_size=warm.config.vocab_size)
    torch.manual_seed(cfg.seed)  # the same init build_model gives every other variant
    fresh = LlamaForCausalLM(model_cfg)
    with torch.no_grad():
        for qual, module in target_modules(fresh, cfg.method.target_modules):
            _, _, res = svd_split(dense_of(warm.get_submodule(qual)), cfg.method.rank)
            module.weight.copy_(res)
    atomic_torch_save(path, {"model": fresh.state_dict()})


# ----------------------------------------------------------------------------------------- spectrum
def study_spectrum(own, rest, folder: Path, console: Console) -> List[dict]:
    paths = [p for value in own["runs"] for p in split_paths(value)]
    layer = _int_arg(own, "layer", None, 0)
    explicit_rank = find_override(rest, "rank")
    r_fixed = int(explicit_rank) if explicit_rank is not None else None
    runs = [load_run(p, key="runs", precision=Precision.fp32) for p in paths]
    if r_fixed is None:
        lowrank = [x.cfg.method.rank for x in runs
                   if get_method(x.cfg.method.name).uses("rank") and x.cfg.method.rank > 0]
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
                     "rank": run.cfg.method.rank if get_method(run.cfg.method.name).uses("rank") else None,
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
    return get_method(method.name).describe(method)
