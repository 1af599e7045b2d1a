"""Every method and memory feature trains a tiny model on sotu with falling loss, and resumes exactly."""
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from sltrain_cli.checkpoint import LATEST, load_checkpoint
from sltrain_cli.cli import app

from helpers import tiny_overrides

VARIANTS = {
    "full": ["method=full"],
    "lowrank": ["method=lowrank", "rank=8"],
    "sltrain": ["method=sltrain", "rank=8", "delta=0.05"],
    "sparse": ["method=sparse", "delta=0.1"],
    "relora": ["method=relora", "rank=8", "method.merge_every=4", "method.restart_warmup=1"],
    "galore": ["method=galore", "rank=8", "method.update_proj_gap=4"],
    "adamw8bit": ["method=sltrain", "rank=8", "optim=adamw8bit"],
    "layerwise": ["method=sltrain", "rank=8", "train.layerwise=true", "optim.grad_clip=0"],
    "checkpointing": ["method=sltrain", "rank=8", "train.activation_checkpointing=true"],
    "bf16-mixed": ["method=sltrain", "rank=8", "train.precision=bf16-mixed"],
}


def _pretrain(args):
    result = CliRunner().invoke(app, ["pretrain", "--quiet", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_method_trains_and_resumes(tmp_path, cache_dir, variant):
    if variant == "adamw8bit":
        pytest.importorskip("bitsandbytes", reason="optional extra (installed by make test)")
    base = tiny_overrides(tmp_path, *VARIANTS[variant], "steps=12", "lr=3e-3", "train.log_every=1",
                          "train.save_every=6", "train.eval_every=0", "optim.warmup_steps=1")
    _pretrain([*base, "run_name=a"])
    run = tmp_path / "pretrain" / "a"
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # it learns
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == VARIANTS[variant][0].split("=")[1]

    # restart from the step-6 checkpoint: the same final weights
    part = tmp_path / "pretrain" / "b"
    shutil.copytree(run, part)
    (part / "checkpoints" / "step_000012.pt").unlink()
    (part / "checkpoints" / LATEST).write_text("step_000006.pt\n")
    _pretrain([*base, "run_name=b", "train.resume=true"])
    a = load_checkpoint(run / "checkpoints" / "step_000012.pt")
    b = load_checkpoint(part / "checkpoints" / "step_000012.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_layerwise_alone_runs_without_clipping(tmp_path, cache_dir):
    result = CliRunner().invoke(app, ["pretrain", "--quiet", *tiny_overrides(tmp_path, "train.layerwise=true",
                                                                             "run_name=lw")])
    assert result.exit_code == 0, result.output
    assert "gradient clipping is off" in result.output
    assert "  grad_clip: 0.0" in (tmp_path / "pretrain" / "lw" / "config.yaml").read_text().splitlines()


def test_layerwise_with_clipping_is_refused(tmp_path, cache_dir):
    result = CliRunner().invoke(app, ["pretrain", *tiny_overrides(tmp_path, "train.layerwise=true",
                                                                  "optim.grad_clip=1.0")])
    assert result.exit_code == 2 and "optim.grad_clip" in result.output


def test_relora_warm_start_loads_the_full_rank_weights(tmp_path, cache_dir):
    import dataclasses

    from sltrain_cli.compose import load_config
    from sltrain_cli.runs import build_model
    from sltrain_cli.tokenizer import load_tokenizer

    _pretrain(tiny_overrides(tmp_path, "method=full", "run_name=full"))
    ckpt = tmp_path / "pretrain" / "full" / "checkpoints" / "step_000008.pt"
    cfg = load_config(tiny_overrides(tmp_path, "method=relora", "rank=8", f"method.warm_start={ckpt}"))
    vocab = load_tokenizer(tmp_path / "pretrain" / "full" / "tokenizer").vocab_size
    model = build_model(dataclasses.replace(cfg.model, vocab_size=vocab), cfg.method, seed=123,
                        device=torch.device("cpu"), warm_start=cfg.method.warm_start)
    full = load_checkpoint(ckpt)["model"]
    assert torch.equal(model.layers[0].attn.q.weight, full["layers.0.attn.q.weight"])  # W0 = trained weight
    assert not model.layers[0].attn.q.weight.requires_grad
    assert torch.equal(model.lm_head.weight, full["lm_head.weight"])
