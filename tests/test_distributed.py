"""DDP and FSDP2 through torchrun on CPU (gloo, 2 processes): same numbers as one process, exact resume."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sltrain_cli.checkpoint import LATEST, load_checkpoint
from sltrain_cli.runs import load_run

from helpers import tiny_overrides

# every test launches torchrun (two Python processes importing torch) and trains: 7-40 s each on 2 busy cores.
# The in-process DDP wrap is checked by test_cli.test_ddp_wrap_warns_nothing_and_keeps_buffers_rank_local.
pytestmark = pytest.mark.slow


def _run(out, nproc, *extra, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*tiny_overrides(out, "train.total_batch_size=4", "train.micro_batch_size=2"),
            *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "sltrain_cli", "pretrain", "--quiet", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "sltrain_cli", "pretrain", "--quiet", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def _close(a, b, tol=1e-5):
    assert len(a) == len(b)
    for (sa, la, va), (sb, lb, vb) in zip(a, b):
        assert sa == sb
        for x, y in ((la, lb), (va, vb)):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= tol), (a, b)


def _lines_up_to(run_dir, step):
    return [line for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= step]


def _assert_resumed(proc, uninterrupted, resumed, ckpt_name, step):
    """A resume, not a restart: the resumed process says where it started, and the metrics rows up to that step are
    the first run's bytes (their timings included: a restart would have measured new ones)."""
    assert f"{ckpt_name} at step {step}" in proc.stdout, proc.stdout[-2000:]
    kept = _lines_up_to(uninterrupted, step)
    assert kept and _lines_up_to(resumed, step) == kept


def _final_weights(run_dir, overrides):
    """The run's latest weights, loaded the way every command loads a run (sharded or not)."""
    return load_run(run_dir).model.state_dict()


@pytest.mark.parametrize("method", ["sltrain", "full", "apollo"])
def test_ddp_two_processes_match_one(tmp_path, cache_dir, method):
    _run(tmp_path, 1, f"method={method}", "rank=8", "run_name=one")
    _run(tmp_path, 2, f"method={method}", "rank=8", "run_name=two")
    one, two = tmp_path / "pretrain" / "one", tmp_path / "pretrain" / "two"
    _close(_losses(one), _losses(two))
    a = load_checkpoint(one / "checkpoints" / "step_000008.pt")["model"]
    b = load_checkpoint(two / "checkpoints" / "step_000008.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=0), k
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


def test_ddp_resume_continues_identically(tmp_path, cache_dir):
    _run(tmp_path, 2, "rank=8", "run_name=full")
    full = tmp_path / "pretrain" / "full"
    part = tmp_path / "pretrain" / "part"
    shutil.copytree(full, part)
    (part / "checkpoints" / "step_000008.pt").unlink()
    (part / "checkpoints" / LATEST).write_text("step_000004.pt\n")
    proc = _run(tmp_path, 2, "rank=8", "run_name=part", "train.resume=true")
    _assert_resumed(proc, full, part, "step_000004.pt", 4)
    _close(_losses(full), _losses(part), tol=0.0)


def test_torchrun_with_the_default_micro_batch(tmp_path, cache_dir):
    """An unset micro-batch is the global batch split over the processes (the default train config's case);
    only an explicit impossible combination is an error."""
    _run(tmp_path, 2, "rank=8", "train.micro_batch_size=null", "run_name=derived")
    config = (tmp_path / "pretrain" / "derived" / "config.yaml").read_text().splitlines()
    assert "  micro_batch_size: 2" in config and "  total_batch_size: 4" in config
    proc = _run(tmp_path, 2, "train.micro_batch_size=4", "run_name=bad4", check=False)
    assert proc.returncode != 0 and "train.total_batch_size" in proc.stderr


def test_bad_global_batch_is_a_clear_error(tmp_path, cache_dir):
    proc = _run(tmp_path, 2, "train.total_batch_size=6", "train.micro_batch_size=2", "run_name=bad", check=False)
    assert proc.returncode != 0
    assert "train.total_batch_size" in proc.stderr


def test_fsdp_matches_one_process_and_resumes(tmp_path, cache_dir):
    ov = ["rank=8", "train.parallel=fsdp"]
    _run(tmp_path, 1, "rank=8", "run_name=one")
    _run(tmp_path, 2, *ov, "run_name=fsdp")
    one, fsdp = tmp_path / "pretrain" / "one", tmp_path / "pretrain" / "fsdp"
    _close(_losses(one), _losses(fsdp), tol=1e-4)
    assert (fsdp / "checkpoints" / "step_000008").is_dir()  # sharded (torch.distributed.checkpoint)
    base = tiny_overrides(tmp_path, "rank=8")
    a, b = _final_weights(one, base), _final_weights(fsdp, base)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4), k
    # the sharded run exports (consolidated) to the weights of its one-process twin
    from safetensors.torch import load_file

    from sltrain_cli.export import export_run

    ea, eb = (load_file(str(export_run(run) / "model.safetensors")) for run in (one, fsdp))
    assert ea.keys() == eb.keys()
    for k in ea:
        assert torch.allclose(ea[k], eb[k], atol=1e-4), k
    # resume from the sharded step-4 checkpoint
    part = tmp_path / "pretrain" / "fsdp_part"
    shutil.copytree(fsdp, part)
    shutil.rmtree(part / "checkpoints" / "step_000008")
    (part / "checkpoints" / LATEST).write_text("step_000004\n")
    proc = _run(tmp_path, 2, *ov, "run_name=fsdp_part", "train.resume=true")
    # the sharded folder was loaded (not a restart), and the steps after it are the uninterrupted run's
    _assert_resumed(proc, fsdp, part, "step_000004", 4)
    _close(_losses(fsdp), _losses(part), tol=1e-6)


def test_factored_kernel_under_ddp_and_fsdp(tmp_path, cache_dir):
    """SparseLowRankLinear's factored kernel (a custom autograd Function with CSR products on a replicated support
    buffer) trains under DDP and FSDP2 to the same numbers as one process."""
    ov = ["method=sltrain", "rank=8", "method.kernel=factored"]
    _run(tmp_path, 1, *ov, "run_name=one")
    _run(tmp_path, 2, *ov, "run_name=ddp")
    _run(tmp_path, 2, *ov, "train.parallel=fsdp", "run_name=fsdp")
    one, ddp, fsdp = (tmp_path / "pretrain" / name for name in ("one", "ddp", "fsdp"))
    _close(_losses(one), _losses(ddp))
    _close(_losses(one), _losses(fsdp), tol=1e-4)
    for run in (ddp, fsdp):
        assert set(json.loads((run / "summary.json").read_text())["kernels"].values()) == {"factored"}
    a, b = _final_weights(one, ()), _final_weights(fsdp, ())
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4), k


def test_layerwise_under_ddp_is_refused(tmp_path, cache_dir):
    proc = _run(tmp_path, 2, "train.layerwise=true", "optim.grad_clip=0", "run_name=lw", check=False)
    assert proc.returncode != 0
    # each rank prints our one line (torchrun's own agent then reports the failed workers)
    assert proc.stderr.startswith("error: train.layerwise=true is single-process only")


def test_sigterm_to_the_launcher_is_exit_143_on_every_rank_and_one_line(tmp_path, cache_dir):
    """sltrain-torchrun: torchrun forwards the signal, every worker saves and reports interrupted, and the
    launcher's exit code is the signal's (plain torchrun: 1 and a traceback)."""
    import signal
    import time

    from sltrain_cli.checkpoint import latest_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "pretrain" / "term"
    cmd = [sys.executable, "-m", "sltrain_cli.launch", "--standalone", "--nproc_per_node=2", "-m", "sltrain_cli",
           "pretrain", "--quiet", *tiny_overrides(tmp_path, "steps=5000", "train.save_every=5", "train.eval_every=0",
                                                 "run_name=term")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and latest_checkpoint(run_dir / "checkpoints") is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("sltrain-torchrun: stopped by SIGTERM")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["world_size"] == 2
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{summary['steps']:06d}.pt"


def test_c4_mirror_two_processes_with_workers_match_one_and_resume(tmp_path, cache_dir, c4_mirror):
    """The harness stream under torchrun: 2 ranks x 2 tokenizer threads train on the one-process run's global
    batches (same losses), and a resume with another worker count continues identically."""
    t5 = Path(__file__).resolve().parent / "assets" / "t5-base"
    mirror = ("data=c4", f"data.path={c4_mirror}", f"tokenizer.path={t5}", "train.eval_tokens=300", "rank=8")
    _run(tmp_path, 1, *mirror, "data.num_workers=0", "run_name=one")
    _run(tmp_path, 2, *mirror, "data.num_workers=2", "run_name=two")
    one, two = tmp_path / "pretrain" / "one", tmp_path / "pretrain" / "two"
    _close(_losses(one), _losses(two))
    part = tmp_path / "pretrain" / "part"
    shutil.copytree(two, part)
    (part / "checkpoints" / "step_000008.pt").unlink()
    (part / "checkpoints" / LATEST).write_text("step_000004.pt\n")
    proc = _run(tmp_path, 2, *mirror, "data.num_workers=1", "run_name=part", "train.resume=true")
    _assert_resumed(proc, two, part, "step_000004.pt", 4)
    _close(_losses(two), _losses(part), tol=0.0)
