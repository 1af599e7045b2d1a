"""Trackers get the same rows as metrics.jsonl; every summary.json says what produced it."""
import json

import pytest
from typer.testing import CliRunner

from sltrain_cli.cli import app

from helpers import tiny_overrides

runner = CliRunner()
METADATA = ("sltrain_version", "git_commit", "python", "torch", "cuda", "bitsandbytes", "transformers",
            "device_name", "device_count", "world_size", "hostname", "argv", "start_time", "end_time",
            "flops_per_token", "peak_flops")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("tracked")
    result = runner.invoke(app, ["pretrain", "--quiet", *tiny_overrides(out, "method=sltrain", "rank=8",
                                                                        "train.loggers=[jsonl,tensorboard]",
                                                                        "train.log_every=1", "run_name=tb")])
    assert result.exit_code == 0, result.output
    return out / "pretrain" / "tb"


def test_tensorboard_holds_the_rows_of_metrics_jsonl(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (tracked / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_ppl"]) for r in rows if "val_ppl" in r]
    for tag, want in (("loss", train), ("val_ppl", val)):
        got = events.Scalars(tag)
        assert [e.step for e in got] == [s for s, _ in want] and len(want) >= 2
        assert [e.value for e in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32
    assert {"lr", "grad_norm", "tokens_per_s", "cpu_rss_bytes"} <= set(events.Tags()["scalars"])


def test_summary_records_software_hardware_and_flops(tracked):
    summary = json.loads((tracked / "summary.json").read_text())
    for key in METADATA:
        assert key in summary, key
    assert summary["world_size"] == 1 and summary["device_count"] == 1 and summary["cuda"] is None
    assert summary["flops_per_token"] > 6 * summary["params_trainable"] * 0.5  # 6N plus attention
    assert summary["peak_flops"] is None and "mfu" not in summary  # no MFU without a known peak (CPU)
    rows = [json.loads(line) for line in (tracked / "metrics.jsonl").read_text().splitlines()]
    assert all(r["cpu_rss_bytes"] > 0 for r in rows if "loss" in r)


def test_a_tracker_that_cannot_start_is_one_line_and_the_run_goes_on(tmp_path, cache_dir, monkeypatch):
    import sltrain_cli.tracking as tracking

    def broken(*a, **kw):
        raise ImportError("No module named 'wandb'")

    monkeypatch.setitem(tracking._START, "wandb", broken)
    result = runner.invoke(app, ["pretrain", "--quiet", *tiny_overrides(tmp_path, "train.loggers=[jsonl,wandb]",
                                                                        "rank=8", "run_name=nowandb")])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "train.loggers" in line]
    assert notes == ["note: train.loggers: wandb did not start (No module named 'wandb'); going on without it"]


def test_an_unknown_logger_is_refused(tmp_path):
    result = runner.invoke(app, ["pretrain", *tiny_overrides(tmp_path, "train.loggers=[jsonl,mlflow]")])
    assert result.exit_code == 2 and "train.loggers" in result.output and "mlflow" in result.output
