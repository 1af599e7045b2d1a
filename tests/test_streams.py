"""data/pipeline.py and data/c4.py: a stream's rows do not depend on workers or ranks, resume skips documents
untokenized, prefix tokenization gives the whole document's ids, a local C4 mirror is found by name, bad shards
are one line."""
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sltrain_cli import data as D
from sltrain_cli.configs import ConfigError, DataConfig, TokenizerConfig, UserError
from sltrain_cli.data.rows import encode_heads
from sltrain_cli.data.tokenizer import build_tokenizer

from helpers import SMALL, load_documents

ROOT = Path(__file__).resolve().parents[1]
T5 = ROOT / "tests" / "assets" / "t5-base"


def _c4(mirror, **kw) -> DataConfig:
    return DataConfig(**{**yaml.safe_load((ROOT / "conf" / "data" / "c4.yaml").read_text()), "path": str(mirror),
                         **kw})


@pytest.fixture(scope="module")
def t5(c4_mirror, tmp_path_factory):
    return build_tokenizer(D.open_corpus(_c4(c4_mirror)), TokenizerConfig(path=str(T5)),
                           tmp_path_factory.mktemp("t5"))


def _mirror_texts(mirror):
    return [json.loads(line)["text"] for p in sorted((mirror / "en").glob("*.json.gz"))
            for line in gzip.open(p, "rt")]


@pytest.mark.parametrize("per_token", [4, 5, 8])  # 8: the shipped ratio; 4, 5: prefixes near `need` tokens
def test_prefix_tokenization_gives_the_whole_documents_ids(c4_mirror, t5, tok, per_token, monkeypatch):
    from sltrain_cli.data import rows

    monkeypatch.setattr(rows, "PREFIX_CHARS_PER_TOKEN", per_token)
    texts = _mirror_texts(c4_mirror) + load_documents(DataConfig(**SMALL))[0]
    for need in (31, 255, 1023):
        assert sum(len(t) > need * per_token for t in texts) > 20  # the prefix path is taken, not only the whole
        for tk in (t5, tok):
            assert encode_heads(tk, texts, need) == [ids[:need] for ids in tk.encode_batch(texts)]


def _batches(corpus, tk, steps, rows=8, rank=0, world=1, workers=0, state=None):
    train, _ = D.build_datasets(corpus, tk, rows_per_step=rows, rank=rank, world_size=world, num_workers=workers)
    if state is not None:
        train.load_state_dict(state)
    out = [train.next_batch() for _ in range(steps)]
    saved = train.state_dict()
    train.close()
    return out, saved


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.fixture(scope="module")
def packed_local(tmp_path_factory, c4_mirror):
    """The mirror's documents as a local .json.gz stream (packed rows) through a symlink without a suffix."""
    root = tmp_path_factory.mktemp("local")
    for p in (c4_mirror / "en").glob("c4-train*"):
        shutil.copy(p, root / p.name)
    (root / "blob").write_bytes((c4_mirror / "en" / "c4-validation.00000-of-00008.json.gz").read_bytes())
    (root / "linked.jsonl.gz").symlink_to(root / "blob")
    return root


@pytest.mark.parametrize("source", ["c4", "local-packed"])
def test_rows_do_not_depend_on_workers_or_ranks_and_resume_exactly(source, c4_mirror, packed_local, t5, tok):
    """Global batches (across an epoch boundary) are the same with 0 or 3 tokenizer threads and for 1 or 2 ranks
    (rank 0's rows then rank 1's); a stream resumed with another worker count continues with the same batches."""
    if source == "c4":
        cfg, tk = _c4(c4_mirror, seq_len=48, max_docs=60), t5
    else:
        cfg = DataConfig(name="local", path=str(packed_local), streaming=True, seq_len=32, val_fraction=0.2,
                         max_docs=60, shuffle_buffer=50)
        tk = tok
    corpus = D.open_corpus(cfg)
    steps = 14  # about two epochs of the 60 documents
    one, _ = _batches(corpus, tk, steps)
    assert _same(one, _batches(corpus, tk, steps, workers=3)[0])
    halves = [_batches(corpus, tk, steps, rank=r, world=2, workers=2)[0] for r in (0, 1)]
    joined = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*halves)]
    assert _same(one, joined)
    _, state = _batches(corpus, tk, 9, workers=2)
    assert state["epoch"] >= 1 or source == "local-packed"
    assert _same(one[9:], _batches(corpus, tk, steps - 9, workers=0, state=state)[0])
    assert not _same(one[9:], _batches(corpus, tk, steps - 9)[0])  # restarting is not resuming


def test_resume_skips_consumed_documents_untokenized(c4_mirror, t5):
    """A resumed harness stream tokenizes none of the documents consumed before the checkpoint: only what it trains
    on next (one chunk of CHUNK_DOCS read ahead)."""
    from sltrain_cli.data.pipeline import CHUNK_DOCS

    corpus = D.open_corpus(_c4(c4_mirror, seq_len=48))
    _, state = _batches(corpus, t5, 20)
    assert state["docs"] == 160
    order = list(corpus.split_texts("train"))
    seen = []
    real = t5.encode_batch
    t5.encode_batch = lambda texts: (seen.extend(texts), real(texts))[1]
    try:
        _batches(corpus, t5, 3, state=state)
    finally:
        del t5.encode_batch
    # the first tokenizer call is the chunk starting at document 160 (a prefix of each), in stream order
    assert 3 * 8 <= len(seen) <= 2 * CHUNK_DOCS
    assert all(doc.startswith(head) for head, doc in zip(seen[:CHUNK_DOCS], order[160:]))


def test_mirror_is_found_by_name(c4_mirror, tmp_path):
    from sltrain_cli.data.c4 import mirror_shards

    found = mirror_shards(str(c4_mirror))
    assert [p.name for p in found["train"]] == ["c4-train.00000-of-01024.json.gz", "c4-train.00001-of-01024.json.gz"]
    assert [p.name for p in found["validation"]] == ["c4-validation.00000-of-00008.json.gz"]
    assert mirror_shards(str(c4_mirror / "en")) == found == mirror_shards(f"{c4_mirror}/en/c4-*.json.gz")
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "c4-train.json.gz").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        D.open_corpus(_c4(tmp_path))
    msg = str(err.value)
    assert msg.startswith("data.path: no C4 train shards in") and "c4-train.json.gz" in msg
    assert "c4-{train,validation}.NNNNN-of-NNNNN.json.gz" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="does not exist"):
        D.open_corpus(_c4(tmp_path / "nowhere"))


def test_truncated_shard_is_one_line_naming_the_file_and_row(c4_mirror, t5, tmp_path):
    root = tmp_path / "c4"
    shutil.copytree(c4_mirror, root)
    shard = root / "en" / "c4-train.00001-of-01024.json.gz"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    corpus = D.open_corpus(_c4(root, seq_len=48, shuffle_buffer=10))
    train, _ = D.build_datasets(corpus, t5, rows_per_step=8, num_workers=1)
    with pytest.raises(UserError) as err:
        for _ in range(100):
            train.next_batch()
    msg = str(err.value)
    assert msg.startswith(f"data.path: {shard} is truncated: its gzip stream breaks after row "), msg
    assert "\n" not in msg


def test_local_json_gz_files(c4_mirror):
    cfg = DataConfig(name="local", path=str(c4_mirror / "en" / "c4-validation.*.json.gz"))
    train, val = load_documents(cfg)
    assert len(train) + len(val) == 80


def _pretrain(out, mirror, *extra):
    import subprocess
    import sys

    args = ["model=tiny", "train=tiny", "data=c4", f"data.path={mirror}", f"tokenizer.path={T5}", "data.seq_len=48",
            "train.num_threads=1", "train.eval_tokens=400", f"out_dir={out}", *extra]
    return subprocess.run([sys.executable, "-m", "sltrain_cli", "pretrain", "--quiet", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # 16 steps of a tiny model with a 32,000-token head: ~10 s
def test_a_shard_breaking_mid_run_fails_in_one_line_and_keeps_the_checkpoint(c4_mirror, tmp_path, monkeypatch):
    """A training shard of 400 long documents (12 MB) whose gzip stream is cut at 90%: `datasets` reads a JSON shard
    in 10 MB blocks, so the run trains on the first block for tens of steps, then stops with one line naming the file
    (exit 2, status failed), and the checkpoints before the cut stay. In process, with the unigram bar fitted on 64
    documents (its 2,048 would reach the cut before step 1)."""
    from typer.testing import CliRunner

    from sltrain_cli.cli import app
    from sltrain_cli.data import pipeline

    monkeypatch.setattr(pipeline, "STREAM_SAMPLE_DOCS", 64)
    root = tmp_path / "c4"
    shutil.copytree(c4_mirror, root)
    shard = root / "en" / "c4-train.00001-of-01024.json.gz"
    rows = [json.loads(line) for line in gzip.open(c4_mirror / "en" / "c4-train.00000-of-01024.json.gz", "rt")]
    joined = ["\n".join(rows[(i + j) % len(rows)]["text"] for j in range(20)) for i in range(400)]
    long = [{**rows[i % len(rows)], "url": f"u{i}", "text": text} for i, text in enumerate(joined)]
    packed = gzip.compress("".join(json.dumps(row) + "\n" for row in long).encode(), compresslevel=1, mtime=0)
    shard.write_bytes(packed[: len(packed) * 9 // 10])
    args = ["model=tiny", "train=tiny", "data=c4", f"data.path={root}", f"tokenizer.path={T5}", "data.seq_len=32",
            "train.num_threads=1", "train.eval_tokens=400", f"out_dir={tmp_path / 'out'}", "data.shuffle_buffer=10",
            "train.total_batch_size=16", "steps=400", "train.save_every=5", "train.eval_every=0", "run_name=cut",
            "data.num_workers=2"]
    result = CliRunner().invoke(app, ["pretrain", "--quiet", *args])
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"error: data.path: {shard} is truncated: its gzip stream breaks after row "), lines
    assert "Traceback" not in result.output
    run = tmp_path / "out" / "pretrain" / "cut"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["val_ppl"] is None and 10 <= summary["steps"] < 400, summary
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert kept and kept[-1] == f"step_{summary['steps'] // 5 * 5:06d}.pt", (kept, summary["steps"])


@pytest.mark.slow  # one tiny pretrain on the mirror: ~10 s
def test_c4_mirror_run_records_the_data_wait_and_the_datasets_version(c4_mirror, tmp_path):
    import datasets

    proc = _pretrain(tmp_path, c4_mirror, "run_name=ok", "train.log_every=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "pretrain" / "ok"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["datasets"] == datasets.__version__ and summary["vocab_size"] == 32000
    assert 0 < summary["data_wait_s"] < summary["train_time_s"]
    assert summary["data_wait_share"] == pytest.approx(summary["data_wait_s"] / summary["train_time_s"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "\"loss\"" in line]
    assert len(rows) == 4 and sum(r["data_wait_s"] for r in rows) == pytest.approx(summary["data_wait_s"])


@pytest.mark.parametrize("args, names", [
    (("data.num_workers=-1",), ["data.num_workers", ">= 0", "-1"]),
    (("tokenizer.path={empty}",), ["tokenizer.path", "is not a tokenizer"]),
    (("data.path={empty}",), ["data.path", "no C4 train shards", "c4-{train,validation}.NNNNN-of-NNNNN.json.gz"]),
])
def test_bad_harness_input_is_one_line(c4_mirror, tmp_path, args, names):
    from typer.testing import CliRunner

    from sltrain_cli.cli import app

    (tmp_path / "empty").mkdir()
    args = ["model=tiny", "train=tiny", "data=c4", f"data.path={c4_mirror}", f"tokenizer.path={T5}",
            f"out_dir={tmp_path / 'out'}", *(a.format(empty=tmp_path / "empty") for a in args)]
    result = CliRunner().invoke(app, ["pretrain", "--quiet", *args])
    err = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(err) == 1 and err[0].startswith("error: "), result.output
    assert all(n in err[0] for n in names), err[0]
    assert not (tmp_path / "out" / "pretrain").exists() or not any((tmp_path / "out" / "pretrain").iterdir())
