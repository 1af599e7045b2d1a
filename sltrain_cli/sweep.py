"""`sltrain sweep`: a grid of pretrain trials, one fresh process each, resumable, aggregated into one table.

    sltrain sweep model=llama_20m rank=64,128 delta=0.01,0.03,0.1 steps=500

Comma lists on any key (aliases included) make the cartesian product of trials. Every trial is validated
(``load_config``) before the first one starts, so a bad value anywhere fails at once (exit 2) and leaves no
folder behind. Each trial then runs as

    python -m sltrain_cli pretrain <trial overrides> out_dir=<sweep dir> run_name=<trial> --quiet

in its own process (memory, RNG and torch state cannot leak from one trial into the next). A trial whose
``summary.json`` says ``completed`` for the same overrides is skipped, so an interrupted sweep is resumed by
running the same command again; a trial interrupted by a signal (SIGINT / SIGTERM reaching the sweep are
forwarded to it) is resumed from its checkpoint by that rerun. A failing trial is recorded (status ``failed``,
the last line of its stderr as ``error``) and the sweep carries on. Exit code: 0 when every trial completed,
1 when one failed, 128 + signal number (130, 143) when interrupted.

Layout of ``<out_dir>/sweep/<name>/`` (name: derived from the grid, or ``--name``):
``sweep.json`` (the grid), ``pretrain/<trial>/`` (ordinary run folders), ``logs/<trial>.log`` (stdout and
stderr of each trial), ``results.csv`` / ``results.md`` (one row per trial), ``ppl_vs_params.png`` and
``ppl_vs_memory.png``.

``ablate-support`` runs its trained variants through the same ``run_trials``.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rich.console import Console

from .checkpoint import latest_checkpoint
from .compose import (
    drop_keys,
    expand_grid,
    find_override,
    load_config,
    override_key,
    parse_value,
    quote,
    run_name,
    split_override,
)
from .configs import ConfigError
from .files import read_overrides, read_summary, write_json
from .results import frame, make_console
from .summary import RunSummary

# Keys a sweep sets itself for every trial.
RESERVED = ("run_name", "timestamp", "train.resume", "train.overwrite")
# Columns of results.csv after the swept keys.
RESULT_COLUMNS = ["params_total", "params_trainable", "val_ppl", "tokens", "tokens_per_s", "peak_mem_gb",
                  "est_mem_gb", "status", "error"]


@dataclass
class Trial:
    """One pretrain run of a sweep or an ablation."""

    name: str  # folder name under <root>/pretrain/
    overrides: List[str]  # the user's overrides for this trial (no out_dir / run_name)
    swept: Dict[str, Any] = field(default_factory=dict)  # swept key -> value, for the table

    def argv(self, root: Path) -> List[str]:
        """The pretrain overrides, with the sweep's folder and the trial's name (quoted for Hydra's grammar:
        names hold '=' and ',')."""
        return [*self.overrides, f"out_dir={quote(str(root))}", f"run_name={quote(self.name)}"]

    def run_dir(self, root: Path) -> Path:
        return Path(root) / "pretrain" / self.name


@dataclass
class TrialResult:
    trial: Trial
    status: str  # completed | failed | interrupted
    summary: Optional[RunSummary]
    error: Optional[str] = None
    skipped: bool = False
    seconds: float = 0.0
    exit_code: int = 0  # the trial process's


# ----------------------------------------------------------------------------------------- planning
def plan_trials(overrides: Sequence[str]) -> tuple[List[Trial], List[str]]:
    """Expand the grid; return the trials and the swept keys (as the user wrote them, in order)."""
    for o in overrides:
        if "=" in o and override_key(o) in RESERVED:
            raise ConfigError(override_key(o), "is set by the sweep for every trial; name the sweep with --name")
        if "=" in o and override_key(o) == "out_dir" and len(expand_grid([o])) > 1:
            raise ConfigError("out_dir", "cannot be swept (it is the root of the sweep folder)")
    user = drop_keys(overrides, ["out_dir"])
    swept_idx = [i for i, o in enumerate(user) if len(expand_grid([o])) > 1]
    swept_keys = [split_override(user[i])[0].lstrip("+~") for i in swept_idx]
    trials, seen = [], set()
    for combo in expand_grid(user):
        swept_ovs = [combo[i] for i in swept_idx]
        name = run_name(swept_ovs) if swept_ovs else "base"
        if name in seen:  # rank=64,64 -> one trial
            continue
        seen.add(name)
        swept = {k: parse_value(split_override(o)[1]) for k, o in zip(swept_keys, swept_ovs)}
        trials.append(Trial(name=name, overrides=list(combo), swept=swept))
    return trials, swept_keys


def sweep_name(overrides: Sequence[str]) -> str:
    """Deterministic folder name from the grid: ['rank=64,128', 'model=tiny'] -> 'rank=64+128,model=tiny'."""
    parts = []
    for o in drop_keys(overrides, ["out_dir", *RESERVED]):
        key, value = split_override(o)
        parts.append(f"{key}={value.replace(',', '+')}")
    return run_name(parts)


def out_root(overrides: Sequence[str]) -> Path:
    """out_dir=... from the overrides, else the config's default ('outputs')."""
    value = find_override(overrides, "out_dir")
    if value is not None:
        return Path(value.strip().strip("'\""))
    return Path(load_config([o for o in overrides if len(expand_grid([o])) == 1]).out_dir)


def validate_trials(trials: Sequence[Trial], root: Path) -> None:
    """Compose and check every trial's config; the first bad one raises ConfigError (nothing has run yet)."""
    for trial in trials:
        try:
            load_config(trial.argv(root))
        except ConfigError as err:
            if len(trials) > 1:
                raise ConfigError(err.key, f"{str(err).split(': ', 1)[-1]} (trial {trial.name})") from None
            raise


# ----------------------------------------------------------------------------------------- running
def _trial_state(trial: Trial, root: Path) -> tuple[str, Optional[RunSummary]]:
    """(new | completed | interrupted | stale, summary) of the trial's folder: completed and interrupted only
    for the same overrides; stale is anything else an earlier sweep left there (it is overwritten)."""
    run_dir = trial.run_dir(root)
    if not run_dir.is_dir():
        return "new", None
    try:
        summary, saved = read_summary(run_dir), read_overrides(run_dir)
    except (OSError, ValueError):
        return "stale", None
    same = sorted(drop_keys(saved, ["train.resume", "train.overwrite"])) == sorted(trial.argv(root))
    status = (summary or {}).get("status")
    if same and status == "completed":
        return "completed", summary
    if same and (status == "interrupted" or (summary is None and latest_checkpoint(run_dir / "checkpoints"))):
        return "interrupted", summary
    return "stale", summary


def completed_summary(trial: Trial, root: Path) -> Optional[RunSummary]:
    """The trial's summary when it already completed with these same overrides, else None."""
    state, summary = _trial_state(trial, root)
    return summary if state == "completed" else None


def run_trial(trial: Trial, root: Path) -> TrialResult:
    """Run one trial as a fresh `python -m sltrain_cli pretrain` process (resuming it when an earlier sweep was
    interrupted in it); its output goes to logs/<trial>.log. SIGINT / SIGTERM received meanwhile are forwarded
    to the trial, which saves its state and stops; the result then has status interrupted."""
    root = Path(root)
    log = root / "logs" / f"{trial.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    state, _ = _trial_state(trial, root)
    extra = {"interrupted": ["train.resume=true"], "stale": ["train.overwrite=true"]}.get(state, [])
    cmd = [sys.executable, "-m", "sltrain_cli", "pretrain", *trial.argv(root), *extra, "--quiet"]
    t0 = time.perf_counter()
    received: List[int] = []
    with log.open("a" if state == "interrupted" else "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        # its own session: a Ctrl-C in the terminal reaches the trial once, through us, not twice
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, start_new_session=True)

        def forward(signum, frame):
            received.append(signum)
            proc.send_signal(signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            _, err = proc.communicate()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        out.write("--- stderr ---\n" + (err or ""))
    seconds = time.perf_counter() - t0
    summary = read_summary(trial.run_dir(root))
    if summary is not None and summary.get("run") != trial.name:
        summary = None  # not this run's (should not happen: the folder is the trial's own)
    lines = [line.strip() for line in (err or "").splitlines() if line.strip()]
    if proc.returncode == 0 and summary is not None and summary.get("status") == "completed":
        return TrialResult(trial, "completed", summary, seconds=seconds)
    status = "interrupted" if received or (summary or {}).get("status") == "interrupted" else "failed"
    error = lines[-1] if lines else (f"exit code {proc.returncode}" if proc.returncode else "no completed summary.json")
    code = 128 + received[0] if received else proc.returncode
    return TrialResult(trial, status, summary, error=error, seconds=seconds, exit_code=code)


def run_trials(trials: Sequence[Trial], root: Path, console: Optional[Console] = None,
               label: str = "trial") -> List[TrialResult]:
    """Run (or skip, when already completed) every trial in order, printing one progress line per trial."""
    console = console or make_console()
    results = []
    for i, trial in enumerate(trials, 1):
        head = f"{label} {i}/{len(trials)}: {trial.name}"
        done = completed_summary(trial, root)
        if done is not None:
            results.append(TrialResult(trial, "completed", done, skipped=True))
            console.print(f"{head} ... skipped (completed earlier, ppl {_ppl(done)})", highlight=False)
            continue
        if console.is_terminal:  # a spinner while it runs; in a log, a start line
            with console.status(f"{head} ..."):
                result = run_trial(trial, root)
        else:
            console.print(f"{head} ...", highlight=False)
            result = run_trial(trial, root)
        results.append(result)
        if result.status == "interrupted":
            console.print(f"{head} ... [yellow]interrupted[/yellow] ({result.seconds:.0f} s); run the same command "
                          "again to resume it", highlight=False)
            break
        if result.status == "completed":
            console.print(f"{head} ... completed ppl {_ppl(result.summary)} ({result.seconds:.0f} s)",
                          highlight=False)
        else:
            console.print(f"{head} ... [red]{result.status}[/red] ({result.seconds:.0f} s): {result.error}",
                          highlight=False)
    return results


def _ppl(summary: Optional[RunSummary]) -> str:
    ppl = (summary or {}).get("val_ppl")
    return "-" if ppl is None else f"{ppl:.1f}"


# ----------------------------------------------------------------------------------------- aggregation
def result_row(result: TrialResult, swept_keys: Sequence[str] = ()) -> dict:
    s = result.summary or {}
    peak = s.get("peak_mem_bytes")
    row = {"trial": result.trial.name, **{k: result.trial.swept.get(k) for k in swept_keys}, "method": s.get("method")}
    row.update({"params_total": s.get("params_total"), "params_trainable": s.get("params_trainable"),
                "val_ppl": s.get("val_ppl"), "tokens": s.get("tokens"), "tokens_per_s": s.get("tokens_per_s"),
                "peak_mem_gb": round(peak / 1e9, 4) if peak else None, "est_mem_gb": s.get("est_mem_gb"),
                "status": result.status, "error": result.error, "exit_code": result.exit_code})
    return row


def plot_sweep(rows: Sequence[dict], folder: Path) -> List[Path]:
    """ppl_vs_params.png and ppl_vs_memory.png from the completed rows (coloured by method, labelled by trial)."""
    from .results import plot_scatter

    done = [r for r in rows if r["status"] == "completed" and r["val_ppl"] is not None]
    paths = []
    for x_key, scale, xlabel, stem in (
            ("params_total", 1e6, "parameters (millions)", "ppl_vs_params"),
            ("est_mem_gb", 1.0, "estimated memory (GB, params + Adam, bf16)", "ppl_vs_memory")):
        points = [(float(r[x_key]) / scale, float(r["val_ppl"]), r["trial"], r.get("method") or "?")
                  for r in done if r[x_key] is not None]
        paths.append(plot_scatter(points, folder / f"{stem}.png", xlabel=xlabel, ylabel="validation perplexity",
                                  title=f"sweep {folder.name}" if points else "no completed trials"))
    return paths


def run_sweep(overrides: Sequence[str], dry_run: bool = False, name: Optional[str] = None,
              console: Optional[Console] = None) -> List[dict]:
    """Plan, validate, run (skipping finished trials), aggregate and plot; return the result rows."""
    from .results import print_table, write_table

    console = console or make_console()
    overrides = list(overrides)
    trials, swept_keys = plan_trials(overrides)
    if name is not None and (not name or "/" in name or name in (".", "..")):
        raise ConfigError("--name", f"must be a plain folder name, got {name!r}")
    folder = out_root(overrides) / "sweep" / (name or sweep_name(overrides))
    validate_trials(trials, folder)  # everything checked before anything runs or is created
    if dry_run:
        print_table([{"#": i, "trial": t.name, "overrides": " ".join(t.overrides),
                      "state": "completed" if completed_summary(t, folder) else "to run"}
                     for i, t in enumerate(trials, 1)],
                    title=f"sweep {folder} ({len(trials)} trials, dry run)", console=console)
        return []
    write_json(folder / "sweep.json", {"overrides": overrides, "swept": swept_keys,
                                       "trials": [{"name": t.name, "overrides": t.overrides} for t in trials]})
    console.print(f"sweep {folder}: {len(trials)} trials", highlight=False)
    results: List[TrialResult] = []
    try:
        results = run_trials(trials, folder, console)
    finally:  # an interrupted sweep still leaves the table of what finished
        if not results:
            results = [TrialResult(t, "completed", s, skipped=True) for t in trials
                       if (s := completed_summary(t, folder)) is not None]
        rows = [result_row(r, swept_keys) for r in results]
        if rows:
            write_table(frame(rows), folder / "results", columns=["trial", *swept_keys, *RESULT_COLUMNS])
            plot_sweep(rows, folder)
    show = ["trial", *swept_keys, *RESULT_COLUMNS[:-1]]
    print_table(frame(rows), title=f"sweep {folder}", columns=show, console=console)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "failed", "interrupted")}
    skipped = sum(r.skipped for r in results)
    left = len(trials) - len(rows)
    console.print(f"{counts['completed']} completed ({skipped} skipped as already done), {counts['failed']} failed"
                  + (f", {counts['interrupted']} interrupted, {left} not started" if counts["interrupted"] else "")
                  + f" -> {folder / 'results.csv'}, {folder / 'ppl_vs_params.png'}", highlight=False)
    return rows
