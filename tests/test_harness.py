"""data=c4 equals the GaLore / SLTrain benchmark harness token for token, on a local mirror in the allenai/c4 layout.

The harness (GaLore's torchrun_main.py, reused by SLTrain) streams ``allenai/c4`` "en", shuffles the train split with
``.shuffle(seed=42)`` (buffer 1000), tokenizes each document with t5-base (max_length=256, truncation, padding to
256, EOS appended) and masks pad with -100; it evaluates on the validation split shuffled the same way. Here the
hub load is replaced by the same ``datasets`` calls on the mirror's shards (conftest.c4_mirror) and t5-base by its
SentencePiece model in tests/assets/t5-base, read by transformers' T5 tokenizer as the harness does.
"""
import gzip
import hashlib
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

T5 = Path(__file__).resolve().parent / "assets" / "t5-base"
CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
SEQ_LEN = 256
TRAIN_ROWS = 40  # 5 steps of 8
HELLO = "Hello world."


def harness_tokenizer():
    """t5-base as the harness loads it (``AutoTokenizer.from_pretrained("t5-base", model_max_length=256)``),
    from the SentencePiece model alone: transformers converts it offline."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(T5), model_max_length=SEQ_LEN)


def harness_rows(mirror: Path, split: str, tokenizer, n: int | None = None):
    """(ids, labels), int64 (rows, 256): the harness's first n rows of ``split`` (all of them when n is None)."""
    import datasets

    files = sorted(str(p) for p in (mirror / "en").glob(f"c4-{split}.*.json.gz"))
    data = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    data = data.shuffle(seed=42)  # train and validation alike; buffer_size 1000, datasets' default
    texts = [example["text"] for example in itertools.islice(data, n)]
    batch = tokenizer(texts, max_length=SEQ_LEN, truncation=True, padding="max_length", return_tensors="pt")
    ids = batch["input_ids"]
    labels = ids.clone()
    labels[labels == tokenizer.pad_token_id] = -100
    return ids, labels


def shard_texts(mirror: Path, pattern: str = "c4-*.json.gz"):
    """The documents of the mirror's shards matching pattern, in file-name order (train before validation)."""
    texts = []
    for path in sorted((mirror / "en").glob(pattern)):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


@pytest.fixture(scope="module")
def harness(c4_mirror):
    """The harness's first TRAIN_ROWS training rows and every validation row: {"train": (ids, labels), "val": ...}."""
    tokenizer = harness_tokenizer()
    return {"train": harness_rows(c4_mirror, "train", tokenizer, TRAIN_ROWS),
            "val": harness_rows(c4_mirror, "validation", tokenizer)}


def _c4_config(mirror: Path):
    from sltrain_cli.configs import DataConfig

    return DataConfig(**{**yaml.safe_load((CONF / "c4.yaml").read_text()), "path": str(mirror)})


def _assert_same_rows(got, want, what):
    assert got.dtype == torch.int64 and tuple(got.shape) == tuple(want.shape), \
        (what, got.dtype, tuple(got.shape), tuple(want.shape))
    bad = (got != want).any(1).nonzero().flatten()
    if bad.numel():
        r = int(bad[0])
        c = int((got[r] != want[r]).nonzero()[0])
        pytest.fail(f"{what}: {bad.numel()} of {got.size(0)} rows differ; first row {r} from position {c}: "
                    f"sltrain {got[r, c:c + 6].tolist()} harness {want[r, c:c + 6].tolist()}")


def test_the_mirror_and_the_harness_rows(c4_mirror, harness):
    """The stand-in is C4-shaped and exercises both row kinds: short documents padded, long ones truncated."""
    assert sorted(p.name for p in (c4_mirror / "en").iterdir()) == [
        "c4-train.00000-of-01024.json.gz", "c4-train.00001-of-01024.json.gz", "c4-validation.00000-of-00008.json.gz"]
    with gzip.open(c4_mirror / "en" / "c4-validation.00000-of-00008.json.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 80 and all(set(r) == {"text", "timestamp", "url"} for r in rows)
    assert harness_tokenizer()(HELLO)["input_ids"] == [8774, 296, 5, 1]
    for split, n in (("train", TRAIN_ROWS), ("val", 80)):
        ids, labels = harness[split]
        assert ids.shape == (n, SEQ_LEN) and ids.dtype == labels.dtype == torch.int64
        padded = (ids[:, -1] == 0).sum()
        assert 0 < padded < n // 2, (split, int(padded))  # some rows short, most truncated
        assert ((ids == 1).sum(1) == 1).all() and (ids[ids[:, -1] != 0, -1] == 1).all()  # one EOS, kept at 256
        assert torch.equal(labels == -100, ids == 0) and int(ids.max()) < 32000
    first_docs = shard_texts(c4_mirror, "c4-train.*.json.gz")[:TRAIN_ROWS]
    first = harness_tokenizer()(first_docs, max_length=SEQ_LEN, truncation=True, padding="max_length",
                                return_tensors="pt")["input_ids"]
    assert not torch.equal(first, harness["train"][0])  # the shuffle moved documents: order is being tested


def test_sentencepiece_equals_transformers_on_the_mirror(c4_mirror):
    """The SentencePiece library and transformers' T5 tokenizer give the same ids (before truncation; the latter
    also appends EOS) for every mirror document: either backend reproduces the harness on such text."""
    import sentencepiece as spm

    texts = shard_texts(c4_mirror)
    sp = spm.SentencePieceProcessor(model_file=str(T5 / "spiece.model")).encode(texts)
    hf = harness_tokenizer()(texts)["input_ids"]
    differ = [i for i, (a, b) in enumerate(zip(sp, hf)) if a + [1] != b]
    assert len(texts) == 480 and not differ, f"{len(differ)} documents differ, first {differ[:5]}"


def test_t5_tokenizer_ids_and_checksum(c4_mirror, tmp_path):
    from sltrain_cli import data as D
    from sltrain_cli.configs import TokenizerConfig
    from sltrain_cli.data.tokenizer import build_tokenizer

    notice = (T5 / "NOTICE").read_text()
    sha = re.search(r"sha256 ([0-9a-f]{64})", notice).group(1)
    assert hashlib.sha256((T5 / "spiece.model").read_bytes()).hexdigest() == sha
    corpus = D.open_corpus(_c4_config(c4_mirror))
    for cfg in (TokenizerConfig(path=str(T5)), TokenizerConfig(kind="t5", path=str(T5))):
        tok = build_tokenizer(corpus, cfg, tmp_path)
        assert tok.encode(HELLO) == [8774, 296, 5], cfg
        assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (32000, 1, 0), cfg
        assert tok.decode([8774, 296, 5]) == HELLO


def test_first_batches_and_validation_equal_the_harness(c4_mirror, harness, tmp_path):
    from sltrain_cli import data as D
    from sltrain_cli.configs import TokenizerConfig
    from sltrain_cli.data.tokenizer import build_tokenizer

    corpus = D.open_corpus(_c4_config(c4_mirror))
    tok = build_tokenizer(corpus, TokenizerConfig(path=str(T5)), tmp_path)
    assert tok.vocab_size == 32000
    train, val = D.build_datasets(corpus, tok, rows_per_step=8, cache_root=tmp_path)
    batches = [train.next_batch() for _ in range(TRAIN_ROWS // 8)]
    assert all(tuple(x.shape) == tuple(y.shape) == (8, SEQ_LEN) for x, y in batches)
    ids, labels = (torch.cat(t) for t in zip(*batches))
    _assert_same_rows(ids, harness["train"][0], "train ids")
    _assert_same_rows(labels, harness["train"][1], "train labels")
    assert int(ids.max()) < 32000

    val_batches = val.batches(max_tokens=None, batch_size=16)
    assert all(x.size(0) <= 16 for x, _ in val_batches)
    ids, labels = (torch.cat(t) for t in zip(*val_batches))
    _assert_same_rows(ids, harness["val"][0], "validation ids")
    _assert_same_rows(labels, harness["val"][1], "validation labels")
    assert int(ids.max()) < 32000


@pytest.mark.slow  # a tiny pretrain on the mirror (vocab 32000, 256-token rows), its export, two evaluations: ~30 s
def test_val_ppl_equals_transformers_on_the_harness_validation_rows(c4_mirror, harness, cache_dir, tmp_path):
    """summary.json's val_ppl is the exact token-weighted perplexity of the exported model on every harness
    validation row: exp(mean next-token cross-entropy over the non-pad targets). The run trains fast enough (lr 0.02)
    that per-token losses spread (std ~3 nats), so averaging per batch instead would be off by ~1e-4 relative;
    the two agree to ~1e-8 on CPU in fp32, hence rel 1e-5."""
    from transformers import LlamaForCausalLM
    from typer.testing import CliRunner

    from sltrain_cli.cli import app

    runner = CliRunner()
    ids, labels = harness["val"]
    targets = int((labels[:, 1:] != -100).sum())
    args = ["pretrain", "--quiet", "data=c4", f"data.path={c4_mirror}", f"tokenizer.path={T5}", "model=tiny",
            "train=tiny", "steps=10", "optim.lr=0.02", "train.eval_every=10", "train.save_every=10",
            f"train.eval_tokens={10 * ids.numel()}", "train.num_threads=1", f"out_dir={tmp_path}", "run_name=c4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    run_dir = tmp_path / "pretrain" / "c4"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 10
    assert summary["val_ppl"] < 5000  # learned something (an untrained model reads ~32000): losses differ by token
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output + repr(result.exception)

    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.vocab_size == 32000
    total = 0.0
    with torch.no_grad():
        for x, y in zip(ids.split(16), labels.split(16)):
            logits = model(input_ids=x).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                             y[:, 1:].reshape(-1), ignore_index=-100,
                                                             reduction="sum"))
    ppl = math.exp(total / targets)
    assert summary["val_tokens"] == targets  # every validation row, each target counted once
    assert summary["val_ppl"] == pytest.approx(ppl, rel=1e-5), (summary["val_ppl"], ppl)
