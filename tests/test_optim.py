"""Schedules, build_optimizer / build_scheduler, layer-wise updates, 8-bit AdamW, state byte counts."""
import copy
import io
import sys

import pytest
import torch
import torch.nn as nn

from sltrain_cli.configs import MethodConfig, OptimConfig, UserError
from sltrain_cli.core.galore import GaLoreAdamW, GaLoreAdamW8bit
from sltrain_cli.core.optim import (
    BNB_MISSING,
    LayerwiseOptimizer,
    build_optimizer,
    build_scheduler,
    check_layerwise,
    lr_factor,
    optimizer_state_bytes,
    relora_lr_factor,
    warmup_steps,
)
from sltrain_cli.methods import get_method


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"bitsandbytes not importable: {e}")
    return bnb


class Toy(nn.Module):
    """Named like the LLaMA blocks: attn.q and mlp.up are GaLore targets, head is not."""

    def __init__(self, d_in=16, hidden=32, inner=80, out=4):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(d_in, hidden, bias=False)})
        self.mlp = nn.ModuleDict({"up": nn.Linear(hidden, inner)})
        self.norm = nn.LayerNorm(inner)
        self.head = nn.Linear(inner, out)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        h = torch.tanh(self.attn["q"](x))
        return self.head(self.norm(torch.relu(self.mlp["up"](h))))


def _cfg(**kw):
    kw.setdefault("grad_clip", 0.0)
    kw.setdefault("lr", 1e-2)
    kw.setdefault("weight_decay", 0.1)
    kw.setdefault("warmup_steps", 2)
    return OptimConfig(**kw)


def _batches(n, micro=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(6, 16, generator=g), torch.randn(6, 4, generator=g)) for _ in range(micro)]
            for _ in range(n)]


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


# ----------------------------------------------------------------------------- schedules

def test_lr_factor_endpoints():
    T, W, mn = 100, 10, 0.1
    for sched in ("cosine", "linear", "constant"):
        assert lr_factor(0, T, W, mn, sched) == 0.0
        assert lr_factor(5, T, W, mn, sched) == pytest.approx(0.5)
        assert lr_factor(W, T, W, mn, sched) == pytest.approx(1.0)
    assert lr_factor(T, T, W, mn, "cosine") == pytest.approx(mn)
    assert lr_factor(T, T, W, mn, "linear") == pytest.approx(mn)
    assert lr_factor(T + 50, T, W, mn, "cosine") == pytest.approx(mn)  # held after the end
    assert lr_factor(T - 1, T, W, mn, "constant") == 1.0
    assert lr_factor(55, T, W, mn, "cosine") == pytest.approx(mn + (1 - mn) * 0.5)  # cosine midpoint
    assert lr_factor(55, T, W, mn, "linear") == pytest.approx(mn + (1 - mn) * 0.5)
    assert lr_factor(30, T, W, mn, "cosine") > lr_factor(30, T, W, mn, "linear")
    assert lr_factor(0, T, 0, mn, "cosine") == 1.0  # no warmup


def test_warmup_steps():
    assert warmup_steps(OptimConfig(warmup_ratio=0.1), 250) == 25
    assert warmup_steps(OptimConfig(warmup_steps=7, warmup_ratio=0.1), 250) == 7
    assert warmup_steps(OptimConfig(warmup_steps=0), 250) == 0


def test_build_scheduler_follows_factor():
    model = Toy()
    cfg, T = _cfg(lr=0.5, warmup_steps=3, min_lr_ratio=0.2), 20
    opt = build_optimizer(model, cfg, MethodConfig(name="full"))
    sched = build_scheduler(opt, cfg, MethodConfig(name="full"), T)
    for s in range(T):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr_factor(s, T, 3, 0.2, "cosine"))
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["last_epoch"] == T


def test_build_scheduler_relora_is_jagged():
    model = Toy()
    cfg, T = _cfg(lr=1.0, warmup_steps=2), 40
    method = MethodConfig(name="relora", rank=2, merge_every=10, restart_warmup=4)
    opt = build_optimizer(model, cfg, method)
    sched = build_scheduler(opt, cfg, method, T)
    lrs = []
    for _ in range(T):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([relora_lr_factor(s, T, 2, cfg.min_lr_ratio, 10, 4) for s in range(T)])
    assert lrs[10] == lrs[20] == lrs[30] == 0.0


# ----------------------------------------------------------------------------- build_optimizer

def test_build_adamw_trainable_only():
    model = Toy()
    cfg = _cfg(beta1=0.8, beta2=0.95, eps=1e-6)
    opt = build_optimizer(model, cfg, MethodConfig(name="full"))
    assert type(opt) is torch.optim.AdamW
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len([p for p in model.parameters() if p.requires_grad])
    assert all(p is not model.frozen for p in params)
    g = opt.param_groups[0]
    assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 and g["weight_decay"] == 0.1 and g["lr"] == 1e-2


def test_build_galore_groups():
    model = Toy()
    opt = build_optimizer(model, _cfg(), MethodConfig(name="galore", rank=4, update_proj_gap=5, scale=0.5))
    assert isinstance(opt, GaLoreAdamW)
    plain, gal = opt.param_groups
    assert not plain["galore"] and gal["galore"]
    assert [id(p) for p in gal["params"]] == [id(model.attn["q"].weight), id(model.mlp["up"].weight)]
    assert (gal["rank"], gal["update_proj_gap"], gal["scale"]) == (4, 5, 0.5)
    assert {id(model.head.weight), id(model.mlp["up"].bias)} <= {id(p) for p in plain["params"]}
    # target_modules filters by attribute name
    up_only = MethodConfig(name="galore", rank=4, target_modules=["up"])
    assert [id(p) for p in get_method("galore").projected_params(model, up_only)] == [id(model.mlp["up"].weight)]


def test_build_galore_8bit():
    _bnb()
    model = Toy(d_in=64, hidden=128, inner=256)  # mlp.up (256, 128): R = 256 x 32 = 8192 -> 8-bit moments
    opt = build_optimizer(model, _cfg(name="adamw8bit"), MethodConfig(name="galore", rank=32, update_proj_gap=5))
    assert type(opt) is GaLoreAdamW8bit
    plain, gal = opt.param_groups
    assert not plain["galore"] and gal["galore"] and gal["rank"] == 32
    x, y = torch.randn(6, 64), torch.randn(6, 4)
    _loss(model, x, y).backward()
    opt.step()
    st = opt.state[model.mlp["up"].weight]
    assert st["state1"].dtype == torch.uint8 and st["state1"].shape == (256, 32) and st["proj"].shape == (32, 128)
    assert opt.state[model.head.weight]["state1"].dtype == torch.float32  # 1024 entries: fp32, as bitsandbytes


def test_build_galore_8bit_missing_bnb_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError) as e:
        build_optimizer(Toy(), _cfg(name="adamw8bit"), MethodConfig(name="galore", rank=4))
    assert str(e.value) == BNB_MISSING


def test_build_galore_refusals():
    with pytest.raises(UserError, match="target_modules"):
        build_optimizer(nn.Sequential(nn.Linear(4, 4)), _cfg(), MethodConfig(name="galore", rank=2))


def test_adamw8bit_builds_and_steps():
    bnb = _bnb()
    model = Toy(inner=256)  # mlp.up.weight has 32 * 256 = 8192 numbers: quantized state
    opt = build_optimizer(model, _cfg(name="adamw8bit"), MethodConfig(name="full"))
    assert isinstance(opt, bnb.optim.AdamW8bit)
    before = copy.deepcopy(model.state_dict())
    x, y = _batches(1)[0][0]
    _loss(model, x, y).backward()
    opt.step()
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in ("attn.q.weight", "mlp.up.weight", "head.bias"))
    assert opt.state[model.mlp["up"].weight]["state1"].dtype == torch.uint8


def test_adamw8bit_missing_bnb_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(UserError) as e:
        build_optimizer(Toy(), _cfg(name="adamw8bit"), MethodConfig(name="full"))
    assert str(e.value) == BNB_MISSING == "optim.name=adamw8bit needs bitsandbytes: pip install 'sltrain[bnb]'"


# ----------------------------------------------------------------------------- layer-wise updates

def _train_ordinary(model, cfg, method, batches, total):
    opt = build_optimizer(model, cfg, method)
    sched = build_scheduler(opt, cfg, method, total)
    for micro in batches:
        opt.zero_grad(set_to_none=True)
        for x, y in micro:
            (_loss(model, x, y) / len(micro)).backward()
        opt.step()
        sched.step()
    return opt


def _train_layerwise(model, lw, batches):
    for micro in batches:
        lw.zero_grad()
        for i, (x, y) in enumerate(micro):
            lw.sync(i == len(micro) - 1)
            (_loss(model, x, y) / len(micro)).backward()
        assert all(p.grad is None for p in lw.params)  # freed inside backward
        lw.step_scheduler()


@pytest.mark.parametrize("method,optim_name,micro", [
    ("full", "adamw", 1), ("full", "adamw", 2), ("galore", "adamw", 2), ("full", "adamw8bit", 2),
    ("galore", "adamw8bit", 2)])
def test_layerwise_matches_ordinary(method, optim_name, micro):
    if optim_name == "adamw8bit":
        _bnb()
    torch.manual_seed(0)
    ref = Toy(inner=256 if optim_name == "adamw8bit" else 80)
    model = copy.deepcopy(ref)
    cfg = _cfg(name=optim_name)
    # 8-bit GaLore: rank 16 gives mlp.up (256, 32) an R of 256 x 16 = 4096 entries, 8-bit moments
    mcfg = MethodConfig(name=method, rank=16 if optim_name == "adamw8bit" else 4, update_proj_gap=2)
    T, batches = 5, _batches(5, micro)
    _train_ordinary(ref, cfg, mcfg, batches, T)
    lw = LayerwiseOptimizer(model, cfg, mcfg, total_steps=T)
    _train_layerwise(model, lw, batches)
    assert lw.last_step == T
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    lw.remove()


def test_layerwise_accumulates_without_stepping_and_frees_grads():
    torch.manual_seed(0)
    model = Toy()
    lw = LayerwiseOptimizer(model, _cfg(warmup_steps=0), MethodConfig(name="full"), total_steps=10)
    before = copy.deepcopy(model.state_dict())
    (x, y), = _batches(1)[0]
    lw.sync(False)
    _loss(model, x, y).backward()
    assert all(p.grad is not None for p in lw.params)  # accumulated, not consumed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    lw.zero_grad()
    lw.sync(True)
    live = []
    counting = [p.register_post_accumulate_grad_hook(lambda _p: live.append(
        sum(q.grad is not None for q in lw.params))) for p in lw.params]
    lw.remove()  # re-register the stepping hooks after the counters so counters see grads before freeing
    lw._handles = [p.register_post_accumulate_grad_hook(lw._hook) for p in lw.params]
    _loss(model, x, y).backward()
    assert all(p.grad is None for p in lw.params)
    assert not torch.equal(before["head.weight"], model.head.weight)
    # when each hook fires, the previously finished parameters' grads are already gone
    assert max(live) <= len(lw.params) // 2 + 2 and len(live) == len(lw.params)
    for h in counting:
        h.remove()


def test_layerwise_refuses_clipping_and_ddp():
    with pytest.raises(UserError) as e:
        check_layerwise(OptimConfig(grad_clip=1.0))
    assert "optim.grad_clip" in str(e.value) and "train.layerwise" in str(e.value)
    with pytest.raises(UserError, match="train.layerwise"):
        LayerwiseOptimizer(Toy(), OptimConfig(grad_clip=0.5), MethodConfig(name="full"))
    with pytest.raises(UserError, match="train.layerwise"):
        check_layerwise(OptimConfig(grad_clip=0.0), world_size=2)
    check_layerwise(OptimConfig(grad_clip=0.0))


@pytest.mark.parametrize("method,optim_name", [("full", "adamw"), ("galore", "adamw"), ("galore", "adamw8bit")])
def test_layerwise_resume_bitwise(method, optim_name):
    if optim_name == "adamw8bit":
        _bnb()
    torch.manual_seed(0)
    eight = optim_name == "adamw8bit"  # as in test_layerwise_matches_ordinary: mlp.up gets 8-bit moments
    cfg, mcfg, T = _cfg(name=optim_name), MethodConfig(name=method, rank=16 if eight else 4, update_proj_gap=2), 7
    batches = _batches(T, micro=2)
    ref = Toy(inner=256 if eight else 80)
    model = copy.deepcopy(ref)
    _train_layerwise(ref, LayerwiseOptimizer(ref, cfg, mcfg, total_steps=T), batches)

    lw = LayerwiseOptimizer(model, cfg, mcfg, total_steps=T)
    _train_layerwise(model, lw, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": lw.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    lw.remove()

    if eight:
        assert lw.state[model.mlp["up"].weight]["state1"].dtype == torch.uint8
    torch.manual_seed(99)
    model2 = Toy(inner=256 if eight else 80)
    model2.load_state_dict(ckpt["model"])
    lw2 = LayerwiseOptimizer(model2, cfg, mcfg, total_steps=T)
    lw2.load_state_dict(ckpt["optim"])
    assert lw2.last_step == 3 and lw2.get_last_lr() == lw.get_last_lr() == [lw2.current_lr()]
    _train_layerwise(model2, lw2, batches[3:])
    for p, q in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- state bytes

def test_optimizer_state_bytes_adamw_and_layerwise():
    torch.manual_seed(0)
    model = Toy()
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    # exp_avg + exp_avg_sq in fp32, plus torch AdamW's 0-d fp32 `step` tensor per parameter
    expected = 2 * 4 * numel + 4 * len(params)

    opt = build_optimizer(model, _cfg(), MethodConfig(name="full"))
    assert optimizer_state_bytes(opt) == 0
    (x, y), = _batches(1)[0]
    _loss(model, x, y).backward()
    opt.step()
    assert optimizer_state_bytes(opt) == expected

    model2 = copy.deepcopy(model)
    lw = LayerwiseOptimizer(model2, _cfg(), MethodConfig(name="full"), total_steps=3)
    _loss(model2, x, y).backward()
    assert optimizer_state_bytes(lw) == expected


def test_optimizer_state_bytes_galore():
    torch.manual_seed(0)
    model, r = Toy(), 4
    opt = build_optimizer(model, _cfg(), MethodConfig(name="galore", rank=r))
    (x, y), = _batches(1)[0]
    _loss(model, x, y).backward()
    opt.step()
    # galore matrices: moments r x max(out, in) each + projector r x min(out, in); step is an int (0 bytes)
    expected = 0
    for w in (model.attn["q"].weight, model.mlp["up"].weight):
        expected += 4 * (2 * r * max(w.shape) + r * min(w.shape))
    targets = {id(model.attn["q"].weight), id(model.mlp["up"].weight)}
    expected += sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad and id(p) not in targets)
    assert optimizer_state_bytes(opt) == expected


def test_optimizer_state_bytes_8bit_counts_shared_maps_once():
    _bnb()
    model = Toy(inner=256)
    opt = build_optimizer(model, _cfg(name="adamw8bit"), MethodConfig(name="full"))
    (x, y), = _batches(1)[0]
    _loss(model, x, y).backward()
    opt.step()
    n = optimizer_state_bytes(opt)
    fp32 = 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < n < fp32 / 2
