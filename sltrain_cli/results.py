"""Results tables (pandas -> CSV / Markdown / rich) and plots (matplotlib, headless PNG).

Every table a command produces goes through ``write_table`` (atomic CSV + Markdown side by side) and
``print_table``; per-command result rows accumulate with ``upsert_row``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .config_io import flatten, read_config_file
from .configs import ConfigError
from .files import atomic_write, locked
from .summary import summary_row


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value.is_integer() and abs(value) < 1e15:
            value = int(value)
            return f"{value:,}" if abs(value) >= 10000 else str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return "-" if value is None else str(value)


def to_frame(rows: Iterable[Mapping] | pd.DataFrame, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if columns:
        df = df[[c for c in columns if c in df.columns]]
    return df


def frame(rows: Sequence[Mapping]) -> pd.DataFrame:
    """A table with object columns: integers stay integers (no 1234.0) next to the None of a failed trial."""
    return pd.DataFrame(list(rows), dtype=object)


def write_table(rows: Iterable[Mapping] | pd.DataFrame, stem: Path | str,
                columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Write ``stem.csv`` and ``stem.md`` atomically; return the DataFrame."""
    df = to_frame(rows, columns)
    stem = Path(stem)
    atomic_write(stem.with_suffix(".csv"), df.to_csv(index=False))
    atomic_write(stem.with_suffix(".md"), markdown(df) + "\n")
    return df


def show_rows(rows: List[dict], fmt: str, out: Optional[Path], view: Callable[[dict], dict], title: str) -> None:
    """A command's rows: written to ``out`` (.csv, .json, else Markdown) when given, and printed as ``fmt``: json,
    csv, md, or a rich table of ``view(row)`` (a narrower view for the terminal)."""
    df = to_frame(rows)
    if out is not None:
        text = {".csv": lambda: df.to_csv(index=False), ".json": lambda: json.dumps(rows, indent=2) + "\n"}.get(
            Path(out).suffix, lambda: markdown(df) + "\n")()
        atomic_write(out, text)
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif fmt == "csv":
        print(df.to_csv(index=False), end="")
    elif fmt == "md":
        print(markdown(df))
    else:
        print_table([view(r) for r in rows], title=title)


def markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def make_console() -> Console:
    """Rich falls back to 80 columns when output is not a terminal; tables are wider than that."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_table(rows: Iterable[Mapping] | pd.DataFrame, title: str = "",
                columns: Optional[Sequence[str]] = None, console: Optional[Console] = None) -> None:
    df = to_frame(rows, columns)
    table = Table(title=title or None, show_lines=False)
    for col in df.columns:
        table.add_column(str(col), overflow="fold")
    for row in df.itertuples(index=False):  # cells are text, not rich markup ([q,v], sltrain[bnb] stay)
        table.add_row(*(Text(_fmt(v)) for v in row))
    (console or make_console()).print(table)


def print_record(record: Mapping, title: str = "", console: Optional[Console] = None) -> None:
    """One result as a two-column (field, value) table: readable in any terminal width."""
    table = Table(title=title or None, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in record.items():
        table.add_row(str(key), _fmt(value))
    (console or make_console()).print(table)


def upsert_row(csv_path: Path | str, row: Mapping, key: str = "run") -> pd.DataFrame:
    """Add ``row`` to the CSV table, replacing an earlier row with the same ``key`` (a rerun); under a lock, so
    runs finishing at the same time in one out_dir do not lose each other's rows."""
    csv_path = Path(csv_path)
    new = pd.DataFrame([dict(row)])
    with locked(csv_path):
        if csv_path.is_file():
            old = pd.read_csv(csv_path)
            if key in old.columns:
                old = old[old[key].astype(str) != str(row.get(key))]
            new = pd.concat([old, new], ignore_index=True)
        return write_table(new, csv_path.with_suffix(""))


def plot_lines(series: Dict[str, Tuple[Sequence[float], Sequence[float]]], path: Path | str, *,
               xlabel: str, ylabel: str, title: str = "", logx: bool = False, logy: bool = False,
               marker: str = "") -> Path:
    """One PNG with a line per labelled (x, y) series."""
    fig, ax = _axes()
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), marker=marker, label=label)
    return _save_png(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, logy=logy,
                     legend=len(series) > 1 or any(series))


MARKERS = "osD^vP*X<>"


def plot_scatter(points: List[Tuple[float, float, str, str]], path: Path | str, *, xlabel: str, ylabel: str,
                 title: str = "", logx: bool = False) -> Path:
    """One PNG of labelled points (x, y, label, group): one colour and marker per group (a legend entry
    each), labels nudged alternately above and below so that neighbours do not print on top of each other."""
    fig, ax = _axes()
    groups = list(dict.fromkeys(g for *_, g in points))
    for i, group in enumerate(groups):
        mine = [(x, y) for x, y, _, g in points if g == group]
        ax.scatter([x for x, _ in mine], [y for _, y in mine], marker=MARKERS[i % len(MARKERS)], s=36,
                   label=group, color=f"C{i % 10}")
    for j, (x, y, label, _) in enumerate(sorted(points)):
        ax.annotate(label, (x, y), fontsize=6, xytext=(4, 5 if j % 2 == 0 else -9), textcoords="offset points")
    return _save_png(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, legend=bool(groups))


def read_metrics(path: Path | str) -> Tuple[List[dict], List[dict]]:
    """(training rows, validation rows) of a metrics.jsonl ([] for a missing file)."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if r.get("loss") is not None], [r for r in rows if r.get("val_ppl") is not None]


def plot_run(run_dir: Path, summary: Mapping) -> None:
    """RUN_DIR/loss.png: the run's training loss and validation perplexity (a full disk skips it with one line)."""
    try:
        plot_run_curves({run_dir.name: run_dir}, run_dir / "loss.png",
                        title=f"{run_dir.name} ({summary.get('method')}, {summary['status']})")
    except OSError as err:
        print(f"loss.png not written: {err.strerror}", file=sys.stderr, flush=True)


def plot_run_curves(runs: Dict[str, Path], path: Path | str, title: str = "") -> Path:
    """loss.png: training loss (left) and validation perplexity (right, log scale) against tokens, one colour
    per run folder in ``runs`` (label -> run folder)."""
    fig, ax = _axes()
    right = ax.twinx()
    curves = {label: read_metrics(Path(run_dir) / "metrics.jsonl") for label, run_dir in runs.items()}
    most = max([r["tokens"] for train, val in curves.values() for r in train + val] or [0])
    scale, unit = (1e6, "millions") if most >= 1e6 else (1e3, "thousands")
    ppls = []
    for i, (label, (train, val)) in enumerate(curves.items()):
        name = f"{label} " if len(runs) > 1 else ""
        ax.plot([r["tokens"] / scale for r in train], [r["loss"] for r in train], color=f"C{i % 10}",
                label=f"{name}train loss")
        right.plot([r["tokens"] / scale for r in val], [r["val_ppl"] for r in val], color=f"C{i % 10}",
                   linestyle="--", marker="o", markersize=3, label=f"{name}val ppl")
        ppls += [r["val_ppl"] for r in val]
    if ppls and max(ppls) > 10 * min(ppls):
        right.set_yscale("log")
    right.set_ylabel("validation perplexity (dashed)")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="upper right")
    return _save_png(fig, ax, path, xlabel=f"tokens ({unit})", ylabel="training loss (solid)", title=title)


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5), dpi=120)


def _save_png(fig, ax, path: Path | str, *, xlabel: str, ylabel: str, title: str = "", logx: bool = False,
              logy: bool = False, legend: bool = False) -> Path:
    """Label and grid the axes, then write the PNG next to ``path`` and rename it into place."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------- compare
COMPARE_COLUMNS = ["#", "run", "method", "rank", "delta", "params_total", "optimizer_state_mb", "est_mem_gb",
                   "tokens", "tokens_per_s", "val_ppl", "status"]


def find_runs(paths: Sequence[Path | str]) -> List[Path]:
    """Run folders (holding summary.json) named by ``paths``: a run folder, a sweep or study folder (its
    pretrain/ trials) or any folder of run folders. A path with no run in it is a ConfigError."""
    found: List[Path] = []
    for path in map(Path, paths):
        if (path / "summary.json").is_file():
            runs = [path]
        else:
            runs = sorted(p.parent for p in path.glob("pretrain/*/summary.json")) or sorted(
                p.parent for p in path.glob("*/summary.json"))
        if not runs:
            raise ConfigError("RUN_OR_SWEEP", f"no run (a folder with summary.json) in {path}")
        found += runs
    return list(dict.fromkeys(p.resolve() for p in found))


def best_by(runs: List[Path], summaries: List[dict], key: str) -> Tuple[List[int], List[str]]:
    """For each value of summary[key] (e.g. each method), the index of its completed run with the lowest val
    ppl, and a line naming the settings that won among the ones that differ within that group."""
    groups: Dict[str, List[int]] = {}
    for i, s in enumerate(summaries):
        if s.get("status") == "completed" and s.get("val_ppl") is not None:
            groups.setdefault(str(s.get(key)), []).append(i)
    from .state import RESUME_FREE_KEYS  # here: state loads torch, which listing and tables never need

    keep, notes = [], []
    for value, members in groups.items():
        best = min(members, key=lambda i: summaries[i]["val_ppl"])
        keep.append(best)
        configs = [flatten(read_config_file(runs[i] / "config.yaml")) for i in members]
        varied = sorted(k for k in set().union(*configs) if len({repr(c.get(k)) for c in configs}) > 1
                        and not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS))
        won = ", ".join(f"{k}={configs[members.index(best)].get(k)}" for k in varied) or "nothing else varied"
        notes.append(f"{key}={value}: best of {len(members)} is {runs[best].name} "
                     f"(val ppl {summaries[best]['val_ppl']:.2f}; {won})")
    return sorted(keep), notes


def compare_runs(paths: Sequence[Path | str], out: Optional[Path] = None, key: Optional[str] = None,
                 console: Optional[Console] = None) -> Tuple[List[dict], Path]:
    """`sltrain compare`: the summary rows of several runs side by side and their curves on one PNG."""
    console = console or make_console()
    runs = find_runs(paths)
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    if key is not None:
        if not any(key in s for s in summaries):
            raise ConfigError("--best-by", f"no run has {key!r} in its summary.json (e.g. method, model, rank)")
        keep, notes = best_by(runs, summaries, key)
        runs, summaries = [runs[i] for i in keep], [summaries[i] for i in keep]
        for note in notes:
            console.print(note, highlight=False)
    rows = [{"#": i + 1, **summary_row(s), "run": r.name, "tokens_per_s": s.get("tokens_per_s"),
             "optimizer_state_mb": s["optimizer_state_bytes"] / 1e6 if s.get("optimizer_state_bytes") else None}
            for i, (r, s) in enumerate(zip(runs, summaries))]
    print_table(frame(rows), title="compare", columns=COMPARE_COLUMNS, console=console)
    out = Path(out) if out is not None else Path("outputs") / "compare" / "compare.png"
    write_table(frame(rows), out.with_suffix(""), columns=COMPARE_COLUMNS)
    plot_run_curves({f"{i + 1}: {s.get('method')}": r for i, (r, s) in enumerate(zip(runs, summaries))}, out,
                    title="validation perplexity (dashed) and training loss (solid)")
    return rows, out
