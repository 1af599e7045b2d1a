"""sltrain_cli.data: corpora, split, packing, caches, rank sharding, resume, validation batches."""
import gzip
import json
import math
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from sltrain_cli import data as D
from sltrain_cli.configs import DataConfig, TokenizerConfig, UserError
from sltrain_cli.data import c4 as C4
from sltrain_cli.data import local
from sltrain_cli.data import tokenizer as T

from helpers import SMALL, load_documents

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def _build(tok, rows=6, rank=0, world=1, **kw):
    return D.build_datasets(DataConfig(**{**SMALL, **kw}), tok, rows_per_step=rows, rank=rank, world_size=world)


def _local_files(root: Path) -> Path:
    """A directory with every supported format: 3 .txt documents, .jsonl, .jsonl.gz, .parquet rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "txt").mkdir(parents=True)
    for i in range(3):
        (root / "txt" / f"d{i}.txt").write_text(f"text document {i}.\nSecond line.\n\n" + "plain words " * 40)
    with open(root / "a.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"body": f"json row {i} " + "some json words " * 30, "n": i}) + "\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        for i in range(4):
            f.write(json.dumps({"body": f"gzip row {i} " + "zipped words " * 30}) + "\n")
    pq.write_table(pa.table({"body": [f"parquet row {i} " + "columnar words " * 30 for i in range(4)]}),
                   root / "c.parquet")
    return root


def test_sotu_split_deterministic_and_disjoint():
    train, val = load_documents(DataConfig())
    assert (train, val) == load_documents(DataConfig())
    assert len(train) + len(val) == 249 and len(val) == round(249 * 0.05)
    assert not set(train) & set(val)
    _, val_other = load_documents(DataConfig(split_seed=1))
    assert val_other != val
    train12, val12 = load_documents(DataConfig(max_docs=12))
    assert len(train12) + len(val12) == 12 and len(val12) == 1


def test_packing_rows_and_eos(tok):
    train, val = _build(tok, rows=4)
    x, y = train.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long and torch.equal(x, y)
    docs, _ = load_documents(DataConfig(**SMALL))
    flat = train.ids.flatten()
    eos_at = (flat == tok.eos_id).nonzero().flatten()
    assert train.num_docs == len(docs) and len(docs) - 1 <= eos_at.numel() <= len(docs)
    assert tok.decode(flat[: eos_at[0]]) == docs[0]  # document, EOS, next document
    assert tok.decode(flat[eos_at[0] + 1: eos_at[1]]) == docs[1]
    assert train.num_tokens == train.num_rows * 32 and val.num_rows >= 1 and val.num_docs == 1


def test_unpacked_rows_pad_and_mask(tok):
    train, _ = _build(tok, rows=8, packing=False)
    x, y = train.next_batch()
    assert x.shape == (8, 32)
    for row, lab in zip(x, y):
        end = int((row == tok.eos_id).nonzero()[0])  # each document ends with EOS, then pad
        assert torch.equal(lab[: end + 1], row[: end + 1]) and (lab[end + 1:] == -100).all()
        assert (row[end + 1:] == tok.pad_id).all()


def test_local_formats(tmp_path):
    root = _local_files(tmp_path)
    txt = sum(load_documents(DataConfig(name="local", path=str(root / "txt"))), [])
    assert sorted(txt) == sorted((root / "txt" / f"d{i}.txt").read_text() for i in range(3))
    rows = sum(load_documents(DataConfig(name="local", path=f"{root}/a.jsonl, {root}/b.jsonl.gz",
                                           text_field="body")), [])
    assert len(rows) == 8 and any(r.startswith("gzip row 3") for r in rows)
    pq = sum(load_documents(DataConfig(name="local", path=str(root / "*.parquet"), text_field="body")), [])
    assert sorted(r.split(" words")[0] for r in pq) == [f"parquet row {i} columnar" for i in range(4)]
    every = sum(load_documents(DataConfig(name="local", path=str(root), text_field="body")), [])
    assert len(every) == 3 + 8 + 4
    with pytest.raises(UserError, match="data.text_field"):
        load_documents(DataConfig(name="local", path=str(root / "a.jsonl"), text_field="nope"))


@pytest.mark.parametrize("spec", ["missing", "emptydir", "bad.csv", "*.nothing"])
def test_local_missing_path_names_key(tmp_path, spec):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "bad.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"^data\.path: "):
        T.build_tokenizer(D.open_corpus(DataConfig(name="local", path=str(tmp_path / spec))),
                          TokenizerConfig(cache_dir=str(tmp_path)), tmp_path)


@pytest.mark.parametrize("packing", [True, False])
def test_local_streaming(tmp_path, packing):
    root = _local_files(tmp_path / "corpus")
    seq_len = 16 if packing else 512  # unpacked: every document is shorter than a row, so rows end in pad
    cfg = DataConfig(name="local", path=str(root), text_field="body", streaming=True, seq_len=seq_len,
                     packing=packing, val_fraction=0.3)
    corpus = D.open_corpus(cfg)
    tcfg = TokenizerConfig(vocab_size=300, cache_dir=str(tmp_path / "cache"))
    tk = T.build_tokenizer(corpus, tcfg, D.cache_root(tcfg))
    train, val = D.build_datasets(corpus, tk, rows_per_step=4)
    batches = [train.next_batch() for _ in range(40)]  # > one epoch: the stream restarts reshuffled
    assert all(x.shape == (4, seq_len) for x, _ in batches) and train.state_dict()["epoch"] >= 1
    for x, y in batches:
        assert torch.equal(torch.where(y == -100, x, y), x)
        assert packing == bool((y != -100).all())
    train2, _ = D.build_datasets(corpus, tk, rows_per_step=4)
    [train2.next_batch() for _ in range(25)]
    state = train2.state_dict()
    resumed, _ = D.build_datasets(corpus, tk, rows_per_step=4)
    resumed.load_state_dict(state)
    for want in batches[25:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), want))
    first = val.batches(100, 2)
    assert all(torch.equal(a, b) for p, q in zip(first, val.batches(100, 2)) for a, b in zip(p, q))
    r0, r1 = (D.build_datasets(corpus, tk, rows_per_step=4, rank=r, world_size=2)[0] for r in (0, 1))
    assert r0.next_batch()[0].shape == r1.next_batch()[0].shape == (2, seq_len)


def _hub_spy(monkeypatch, connect=False):
    """Every way a c4 run could wait on the hub, recorded: a TCP connect (the reachability probe; made for real
    only with ``connect``, else refused without touching the network) and a download (datasets' load_dataset,
    transformers' from_pretrained: fakes that record and fail instead of waiting on the network)."""
    calls = {"connect": [], "download": []}
    real_connect = socket.create_connection

    def create_connection(address, timeout=None, *args, **kwargs):
        calls["connect"].append((tuple(address), timeout))
        if connect:
            return real_connect(address, timeout, *args, **kwargs)
        raise ConnectionRefusedError(111, "refused by the test")

    def download(what):
        def call(*args, **kwargs):
            calls["download"].append((what, args))
            raise OSError(f"{what} called by the test")
        return call

    monkeypatch.setattr(socket, "create_connection", create_connection)
    datasets = types.ModuleType("datasets")
    datasets.load_dataset = download("load_dataset")
    transformers = types.ModuleType("transformers")
    transformers.AutoTokenizer = types.SimpleNamespace(from_pretrained=download("AutoTokenizer.from_pretrained"))
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    monkeypatch.setitem(sys.modules, "transformers", transformers)
    return calls


def test_c4_offline_is_one_line_without_touching_the_network(monkeypatch):
    """HF_HUB_OFFLINE decides alone: no connection is tried and nothing is downloaded (what could hang)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _hub_spy(monkeypatch)
    with pytest.raises(UserError) as err:
        D.open_corpus(DataConfig(name="c4", packing=False))
    msg = str(err.value)
    assert "\n" not in msg and "data=sotu" in msg and "data=local" in msg and "data.path=" in msg
    assert "HF_HUB_OFFLINE is set" in msg, msg
    assert calls == {"connect": [], "download": []}


def test_c4_unreachable_endpoint_is_one_bounded_probe(monkeypatch):
    """An unreachable HF_ENDPOINT: one TCP probe of that host and port with a timeout of a few seconds, then the
    one-line error naming it; no download is tried (datasets and transformers retry for minutes)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused at once
    calls = _hub_spy(monkeypatch, connect=True)
    with pytest.raises(UserError, match="data=sotu") as err:
        D.open_corpus(DataConfig(name="c4"))
    assert "cannot connect to 127.0.0.1:9" in str(err.value), err.value
    assert [address for address, _ in calls["connect"]] == [("127.0.0.1", 9)], calls
    timeout = calls["connect"][0][1]
    assert timeout is not None and 0 < timeout <= 5, timeout  # a bounded probe, not the OS's minutes-long default
    assert calls["download"] == []


def test_bpe_and_token_caches_are_reused(tmp_path, monkeypatch):
    cfg, tcfg = DataConfig(max_docs=4, seq_len=64), TokenizerConfig(vocab_size=300, cache_dir=str(tmp_path))
    corpus, root = D.open_corpus(cfg), D.cache_root(tcfg)
    assert root == tmp_path
    first = T.build_tokenizer(corpus, tcfg, root)
    x1, _ = D.build_datasets(corpus, first, rows_per_step=2, cache_root=root)[0].next_batch()
    cached = list((tmp_path / "tokenizers").glob("bpe-*.json")) + list((tmp_path / "tokens").glob("*.pt"))
    assert len(cached) == 2 and not list(tmp_path.rglob("*.tmp"))

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(T, "_train_bpe", boom)
    monkeypatch.setattr(T.Tokenizer, "encode_batch", boom)
    second = T.build_tokenizer(D.open_corpus(cfg), tcfg, root)
    x2, _ = D.build_datasets(D.open_corpus(cfg), second, rows_per_step=2, cache_root=root)[0].next_batch()
    assert second.fingerprint == first.fingerprint and torch.equal(x1, x2)
    # another vocabulary or split is another cache entry
    with pytest.raises(AssertionError, match="recomputed"):
        T.build_tokenizer(D.open_corpus(DataConfig(max_docs=4, split_seed=3)), tcfg, root)


def _synthetic(rows, world=1, rank=0, n=10):
    ids = torch.arange(n)[:, None].repeat(1, 3)
    return D.TrainStream(ids, ids, rows_per_step=rows, rank=rank, world_size=world, seed=0, name="syn",
                         num_docs=n, vocab_size=n)


def test_order_covers_each_epoch_and_shards_by_rank():
    one = _synthetic(4)
    seen = torch.cat([one.next_batch()[0][:, 0] for _ in range(15)])  # 60 rows = 6 epochs of 10
    for e in range(6):
        assert sorted(seen[e * 10:(e + 1) * 10].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:20])  # a fresh order each epoch
    ranks = [_synthetic(4, world=2, rank=r) for r in (0, 1)]
    again = _synthetic(4)
    for _ in range(15):
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), again.next_batch()[0])


def test_rank_sharding_real_corpus(tok):
    one, _ = _build(tok, rows=6)
    two = [_build(tok, rows=6, rank=r, world=2)[0] for r in (0, 1)]
    for _ in range(5):
        x, y = one.next_batch()
        parts = [t.next_batch() for t in two]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_resume_gives_the_same_batches(tok):
    ref = _synthetic(4, n=7)
    want = [ref.next_batch()[0] for _ in range(9)]
    run = _synthetic(4, n=7)
    [run.next_batch() for _ in range(4)]
    state = run.state_dict()
    assert set(state) == {"epoch", "pos", "num_rows"} and all(isinstance(v, int) for v in state.values())
    fresh = _synthetic(4, n=7)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.next_batch()[0], w) for w in want[4:])
    ranks = [_synthetic(4, n=7, world=2, rank=r) for r in (0, 1)]  # resume on 2 processes: same global batches
    for r in ranks:
        r.load_state_dict(state)
    assert all(torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), w) for w in want[4:])

    real, _ = _build(tok)
    want = [real.next_batch() for _ in range(6)]
    real2, _ = _build(tok)
    [real2.next_batch() for _ in range(2)]
    resumed, _ = _build(tok)
    resumed.load_state_dict(real2.state_dict())
    assert all(torch.equal(a, b) for w in want[2:] for a, b in zip(resumed.next_batch(), w))
    with pytest.raises(UserError, match="resume"):
        _build(tok, seq_len=16)[0].load_state_dict(real2.state_dict())


def test_validation_batches_are_fixed_and_split_by_rank(tok):
    _, val = _build(tok)
    a, b = val.batches(1000, 4), val.batches(1000, 4)
    assert len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    rows = torch.cat([x for x, _ in a])
    assert rows.size(0) * 32 >= 1000 > (rows.size(0) - 1) * 32  # the shortest prefix covering the budget
    assert torch.equal(rows, val._ids[: rows.size(0)])
    r0, r1 = val.batches(1000, 4, 0, 2), val.batches(1000, 4, 1, 2)
    assert len(r0) == len(r1) == math.ceil(len(a) / 2)
    assert all(torch.equal(x, a[2 * i][0]) for i, (x, _) in enumerate(r0))
    assert all(torch.equal(x, a[2 * i + 1][0]) for i, (x, _) in enumerate(r1[: len(a) // 2]))
    if len(a) % 2:  # rank 1 is one short: it runs a masked copy so collective forwards stay in step
        assert (r1[-1][1] == -100).all()
    assert sum(int((y != -100).sum()) for y in [q for _, q in r0 + r1]) == sum(int((y != -100).sum()) for _, y in a)


def test_unigram_perplexity(tok):
    train, val = _build(tok)
    ppl = D.unigram_perplexity(train, val)
    assert math.isfinite(ppl) and 1 < ppl < tok.vocab_size
    assert D.unigram_perplexity(train.sample_tokens(), val, vocab_size=tok.vocab_size) == pytest.approx(ppl)
    assert D.unigram_perplexity(train, val, max_tokens=64) > 1


def test_shipped_data_configs():
    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} >= {"sotu", "local", "c4"}
    for f in files:
        values = yaml.safe_load(f.read_text())
        if f.stem == "local":
            with pytest.raises(UserError, match="data.path"):
                DataConfig(**values)
            values["path"] = "corpus/"
        cfg = DataConfig(**values)
        assert cfg.name.value == f.stem
    c4 = DataConfig(**yaml.safe_load((CONF / "c4.yaml").read_text()))
    assert (c4.packing, c4.seq_len, c4.seed, c4.streaming) == (False, 256, 42, True)


def test_c4_pipeline_on_a_stand_in_stream(tmp_path, monkeypatch, spiece):
    """The C4 harness path (shuffled stream, one padded document per row, -100 on pad, rank split) with the hub
    replaced by local .jsonl files, since the hub is unreachable here."""
    import datasets

    real_load = datasets.load_dataset
    for split, n in (("train", 40), ("validation", 10)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{split} document {i}. " + "The Congress shall meet. " * (i % 7 + 1),
                                    "url": "u", "timestamp": "t"}) + "\n")

    def fake_load(name, config=None, split=None, streaming=False, **kw):
        assert (name, config, streaming) == ("allenai/c4", "en", True)
        return real_load("json", data_files=str(tmp_path / f"{split}.jsonl"), split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(C4, "require_c4", lambda: None)  # where C4Corpus.open looks it up
    cfg = DataConfig(**yaml.safe_load((CONF / "c4.yaml").read_text()))
    cfg.seq_len = 48
    corpus = D.open_corpus(cfg)
    tk = T.build_tokenizer(corpus, TokenizerConfig(path=str(spiece[0])), tmp_path)  # kind auto -> t5 -> tokenizer.path
    train, val = D.build_datasets(corpus, tk, rows_per_step=4, cache_root=tmp_path)
    x, y = train.next_batch()
    assert x.shape == (4, 48) and train.num_tokens is None
    for row, lab in zip(x, y):
        end = int((row == tk.eos_id).nonzero()[0])
        assert (lab[end + 1:] == -100).all() and (row[end + 1:] == tk.pad_id).all()
        assert torch.equal(lab[: end + 1], row[: end + 1])
    texts = [tk.decode(r[: int((r == tk.eos_id).nonzero()[0])].tolist()) for r in x]
    assert all(t.startswith("train document") for t in texts)
    assert [t.split(".")[0] for t in texts] != [f"train document {i}" for i in range(4)]  # shuffled (seed 42)
    batches = val.batches(200, 4)
    tokens = sum(int((b[1] != -100).sum()) for b in batches)
    assert tokens >= 200 and all(torch.equal(p[0], q[0]) for p, q in zip(batches, val.batches(200, 4)))
    assert 1 < D.unigram_perplexity(train, val, max_tokens=200) < 300
    halves = [D.build_datasets(corpus, tk, rows_per_step=4, rank=r, world_size=2)[0].next_batch()[0] for r in (0, 1)]
    assert all(h.shape == (2, 48) for h in halves)


def test_one_word_is_not_enough(tmp_path):
    (tmp_path / "only.txt").write_text("unsplittable")  # a single .txt is split by chunks, but not inside a word
    with pytest.raises(UserError, match=r"^data\.path: need at least 2"):
        load_documents(DataConfig(name="local", path=str(tmp_path / "only.txt")))


def test_a_single_txt_file_is_split_by_chunks(tmp_path):
    from sltrain_cli.data.local import SINGLE_DOC_CHUNKS, chunk_document

    text = "".join(f"Line {i} of the only speech in this corpus.\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    corpus = D.open_corpus(DataConfig(name="local", path=str(tmp_path / "one.txt"), val_fraction=0.1))
    train, val = corpus.documents()
    assert len(train) + len(val) == len(chunk_document(text)) and len(val) == round(SINGLE_DOC_CHUNKS * 0.1)
    assert "".join(chunk_document(text)) == text and all(c.endswith("\n") for c in chunk_document(text))


def test_an_unquoted_comma_list_of_files_is_one_path(tmp_path):
    from sltrain_cli.compose import expand_grid, load_config

    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("some words here\n" * 50)
    spec = f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"
    cfg = load_config(["data=local", f"data.path={spec}"])
    assert cfg.data.path == spec and len(local.resolve_files(cfg.data.path)) == 2
    assert expand_grid([f"data.path={spec}", "rank=1,2"]) == [[f"data.path={spec}", "rank=1"],
                                                               [f"data.path={spec}", "rank=2"]]
