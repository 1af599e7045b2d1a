"""The Typer app of `sltrain` and what every command shares: the root options, user errors as one line with exit
code 2, --threads. cli.py and cli_infer.py register the commands on it."""
from __future__ import annotations

import functools
from typing import Optional

import typer

from .configs import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"sltrain {version('sltrain')}")
        except PackageNotFoundError:
            typer.echo("sltrain (not installed: no package metadata)")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Memory-efficient LLaMA pretraining: SLTrain (sparse + low-rank) and its baselines.

    Overrides use Hydra syntax: sltrain pretrain model=llama_60m method=sltrain rank=64
    The config groups and their options: sltrain list
    """


def _user_errors(fn):
    """User mistakes: one line on stderr, exit code 2, no traceback. A signal (SIGINT, SIGTERM, SIGUSR1): one line,
    exit 128 + its number; every command drops its work at once (pretrain and sweep install their own handlers,
    which save first). A full disk anywhere: one line, exit 2 (what was written before stays whole: every write is
    atomic)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .signals import Interrupted, StopSignal

        try:
            with StopSignal():  # abort phase: a signal raises Interrupted here instead of killing the process
                return fn(*args, **kwargs)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as err:
            typer.echo(f"interrupted ({err})", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as err:
            from .files import is_disk_full

            if not is_disk_full(err):
                raise
            typer.echo(f"error: no space left on the device of {err.filename or 'the output'}; free some space "
                       "and run the command again", err=True)
            raise typer.Exit(2) from None

    return wrapper


THREADS_HELP = "CPU threads for torch (like train.num_threads); default: torch's (all cores)."


def set_threads(threads: Optional[int]) -> None:
    """--threads: torch's intra-op threads (a shared machine: fewer threads is often faster)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads: must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
