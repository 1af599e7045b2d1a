"""`sltrain ablate-support`: each study runs end to end on a tiny model and writes its table and PNG(s)."""
import io

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from sltrain_cli.ablate import run_study, split_args, split_paths
from sltrain_cli.cli import app, run_dir_for
from sltrain_cli.compose import load_config
from sltrain_cli.configs import ConfigError
from sltrain_cli.train import train

from helpers import tiny_overrides

SMALL = ("rank=8", "delta=0.1", "steps=2", "train.num_threads=1")  # 1 thread: 2 shared cores


def _console():
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def _pretrain(out_dir, *extra):
    overrides = tiny_overrides(out_dir, *extra)
    cfg = load_config(overrides)
    run_dir = run_dir_for("pretrain", cfg, overrides)
    assert train(cfg, run_dir, overrides)["status"] == "completed"
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """A trained full-rank run and an SLTrain run (in this process: a few seconds each)."""
    out = tmp_path_factory.mktemp("ablate-runs")
    return _pretrain(out, "method=full", "steps=6", "train.num_threads=1"), _pretrain(out, *SMALL)


def test_arguments(tmp_path):
    study, own, rest = split_args(["study=seeds", "n=3", "rank=8"])
    assert (study, own, rest) == ("seeds", {"n": ["3"]}, ["rank=8"])
    with pytest.raises(ConfigError, match="^study"):
        split_args(["rank=8"])
    with pytest.raises(ConfigError, match="^from: belongs to study=pruning"):
        split_args(["study=seeds", "from=x"])
    (tmp_path / "model=tiny,rank=8").mkdir()
    (tmp_path / "b").mkdir()
    value = f"{tmp_path / 'model=tiny,rank=8'},{tmp_path / 'b'}"  # run names hold commas
    assert split_paths(value) == [tmp_path / "model=tiny,rank=8", tmp_path / "b"]
    with pytest.raises(ConfigError, match="^runs"):
        split_paths(f"{tmp_path / 'missing'}")
    result = CliRunner().invoke(app, ["ablate-support", "study=bogus"])
    assert result.exit_code == 2 and "study" in result.output
    result = CliRunner().invoke(app, ["ablate-support", "study=pruning", f"out_dir={tmp_path}"])
    assert result.exit_code == 2 and "from" in result.output


@pytest.mark.slow  # several trial processes: ~19 s
def test_seeds_study(tmp_path, cache_dir):
    console, buf = _console()
    rows = run_study(tiny_overrides(tmp_path, "study=seeds", "n=2", *SMALL), console=console)
    folder = next((tmp_path / "ablate").glob("seeds-*"))
    assert [r["support_seed"] for r in rows] == [0, 1, "mean", "std"]
    assert all(r["status"] == "completed" for r in rows[:2]), buf.getvalue()
    assert rows[2]["val_ppl"] == pytest.approx((rows[0]["val_ppl"] + rows[1]["val_ppl"]) / 2)
    assert len(pd.read_csv(folder / "results.csv")) == 4 and (folder / "results.md").is_file()
    assert (folder / "loss_curves.png").stat().st_size > 0
    assert "± " in buf.getvalue()
    # the seeds really differ in support, and only there
    a, b = (folder / "pretrain" / f"support_seed={i}" / "config.yaml" for i in (0, 1))
    diff = [x for x, y in zip(a.read_text().splitlines(), b.read_text().splitlines()) if x != y]
    assert [d.strip() for d in diff] == ["support_seed: 0", "run_name: support_seed=0"]


@pytest.mark.slow  # the module's `runs` fixture trains two runs first
def test_pruning_study(runs, tmp_path):
    full, _ = runs
    console, buf = _console()
    rows = run_study(["study=pruning", f"from={full}", *SMALL, f"out_dir={tmp_path}"], console=console)
    folder = next((tmp_path / "ablate").glob("pruning-*"))
    err = {r["weights"]: r["rel_error"] for r in rows}
    assert list(err) == ["Full-rank", "L0 (low-rank)", "L0 + top-0.1 pruned", "L0 + random-0.1 pruned",
                         "L0 + top-0.1 trained", "L0 + random-0.1 trained"]
    assert err["Full-rank"] == pytest.approx(0, abs=1e-6)
    assert err["L0 + top-0.1 pruned"] <= err["L0 + random-0.1 pruned"] < err["L0 (low-rank)"]
    assert all(r["val_ppl"] > 1 for r in rows)
    assert len(pd.read_csv(folder / "results.csv")) == 6
    for png in ("trained_loss.png", "residual_cdf.png"):
        assert (folder / png).stat().st_size > 0
    with pytest.raises(ConfigError, match="^from"):
        run_study(["study=pruning", f"from={runs[1]}", f"out_dir={tmp_path}"], console=console)
    # a rank not below the smallest side of the weights (tiny: d = 64) makes L0 = W0: refused, not tabulated
    with pytest.raises(ConfigError, match="^method.rank: study=pruning needs a rank below the smallest side 64"):
        run_study(["study=pruning", f"from={full}", "rank=64", f"out_dir={tmp_path}"], console=console)


@pytest.mark.slow  # five trial processes (warm-up + four supports): about a minute on 2 busy cores
def test_strategy_study(tmp_path, cache_dir):
    console, buf = _console()
    rows = run_study(tiny_overrides(tmp_path, "study=strategy", "warmup=2", *SMALL), console=console)
    folder = next((tmp_path / "ablate").glob("strategy-*"))
    assert [r["support"] for r in rows] == ["random", "row_balanced", "block", "top"]
    assert all(r["status"] == "completed" for r in rows), buf.getvalue()
    assert len({r["params_trainable"] for r in rows}) <= 2  # same budget (block may round its nnz)
    assert (folder / "loss_curves.png").stat().st_size > 0 and (folder / "results.csv").is_file()
    assert (folder / "pretrain" / "warmup=full" / "summary.json").is_file()


@pytest.mark.slow  # the module's `runs` fixture trains two runs first
def test_spectrum_study(runs, tmp_path):
    full, slt = runs
    console, _ = _console()
    rows = run_study(["study=spectrum", f"runs={full},{slt}", f"out_dir={tmp_path}", "train.num_threads=1"],
                     console=console)
    folder = next((tmp_path / "ablate").glob("spectrum-*"))
    assert [r["method"] for r in rows] == ["full", "sltrain"]
    assert all(0 < r["energy_top_r"] <= 1 and r["r"] == 8 and 1 <= r["eff_rank"] <= r["min_side"] for r in rows)
    assert (folder / "spectrum.png").stat().st_size > 0 and len(pd.read_csv(folder / "results.csv")) == 2
    rows = run_study(["study=spectrum", f"runs={slt}", "layer=1", "rank=4", f"out_dir={tmp_path}"], console=console)
    assert rows[0]["r"] == 4 and rows[0]["matrices"] == 7
