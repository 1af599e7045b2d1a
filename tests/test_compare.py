"""`sltrain compare`: summary rows side by side, curves on one PNG, the best run per method."""
import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from sltrain_cli.cli import app

from helpers import tiny_overrides

runner = CliRunner()


@pytest.mark.slow  # three tiny pretrains: ~3 s
def test_compare_two_runs_and_the_best_per_method(tmp_path, cache_dir):
    for name, extra in (("a", ["method=sltrain", "lr=0.001"]), ("b", ["method=sltrain", "lr=0.003"]),
                        ("c", ["method=lowrank", "lr=0.003"])):
        result = runner.invoke(app, ["pretrain", "--quiet", *tiny_overrides(tmp_path, "rank=8", *extra,
                                                                            f"run_name={name}")])
        assert result.exit_code == 0, result.output
    runs = tmp_path / "pretrain"
    out = tmp_path / "cmp" / "two.png"
    result = runner.invoke(app, ["compare", str(runs / "a"), str(runs / "c"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(out.with_suffix(".csv"))
    assert list(table["run"]) == ["a", "c"] and list(table["method"]) == ["sltrain", "lowrank"]
    assert {"params_total", "est_mem_gb", "tokens_per_s", "val_ppl"} <= set(table.columns)

    best = tmp_path / "cmp" / "best.png"
    result = runner.invoke(app, ["compare", str(runs), "--best-by", "method", "--out", str(best)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(best.with_suffix(".csv"))
    ppl = {r: pd.read_csv(out.with_suffix(".csv")).set_index("run")["val_ppl"].get(r) for r in ("a", "c")}
    assert sorted(table["method"]) == ["lowrank", "sltrain"] and len(table) == 2
    winner = table.set_index("method").loc["sltrain", "run"]
    sltrain_ppl = {r: json.loads((runs / r / "summary.json").read_text())["val_ppl"] for r in ("a", "b")}
    assert winner == min(sltrain_ppl, key=sltrain_ppl.get)  # the lower perplexity of the two lrs
    lr = {"a": "0.001", "b": "0.003"}[winner]
    assert f"best of 2 is {winner}" in result.output and f"optim.lr={lr}" in result.output
    assert ppl["c"] == table.set_index("method").loc["lowrank", "val_ppl"]


def test_compare_of_a_folder_without_runs_is_one_line(tmp_path):
    result = runner.invoke(app, ["compare", str(tmp_path)])
    assert result.exit_code == 2 and "no run" in result.output
