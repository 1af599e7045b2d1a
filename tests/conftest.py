import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here; C4/t5 paths must fail fast, not hang


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole test session (BPE training is the slow part)."""
    path = tmp_path_factory.mktemp("sltrain-cache")
    os.environ["SLTRAIN_CACHE_DIR"] = str(path)
    return path


def tiny_overrides(out_dir, *extra):
    """A run that takes a few seconds on CPU: tiny model, 8 steps, small vocab, few documents."""
    return ["model=tiny", "train=tiny", "tokenizer.vocab_size=512", "data.max_docs=24", "data.seq_len=64", "train.num_threads=1",
            f"out_dir={out_dir}", *extra]
