"""The chunked lm_head + cross-entropy of LlamaForCausalLM: the same loss and gradients as the plain one, no
(tokens, vocab) tensor in the step, and .logits still there when asked for."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sltrain_cli.configs import MethodConfig, ModelConfig
from sltrain_cli.core.convert import apply_method
from sltrain_cli.core.model import LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

VOCAB = 101


def _model(method="full"):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, vocab_size=VOCAB, max_seq_len=32)
    model = LlamaForCausalLM(cfg)
    return apply_method(model, MethodConfig(name=method, rank=4, delta=0.1, alpha=8)) if method != "full" else model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 16), generator=g)
    labels = ids.clone()
    labels[0, 5:] = -100  # padding
    labels[2, :3] = -100
    return ids, labels


def _plain_loss(model, ids, labels):
    logits = model(ids).logits  # no labels: the ordinary full logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def _loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["full", "sltrain"])
@pytest.mark.parametrize("chunk", [None, 1, 7, 45])  # None: the default (one chunk here); 7 does not divide 45
def test_chunked_loss_equals_plain_fp32(method, chunk):
    model = _model(method)
    model.loss_chunk_tokens = chunk
    ids, labels = _batch()
    loss, grads = _loss_and_grads(model, lambda: model(ids, labels=labels).loss)
    ref, ref_grads = _loss_and_grads(model, lambda: _plain_loss(model, ids, labels))
    assert abs(float(loss) - float(ref)) <= 1e-6
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_bf16_autocast_close_to_plain():
    model = _model("sltrain")
    model.loss_chunk_tokens = 10
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, lambda: model(ids, labels=labels).loss)
        ref, ref_grads = _loss_and_grads(model, lambda: _plain_loss(model, ids, labels))
    assert loss.dtype == torch.float32 and abs(float(loss) - float(ref)) < 5e-6  # bf16 logits, as the plain loss
    for name in grads:
        assert grads[name].dtype == torch.float32
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0.05, atol=0.05 * scale, msg=name)


def test_chunked_loss_bf16_pure_weights():
    model = _model("sltrain").to(torch.bfloat16)  # bf16-pure: the head's gradient is summed in bf16, chunk by chunk
    model.loss_chunk_tokens = 10
    ids, labels = _batch()
    loss, grads = _loss_and_grads(model, lambda: model(ids, labels=labels).loss)
    ref, ref_grads = _loss_and_grads(model, lambda: _plain_loss(model, ids, labels))
    assert abs(float(loss) - float(ref)) < 1e-2
    for name in grads:
        assert grads[name].dtype == torch.bfloat16
        scale = float(ref_grads[name].float().abs().max())
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), rtol=0.05, atol=0.05 * scale, msg=name)


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.update(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def test_no_full_logits_in_a_training_step_but_logits_on_demand():
    model = _model("sltrain")
    model.loss_chunk_tokens = 8
    ids, labels = _batch()
    with _Shapes() as seen:
        out = model(ids, labels=labels)
        out.loss.backward()
    hidden = model.config.hidden_size  # (hidden, vocab) is the transposed lm_head weight, not logits
    vocab_rows = sorted(s[0] for s in seen.shapes if len(s) == 2 and s[1] == VOCAB and s[0] != hidden)
    assert vocab_rows and max(vocab_rows) <= 8, vocab_rows  # chunks of 8 tokens, never the 45 (or 48) at once
    assert not any(len(s) == 3 and s[-1] == VOCAB for s in seen.shapes)

    # .logits is still there with labels: computed on first access, equal to the no-label forward's
    with torch.no_grad():
        plain = model(ids).logits
        out = model(ids, labels=labels)
    assert out.logits.shape == (3, 16, VOCAB) and not out.logits.requires_grad
    torch.testing.assert_close(out.logits, plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels)
    assert out.logits.dtype == torch.bfloat16  # under the forward's autocast, even when read outside it
    assert model(ids).loss is None
