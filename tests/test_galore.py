"""GaLoreAdamW: hand-computed projected update, projector refresh schedule, weights_only resume."""
import io

import pytest
import torch
import torch.nn as nn

from sltrain_cli.core.galore import GaLoreAdamW

LR, B1, B2, EPS, WD, SCALE, RANK = 0.1, 0.9, 0.999, 1e-8, 0.01, 0.25, 2


def _hand_adam(P, left, grads, W0):
    """Two or more GaLore-AdamW steps written out with the projector fixed to P."""
    W, m, v = W0.clone(), None, None
    for t, G in enumerate(grads, start=1):
        R = P.T @ G if left else G @ P
        m = (1 - B1) * R if m is None else B1 * m + (1 - B1) * R
        v = (1 - B2) * R * R if v is None else B2 * v + (1 - B2) * R * R
        N = (m / (1 - B1 ** t)) / (torch.sqrt(v / (1 - B2 ** t)) + EPS)
        back = P @ N if left else N @ P.T
        W = W * (1 - LR * WD) - LR * SCALE * back
    return W


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (5, 5)])
def test_projected_update_matches_hand_computation(shape):
    torch.manual_seed(0)
    out_f, in_f = shape
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(3)]

    # hand computation: projector from the SVD of the first gradient, on the smaller side
    U, S, Vh = torch.linalg.svd(grads[0], full_matrices=False)
    left = out_f <= in_f
    P = U[:, :RANK] if left else Vh.T[:, :RANK]  # (out, r) or (in, r)
    assert P.shape == ((out_f, RANK) if left else (in_f, RANK))
    expected = _hand_adam(P, left, grads, W0)

    w = nn.Parameter(W0.clone())
    opt = GaLoreAdamW([{"params": [w], "galore": True, "rank": RANK, "update_proj_gap": 200, "scale": SCALE}],
                      lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    for G in grads:
        w.grad = G.clone()
        opt.step()
    st = opt.state[w]
    torch.testing.assert_close(st["proj"], P)
    assert st["exp_avg"].shape == ((RANK, in_f) if left else (out_f, RANK))
    assert st["step"] == 3
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-8)


def test_plain_group_matches_torch_adamw():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(7, 3))
    b = nn.Parameter(a.detach().clone())
    ours = GaLoreAdamW([a], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    ref = torch.optim.AdamW([b], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    for _ in range(4):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert "proj" not in ours.state[a] and ours.state[a]["exp_avg"].shape == a.shape


def test_projector_refreshes_on_schedule():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 12))
    opt = GaLoreAdamW([{"params": [w], "galore": True, "rank": 3, "update_proj_gap": 3}], lr=1e-2)
    projs = []
    for _ in range(8):
        w.grad = torch.randn_like(w)
        opt.step()
        projs.append(opt.state[w]["proj"].clone())
    changed = [i for i in range(1, 8) if not torch.equal(projs[i], projs[i - 1])]
    assert changed == [3, 6]  # step indices 0, 3, 6 compute a new projector
    assert projs[0].shape == (8, 3)


def _make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    groups = [{"params": [model[0].bias, model[2].bias]},
              {"params": [model[0].weight, model[2].weight], "galore": True, "rank": 2, "update_proj_gap": 3,
               "scale": 0.25}]
    return model, GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1)


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_resume_is_bitwise_with_weights_only_load():
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=gen), torch.randn(5, 4, generator=gen)) for _ in range(9)]

    ref_model, ref_opt = _make()
    _train(ref_model, ref_opt, batches)

    model, opt = _make()
    _train(model, opt, batches[:5])  # stops between two refreshes (gap 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2, opt2 = _make(seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.param_groups[1]["galore"] is True and opt2.param_groups[1]["rank"] == 2
    _train(model2, opt2, batches[5:])
    for p, q in zip(ref_model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
