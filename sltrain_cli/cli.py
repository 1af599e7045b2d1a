"""`sltrain` command line: parse, call one library function per command, print. The only typer import.

Overrides are Hydra syntax (group=option, a.b=value) with short aliases: rank, delta, alpha, lr, steps,
seed. See `sltrain COMMAND --help`.
"""
from __future__ import annotations

import functools
import json
import os
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .configs import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Memory-efficient LLaMA pretraining: SLTrain (sparse + low-rank) and its baselines.\n\n"
                       "Overrides use Hydra syntax, e.g. `sltrain pretrain model=llama_60m method=sltrain rank=64`.")

OVERRIDES_HELP = ("Hydra overrides: group=option (model=llama_60m, method=galore, data=local, optim=adamw8bit, "
                  "experiment=paper_60m) or key=value (train.steps=100, data.path=docs/*.txt). "
                  "Aliases: rank, delta, alpha, lr, steps, seed.")


def _user_errors(fn):
    """User mistakes: one line on stderr, exit code 2, no traceback. Ctrl-C: exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_dir_for(command: str, cfg, overrides) -> Path:
    from .compose import run_name

    name = cfg.run_name or run_name(overrides)
    if cfg.timestamp:
        import time

        name += time.strftime("-%Y%m%d-%H%M%S")
    return Path(cfg.out_dir) / command / name


@app.command(context_settings={"allow_extra_args": False})
@_user_errors
def pretrain(overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
             print_config: bool = typer.Option(False, "--print-config",
                                               help="Print the resolved config and exit: every key with its value "
                                                    "and, as a # comment above it, its meaning, units and allowed "
                                                    "values (the same text as the run's config.yaml)."),
             quiet: bool = typer.Option(False, "--quiet", help="No progress bar.")):
    """Pretrain a model; writes outputs/pretrain/<run>/ (config, metrics, summary, checkpoints).

    Default: a llama_20m-sized SLTrain model on the State of the Union corpus (about 3 min on 2 CPU cores).
    Resume an interrupted run with the same overrides plus train.resume=true.
    Several processes: torchrun --nproc_per_node=N -m sltrain_cli pretrain ...

    Every key, its default and its help: sltrain pretrain --print-config (add overrides to see their effect).
    """
    from .compose import load_config, to_yaml
    from .results import print_record, summary_row, upsert_row
    from .train import train

    overrides = list(overrides or [])
    cfg = load_config(overrides)
    if print_config:
        typer.echo(to_yaml(cfg))
        return
    run_dir = run_dir_for("pretrain", cfg, overrides)
    summary = train(cfg, run_dir, overrides, progress=not quiet)
    if not _is_main():
        return
    row = summary_row(summary)
    upsert_row(run_dir.parent / "results.csv", row)
    print_record(row, title=f"pretrain -> {run_dir}")
    if summary.get("val_ppl") is not None:
        typer.echo(f"validation perplexity {summary['val_ppl']:.2f} on {summary['val_tokens']:,} tokens "
                   f"(unigram baseline of this corpus: {summary['unigram_ppl']:.2f})")
    if summary["status"] == "interrupted":
        typer.echo(f"interrupted at step {summary['steps']}; resume with: sltrain pretrain "
                   f"{' '.join(overrides)} train.resume=true", err=True)
        raise typer.Exit(130)


@app.command("eval-ppl")
@_user_errors
def eval_ppl(run: Path = typer.Argument(..., help="A run folder (its latest checkpoint) or a checkpoint."),
             overrides: Optional[List[str]] = typer.Argument(None, help="e.g. data=local data.path=notes.txt "
                                                                         "train.eval_tokens=100000")):
    """Evaluate a trained model's perplexity on any configured corpus, with the run's own tokenizer.

    Perplexity = exp(total loss over non-pad tokens / their count). Writes RUN_DIR/eval/<data>.json.
    """
    from .evaluate import evaluate_run

    result = evaluate_run(run, list(overrides or []))
    typer.echo(f"{result['data']}: loss {result['val_loss']:.4f}  ppl {result['val_ppl']:.3f}  "
               f"tokens {result['tokens']:,}  -> {result['path']}")


@app.command()
@_user_errors
def sweep(overrides: Optional[List[str]] = typer.Argument(None, help="Overrides; comma lists make a grid: "
                                                                     "rank=64,128 delta=0.01,0.03"),
          dry_run: bool = typer.Option(False, "--dry-run", help="List the trials and exit."),
          name: Optional[str] = typer.Option(None, "--name", help="Sweep folder name (default: from the grid).")):
    """Run a grid of pretrain trials (one fresh process each; finished trials are skipped) and aggregate
    outputs/sweep/<name>/results.csv, results.md and a ppl-vs-params plot."""
    from .sweep import run_sweep

    run_sweep(list(overrides or []), dry_run=dry_run, name=name)


@app.command("ablate-support")
@_user_errors
def ablate_support(overrides: Optional[List[str]] = typer.Argument(None, help="study=seeds|pruning|strategy|"
                                                                             "spectrum plus pretrain overrides; "
                                                                             "pruning needs from=RUN_DIR, "
                                                                             "spectrum runs=DIR1,DIR2")):
    """The paper's support ablations: random-support seeds (Fig. 4), pruning vs training on top/random
    supports (Table 1), support strategies, and singular-value spectra (Figs. 2, 10)."""
    from .ablate import run_study

    run_study(list(overrides or []))


class Fmt(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    md = "md"


@app.command("memory-estimate")
@_user_errors
def memory_estimate(size: str = typer.Option("60m", "--size", help="60m|130m|350m|1b|7b or any conf/model name."),
                    method: str = typer.Option("all", "--method", help="all|full|lowrank|sltrain|sparse|relora|galore"),
                    rank: Optional[int] = typer.Option(None, "--rank", help="Default: the paper's recipe for the size."),
                    delta: Optional[float] = typer.Option(None, "--delta", help="Default: the paper's recipe."),
                    optimizer: str = typer.Option("adam", "--optimizer", help="adam|adam8bit"),
                    layerwise: bool = typer.Option(False, "--layerwise", help="Per-parameter updates: no full gradients."),
                    index_dtype: str = typer.Option("int64", "--index-dtype", help="int64 (paper) | int32"),
                    batch_size: int = typer.Option(1, "--batch-size", help="Sequences, for activations."),
                    seq_len: int = typer.Option(256, "--seq-len"),
                    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing"),
                    measure: bool = typer.Option(False, "--measure", help="Also build the model here, train a few "
                                                                          "steps and report measured peak memory."),
                    device: str = typer.Option("auto", "--device", help="For --measure: auto|cpu|cuda."),
                    fmt: Fmt = typer.Option(Fmt.table, "--format"),
                    out: Optional[Path] = typer.Option(None, "--out", help="Also write the table here "
                                                                           "(.csv, .md or .json).")):
    """Parameter and memory estimate per method: the paper's convention (params + Adam state in bf16,
    int64 indices) beside a fuller one (gradients, 8-bit moments, activations); --measure adds a measurement."""
    from .memory import memory_rows
    from .results import markdown, print_table, to_frame
    from .checkpoint import atomic_write

    rows = memory_rows(size, method, rank=rank, delta=delta, optimizer=optimizer, layerwise=layerwise,
                       index_dtype=index_dtype, batch_size=batch_size, seq_len=seq_len,
                       activation_checkpointing=activation_checkpointing, measure=measure,
                       device=None if device == "auto" else device)
    df = to_frame(rows)
    if out is not None:
        text = {".csv": lambda: df.to_csv(index=False), ".json": lambda: json.dumps(rows, indent=2) + "\n"}.get(
            out.suffix, lambda: markdown(df) + "\n")()
        atomic_write(out, text)
    if fmt == Fmt.json:
        typer.echo(json.dumps(rows, indent=2))
    elif fmt == Fmt.csv:
        typer.echo(df.to_csv(index=False), nl=False)
    elif fmt == Fmt.md:
        typer.echo(markdown(df))
    else:
        print_table([_memory_display(r) for r in rows],
                    title=f"LLaMA {size}: paper convention (bf16 params + Adam moments, int64 indices) | "
                          f"ours: + gradients, {optimizer}{', layer-wise' if layerwise else ''}, activations "
                          f"(batch {batch_size} x {seq_len})")


def _memory_display(row: dict) -> dict:
    """A narrow view of one memory_rows() row for the terminal (all fields stay in csv/json/md)."""
    out = {"method": row["method"], "rank": row.get("rank"), "delta": row.get("delta"),
           "params M": round(row["params_total"] / 1e6, 2), "trainable M": round(row["params_trainable"] / 1e6, 2),
           "param GB": row["param_mem_gb"], "optim GB": row["optimizer_mem_gb"], "paper GB": row["total_mem_gb"],
           "grads GB": row.get("full_grad_mem_gb"), "activ GB": row.get("activation_mem_gb"),
           "ours GB": row.get("full_total_gb")}
    if "measured_gb" in row:
        out.update({"measured GB": row["measured_gb"], "measured/ours": row.get("ratio")})
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def main() -> None:
    app()


if __name__ == "__main__":
    main()
