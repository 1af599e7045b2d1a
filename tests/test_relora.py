"""ReLoRA: merge keeps the function, re-inits the adapter, optimizer resets, jagged schedule."""
import io
import math

import pytest
import torch
import torch.nn as nn

from sltrain_cli.configs import MethodConfig, ResetKind
from sltrain_cli.core.optim import lr_factor, relora_lr_factor
from sltrain_cli.core.relora import ReLoRALinear, merge_after_update, merge_all, merge_due, reset_optimizer_state


def _trained_layer(seed=0, in_f=24, out_f=16, rank=4):
    torch.manual_seed(seed)
    layer = ReLoRALinear(in_f, out_f, rank=rank, alpha=8.0)
    with torch.no_grad():
        layer.B.normal_()  # as if trained: a non-zero adapter
    return layer


def test_init_shapes_and_frozen_weight():
    layer = ReLoRALinear(24, 16, rank=4, alpha=8.0)
    assert layer.weight.shape == (16, 24) and not layer.weight.requires_grad
    assert layer.A.shape == (4, 24) and layer.A.requires_grad
    assert layer.B.shape == (16, 4) and torch.count_nonzero(layer.B) == 0
    assert layer.A.abs().max() <= 1 / math.sqrt(24)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["A", "B"]
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)  # B = 0: adapter contributes nothing


def test_forward_matches_dense_weight():
    layer = _trained_layer()
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T, rtol=1e-5, atol=1e-5)


def test_merge_keeps_function_and_reinits_adapter():
    layer = _trained_layer()
    x = torch.randn(7, 24)
    before_out, before_A = layer(x).detach(), layer.A.detach().clone()
    before_W = layer.dense_weight()
    layer.merge_and_reinit()
    torch.testing.assert_close(layer(x).detach(), before_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.detach(), before_W)
    assert torch.count_nonzero(layer.B) == 0
    assert not torch.equal(layer.A, before_A)
    assert layer.A.abs().max() <= 1 / math.sqrt(24)


def test_merge_all_on_toy_model():
    torch.manual_seed(0)
    model = nn.Sequential(ReLoRALinear(8, 12, 2, 4.0), nn.ReLU(), nn.Linear(12, 12), ReLoRALinear(12, 4, 2, 4.0))
    with torch.no_grad():
        for m in model:
            if isinstance(m, ReLoRALinear):
                m.B.normal_()
    x = torch.randn(5, 8)
    y = model(x).detach()
    pairs = merge_all(model)
    assert [(a.shape, b.shape) for a, b in pairs] == [((2, 8), (12, 2)), ((2, 12), (4, 2))]
    assert all(torch.count_nonzero(b) == 0 for _, b in pairs)
    torch.testing.assert_close(model(x).detach(), y, rtol=1e-5, atol=1e-5)


def test_merge_due():
    # after the 0-based update k * merge_every (k >= 1): the one whose jagged lr factor is 0
    assert [s for s in range(0, 25) if merge_due(s, 10)] == [10, 20]


# ----------------------------------------------------------------------------- optimizer reset

def _adam_with_state(shape=(64, 64), steps=3):
    torch.manual_seed(0)
    A, B = nn.Parameter(torch.randn(*shape)), nn.Parameter(torch.randn(*shape))
    opt = torch.optim.AdamW([A, B], lr=1e-3)
    for _ in range(steps):
        A.grad, B.grad = torch.randn_like(A), torch.randn_like(B)
        opt.step()
    return opt, A, B


def test_reset_zero():
    opt, A, B = _adam_with_state()
    step = opt.state[A]["step"].clone()
    assert reset_optimizer_state(opt, [(A, B)], ResetKind.zero, 0.9) == 2
    for p in (A, B):
        assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
        assert torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0
    assert torch.equal(opt.state[A]["step"], step)  # bias correction untouched


def test_reset_magnitude_keeps_largest():
    opt, A, B = _adam_with_state()
    orig = {k: opt.state[A][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    reset_optimizer_state(opt, [A, B], "magnitude", 0.9)
    n = A.numel()
    for k, before in orig.items():
        after = opt.state[A][k]
        kept = after != 0
        assert kept.sum().item() == round(0.1 * n)
        torch.testing.assert_close(after[kept], before[kept])  # survivors unchanged
        assert before[kept].abs().min() >= before[~kept].abs().max()  # and they are the largest
    assert torch.count_nonzero(opt.state[B]["exp_avg"]).item() == round(0.1 * n)


def test_reset_random_fraction():
    opt, A, B = _adam_with_state(shape=(128, 128))
    before = opt.state[A]["exp_avg"].clone()
    reset_optimizer_state(opt, [A], ResetKind.random, 0.9, generator=torch.Generator().manual_seed(1))
    after = opt.state[A]["exp_avg"]
    kept = after != 0
    assert 0.08 < kept.float().mean().item() < 0.12
    torch.testing.assert_close(after[kept], before[kept])
    assert torch.count_nonzero(opt.state[B]["exp_avg"]) == B.numel()  # B not listed: untouched


def test_reset_ratio_edges_and_missing_state():
    opt, A, B = _adam_with_state()
    fresh = nn.Parameter(torch.randn(3))  # not in the optimizer: skipped
    before = opt.state[A]["exp_avg"].clone()
    assert reset_optimizer_state(opt, [A, fresh], "magnitude", 0.0) == 1
    assert torch.equal(opt.state[A]["exp_avg"], before)
    reset_optimizer_state(opt, [A], "magnitude", 1.0)
    assert torch.count_nonzero(opt.state[A]["exp_avg"]) == 0


def _bnb_8bit_state():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not importable")
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64, 128))  # >= 4096 numbers: 8-bit blockwise state
    opt = bnb.optim.AdamW8bit([p], lr=1e-3)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    return opt, p


def _dequant(st, i):
    codes, qmap, absmax = st[f"state{i}"], st[f"qmap{i}"], st[f"absmax{i}"]
    return qmap[codes.long()].view(-1) * absmax.repeat_interleave(256)[: codes.numel()]


@pytest.mark.parametrize("kind", ["zero", "magnitude", "random"])
def test_reset_bnb_8bit(kind):
    opt, p = _bnb_8bit_state()
    st = opt.state[p]
    before = [_dequant(st, 1), _dequant(st, 2)]
    reset_optimizer_state(opt, [p], kind, 0.9, generator=torch.Generator().manual_seed(0))
    for i, b in zip((1, 2), before):
        a = _dequant(st, i)
        kept = a != 0
        if kind == "zero":
            assert kept.sum() == 0
            continue
        assert 0.07 < kept.float().mean().item() < 0.12  # quantized zeros in `b` can only lower it
        torch.testing.assert_close(a[kept], b[kept])
        if kind == "magnitude":
            assert b[kept].abs().min() >= b[~kept].abs().max()
    p.grad = torch.randn_like(p)
    opt.step()  # still a valid state


# ----------------------------------------------------------------------------- jagged schedule

def test_jagged_schedule_shape():
    total, warm, mn, every, rewarm = 1000, 100, 0.1, 200, 20
    f = lambda s: relora_lr_factor(s, total, warm, mn, every, rewarm)  # noqa: E731
    base = lambda s: lr_factor(s, total, warm, mn, "cosine")  # noqa: E731
    # global warmup and the first cycle are the plain schedule
    for s in list(range(0, 200)):
        assert f(s) == pytest.approx(base(s))
    assert f(0) == 0.0 and f(100) == pytest.approx(1.0)
    for k in (1, 2, 3, 4):
        m = k * every
        assert f(m) == 0.0  # restart right after the merge
        assert f(m - 1) == pytest.approx(base(m - 1))
        ramp = [f(m + i) for i in range(rewarm + 1)]
        assert all(b > a for a, b in zip(ramp, ramp[1:]))  # linear ramp up ...
        assert f(m + rewarm // 2) == pytest.approx(0.5 * base(m + rewarm))
        assert f(m + rewarm) == pytest.approx(base(m + rewarm))  # ... back onto the cosine
        for s in range(m + rewarm, min(m + every, total)):
            assert f(s) == pytest.approx(base(s))
    assert f(total - 1) == pytest.approx(mn, abs=1e-4)  # last update: the floor of the cosine


def test_jagged_schedule_without_rewarm_is_cosine():
    for s in range(0, 300, 7):
        assert relora_lr_factor(s, 300, 30, 0.1, 50, 0) == pytest.approx(lr_factor(s, 300, 30, 0.1, "cosine"))


def test_merge_and_reset_through_layerwise_optimizer():
    from sltrain_cli.configs import OptimConfig
    from sltrain_cli.core.optim import LayerwiseOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(ReLoRALinear(8, 12, 2, 4.0), nn.Tanh(), ReLoRALinear(12, 4, 2, 4.0))
    lw = LayerwiseOptimizer(model, OptimConfig(grad_clip=0.0, lr=1e-2), MethodConfig(name="relora", rank=2),
                            total_steps=10)
    assert len(lw.params) == 4  # A, B of each layer; W0 frozen
    x = torch.randn(5, 8)
    for _ in range(2):
        model(x).square().mean().backward()
        lw.step_scheduler()
    y = model(x).detach()
    pairs = merge_all(model)
    assert reset_optimizer_state(lw, pairs, "zero", 0.9) == 4
    assert all(torch.count_nonzero(st["exp_avg"]) == 0 for st in lw.state.values())
    torch.testing.assert_close(model(x).detach(), y, rtol=1e-5, atol=1e-5)
    lw.remove()


# ----------------------------------------------------------------------------- order in the training loop
# The reference (Guitaricet/relora torchrun_main.py): optimizer.step(); scheduler.step(); update_step += 1;
# then, when update_step % relora == 1, merge_and_reinit and optimizer_reset. With 0-based update indices:
# update k * every runs with lr factor 0, then the merge and the reset; update k * every + 1 starts from
# reset moments.

EVERY, TOTAL = 3, 8


def _relora_setup(seed=0):
    from sltrain_cli.configs import ModelConfig, OptimConfig
    from sltrain_cli.core.convert import apply_method
    from sltrain_cli.core.model import LlamaForCausalLM
    from sltrain_cli.core.optim import build_optimizer, build_scheduler

    cfg = ModelConfig(name="t", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=64)
    mcfg = MethodConfig(name="relora", rank=4, merge_every=EVERY, restart_warmup=2, reset="zero")
    ocfg = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.0, weight_decay=0.1)
    torch.manual_seed(seed)
    model = apply_method(LlamaForCausalLM(cfg), mcfg)
    opt = build_optimizer(model, ocfg, mcfg)
    return model, opt, build_scheduler(opt, ocfg, mcfg, TOTAL), mcfg


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 16), generator=gen) for _ in range(TOTAL)]


def _loop(model, opt, sched, mcfg, batches, start, stop, log=None):
    """train.py's order: train_step (forward, backward, step, scheduler step) then the ReLoRA hook."""
    import contextlib

    from sltrain_cli.train import train_step

    adapters = [p for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda q: grads.__setitem__(id(q), q.grad.clone()))
             for p in adapters]
    for s in range(start, stop):
        lr, before = opt.param_groups[0]["lr"], [p.detach().clone() for p in adapters]
        train_step(model, batches[s], batches[s], 1, params, opt, sched, 0.0, torch.device("cpu"),
                   contextlib.nullcontext)
        moved = any(not torch.equal(b, p) for b, p in zip(before, adapters))
        merged = merge_after_update(model, opt, mcfg, s, TOTAL, seed=0)
        if log is not None:
            log.append({"step": s, "lr": lr, "moved": moved, "merged": merged,
                        "grads": [grads[id(p)] for p in adapters],
                        "m": [opt.state[p]["exp_avg"].clone() for p in adapters],
                        "v": [opt.state[p]["exp_avg_sq"].clone() for p in adapters]})
    for h in hooks:
        h.remove()
    return adapters


def test_merge_and_reset_follow_the_lr0_update_as_the_reference():
    model, opt, sched, mcfg = _relora_setup()
    log = []
    _loop(model, opt, sched, mcfg, _batches(), 0, TOTAL, log)
    assert [r["step"] for r in log if r["lr"] == 0.0] == [3, 6]  # the jagged schedule's restarts (no warmup)
    assert [r["step"] for r in log if r["merged"]] == [3, 6]  # right after the lr-0 updates k * every
    b1, b2 = opt.param_groups[0]["betas"]
    for k in (3, 6):
        lr0, first = log[k], log[k + 1]
        assert not lr0["moved"]  # the lr-0 update moves nothing: the merge folds in the adapter it was given
        # right after the reset (the moments as they are at the end of update k): nothing from before the merge
        assert all(torch.count_nonzero(m) == 0 for m in lr0["m"] + lr0["v"])
        # the first update after the merge starts from reset moments: they hold its own gradient only
        for g, m, v in zip(first["grads"], first["m"], first["v"]):
            torch.testing.assert_close(m, (1 - b1) * g, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(v, (1 - b2) * g * g, rtol=1e-6, atol=1e-12)
        assert first["lr"] > 0.0 and first["moved"]


def test_relora_loop_resumes_bitwise_across_a_merge():
    batches = _batches()
    ref = _relora_setup()
    ref_adapters = _loop(*ref[:4], batches, 0, TOTAL)

    model, opt, sched, mcfg = _relora_setup()
    _loop(model, opt, sched, mcfg, batches, 0, 5)  # past the merge after update 3, before the one after 6
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, sched2, _ = _relora_setup(seed=7)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    sched2.load_state_dict(ckpt["sched"])
    adapters = _loop(model2, opt2, sched2, mcfg, batches, 5, TOTAL)
    for p, q in zip(ref[0].state_dict().values(), model2.state_dict().values()):
        assert torch.equal(p, q)
    assert all(torch.equal(p, q) for p, q in zip(ref_adapters, adapters))
