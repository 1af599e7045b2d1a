"""Fault injection: signals at seeded random moments, SIGKILL, truncated checkpoints, a full disk, changed
configs, divergence and a second process on the same folder. Nothing is lost and nothing is silently wrong."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import sltrain_cli.files as files
import sltrain_cli.train as train_mod
from sltrain_cli.checkpoint import checkpoint_problem, latest_checkpoint, load_checkpoint
from sltrain_cli.cli import app
from sltrain_cli.files import RunLock

from helpers import tiny_overrides

runner = CliRunner()
STEPS = 8  # train=tiny: eval and checkpoint every 4 steps


def _args(out, name, *extra):
    return [*tiny_overrides(out, "method=sltrain", "rank=8", f"run_name={name}"), *extra]


def _final(run_dir):
    state = load_checkpoint(run_dir / "checkpoints" / f"step_{STEPS:06d}.pt")
    return state["model"], json.loads((run_dir / "summary.json").read_text())


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted run every interrupted one must reproduce bitwise."""
    out = tmp_path_factory.mktemp("faults")
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "ref")])
    assert result.exit_code == 0, result.output
    weights, summary = _final(out / "pretrain" / "ref")
    return out, weights, summary


def _signal_at(monkeypatch, phase: str, n: int, sig: int, times: int = 1) -> None:
    """Send ``sig`` to this process at the n-th call of the phase: during a training step, at the start of an
    evaluation, or in the middle of a checkpoint write (the temp file is open)."""
    calls = {"n": 0}

    def hit():
        calls["n"] += 1
        if calls["n"] == n:
            for _ in range(times):
                os.kill(os.getpid(), sig)

    if phase == "step":
        real_step = train_mod.train_step

        def step(*a, **kw):
            hit()
            return real_step(*a, **kw)

        monkeypatch.setattr(train_mod, "train_step", step)
    elif phase == "eval":
        real_eval = train_mod.evaluate_ppl

        def evaluate(*a, **kw):
            hit()
            return real_eval(*a, **kw)

        monkeypatch.setattr(train_mod, "evaluate_ppl", evaluate)
    else:
        real_write = files._write_then_replace

        def write_then_replace(path, write):
            if str(path).endswith(".pt"):
                return real_write(path, lambda f: (hit(), write(f)))
            return real_write(path, write)

        monkeypatch.setattr(files, "_write_then_replace", write_then_replace)


def _moments(seed: int, count: int = 10):
    """Seeded random (phase, n) moments, always including an evaluation and a checkpoint write."""
    rng = random.Random(seed)
    picks = [("eval", rng.randint(1, 2)), ("save", rng.randint(1, 2))]
    while len(picks) < count:
        phase = rng.choice(["step", "step", "eval", "save"])
        picks.append((phase, rng.randint(1, STEPS if phase == "step" else 2)))
    return picks


@pytest.mark.slow  # ten interrupted + resumed runs per signal: ~17 s each
@pytest.mark.parametrize("sig, code, seed", [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 2)])
def test_a_signal_at_any_moment_resumes_bitwise(reference, monkeypatch, sig, code, seed):
    out, ref_weights, ref_summary = reference
    for i, (phase, n) in enumerate(_moments(seed)):
        name = f"{signal.Signals(sig).name}-{i}-{phase}{n}"
        with monkeypatch.context() as m:
            _signal_at(m, phase, n, sig)
            first = runner.invoke(app, ["pretrain", "--quiet", *_args(out, name)])
        run_dir = out / "pretrain" / name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert first.exit_code == code, (name, first.output)
        assert summary["status"] == "interrupted" and summary["signal"] == signal.Signals(sig).name, name
        stopped_at = summary["steps"]
        assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{stopped_at:06d}.pt", name
        again = runner.invoke(app, ["pretrain", "--quiet", *_args(out, name, "train.resume=true")])
        assert again.exit_code == 0, (name, again.output)
        assert f"at step {stopped_at}" in again.output, name  # a resume, not a restart
        weights, resumed = _final(run_dir)
        assert resumed["status"] == "completed" and _same_weights(weights, ref_weights), name
        assert resumed["val_ppl"] == ref_summary["val_ppl"], name


def test_a_second_signal_aborts_at_once(reference, monkeypatch):
    out, _, _ = reference
    _signal_at(monkeypatch, "step", 6, signal.SIGINT, times=2)
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "twice")])
    run_dir = out / "pretrain" / "twice"
    assert result.exit_code == 130
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_000004.pt"  # nothing saved after the abort


@pytest.mark.slow  # three killed subprocess runs: ~6 s
def test_sigkill_never_leaves_an_unloadable_latest_checkpoint(tmp_path, cache_dir):
    rng = random.Random(7)
    args = _args(tmp_path, "killed", "steps=400", "train.save_every=1", "train.eval_every=0",
                 "train.keep_checkpoints=2")
    run_dir = tmp_path / "pretrain" / "killed"
    for i in range(3):
        cmd = [sys.executable, "-m", "sltrain_cli", "pretrain", *args, *(["train.resume=true"] if i else []),
               "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and latest_checkpoint(run_dir / "checkpoints") is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 1.0))  # somewhere in the middle of steps and checkpoint writes
        proc.kill()
        proc.wait()
        latest = latest_checkpoint(run_dir / "checkpoints")
        assert latest is not None and checkpoint_problem(latest) is None
        marker = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert checkpoint_problem(run_dir / "checkpoints" / marker) is None
    assert len([p for p in (run_dir / "checkpoints").glob("step_*.pt")]) <= 3  # retention kept up


@pytest.mark.slow  # two runs (test-fast: test_fault_matrix's damaged-bytes fallback)
def test_a_truncated_latest_checkpoint_falls_back(reference):
    out, ref_weights, ref_summary = reference
    src = out / "pretrain" / "ref"
    run_dir = out / "pretrain" / "truncated"
    runner.invoke(app, ["pretrain", "--quiet", *_args(out, "truncated")])
    final = run_dir / "checkpoints" / f"step_{STEPS:06d}.pt"
    final.write_bytes(final.read_bytes()[:1000])
    (run_dir / "summary.json").unlink()  # the run looks killed during its last write
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "truncated", "train.resume=true")])
    assert result.exit_code == 0, result.output
    assert "cannot be loaded" in result.output and "at step 4" in result.output
    weights, summary = _final(run_dir)
    assert _same_weights(weights, ref_weights) and summary["val_ppl"] == ref_summary["val_ppl"]
    assert src.is_dir()


@pytest.mark.parametrize("change", ["lr=0.05", "rank=4", "steps=12", "data.seq_len=32"])
def test_resuming_with_another_config_is_refused(reference, change):
    out, _, _ = reference
    run_dir = out / "pretrain" / "ref"
    before = (run_dir / "config.yaml").read_bytes(), (run_dir / "overrides.txt").read_bytes()
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "ref", change, "train.resume=true")])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    key = {"lr": "optim.lr", "rank": "method.rank", "steps": "train.steps", "data.seq_len": "data.seq_len"}
    assert line.startswith("error: train.resume:") and key[change.split("=")[0]] in line
    assert ((run_dir / "config.yaml").read_bytes(), (run_dir / "overrides.txt").read_bytes()) == before


def test_cadence_keys_may_change_on_resume(reference):
    out, ref_weights, ref_summary = reference
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "ref", "train.log_every=1",
                                                                  "train.resume=true")])
    assert result.exit_code == 0, result.output
    # accepted as a resume of the finished run (not refused, not a restart): nothing trained again, same numbers
    assert f"step_{STEPS:06d}.pt at step {STEPS}" in result.output, result.output
    weights, summary = _final(out / "pretrain" / "ref")
    assert summary["status"] == "completed" and summary["resumed_from_step"] == STEPS
    assert summary["steps"] == STEPS and summary["val_ppl"] == ref_summary["val_ppl"]
    assert _same_weights(weights, ref_weights)


def test_override_order_does_not_change_the_run(reference):
    out, _, _ = reference
    args = list(reversed(tiny_overrides(out, "method=sltrain", "rank=8")))
    a = runner.invoke(app, ["pretrain", "--quiet", *tiny_overrides(out, "method=sltrain", "rank=8")])
    b = runner.invoke(app, ["pretrain", "--quiet", *args])
    assert a.exit_code == 0 and b.exit_code == 0
    assert "not training it again" in b.output  # the same folder, found and recognised


def test_a_rerun_over_an_interrupted_run_is_refused_and_says_how_to_go_on(reference, monkeypatch):
    out, _, _ = reference
    with monkeypatch.context() as m:
        _signal_at(m, "step", 3, signal.SIGTERM)
        assert runner.invoke(app, ["pretrain", "--quiet", *_args(out, "again")]).exit_code == 143
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "again")])
    assert result.exit_code == 2
    assert "train.resume=true" in result.output and "train.overwrite=true" in result.output
    assert (out / "pretrain" / "again" / "checkpoints" / "step_000003.pt").is_file()  # nothing deleted
    ok = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "again", "train.overwrite=true")])
    assert ok.exit_code == 0 and not (out / "pretrain" / "again" / "checkpoints" / "step_000003.pt").exists()


def test_resume_true_without_a_checkpoint_starts_fresh(reference):
    out, _, _ = reference
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "nockpt", "train.resume=true")])
    assert result.exit_code == 0 and "no checkpoint" in result.output and "starting fresh" in result.output


def test_divergence_ends_diverged_with_strict_json(reference):
    out, _, _ = reference
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "diverged", "lr=1e30")])
    assert result.exit_code == 3, result.output
    text = (out / "pretrain" / "diverged" / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite {c} in summary.json"))
    assert summary["status"] == "diverged" and summary["diverged_step"] >= 1 and summary["val_ppl"] is None
    assert "lr" in result.output and "grad_clip" in result.output


@pytest.mark.parametrize("bad", ["lr=inf", "lr=nan", "optim.eps=inf", "lr=-1"])
def test_non_finite_settings_are_refused(tmp_path, bad):
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(tmp_path, "x", bad)])
    assert result.exit_code == 2 and result.output.startswith("error: optim.")
    assert not (tmp_path / "pretrain").exists()


def test_a_second_process_on_the_same_folder_is_refused(reference):
    out, _, _ = reference
    run_dir = out / "pretrain" / "busy"
    with RunLock(run_dir):  # as a running process holds it
        result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "busy")])
    assert result.exit_code == 2 and "in use by another process" in result.output
    assert not (run_dir / "config.yaml").exists()


def test_resume_from_something_that_is_not_a_checkpoint(reference, tmp_path):
    out, _, _ = reference
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    result = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "junk", f"train.resume={junk}")])
    assert result.exit_code == 2 and "train.resume" in result.output and "not a usable checkpoint" in result.output


@pytest.mark.slow  # two runs saving every step: ~2-3 s
def test_stale_temp_files_are_removed_and_old_checkpoints_pruned(reference):
    out, _, _ = reference
    run_dir = out / "pretrain" / "prune"
    runner.invoke(app, ["pretrain", "--quiet", *_args(out, "prune", "train.save_every=1", "train.keep_checkpoints=2")])
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert names == ["step_000006.pt", "step_000007.pt", "step_000008.pt"]
    stale = run_dir / "checkpoints" / ".step_000009.pt.abc.tmp"
    stale.write_bytes(b"half")
    runner.invoke(app, ["pretrain", "--quiet", *_args(out, "prune", "train.save_every=1",
                                                      "train.keep_checkpoints=2", "train.overwrite=true")])
    assert not stale.exists()


def test_files_get_the_users_umask(reference):
    out, _, _ = reference
    mask = os.umask(0o022)
    os.umask(mask)
    for path in ((out / "pretrain" / "ref" / "summary.json"), (out / "pretrain" / "ref" / "checkpoints" / "latest")):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


@pytest.mark.slow  # three runs (test-fast: test_methods' layerwise run)
def test_layerwise_runs_stop_between_steps_and_resume_bitwise(reference, monkeypatch):
    out, _, _ = reference
    extra = ("train.layerwise=true", "optim.grad_clip=0")
    assert runner.invoke(app, ["pretrain", "--quiet", *_args(out, "lw-ref", *extra)]).exit_code == 0
    ref_weights, ref_summary = _final(out / "pretrain" / "lw-ref")
    with monkeypatch.context() as m:
        _signal_at(m, "step", 3, signal.SIGTERM)
        assert runner.invoke(app, ["pretrain", "--quiet", *_args(out, "lw", *extra)]).exit_code == 143
    assert (out / "pretrain" / "lw" / "checkpoints" / "step_000003.pt").is_file()
    again = runner.invoke(app, ["pretrain", "--quiet", *_args(out, "lw", *extra, "train.resume=true")])
    assert again.exit_code == 0 and "at step 3" in again.output
    weights, summary = _final(out / "pretrain" / "lw")
    assert _same_weights(weights, ref_weights) and summary["val_ppl"] == ref_summary["val_ppl"]
