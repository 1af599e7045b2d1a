"""`sltrain sweep`: grid expansion, validation before anything runs, one process per trial, skip finished
trials, failed trials recorded, one aggregated table and two plots."""
import io
import json
import os

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from sltrain_cli.cli import app
from sltrain_cli.configs import ConfigError
from sltrain_cli.sweep import plan_trials, run_sweep, run_trials, sweep_name

from helpers import tiny_overrides


def _console():
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def test_grid_expansion_aliases_and_names():
    trials, swept = plan_trials(["model=tiny", "rank=64,128", "delta=0.01,0.03,0.1", "lr=1e-3", "out_dir=/tmp/o"])
    assert swept == ["rank", "delta"]
    assert len(trials) == 6
    assert [t.name for t in trials[:2]] == ["delta=0.01,rank=64", "delta=0.03,rank=64"]
    assert trials[0].swept == {"rank": 64, "delta": 0.01}
    assert trials[-1].overrides == ["model=tiny", "rank=128", "delta=0.1", "lr=1e-3"]  # out_dir is the sweep's
    # names hold '=' and ',': quoted for Hydra's grammar
    assert trials[0].argv("/tmp/s")[-2:] == ["out_dir='/tmp/s'", "run_name='delta=0.01,rank=64'"]
    # a group can be swept too, and a repeated value is one trial
    trials, swept = plan_trials(["method=sltrain,lowrank", "rank=8,8"])
    assert swept == ["method", "rank"]
    assert [t.name for t in trials] == ["method=sltrain,rank=8", "method=lowrank,rank=8"]
    # deterministic sweep name from the grid, without out_dir
    assert sweep_name(["rank=64,128", "model=tiny", "out_dir=x"]) == "model=tiny,rank=64+128"
    with pytest.raises(ConfigError, match="run_name"):
        plan_trials(["rank=1,2", "run_name=x"])


def test_bad_value_rejected_before_any_trial(tmp_path, cache_dir):
    # delta=1.5 only in the last trial: still nothing runs and no folder is created
    overrides = tiny_overrides(tmp_path, "rank=4,8", "delta=0.05,1.5")
    with pytest.raises(ConfigError, match="method.delta"):
        run_sweep(overrides, console=_console()[0])
    assert not (tmp_path / "sweep").exists()
    result = CliRunner().invoke(app, ["sweep", *overrides])
    assert result.exit_code == 2
    assert "method.delta" in result.output and not (tmp_path / "sweep").exists()
    result = CliRunner().invoke(app, ["sweep", *tiny_overrides(tmp_path, "model=nope,tiny")])
    assert result.exit_code == 2 and not (tmp_path / "sweep").exists()


def test_dry_run_lists_trials(tmp_path, cache_dir):
    console, buf = _console()
    assert run_sweep(tiny_overrides(tmp_path, "rank=4,8", "delta=0.05,0.1"), dry_run=True, console=console) == []
    text = buf.getvalue()
    assert "4 trials" in text and "delta=0.1,rank=8" in text and "to run" in text
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow  # eight trial processes: ~40 s
def test_sweep_runs_skips_and_records_failures(tmp_path, cache_dir):
    grid = ["rank=4,8", "delta=0.05,0.1", "steps=2", "train.num_threads=1"]  # 1 thread: 2 shared cores
    console, buf = _console()
    rows = run_sweep(tiny_overrides(tmp_path, *grid), name="grid", console=console)
    folder = tmp_path / "sweep" / "grid"
    assert [r["status"] for r in rows] == ["completed"] * 4, buf.getvalue()
    df = pd.read_csv(folder / "results.csv")
    assert len(df) == 4 and {"rank", "delta", "params_total", "params_trainable", "val_ppl", "tokens",
                             "tokens_per_s", "peak_mem_gb", "est_mem_gb", "status"} <= set(df.columns)
    assert sorted(zip(df["rank"], df["delta"])) == [(4, 0.05), (4, 0.1), (8, 0.05), (8, 0.1)]
    assert (df["val_ppl"] > 1).all() and df["params_total"].nunique() == 4
    assert (folder / "results.md").is_file()
    assert (folder / "ppl_vs_params.png").stat().st_size > 0 and (folder / "ppl_vs_memory.png").stat().st_size > 0
    assert "trial 4/4: delta=0.1,rank=8 ... completed ppl" in buf.getvalue()
    summaries = sorted(folder.glob("pretrain/*/summary.json"))
    assert len(summaries) == 4
    pids = []
    for path in summaries:  # each trial ran in its own process, in its own folder
        summary = json.loads(path.read_text())
        assert summary["status"] == "completed"
        pids.append(summary["pid"])
    assert len(set(pids)) == 4 and os.getpid() not in pids, pids
    mtimes = [p.stat().st_mtime_ns for p in summaries]

    # rerun: nothing starts
    console, buf = _console()
    rows = run_sweep(tiny_overrides(tmp_path, *grid), name="grid", console=console)
    assert buf.getvalue().count("... skipped") == 4 and [r["status"] for r in rows] == ["completed"] * 4
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes

    # extend the grid with an impossible rank: the old trials are skipped, the new ones fail and are recorded
    console, buf = _console()
    rows = run_sweep(tiny_overrides(tmp_path, "rank=4,100000", *grid[1:]), name="grid",
                     console=console)
    status = {r["trial"]: r["status"] for r in rows}
    assert status == {"delta=0.05,rank=4": "completed", "delta=0.1,rank=4": "completed",
                      "delta=0.05,rank=100000": "failed", "delta=0.1,rank=100000": "failed"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert all("rank" in r["error"].lower() for r in failed), failed
    df = pd.read_csv(folder / "results.csv")
    assert list(df["status"]) == ["completed", "completed", "failed", "failed"]
    assert (folder / "logs" / "delta=0.05,rank=100000.log").is_file()

    # a trial whose overrides changed (steps=3 instead of 2, same trial name) is run again, in a new process; an
    # identical one is skipped, its folder untouched
    same = next(t for t in plan_trials(tiny_overrides(tmp_path, *grid))[0] if t.name == "delta=0.05,rank=4")
    changed = next(t for t in plan_trials(tiny_overrides(tmp_path, *grid[:2], "steps=3", *grid[3:]))[0]
                   if t.name == "delta=0.1,rank=4")
    before = {t.name: json.loads((t.run_dir(folder) / "summary.json").read_text()) for t in (same, changed)}
    stamp = (same.run_dir(folder) / "summary.json").stat().st_mtime_ns
    console, buf = _console()
    results = run_trials([same, changed], folder, console)
    assert [(r.trial.name, r.status, r.skipped) for r in results] == [
        ("delta=0.05,rank=4", "completed", True), ("delta=0.1,rank=4", "completed", False)], buf.getvalue()
    assert (same.run_dir(folder) / "summary.json").stat().st_mtime_ns == stamp
    rerun = json.loads((changed.run_dir(folder) / "summary.json").read_text())
    assert rerun["steps"] == 3 and before[changed.name]["steps"] == 2
    assert rerun["pid"] not in (*pids, os.getpid())
    assert "steps=3" in (changed.run_dir(folder) / "overrides.txt").read_text().splitlines()


@pytest.mark.slow  # two trial processes: ~10 s
def test_a_failed_trial_makes_the_sweep_exit_1(tmp_path, cache_dir):
    result = CliRunner().invoke(app, ["sweep", *tiny_overrides(tmp_path, "rank=4,100000", "steps=2")])
    assert result.exit_code == 1, result.output
    # the exit code stands for this: the good trial ran to the end, the bad one is recorded failed with its reason,
    # wrote no run folder, and the output says so
    (folder,) = (tmp_path / "sweep").iterdir()
    df = pd.read_csv(folder / "results.csv")
    assert dict(zip(df["trial"], df["status"])) == {"rank=4": "completed", "rank=100000": "failed"}
    error = df.set_index("trial").loc["rank=100000", "error"]
    assert "method.rank" in error and "100000" in error, error
    assert json.loads((folder / "pretrain" / "rank=4" / "summary.json").read_text())["status"] == "completed"
    assert not (folder / "pretrain" / "rank=100000").exists()
    assert "method.rank" in (folder / "logs" / "rank=100000.log").read_text()
    assert "rank=100000 ... failed" in result.output and "1 completed" in result.output, result.output
    assert "1 failed" in result.output, result.output


@pytest.mark.slow  # two sweep processes: ~20 s
def test_sigterm_reaches_the_trial_and_a_rerun_resumes_it(tmp_path, cache_dir):
    import signal
    import subprocess
    import sys
    import time

    grid = tiny_overrides(tmp_path, "rank=4,8", "steps=400", "train.eval_every=0", "train.save_every=2")
    cmd = [sys.executable, "-m", "sltrain_cli", "sweep", *grid, "--name", "long"]
    folder = tmp_path / "sweep" / "long"
    first = folder / "pretrain" / "rank=4" / "checkpoints"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (first / "step_000002.pt").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    summary = json.loads((folder / "pretrain" / "rank=4" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    stopped = summary["steps"]
    df = pd.read_csv(folder / "results.csv")
    assert list(df["status"]) == ["interrupted"]
    assert not (folder / "pretrain" / "rank=8").exists()  # the sweep stopped, it did not go on to trial 2

    # the same command again resumes trial 1 from its checkpoint (stopped again once it has gone on)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    log = folder / "logs" / "rank=4.log"
    def gone_on():  # a checkpoint past the one it resumed from
        return any(int(p.stem.split("_")[1]) > stopped for p in first.glob("step_*.pt"))

    while time.time() < deadline and not gone_on():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert "resumed from" in log.read_text() and f"at step {stopped}" in log.read_text(), log.read_text()
    assert proc.returncode == 130, out
    again = json.loads((folder / "pretrain" / "rank=4" / "summary.json").read_text())
    assert again["status"] == "interrupted" and again["steps"] > stopped  # it went on from where it stopped
