"""Plain helpers shared by the tests (fixtures live in conftest.py): `from helpers import tiny_overrides`."""

SMALL = dict(max_docs=12, seq_len=32)  # DataConfig of the first 12 speeches: ~35k tokens with a 512 BPE


def tiny_overrides(out_dir, *extra):
    """A run that takes a few seconds on CPU: tiny model, 8 steps, small vocab, few documents."""
    return ["model=tiny", "train=tiny", "tokenizer.vocab_size=512", "data.max_docs=24", "data.seq_len=64",
            "train.num_threads=1", f"out_dir={out_dir}", *extra]
