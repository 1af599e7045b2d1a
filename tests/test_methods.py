"""Every method and memory feature trains a tiny model on sotu with falling loss, and resumes exactly: the resumed
process runs only the remaining steps and keeps the earlier metrics rows byte for byte. Precision and activation
checkpointing are watched inside the loop (hooks on the model the run builds)."""
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import sltrain_cli.train as train_mod
from sltrain_cli.checkpoint import LATEST, load_checkpoint
from sltrain_cli.cli import app
from sltrain_cli.core.model import DecoderBlock

from helpers import tiny_overrides

VARIANTS = {
    "full": ["method=full"],
    "lowrank": ["method=lowrank", "rank=8"],
    "sltrain": ["method=sltrain", "rank=8", "delta=0.05"],
    "sparse": ["method=sparse", "delta=0.1"],
    "relora": ["method=relora", "rank=8", "method.merge_every=5", "method.restart_warmup=1"],
    "galore": ["method=galore", "rank=8", "method.update_proj_gap=4"],
    "adamw8bit": ["method=sltrain", "rank=8", "optim=adamw8bit"],
    "layerwise": ["method=sltrain", "rank=8", "train.layerwise=true", "optim.grad_clip=0"],
    "checkpointing": ["method=sltrain", "rank=8", "train.activation_checkpointing=true"],
    "bf16-mixed": ["method=sltrain", "rank=8", "train.precision=bf16-mixed"],
    "bf16-pure": ["method=sltrain", "rank=8", "train.precision=bf16-pure"],
}
STEPS, SAVE_AT, LAYERS, ACCUM = 12, 6, 2, 2  # model=tiny has 2 blocks; train=tiny: batch 4 in micro-batches of 2


def _pretrain(args):
    result = CliRunner().invoke(app, ["pretrain", "--quiet", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


class _Watch:
    """Hooks on the model a real `sltrain pretrain` builds: the dtypes of the projections' outputs in training
    forwards, the block calls made with grad enabled (forward + activation-checkpoint recomputes in backward: a
    pre-hook, since a recompute may stop early), the parameter dtypes, and the train_step calls."""

    def __init__(self, monkeypatch):
        self.steps, self.block_calls, self.act_dtypes, self.param_dtypes = 0, 0, set(), set()
        real_build, real_step = train_mod.build_model, train_mod.train_step

        def build_model(*a, **kw):
            model = real_build(*a, **kw)
            self.param_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
            for module in model.modules():
                if isinstance(module, DecoderBlock):
                    module.register_forward_pre_hook(self._block)
                    for proj in (module.attn.q, module.attn.o, module.mlp.down):
                        proj.register_forward_hook(self._output)
            return model

        def train_step(*a, **kw):
            self.steps += 1
            return real_step(*a, **kw)

        monkeypatch.setattr(train_mod, "build_model", build_model)
        monkeypatch.setattr(train_mod, "train_step", train_step)

    def _block(self, module, args):
        if module.training and torch.is_grad_enabled():
            self.block_calls += 1

    def _output(self, module, args, out):
        if module.training and torch.is_grad_enabled():
            self.act_dtypes.add(out.dtype)


# 1-2 s each: test-fast keeps the paper's method; the other methods have their own fast unit-test modules
@pytest.mark.parametrize("variant", [v if v == "sltrain" else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
def test_method_trains_and_resumes(tmp_path, cache_dir, monkeypatch, variant):
    if variant == "adamw8bit":
        pytest.importorskip("bitsandbytes", reason="optional extra (installed by make test)")
    base = tiny_overrides(tmp_path, *VARIANTS[variant], f"steps={STEPS}", "lr=3e-3", "train.log_every=1",
                          f"train.save_every={SAVE_AT}", "train.eval_every=0", "optim.warmup_steps=1")
    watch = _Watch(monkeypatch)
    _pretrain([*base, "run_name=a"])
    run = tmp_path / "pretrain" / "a"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, rows) if "loss" in r]
    assert len(losses) == STEPS and watch.steps == STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # it learns
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == VARIANTS[variant][0].split("=")[1]

    # precision and activation checkpointing reach the loop's forwards and backwards
    bf16 = variant.startswith("bf16")
    assert watch.act_dtypes == {torch.bfloat16 if bf16 else torch.float32}, watch.act_dtypes
    assert watch.param_dtypes == {torch.bfloat16 if variant == "bf16-pure" else torch.float32}, watch.param_dtypes
    per_pass = STEPS * ACCUM * LAYERS  # block calls of the training forwards
    assert watch.block_calls == per_pass * (2 if variant == "checkpointing" else 1), watch.block_calls
    if variant == "bf16-pure":  # the checkpointed weights are bf16 too
        final = load_checkpoint(run / "checkpoints" / f"step_{STEPS:06d}.pt")["model"]
        assert {v.dtype for v in final.values() if v.is_floating_point()} == {torch.bfloat16}

    # restart from the step-6 checkpoint: only steps 7-12 run, rows 1-6 are kept byte for byte (timings too),
    # and the final weights are the uninterrupted run's
    part = tmp_path / "pretrain" / "b"
    shutil.copytree(run, part)
    (part / "checkpoints" / f"step_{STEPS:06d}.pt").unlink()
    (part / "checkpoints" / LATEST).write_text(f"step_{SAVE_AT:06d}.pt\n")
    watch.steps = 0
    result = _pretrain([*base, "run_name=b", "train.resume=true"])
    assert f"at step {SAVE_AT}" in result.output
    assert watch.steps == STEPS - SAVE_AT, watch.steps  # a resume, not a restart
    resumed_rows = (part / "metrics.jsonl").read_text().splitlines()
    assert len(resumed_rows) == len(rows) and resumed_rows[:SAVE_AT] == rows[:SAVE_AT]
    a = load_checkpoint(run / "checkpoints" / f"step_{STEPS:06d}.pt")
    b = load_checkpoint(part / "checkpoints" / f"step_{STEPS:06d}.pt")
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
    from sltrain_cli.data.tokenizer import load_tokenizer
    from sltrain_cli.runs import build_model

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
