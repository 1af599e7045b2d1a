"""The commands that use a trained model (export, generate) or measure inference (bench-infer); registered on
cli_app.app, with its error handling (cli.py imports this module)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .cli_app import THREADS_HELP, _user_errors, app, set_threads
from .configs import UserError

KERNEL_HELP = ("SLTrain / sparse layers: auto (per phase, the cost model), compose, factored, or dense (W built "
               "once at load and kept: a dense layer's memory, its speed).")
RUN_HELP = ("A run folder (its latest checkpoint), a checkpoint file (RUN_DIR/checkpoints/step_NNNNNN.pt) "
            "or a sharded (FSDP) checkpoint folder.")


@app.command("export")
@_user_errors
def export(run: Path = typer.Argument(..., help=RUN_HELP),
           out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (replaced if it holds an "
                                                                  "earlier export). Default: RUN_DIR/export for the "
                                                                  "latest checkpoint, RUN_DIR/export-step_NNNNNN for "
                                                                  "an earlier one."),
           dtype: str = typer.Option("fp32", "--dtype", help="Weight dtype in model.safetensors: fp32 (exact) or "
                                                             "bf16 (half the size).")):
    """Write a Hugging Face LlamaForCausalLM folder from a run.

    The folder holds config.json, model.safetensors, the tokenizer, README.md.
    The method's layers are multiplied out into dense weights (SLTrain:
    (alpha/r) B A + S), so transformers loads it without sltrain:
    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR).
    """
    from .export import export_command

    path, loaded, notes = export_command(run, out, dtype)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"exported step {loaded.step} ({loaded.checkpoint.name}) -> {path}  "
               f"(AutoModelForCausalLM.from_pretrained({str(path)!r}))")


def read_prompts(prompts: Optional[List[str]], prompts_file: Optional[Path]) -> List[str]:
    """--prompt (repeatable) and --prompts-file (one prompt per line) -> the prompts, in that order."""
    out = list(prompts or [])
    if prompts_file is not None:
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeError) as err:
            why = getattr(err, 'strerror', None) or err
            raise UserError(f"--prompts-file: cannot read {prompts_file}: {why}") from None
        if not any(line.strip() for line in lines):
            raise UserError(f"--prompts-file: {prompts_file} holds no prompt (one per line)")
        out += [line for line in lines if line.strip()]
    if not out:
        raise UserError("--prompt: give a prompt (--prompt TEXT, repeatable; \"\" starts a new document) or "
                        "--prompts-file FILE")
    return out


@app.command("generate")
@_user_errors
def generate(run: Path = typer.Argument(..., help=RUN_HELP),
             prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="Text to continue (\"\" starts a new "
                                                                              "document); repeat for a batch."),
             prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="A file of prompts, one per "
                                                                                     "line (decoded as one batch)."),
             max_new_tokens: int = typer.Option(50, "--max-new-tokens", help="Most tokens to add; stops earlier "
                                                                             "at the end-of-sequence token."),
             temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 = greedy "
                                                                          "(always the most likely token)."),
             top_k: int = typer.Option(50, "--top-k", help="Sample among the k most likely tokens; 0 = all."),
             seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same text."),
             threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
             kernel: str = typer.Option("auto", "--kernel", help=KERNEL_HELP)):
    """Continue prompts with a trained model.

    Prints each prompt with its continuation (one blank line between them),
    computed by the model in its own (sparse + low-rank) form with a KV cache;
    several prompts are decoded as one batch. A context longer than the
    model's max_seq_len keeps its last tokens.
    """
    from .core.kernel_choice import KERNELS
    from .core.sparse_lowrank import set_kernels
    from .export import open_run
    from .infer import generate as sample

    texts = read_prompts(prompt, prompts_file)
    if kernel not in KERNELS:
        raise UserError(f"--kernel: must be one of {', '.join(KERNELS)}, got {kernel!r}")
    set_threads(threads)
    loaded = open_run(run)
    set_kernels(loaded.model, kernel)
    if not loaded.newest:  # an earlier checkpoint (named, or fallen back to past a damaged one): say which
        typer.echo(f"(step {loaded.step}, {loaded.checkpoint.name})", err=True)
    outs = sample(loaded, texts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    typer.echo("\n\n".join(outs))


@app.command("bench-infer")
@_user_errors
def bench_infer(run: Optional[Path] = typer.Argument(None, help="A trained run, measured in its own form and as "
                                                                "its dense twin (full). Or use --size."),
                size: Optional[str] = typer.Option(None, "--size", help="130m | 350m | 1b | 7b (and 60m): random "
                                                                        "weights at that paper shape."),
                blocks: Optional[int] = typer.Option(None, "--blocks", help="Only this many decoder blocks at that "
                                                                            "width (the embedding and head stay)."),
                methods: str = typer.Option("sltrain,full", "--methods", help="Comma-separated methods (each "
                                                                               "with the preset's settings)."),
                batch: int = typer.Option(1, "--batch", help="Sequences decoded together."),
                prompt_tokens: int = typer.Option(32, "--prompt-tokens", help="Prompt length (one prefill)."),
                new_tokens: int = typer.Option(32, "--new-tokens", help="Tokens decoded one at a time."),
                threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
                dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16"),
                device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
                rounds: int = typer.Option(5, "--rounds", help="Interleaved timing rounds (medians)."),
                kernel: str = typer.Option("auto", "--kernel", help=KERNEL_HELP),
                fmt: str = typer.Option("table", "--format", help="table | json | csv | md"),
                out: Optional[Path] = typer.Option(None, "--out", help="Also write the rows here (.csv, .json or "
                                                                       ".md).")):
    """Inference memory and tokens/s per method: the paper's Table 5 here.

    Per method: parameters, weight bytes as held, peak bytes of one prefill +
    decode, prefill and decode tokens/s (KV cache, greedy), and each one's
    ratio to full-rank. --format json prints a list of row objects.
    """
    from .bench_infer import bench_infer as measure
    from .bench_infer import rows_view
    from .results import show_rows

    if fmt not in ("table", "json", "csv", "md"):
        raise UserError(f"--format: must be one of table, json, csv, md, got {fmt!r}")
    if rounds < 1:
        raise UserError(f"--rounds: must be >= 1, got {rounds}")
    set_threads(threads)
    rows = measure(size=size, run=run, blocks=blocks, methods=[m.strip() for m in methods.split(",") if m.strip()],
                   batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens, dtype=dtype, device=device,
                   rounds=rounds, kernel=kernel)
    what = f"run {run}" if run else f"LLaMA {size}" + (f", {blocks} blocks" if blocks else "")
    show_rows(rows, fmt, out, view=rows_view, title=f"{what}: batch {batch}, {prompt_tokens}-token prompt, "
                                                   f"{new_tokens} new tokens, {dtype}, {torch_threads()} threads")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
