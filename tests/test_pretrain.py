"""End to end on sotu with a tiny model: run files, eval-ppl reproduction, exact resume, Ctrl-C."""
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sltrain_cli import data as data_lib
from sltrain_cli.checkpoint import LATEST, load_checkpoint
from sltrain_cli.cli import app

from helpers import tiny_overrides

runner = CliRunner()


def _pretrain(*args):
    result = runner.invoke(app, ["pretrain", "--quiet", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _metric_rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("runs")
    args = tiny_overrides(out, "run_name=base")
    result = _pretrain(*args)
    return out / "pretrain" / "base", args, result.output


def test_tiny_pretrain_writes_every_run_file(tiny_run):
    run_dir, _, output = tiny_run
    for name in ("config.yaml", "overrides.txt", "metrics.jsonl", "summary.json", "checkpoints/latest",
                 "tokenizer", "loss.png"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("command", "model", "method", "rank", "delta", "params_total", "params_trainable", "tokens",
                "steps", "val_loss", "val_ppl", "tokens_per_s", "peak_mem_bytes", "est_mem_gb", "status"):
        assert key in summary, key
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert math.isfinite(summary["val_ppl"]) and summary["val_ppl"] > 1
    assert summary["peak_mem_kind"] == "cpu_peak_rss" and summary["peak_mem_bytes"] > 0
    rows = _metric_rows(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(train_rows[0])
    assert (run_dir.parent / "results.csv").is_file()
    assert "validation perplexity" in output and "unigram" in output
    ckpt = load_checkpoint(run_dir / "checkpoints" / (run_dir / "checkpoints" / LATEST).read_text().strip())
    assert {"model", "optimizer", "scheduler", "step", "rng", "data", "config"} <= set(ckpt)
    assert any(k.endswith("indices") for k in ckpt["model"]), "the sparse supports are checkpointed"


def test_eval_ppl_reproduces_final_val_ppl(tiny_run):
    run_dir, _, _ = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    result = runner.invoke(app, ["eval-ppl", str(run_dir)])
    assert result.exit_code == 0, result.output
    out = json.loads((run_dir / "eval" / "sotu.json").read_text())
    assert out["val_ppl"] == summary["val_ppl"] and out["tokens"] == summary["val_tokens"]
    assert {"val_loss", "val_ppl", "tokens", "data"} <= set(out)


def test_eval_ppl_of_an_older_checkpoint_gets_its_own_file(tiny_run):
    run_dir, _, _ = tiny_run
    final = run_dir / "eval" / "sotu.json"
    runner.invoke(app, ["eval-ppl", str(run_dir)])
    before = final.read_bytes()
    result = runner.invoke(app, ["eval-ppl", str(run_dir / "checkpoints" / "step_000004.pt")])
    assert result.exit_code == 0, result.output
    older = json.loads((run_dir / "eval" / "sotu-step_000004.json").read_text())
    assert older["checkpoint"].endswith("step_000004.pt") and older["val_ppl"] != json.loads(before)["val_ppl"]
    assert final.read_bytes() == before  # the run's final evaluation is never overwritten


def test_eval_ppl_missing_run_is_user_error(tmp_path):
    result = runner.invoke(app, ["eval-ppl", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "RUN" in result.output


def _restart_from_step(src: Path, dst: Path, step: int):
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    for p in ckpts.glob("step_*.pt"):
        if int(p.stem.split("_")[1]) > step:
            p.unlink()
    (ckpts / LATEST).write_text(f"step_{step:06d}.pt\n")
    (dst / "summary.json").unlink()


def test_resume_is_bitwise_identical(tiny_run):
    run_dir, args, _ = tiny_run
    resumed = run_dir.parent / "resumed"
    _restart_from_step(run_dir, resumed, 4)
    _pretrain(*[a for a in args if not a.startswith("run_name")], "run_name=resumed", "train.resume=true")
    timing = ("tokens_per_s", "elapsed_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_metric_rows(resumed)) == strip(_metric_rows(run_dir))
    a = load_checkpoint(run_dir / "checkpoints" / "step_000008.pt")["model"]
    b = load_checkpoint(resumed / "checkpoints" / "step_000008.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_marks_interrupted(tiny_run, monkeypatch):
    run_dir, args, _ = tiny_run
    real = data_lib.build_datasets

    def interrupting(*a, **kw):
        train, val = real(*a, **kw)
        calls = {"n": 0}
        original = train.next_batch

        def next_batch():
            calls["n"] += 1
            if calls["n"] == 6:  # Ctrl-C during step 6 (steps 1-5 done): step 6 completes, then the run stops
                os.kill(os.getpid(), signal.SIGINT)
            return original()

        train.next_batch = next_batch
        return train, val

    monkeypatch.setattr(data_lib, "build_datasets", interrupting)
    base = [a for a in args if not a.startswith("run_name")]
    result = runner.invoke(app, ["pretrain", "--quiet", *base, "run_name=ctrlc"])
    assert result.exit_code == 130, result.output
    ctrlc = run_dir.parent / "ctrlc"
    summary = json.loads((ctrlc / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 6 and summary["signal"] == "SIGINT"
    assert (ctrlc / "checkpoints" / "step_000006.pt").is_file()
    monkeypatch.setattr(data_lib, "build_datasets", real)
    _pretrain(*base, "run_name=ctrlc", "train.resume=true")
    a = load_checkpoint(run_dir / "checkpoints" / "step_000008.pt")["model"]
    b = load_checkpoint(ctrlc / "checkpoints" / "step_000008.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_ppl_on_a_local_file_uses_all_of_it(tiny_run, tmp_path):
    run_dir, _, _ = tiny_run
    text = "The state of the union is strong, and the people of this nation are at work. " * 60
    (tmp_path / "speech.txt").write_text(text)
    result = runner.invoke(app, ["eval-ppl", str(run_dir), "data=local", f"data.path={tmp_path / 'speech.txt'}"])
    assert result.exit_code == 0, result.output
    out = json.loads((run_dir / "eval" / "local_speech.json").read_text())
    assert out["split"] == "all" and out["tokens"] > 0 and math.isfinite(out["val_ppl"])
