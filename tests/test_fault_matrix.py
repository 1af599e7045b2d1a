"""The faults a careful user found at their real source (issue 20): a real full disk, damaged checkpoint bytes, run
names outside out_dir, unknown ``+key``s, a collapsed run, signals before the first step and after the last, and
the run's bookkeeping. Each test drives the real fault where this machine can make it."""
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
import torch
from typer.testing import CliRunner

import sltrain_cli.files as files
import sltrain_cli.train as train_mod
from sltrain_cli.checkpoint import CHECKSUM, checkpoint_problem, latest_checkpoint, load_checkpoint
from sltrain_cli.cli import app
from sltrain_cli.files import atomic_torch_save

from helpers import tiny_overrides

runner = CliRunner()
STEPS = 8  # train=tiny: eval and checkpoint every 4 steps


def _args(out, name, *extra):
    return [*tiny_overrides(out, "method=sltrain", "rank=8", f"run_name={name}"), *extra]


def _pretrain(out, name, *extra):
    return runner.invoke(app, ["pretrain", "--quiet", *_args(out, name, *extra)])


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _weights(run_dir, step=STEPS):
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:06d}.pt")["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _error_lines(output):
    return [x for x in output.splitlines() if x.startswith("error:")]


@pytest.fixture(scope="module")
def ref(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("matrix")
    result = _pretrain(out, "ref")
    assert result.exit_code == 0, result.output
    run_dir = out / "pretrain" / "ref"
    return out, run_dir, _weights(run_dir), _summary(run_dir)


# ------------------------------------------------------------------------------------------------ a full disk
def _mount_tmpfs(path, size_bytes) -> bool:
    """A real small filesystem (root only, as CI runs); False where this machine cannot make one."""
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.slow  # a tmpfs or an injected ENOSPC, then a resume: ~2 s
def test_a_full_disk_is_one_line_exit_2_and_the_run_resumes_exactly(ref, tmp_path, monkeypatch):
    """Where a tmpfs can be mounted, the disk is really full. Elsewhere the write inside torch.save raises the
    OSError(ENOSPC) a full disk raises, and torch itself turns it into ``RuntimeError: [enforce fail at
    inline_container.cc] . unexpected pos`` -- the exact error a real full disk gives (the old handler missed it)."""
    out, ref_dir, ref_weights, ref_summary = ref
    ckpt = (ref_dir / "checkpoints" / "step_000004.pt").stat().st_size
    others = sum(p.stat().st_size for p in ref_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    disk = tmp_path / "small"
    real = _mount_tmpfs(disk, others + int(1.25 * ckpt))  # the first checkpoint fits; the second fails inside torch
    try:
        if not real:
            real_write = files._write_then_replace

            def full_after_a_while(path, write):
                if not str(path).endswith(f"step_{STEPS:06d}.pt"):
                    return real_write(path, write)

                class Full:
                    def __init__(self, f):
                        self.f, self.n = f, 0

                    def write(self, data):
                        self.n += len(data)
                        if self.n > ckpt // 2:
                            raise OSError(28, "No space left on device")
                        return self.f.write(data)

                    def flush(self):
                        self.f.flush()

                return real_write(path, lambda f: write(Full(f)))

            monkeypatch.setattr(files, "_write_then_replace", full_after_a_while)
        result = _pretrain(disk, "r")
        run_dir = disk / "pretrain" / "r"
        assert result.exit_code == 2, result.output
        lines = _error_lines(result.output)
        assert len(lines) == 1 and "no space left" in lines[0] and "step_000004.pt" in lines[0], result.output
        assert "Traceback" not in result.output and "unexpected pos" not in result.output
        assert latest_checkpoint(run_dir / "checkpoints").name == "step_000004.pt"
        assert not list((run_dir / "checkpoints").glob(".*.tmp"))
        monkeypatch.undo()
        if real:  # make room: the same filesystem, larger
            subprocess.run(["mount", "-o", f"remount,size={others + 4 * ckpt + (1 << 20)}", str(disk)], check=True)
        again = _pretrain(disk, "r", "train.resume=true")
        assert again.exit_code == 0 and "at step 4" in again.output, again.output
        assert _same(_weights(run_dir), ref_weights) and _summary(run_dir)["val_ppl"] == ref_summary["val_ppl"]
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------------------------ damaged bytes
def _damage(path, offset_fraction=0.5, size=4096):
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_fraction)
    data[at:at + size] = os.urandom(size)
    path.write_bytes(bytes(data))


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_damaged_bytes_are_found_and_the_previous_checkpoint_is_used_by_every_reader(ref, tmp_path):
    out, ref_dir, ref_weights, ref_summary = ref
    run_dir = _copy_run(ref_dir, out / "pretrain" / "damaged")
    final = run_dir / "checkpoints" / f"step_{STEPS:06d}.pt"
    _damage(final)
    assert "damaged" in checkpoint_problem(final)

    evaluated = runner.invoke(app, ["eval-ppl", str(run_dir)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "cannot be loaded" in evaluated.output and final.name in evaluated.output
    assert "at step 4" in evaluated.output
    assert (run_dir / "eval" / "sotu-step_000004.json").is_file() and not (run_dir / "eval" / "sotu.json").exists()

    exported = runner.invoke(app, ["export", str(run_dir)])
    assert exported.exit_code == 0, exported.output
    assert "cannot be loaded" in exported.output and "step 4" in exported.output
    assert (run_dir / "export-step_000004" / "model.safetensors").is_file()

    generated = runner.invoke(app, ["generate", str(run_dir), "--prompt", "The", "--max-new-tokens", "3"])
    assert generated.exit_code == 0 and "cannot be loaded" in generated.output and "step 4" in generated.output

    resumed = _pretrain(out, "damaged", "train.resume=true")
    assert resumed.exit_code == 0 and "at step 4" in resumed.output, resumed.output
    assert _same(_weights(run_dir), ref_weights) and _summary(run_dir)["val_ppl"] == ref_summary["val_ppl"]


def test_a_checkpoint_from_before_checksums_still_loads_and_damage_to_it_is_still_noticed(ref, tmp_path):
    _, ref_dir, _, _ = ref
    state = load_checkpoint(ref_dir / "checkpoints" / "step_000004.pt")
    assert CHECKSUM in state
    del state[CHECKSUM]
    old = tmp_path / "step_000004.pt"
    atomic_torch_save(old, state)
    assert checkpoint_problem(old) is None
    state["model"][next(iter(state["model"]))] += 1  # a flipped value in a file that has its checksum
    atomic_torch_save(tmp_path / "step_000008.pt", {**state, CHECKSUM: load_checkpoint(
        ref_dir / "checkpoints" / "step_000004.pt")[CHECKSUM]})
    assert "checksum" in checkpoint_problem(tmp_path / "step_000008.pt")


def test_a_file_that_is_no_checkpoint_is_named_in_plain_words(ref, tmp_path):
    not_a_ckpt = tmp_path / "notes.pt"
    not_a_ckpt.write_text("these are my notes, not a checkpoint\n" * 20)
    result = runner.invoke(app, ["eval-ppl", str(not_a_ckpt)])
    assert result.exit_code == 2
    (line,) = _error_lines(result.output)
    assert line.endswith("not a readable PyTorch checkpoint (truncated, damaged, or another kind of file)"), line


# ------------------------------------------------------------------------------------------------ run names, keys
@pytest.mark.parametrize("name", ["../../escape", "/srv/elsewhere", "a/b", "..", "."])
def test_run_name_must_be_one_folder_inside_out_dir(tmp_path, name):
    out = tmp_path / "deep" / "out"
    result = runner.invoke(app, ["pretrain", "--quiet", *tiny_overrides(out), f"run_name={name}"])
    assert result.exit_code == 2
    (line,) = _error_lines(result.output)
    assert line.startswith("error: run_name: must be one folder name"), line
    assert not (tmp_path / "escape").exists() and not out.exists() and not (tmp_path / "deep").exists()


def test_a_non_ascii_run_name_is_a_folder_of_that_name(ref):
    out, _, _, _ = ref
    result = _pretrain(out, "première", "steps=2")
    assert result.exit_code == 0, result.output
    assert _summary(out / "pretrain" / "première")["status"] == "completed"


@pytest.mark.parametrize("override, key", [("+train.stepz=10", "train.stepz"), ("+stepz=1", "stepz"),
                                           ("++model.foo=1", "model.foo")])
def test_unknown_keys_are_refused_with_or_without_plus(tmp_path, override, key):
    result = runner.invoke(app, ["pretrain", "--quiet", *tiny_overrides(tmp_path), override])
    assert result.exit_code == 2
    (line,) = _error_lines(result.output)
    assert line.startswith(f"error: {key}: unknown key"), line
    assert not (tmp_path / "pretrain").exists()


# ------------------------------------------------------------------------------------------------ collapse
def test_a_collapsed_run_is_diverged_and_a_rerun_says_so(ref):
    out, _, _, _ = ref
    args = ("lr=1e3", "steps=40", "train.log_every=2", "train.eval_every=0", "train.save_every=10")
    result = _pretrain(out, "collapse", *args)
    run_dir = out / "pretrain" / "collapse"
    summary = _summary(run_dir)
    assert result.exit_code == 3, result.output
    assert summary["status"] == "diverged" and "uniform prediction" in summary["diverged_reason"]
    assert summary["diverged_step"] < 40 and latest_checkpoint(run_dir / "checkpoints") is not None
    assert "diverged at step" in result.output
    again = _pretrain(out, "collapse", *args)
    assert again.exit_code == 2
    (line,) = _error_lines(again.output)
    assert "diverged" in line and "train.resume=true" not in line, line


def test_collapse_watch_rules():
    watch = train_mod.CollapseWatch(vocab_size=512, unigram_ppl=200.0, warmup_steps=10)
    uniform = watch.uniform_loss
    assert all(watch.logged(s, uniform + 1) is None for s in range(1, 11))  # warm-up: never
    assert all(watch.logged(s, uniform) is None for s in range(11, 15))
    assert "uniform prediction" in watch.logged(15, uniform)
    healthy = train_mod.CollapseWatch(512, 200.0, 0)
    assert all(healthy.logged(s, uniform - 0.01) is None for s in range(1, 50))  # short and near uniform: no
    assert healthy.final(480.0, 200.0) is None  # never beat the unigram loss: undertrained, not collapsed
    learned = train_mod.CollapseWatch(512, 200.0, 0)
    learned.logged(5, 4.0)  # below ln(200) = 5.30
    assert "unigram" in learned.final(250.0, 200.0) and learned.final(150.0, 200.0) is None


# ------------------------------------------------------------------------------------------------ signals
def _kill_self_in(monkeypatch, target, attr, sig=signal.SIGTERM, at=1):
    real = getattr(target, attr)
    calls = {"n": 0}

    def wrapped(*a, **kw):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), sig)
        return real(*a, **kw)

    monkeypatch.setattr(target, attr, wrapped)


@pytest.mark.parametrize("moment", ["preparing data", pytest.param("final evaluation", marks=pytest.mark.slow),
                                    pytest.param("writing summary", marks=pytest.mark.slow),
                                    pytest.param("after summary", marks=pytest.mark.slow)])
def test_sigterm_at_the_edges_of_a_run_is_one_line_and_resumes(ref, monkeypatch, moment):
    out, _, ref_weights, ref_summary = ref
    name = "edge-" + moment.replace(" ", "-")
    with monkeypatch.context() as m:
        if moment == "preparing data":
            _kill_self_in(m, train_mod.data_lib, "build_datasets")
        elif moment == "final evaluation":
            _kill_self_in(m, train_mod, "evaluate_ppl", at=2)  # evals at step 4 and at the end
        elif moment == "writing summary":  # the final evaluation is done, summary.json not yet written
            _kill_self_in(m, train_mod.Trackers, "close")
        else:
            import sltrain_cli.results as results

            _kill_self_in(m, results, "plot_run_curves")  # drawn by the CLI once summary.json is written
        result = _pretrain(out, name)
    run_dir = out / "pretrain" / name
    assert result.exit_code == 143, result.output
    assert "Traceback" not in result.output
    summary = _summary(run_dir)
    if moment == "after summary":  # the run had completed: its files say so, the exit code says the signal
        assert summary["status"] == "completed" and "after the run completed" in result.output
        return
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM", summary
    assert summary["val_ppl"] is None and "validation perplexity" not in result.output
    assert [x for x in result.output.splitlines() if x.startswith("interrupted (SIGTERM)")], result.output
    again = _pretrain(out, name, "train.resume=true")
    assert again.exit_code == 0, again.output
    assert _same(_weights(run_dir), ref_weights) and _summary(run_dir)["val_ppl"] == ref_summary["val_ppl"]


def test_sigterm_while_the_config_is_composed_is_exit_143(tmp_path, monkeypatch):
    import sltrain_cli.compose as compose

    _kill_self_in(monkeypatch, compose, "load_config")
    result = runner.invoke(app, ["pretrain", "--quiet", *tiny_overrides(tmp_path)])
    assert result.exit_code == 143 and "interrupted (SIGTERM)" in result.output, result.output


# ------------------------------------------------------------------------------------------------ bookkeeping
def test_a_missing_warm_start_is_one_line_before_any_folder(tmp_path):
    result = runner.invoke(app, ["pretrain", "--quiet", *tiny_overrides(tmp_path), "method=relora",
                                 "method.warm_start=/nope.pt"])
    assert result.exit_code == 2
    (line,) = _error_lines(result.output)
    assert line.startswith("error: method.warm_start:") and "/nope.pt" in line
    assert not (tmp_path / "pretrain").exists()


def test_a_completed_run_missing_from_results_csv_gets_its_row_back(ref):
    out, _, _, _ = ref
    table = out / "pretrain" / "results.csv"
    kept = [line for line in table.read_text().splitlines() if not line.startswith("ref,")]
    table.write_text("\n".join(kept) + "\n")
    result = _pretrain(out, "ref")
    assert result.exit_code == 0 and "not training it again" in result.output
    assert any(line.startswith("ref,") for line in table.read_text().splitlines())


@pytest.mark.slow
def test_resume_keeps_the_whole_runs_start_argv_and_peak_and_lists_segments(ref, monkeypatch):
    out, _, _, _ = ref
    with monkeypatch.context() as m:
        _kill_self_in(m, train_mod, "train_step", sig=signal.SIGINT, at=3)
        first = _pretrain(out, "segments")
    assert first.exit_code == 130
    run_dir = out / "pretrain" / "segments"
    before = _summary(run_dir)
    assert before["val_ppl"] is None and before["last_eval"] is None
    again = _pretrain(out, "segments", "train.resume=true")
    assert again.exit_code == 0
    after = _summary(run_dir)
    assert after["start_time"] == before["start_time"]
    assert [s["status"] for s in after["segments"]] == ["interrupted", "completed"]
    assert [s["resumed_from_step"] for s in after["segments"]] == [None, 3]
    assert after["peak_mem_bytes"] == max(s["peak_mem_bytes"] for s in after["segments"])


@pytest.mark.slow  # subprocess runs: ~7 s
def test_a_closed_stdout_does_not_decide_the_runs_status(tmp_path, cache_dir):
    name = f"piped-{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, "-m", "sltrain_cli", "pretrain", *_args(tmp_path, name, "steps=24")]  # notes follow
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    proc.stdout.readline()  # `| head -1`: read one line, then go away
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert _summary(tmp_path / "pretrain" / name)["status"] == "completed"
