"""Inference with a KV cache: equal to recomputing the whole window, batched prompts (left-padded) equal to one at a
time, every layer form (dense, low-rank, SLTrain with either kernel)."""
import dataclasses

import pytest
import torch

from sltrain_cli.configs import MethodConfig, ModelConfig
from sltrain_cli.core.model import KVCache
from sltrain_cli.infer import generate_ids
from sltrain_cli.runs import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = ModelConfig(name="t", hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, vocab_size=97,
                  max_seq_len=48)
FORMS = {"full": MethodConfig(name="full"), "lowrank": MethodConfig(name="lowrank", rank=8),
         "sltrain-compose": MethodConfig(name="sltrain", rank=8, delta=0.1, kernel="compose"),
         "sltrain-factored": MethodConfig(name="sltrain", rank=8, delta=0.1, kernel="factored")}


def _model(form):
    model = build_model(CFG, FORMS[form], seed=0, device=torch.device("cpu"))
    return model.eval()


@pytest.mark.parametrize("form", list(FORMS))
def test_cached_decoding_equals_recomputing_the_window(form):
    """Prefill, then one token at a time (and a chunk of several): each step's logits are the full forward's at that
    position, for a left-padded batch too (each row as if alone, at its own rotary positions)."""
    model = _model(form)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(2, 97, (1, 12), generator=gen), torch.randint(2, 97, (1, 7), generator=gen)
    full_a, full_b = model(a).logits[0].detach(), model(b).logits[0].detach()
    cache = KVCache(CFG, 1, 48)
    steps = [model.decode(a[:, :5], cache)] + [model.decode(a[:, i:i + 1], cache) for i in range(5, 9)]
    steps.append(model.decode(a[:, 9:12], cache))  # several new positions over a filled cache
    got = torch.stack([s[0] for s in steps])
    assert torch.allclose(got, full_a[[4, 5, 6, 7, 8, 11]], atol=1e-5, rtol=0), (got - full_a[[4, 5, 6, 7, 8, 11]])
    ids = torch.zeros(2, 6, dtype=torch.long)
    ids[0], ids[1, 1:] = a[0, :6], b[0, :5]
    mask = ids != 0
    mask[1, 0] = False
    cache = KVCache(CFG, 2, 48)
    first = model.decode(ids, cache, mask)
    second = model.decode(torch.stack([a[0, 6:7], b[0, 5:6]]), cache)
    for got, want in ((first[0], full_a[5]), (first[1], full_b[4]), (second[0], full_a[6]), (second[1], full_b[5])):
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_batched_prompts_equal_one_at_a_time_and_sampling_is_seeded():
    model = _model("sltrain-factored")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    alone = [generate_ids(model, [p], 12, eos_id=None)[0] for p in prompts]
    assert generate_ids(model, prompts, 12, eos_id=None) == alone
    assert all(len(x) == 12 for x in alone)
    kw = dict(eos_id=None, temperature=1.0, top_k=20, seed=3)
    assert generate_ids(model, prompts, 8, **kw) == generate_ids(model, prompts, 8, **kw)
    assert generate_ids(model, prompts, 8, **kw) != generate_ids(model, prompts, 8, **{**kw, "seed": 4})


def test_a_context_past_max_seq_len_keeps_its_last_tokens():
    model = _model("full")
    long = list(range(2, 2 + 60))  # 60 tokens > max_seq_len 48
    out = generate_ids(model, [long], 40, eos_id=None)[0]  # 40 new: the cache is rebuilt from the last 24 once
    assert len(out) == 40
    small = dataclasses.replace(CFG, max_seq_len=64)
    wide = build_model(small, FORMS["full"], seed=0, device=torch.device("cpu")).eval()
    assert generate_ids(wide, [long[-24:]], 5, eos_id=None) == generate_ids(model, [long[-24:]], 5, eos_id=None)


@pytest.mark.parametrize("args, words", [
    ([], ["--prompt", "--prompts-file"]),
    (["--prompts-file", "{empty}"], ["--prompts-file", "holds no prompt"]),
    (["--prompts-file", "{missing}"], ["--prompts-file", "cannot read"]),
    (["--prompt", "x", "--threads", "0"], ["--threads", ">= 1"]),
])
def test_generate_bad_input_is_one_line(tmp_path, args, words):
    from typer.testing import CliRunner

    from sltrain_cli.cli import app

    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.format(empty=tmp_path / "empty.txt", missing=tmp_path / "nope.txt") for a in args]
    result = CliRunner().invoke(app, ["generate", str(tmp_path), *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(w in lines[0] for w in words), lines[0]
