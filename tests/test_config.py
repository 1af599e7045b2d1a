"""Every shipped config composes and validates; bad input is one line, exit code 2; the core stays pure."""
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sltrain_cli.cli import app
from sltrain_cli.compose import expand_aliases, expand_grid, group_options, load_config, run_name
from sltrain_cli.configs import ConfigError, MethodName, Precision

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("group", ["model", "method", "data", "optim", "train", "experiment"])
def test_every_conf_file_composes(group):
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        extra = ["data.path=corpus/*.txt"] if (group, option) == ("data", "local") else []
        cfg = load_config([f"{group}={option}", *extra])
        if group == "method":
            assert cfg.method.name == MethodName(option)
        if group == "model":
            assert cfg.model.name == option


def test_experiment_recipe_per_method():
    sl = load_config(["experiment=paper_60m"])
    ga = load_config(["experiment=paper_60m", "method=galore"])
    assert sl.model.name == "llama_60m" and sl.method.rank == 128 and sl.optim.lr == 0.003
    assert sl.train.total_batch_size == 512 and sl.train.precision == Precision.bf16_pure
    assert ga.method.name == MethodName.galore and ga.optim.lr == 0.01 and ga.method.rank == 128
    # the command line wins over the recipe
    assert load_config(["experiment=paper_60m", "method=galore", "lr=0.02"]).optim.lr == 0.02


def test_aliases_and_grid():
    assert expand_aliases(["rank=8", "delta=0.1", "lr=1e-3", "steps=5", "seed=3", "alpha=4"]) == [
        "method.rank=8", "method.delta=0.1", "optim.lr=1e-3", "train.steps=5", "seed=3", "method.alpha=4"]
    cfg = load_config(["rank=8", "delta=0.1", "steps=5"])
    assert (cfg.method.rank, cfg.method.delta, cfg.train.steps) == (8, 0.1, 5)
    grid = expand_grid(["rank=1,2", "delta=0.1,0.2,0.3", "model=tiny"])
    assert len(grid) == 6 and grid[0] == ["rank=1", "delta=0.1", "model=tiny"]
    assert run_name(["model=tiny", "rank=8"]) == run_name(["model=tiny", "rank=8"]) == "model=tiny,rank=8"


@pytest.mark.parametrize("override,key", [
    ("method.delta=1.5", "method.delta"),
    ("method.rank=-1", "method.rank"),
    ("model=nonexistent", "model"),
    ("method.nonexistent_key=3", "method.nonexistent_key"),
    ("train.precision=fp8", "train.precision"),
    ("optim.lr=abc", "optim.lr"),
])
def test_bad_values_raise_config_error(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("override,key", [
    ("method.delta=1.5", "method.delta"),
    ("method.rank=-1", "method.rank"),
    ("model=nonexistent", "model"),
])
def test_cli_bad_input_exit_2_one_line(tmp_path, override, key):
    result = CliRunner().invoke(app, ["pretrain", override, f"out_dir={tmp_path}"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], result.output
    assert "Traceback" not in result.output
    assert not any(tmp_path.iterdir()), "no run folder may be left behind"


def test_print_config():
    result = CliRunner().invoke(app, ["pretrain", "model=tiny", "rank=8", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "rank: 8" in result.output and "hidden_size: 64" in result.output


def test_core_imports_no_cli_frameworks():
    code = ("import sys, sltrain_cli.core.model, sltrain_cli.core.sparse_lowrank, sltrain_cli.core.convert, "
            "sltrain_cli.core.optim, sltrain_cli.core.galore, sltrain_cli.core.relora, sltrain_cli.core.lowrank\n"
            "bad = [m for m in ('typer', 'hydra', 'omegaconf', 'rich', 'pandas', 'datasets') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
