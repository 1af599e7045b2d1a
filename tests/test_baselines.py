"""method=apollo and method=fira: core/apollo.py and core/fira.py equal their references (apollo-torch 1.0.3, fira
1.0.2: test extras) bitwise, resume bitwise, train from the command line (APOLLO, APOLLO-Mini, Fira), and refuse what
they cannot do in one line."""
import io

import pytest
import torch

from sltrain_cli.core.apollo import APOLLOAdamW

SHAPES = [(48, 16), (16, 40), (24, 24)]  # tall (projected on the right), wide (on the left), square (right)
VARIANTS = {"apollo": dict(rank=4, scale_type="channel", scale=1.0),
            "apollo-mini": dict(rank=1, scale_type="tensor", scale=128.0)}


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES] + [
        torch.nn.Parameter(torch.randn(7, generator=gen))]


def _ours(params, variant, gap=3):
    group = {"params": params[:3], "apollo": True, "update_proj_gap": gap, **VARIANTS[variant]}
    return APOLLOAdamW([{"params": params[3:]}, group], lr=0.01, weight_decay=0.1, eps=1e-8)


GRAD_SCALES = (1.0, 0.25, 4.0, 0.5)  # gradients that shrink and grow: the norm-growth limiter acts on some steps only


def _steps(opts_params, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for step in range(n):
        grads = [torch.randn(p.shape, generator=gen) * GRAD_SCALES[step % 4] for p in opts_params[0][1]]
        for opt, params in opts_params:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_the_reference_bitwise(variant):
    """12 steps across four projection refreshes (gap 3) on tall, wide and square weights plus a plain vector:
    every weight equal bit for bit (the same operations in the same order; the reference is apollo-torch)."""
    from apollo_torch import APOLLOAdamW as Reference

    ours_p, ref_p = _params(), _params()
    ref = Reference([{"params": ref_p[3:]}, {"params": ref_p[:3], "proj": "random", "proj_type": "std",
                                              "update_proj_gap": 3, **VARIANTS[variant]}],
                    lr=0.01, weight_decay=0.1, eps=1e-8)
    _steps([(_ours(ours_p, variant), ours_p), (ref, ref_p)], 12)
    for a, b in zip(ours_p, ref_p):
        assert torch.equal(a, b), (a - b).abs().max()
    assert not torch.equal(ours_p[0], _params()[0])


def test_resume_is_bitwise_with_weights_only_load():
    """Stopped between two refreshes: the checkpoint holds the projection, its seed and the limiter's norm."""
    full_p = _params()
    full = _ours(full_p, "apollo")
    _steps([(full, full_p)], 9)
    part_p = _params()
    part = _ours(part_p, "apollo")
    _steps([(part, part_p)], 5)
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    again_p = [torch.nn.Parameter(p.detach().clone()) for p in part_p]
    again = _ours(again_p, "apollo")
    again.load_state_dict(torch.load(buf, weights_only=True))
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) * GRAD_SCALES[i % 4] for p in full_p] for i in range(9)]
    for step in grads[5:]:
        for p, g in zip(again_p, step):
            p.grad = g.clone()
        again.step()
    for a, b in zip(full_p, again_p):
        assert torch.equal(a, b)
    st = again.state[again_p[0]]
    assert {"proj", "proj_seed", "update_norm", "exp_avg", "exp_avg_sq", "step"} <= set(st)


@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_fira_equals_the_reference_bitwise(alpha):
    """Fira (fira 1.0.2) at its scripts' alpha 0.25 (where the reference's residual keeps (1 - alpha) of the
    projected gradient; we follow it) and at 1: 12 steps across four SVD refreshes, bitwise."""
    from fira import FiraAdamW as Reference

    from sltrain_cli.core.fira import FiraAdamW

    ours_p, ref_p = _params(), _params()
    ours = FiraAdamW([{"params": ours_p[3:]}, {"params": ours_p[:3], "galore": True, "rank": 4, "update_proj_gap": 3,
                                               "scale": alpha}], lr=0.01, weight_decay=0.1, eps=1e-8)
    ref = Reference([{"params": ref_p[3:]}, {"params": ref_p[:3], "rank": 4, "update_proj_gap": 3, "alpha": alpha,
                                              "proj_type": "std"}], lr=0.01, weight_decay=0.1, eps=1e-8)
    _steps([(ours, ours_p), (ref, ref_p)], 12)
    for a, b in zip(ours_p, ref_p):
        assert torch.equal(a, b), (a - b).abs().max()
    assert set(ours.state[ours_p[0]]) >= {"proj", "update_norm", "exp_avg", "exp_avg_sq", "step"}


@pytest.mark.parametrize("overrides, key, words", [
    (["method=fira", "optim=adamw8bit"], "optim.name", "32-bit moments"),
    (["method=apollo", "optim=adamw8bit"], "optim.name", "32-bit moments"),
    (["method=apollo", "train.layerwise=true", "optim.grad_clip=0"], "train.layerwise", "layer-wise"),
    (["method=apollo", "method.scale_type=row"], "method.scale_type", "channel or tensor"),
    (["method=apollo", "method.rank=0"], "method.rank", "APOLLO-Mini: 1"),
])
def test_what_apollo_cannot_do_is_one_line(overrides, key, words):
    from sltrain_cli.compose import load_config
    from sltrain_cli.configs import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert str(err.value).startswith(f"{key}: ") and words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # three tiny pretrains: ~20 s
@pytest.mark.parametrize("extra", [["method=apollo", "rank=16"],
                                   ["method=apollo", "rank=1", "method.scale_type=tensor", "method.scale=128"],
                                   ["method=fira", "rank=16"]])
def test_pretrain_with_a_new_baseline(tmp_path, cache_dir, extra):
    import json
    import subprocess
    import sys

    from helpers import tiny_overrides

    args = tiny_overrides(tmp_path, "method.update_proj_gap=3", "run_name=a", *extra)
    proc = subprocess.run([sys.executable, "-m", "sltrain_cli", "pretrain", "--quiet", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "pretrain" / "a" / "summary.json").read_text())
    assert summary["method"] == extra[0].split("=")[1] and summary["status"] == "completed"
    assert summary["val_ppl"] < summary["unigram_ppl"] * 3 and summary["optimizer_state_bytes"] > 0
