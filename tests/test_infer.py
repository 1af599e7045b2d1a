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


def test_every_kernel_gives_the_training_forms_logits_and_dense_is_for_inference_only():
    """compose, factored and dense (W built once) decode to the same logits as the training form's forward."""
    from sltrain_cli.configs import ConfigError
    from sltrain_cli.core.sparse_lowrank import set_kernels

    model = _model("sltrain-compose")
    ids = torch.randint(2, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    want = model(ids).logits[:, -1].detach()
    for kernel in ("compose", "factored", "dense", "auto"):
        set_kernels(model, kernel)
        cache = KVCache(CFG, 2, 16)
        model.decode(ids[:, :6], cache)
        got = model.decode(ids[:, 6:], cache)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (kernel, (got - want).abs().max())
    set_kernels(model, "dense")
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match="for inference"):
        model(ids)
    with pytest.raises(ConfigError, match="^method.kernel: dense keeps W fixed, for inference only"):
        MethodConfig(name="sltrain", kernel="dense")


def _bench(*args):
    from typer.testing import CliRunner

    from sltrain_cli.cli import app

    return CliRunner().invoke(app, ["bench-infer", *map(str, args)])


@pytest.mark.parametrize("args, words", [
    (["--size", "2b"], ["--size", "130m", "'2b'"]),
    ([], ["--size", "or a RUN folder"]),
    (["--size", "60m", "--blocks", "0"], ["--blocks", "[1, 8]", "0"]),
    (["--size", "60m", "--blocks", "9"], ["--blocks", "[1, 8]", "9"]),
    (["--size", "60m", "--prompt-tokens", "200", "--new-tokens", "100"], ["--new-tokens", "300", "256"]),
    (["--size", "60m", "--methods", "sltrain,nope"], ["--methods", "choose from", "nope"]),
    (["--size", "60m", "--kernel", "fast"], ["--kernel", "dense", "'fast'"]),
    (["--size", "60m", "--format", "xml"], ["--format", "json"]),
])
def test_bench_infer_bad_input_is_one_line(args, words):
    result = _bench(*args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.slow  # a 60M-width model of one block, two methods, and a fresh process per method for the peak: ~15 s
def test_bench_infer_rows(tmp_path):
    import json

    out = tmp_path / "rows.csv"
    result = _bench("--size", "60m", "--blocks", "1", "--methods", "sltrain,full,lowrank", "--prompt-tokens", "8",
                    "--new-tokens", "4", "--rounds", "1", "--threads", "1", "--format", "json", "--out", out)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["method"] for r in rows] == ["sltrain", "full", "lowrank"]
    keys = ("method", "params", "weight_bytes", "peak_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")
    assert all(set(keys) <= set(r) for r in rows)
    sl, full, lr = rows
    assert full["params_vs_full"] == 1.0 and sl["params"] < full["params"] and lr["params"] < sl["params"]
    assert sl["weight_bytes_vs_full"] == pytest.approx(sl["weight_bytes"] / full["weight_bytes"])
    assert all(r["peak_bytes"] > 0 and r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert full["weight_bytes"] == 4 * full["params"]  # fp32, no buffers
    assert sl["weight_bytes"] > 4 * sl["params"]  # + the support's int64 indices
    assert out.read_text().splitlines()[0].startswith("method,params,weight_bytes,peak_bytes")


@pytest.mark.slow  # a bench-infer stopped by SIGTERM after a few seconds: ~8 s
def test_a_signal_stops_an_inference_command_in_one_line():
    """Commands without a save point of their own (bench-infer, generate, eval-ppl, export) drop their work at a
    signal with one line and 128 + its number (before: SIGTERM killed them silently)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "sltrain_cli", "bench-infer", "--size", "130m", "--blocks", "2",
                             "--rounds", "500", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM)" and "Traceback" not in err, err
