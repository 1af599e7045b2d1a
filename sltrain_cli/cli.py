"""`sltrain` command line: parse, call one library function per command, print. With cli_app.py (the app, its
error handling) and cli_infer.py (the commands that use a trained model) the only typer imports.

Overrides are Hydra syntax (group=option, a.b=value) with short aliases: rank, delta, alpha, lr, steps,
seed. See `sltrain COMMAND --help`.
"""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from .cli_app import THREADS_HELP, _user_errors, app, set_threads

OVERRIDES_HELP = ("Hydra overrides: group=option (model=llama_60m) or key=value (train.steps=100, "
                  "data.path=docs/*.txt). Aliases: rank, delta, alpha, lr, steps, seed.")


class GroupsHelp(TyperCommand):
    """A command whose help holds ``{groups}`` (every config group) or ``{groups:data}`` (one group): the option
    names are read from conf/ when the help is shown, not at import."""

    def format_help(self, ctx, formatter):
        import re

        from .catalog import groups_text

        if self.help:
            self.help = re.sub(r"\{groups(?::(\w+))?\}",
                               lambda m: groups_text([m.group(1)] if m.group(1) else None), self.help)
        return super().format_help(ctx, formatter)


def run_dir_for(command: str, cfg, overrides) -> Path:
    from .compose import run_name

    name = cfg.run_name or run_name(overrides)
    if cfg.timestamp:
        import time

        name += time.strftime("-%Y%m%d-%H%M%S")
    return Path(cfg.out_dir) / command / name


@app.command(cls=GroupsHelp, context_settings={"allow_extra_args": False})
@_user_errors
def pretrain(overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
             print_config: bool = typer.Option(False, "--print-config",
                                               help="Print the resolved config and exit: every key, its value "
                                                    "and its help as a # comment (as in the run's config.yaml)."),
             quiet: bool = typer.Option(False, "--quiet", help="No progress bar.")):
    """Pretrain a model; writes outputs/pretrain/<run>/.

    The run folder holds config.yaml, metrics.jsonl, summary.json, checkpoints/.
    Default: a llama_20m-sized SLTrain model on the State of the Union corpus
    (about 3 min on 2 CPU cores).
    Resume an interrupted run: the same overrides plus train.resume=true.
    Several processes: torchrun --nproc_per_node=N -m sltrain_cli pretrain ...

    {groups}

    Every key, its default and its help: sltrain pretrain --print-config
    (add overrides to see their effect; keys the method ignores are marked).
    """
    from .signals import StopSignal

    with StopSignal() as stop:  # from the first moment to the last: a signal never kills the run unannounced
        _pretrain(list(overrides or []), print_config, quiet, stop)


def _pretrain(overrides: List[str], print_config: bool, quiet: bool, stop) -> None:
    from .compose import load_config
    from .config_io import to_yaml

    cfg = load_config(overrides)
    if print_config:
        typer.echo(to_yaml(cfg))
        return
    from .catalog import outcome_lines, summary_view, without_unused  # the run's imports (torch) only from here
    from .progress import TrainProgress
    from .results import plot_run, print_record, upsert_row
    from .signals import survive_closed_stdout
    from .summary import summary_row
    from .train import train

    run_dir = run_dir_for("pretrain", cfg, overrides)
    survive_closed_stdout()
    summary = train(cfg, run_dir, overrides, progress=None if quiet else TrainProgress, stop=stop)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun's other ranks: rank 0 reports
        raise typer.Exit(_exit_code(summary))
    if summary.get("command"):  # a completed run skipped as already done still gets (or keeps) its row
        upsert_row(run_dir.parent / "results.csv", without_unused(summary_row(summary)))
    if not summary.get("skipped"):
        plot_run(run_dir, summary)
    print_record(summary_view(summary), title=f"pretrain -> {run_dir}")
    result, warning = outcome_lines(summary, overrides)
    if result:
        typer.echo(result)
    if warning:
        typer.echo(warning, err=True)
    elif stop.requested:  # the signal came after summary.json was written: the run itself is complete
        typer.echo(f"stopped by {stop.name} after the run completed (its files are written)", err=True)
        raise typer.Exit(stop.exit_code)
    code = _exit_code(summary)
    if code:
        raise typer.Exit(code)


def _exit_code(summary: dict) -> int:
    """0 completed (or skipped), 3 diverged, 128 + signal interrupted."""
    return {"interrupted": summary.get("exit_code", 130), "diverged": 3}.get(summary["status"], 0)


@app.command("eval-ppl", cls=GroupsHelp)
@_user_errors
def eval_ppl(run: Path = typer.Argument(..., help="A run folder (its latest checkpoint) or a checkpoint."),
             overrides: Optional[List[str]] = typer.Argument(None, help="e.g. data=local data.path=notes.txt "
                                                                         "train.eval_tokens=100000"),
             threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP)):
    """Evaluate a trained model's perplexity with the run's own tokenizer.

    Perplexity = exp(total loss over non-pad tokens / their count).
    Writes RUN_DIR/eval/<data>.json. Overrides pick the corpus and the budget.

    {groups:data}
    """
    from .evaluate import evaluate_run

    set_threads(threads)
    result = evaluate_run(run, list(overrides or []))
    typer.echo(f"{result['data']} at step {result['step']}: loss {result['val_loss']:.4f}  ppl "
               f"{result['val_ppl']:.3f}  tokens {result['tokens']:,}  -> {result['path']}")


@app.command(cls=GroupsHelp)
@_user_errors
def sweep(overrides: Optional[List[str]] = typer.Argument(None, help="Overrides; comma lists make a grid: "
                                                                     "rank=64,128 delta=0.01,0.03"),
          dry_run: bool = typer.Option(False, "--dry-run", help="List the trials and exit."),
          name: Optional[str] = typer.Option(None, "--name", help="Sweep folder name (default: from the grid).")):
    """Run a grid of pretrain trials and aggregate their results.

    One fresh process per trial; finished trials are skipped. Writes
    outputs/sweep/<name>/results.csv, results.md and a ppl-vs-params plot.
    Ctrl-C / SIGTERM stop the running trial at a step boundary (it saves a
    checkpoint); the same command again resumes it.
    Exit code: 0 all trials completed, 1 a trial failed, 130 / 143 interrupted.

    {groups}
    """
    from .sweep import run_sweep

    rows = run_sweep(list(overrides or []), dry_run=dry_run, name=name)
    interrupted = [r.get("exit_code") or 130 for r in rows if r["status"] == "interrupted"]
    if interrupted:
        raise typer.Exit(interrupted[0])
    if any(r["status"] == "failed" for r in rows):
        raise typer.Exit(1)


@app.command("ablate-support", cls=GroupsHelp)
@_user_errors
def ablate_support(overrides: Optional[List[str]] = typer.Argument(None, help="study=... and its keys (below), "
                                                                             "then pretrain overrides.")):
    """The paper's support ablations (Table 1, Figs. 2, 4, 10).

    Study keys (the other arguments are pretrain overrides):
      study=seeds     random supports, method.support_seed = 0..n-1 (Fig. 4)
        n=N           how many seeds (default 5)
      study=pruning   a trained full-rank run's weights W0 = L0 (best rank r) + R,
                      R pruned to a top or a random delta support (Table 1)
        from=RUN_DIR  that run (method=full); rank= and delta= size L0 and R
      study=strategy  SLTrain with support=random vs row_balanced, block, top
        warmup=N      full-rank warm-up steps that pick the top support
                      (default train.steps // 4, at least 1)
      study=spectrum  singular values of trained target weights (Figs. 2, 10)
        runs=A,B      run folders or checkpoints, comma separated
        layer=I       one decoder layer (default: the mean over all layers)
        rank=R        r of the top-r energy (default: the first low-rank run's)
    Writes <out_dir>/ablate/<study>-<name>/: a table (CSV, Markdown) and plots.

    {groups}
    """
    from .ablate import run_study

    run_study(list(overrides or []))


Fmt = Enum("Fmt", {name: name for name in ("table", "csv", "json", "md")}, type=str)  # --format


@app.command("memory-estimate", cls=GroupsHelp)
@_user_errors
def memory_estimate(size: str = typer.Option("60m", "--size", help="60m, 130m, 350m, 1b, 7b or a model option "
                                                                   "(below)."),
                    method: str = typer.Option("all", "--method", help="all or one method: sltrain list "
                                                                       "methods."),
                    rank: Optional[int] = typer.Option(None, "--rank", help="Default: the paper's recipe for "
                                                                            "the size."),
                    delta: Optional[float] = typer.Option(None, "--delta", help="Default: the paper's recipe."),
                    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | adamw8bit (the optim= "
                                                                            "options)"),
                    layerwise: bool = typer.Option(False, "--layerwise", help="Per-parameter updates: no full "
                                                                              "gradients."),
                    index_dtype: str = typer.Option("int64", "--index-dtype", help="int64 (paper) | int32"),
                    batch_size: int = typer.Option(1, "--batch-size", help="Sequences, for activations."),
                    seq_len: int = typer.Option(256, "--seq-len"),
                    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing",
                                                                  help="Recompute each block in backward."),
                    measure: bool = typer.Option(False, "--measure", help="Also build the model here, train a few "
                                                                          "steps and report measured peak memory."),
                    device: str = typer.Option("auto", "--device", help="For --measure: auto | cpu | cuda."),
                    fmt: Fmt = typer.Option(Fmt.table, "--format", metavar="FORMAT",
                                            help="table | csv | json | md"),
                    out: Optional[Path] = typer.Option(None, "--out", help="Also write the table here "
                                                                           "(.csv, .md or .json).")):
    """Parameters and memory per method, in GB (1 GB = 1e9 bytes).

    paper GB: the paper's convention, bf16 parameters + Adam moments (int64
    indices). ours GB: also gradients, 8-bit moments and activations.
    --measure trains a few steps here and adds the measured peak.

    {groups:model}
    """
    from .catalog import memory_view
    from .measure import memory_rows
    from .results import show_rows

    rows = memory_rows(size, method, rank=rank, delta=delta, optimizer=optimizer, layerwise=layerwise,
                       index_dtype=index_dtype, batch_size=batch_size, seq_len=seq_len,
                       activation_checkpointing=activation_checkpointing, measure=measure,
                       device=None if device == "auto" else device)
    show_rows(rows, fmt.value, out, view=memory_view,
              title=f"LLaMA {size}: paper convention (bf16 params + Adam moments, int64 indices) | ours: + "
                    f"gradients, {optimizer}{', layer-wise' if layerwise else ''}, activations (batch {batch_size} x "
                    f"{seq_len})")



@app.command("list")
@_user_errors
def list_configs(group: Optional[str] = typer.Argument(None, help="models | methods | data | optim | train | "
                                                                  "experiments; all when omitted.")):
    """List the config options of each group and what sets them apart.

    One row per option: its name, the first line of its YAML's comment and its
    key values (- where the option does not use a key). Use an option as
    group=option, e.g. sltrain pretrain model=llama_60m method=galore.
    """
    from .catalog import GROUP_NAMES, group_rows, resolve_group
    from .results import print_table

    names = [group] if group else list(GROUP_NAMES)
    for name in names:
        resolve_group(name)  # a wrong name fails before anything is printed
    for name in names:
        print_table(group_rows(name), title=f"{resolve_group(name)}=OPTION")


@app.command("compare")
@_user_errors
def compare(runs: List[Path] = typer.Argument(..., help="Run folders, sweep / study folders (their trials) or "
                                                        "folders of runs."),
            best_by: Optional[str] = typer.Option(None, "--best-by", help="Keep, for each value of this "
                                                                          "summary key (e.g. method), its run "
                                                                          "with the lowest val ppl."),
            out: Optional[Path] = typer.Option(None, "--out", help="The PNG to write (a .csv / .md table "
                                                                   "beside it). Default: outputs/compare/"
                                                                   "compare.png.")):
    """Put several runs side by side: one table, one picture.

    The table has each run's method, parameters, memory estimate, tokens/s
    and val ppl; the PNG draws their training loss and validation perplexity
    against tokens. --best-by method is the fair table of a paper: for each
    method, its best run over whatever else was swept (e.g. the lr), and
    which value won.
    """
    from .results import compare_runs

    _, path = compare_runs(runs, out=out, key=best_by)
    typer.echo(f"-> {path}")


from . import cli_infer  # noqa: E402,F401 - registers export, generate, bench-infer on app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
