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
    from sltrain_cli.tokenizer import build_tokenizer

    return build_tokenizer(open_corpus(DataConfig(**SMALL)), TokenizerConfig(vocab_size=512, cache_dir=str(cache_dir)),
                           cache_dir)


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A 300-piece SentencePiece model (pad 0, eos 1, unk 2) of three speeches: (spiece.model path, processor)."""
    import io

    import sentencepiece as spm

    from sltrain_cli.configs import DataConfig
    from sltrain_cli.data import load_documents

    docs, _ = load_documents(DataConfig(max_docs=3))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=model, vocab_size=300,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   max_sentence_length=1 << 20)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(model.getvalue())
    return path, spm.SentencePieceProcessor(model_file=str(path))
