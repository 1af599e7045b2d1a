"""evaluate_ppl against a perplexity written out by hand (float64 log-softmax, shifted labels, pad ignored) on fixed
batches with padding. The end-to-end check (eval-ppl's JSON on a local file) is in test_pretrain.py."""
import math

import pytest
import torch

from sltrain_cli.configs import MethodConfig, ModelConfig
from sltrain_cli.core.convert import apply_method
from sltrain_cli.core.model import LlamaForCausalLM
from sltrain_cli.evaluate import evaluate_ppl

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

VOCAB, PAD = 97, 0


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, vocab_size=VOCAB,
                      max_seq_len=16)
    model = apply_method(LlamaForCausalLM(cfg), MethodConfig(name="sltrain", rank=4, delta=0.1, alpha=8))
    with torch.no_grad():  # B = 0 at init: give the low-rank part a say, and sharpen the logits
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.3)
        model.lm_head.weight.mul_(20)
    return model


def _batches():
    """Three batches of different sizes; rows of real lengths 16, 9, 2, 1 (nothing to predict) and 0 (all pad)."""
    gen = torch.Generator().manual_seed(1)
    lengths = [[16, 9], [2, 16, 1], [0, 12]]
    out = []
    for batch in lengths:
        ids = torch.randint(1, VOCAB, (len(batch), 16), generator=gen)
        labels = ids.clone()
        for i, n in enumerate(batch):
            ids[i, n:] = PAD
            labels[i, n:] = -100
        out.append((ids, labels))
    return out


def _by_hand(model, batches):
    """exp(sum over every real target of -log p(target) / their number), in float64, row by row."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, labels in batches:
            logits = model(ids).logits.double()
            for row in range(ids.size(0)):
                logp = torch.log_softmax(logits[row], dim=-1)
                for t in range(ids.size(1) - 1):  # position t predicts the token at t + 1
                    target = int(labels[row, t + 1])
                    if target != -100:
                        total -= float(logp[t, target])
                        count += 1
    return total / count, count


def test_evaluate_ppl_is_the_per_token_perplexity():
    model, batches = _model(), _batches()
    loss, count = _by_hand(model, batches)
    assert count == 15 + 8 + 1 + 15 + 0 + 11
    out = evaluate_ppl(model, batches)
    assert out["tokens"] == count
    assert out["loss"] == pytest.approx(loss, rel=1e-6, abs=0)
    assert out["ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
    # not a mean of per-batch means (which the uneven batches would make different), nor over N + 1 batches
    means = [_by_hand(model, [b])[0] for b in batches if (b[1][:, 1:] != -100).any()]
    assert abs(sum(means) / len(means) - loss) > 1e-3 and abs(sum(means) / (len(means) + 1) - loss) > 1e-3


def test_padding_and_batching_do_not_change_the_result():
    """The same rows one at a time, or with an all-pad filler batch added, give the same numbers."""
    model, batches = _model(), _batches()
    ref = evaluate_ppl(model, batches)
    rows = [(ids[i:i + 1], labels[i:i + 1]) for ids, labels in batches for i in range(ids.size(0))]
    one_by_one = evaluate_ppl(model, rows)
    assert one_by_one["tokens"] == ref["tokens"]
    assert one_by_one["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    filler = [(batches[0][0], torch.full_like(batches[0][1], -100))]  # what a short rank gets under DDP / FSDP
    with_filler = evaluate_ppl(model, batches + filler)
    assert with_filler["tokens"] == ref["tokens"] and with_filler["loss"] == pytest.approx(ref["loss"], rel=1e-12)
