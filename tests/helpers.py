"""Plain helpers shared by the tests (fixtures live in conftest.py): `from helpers import tiny_overrides`."""

SMALL = dict(max_docs=12, seq_len=32)  # DataConfig of the first 12 speeches: ~35k tokens with a 512 BPE


def tiny_overrides(out_dir, *extra):
    """A run that takes a few seconds on CPU: tiny model, 8 steps, small vocab, few documents."""
    return ["model=tiny", "train=tiny", "tokenizer.vocab_size=512", "data.max_docs=24", "data.seq_len=64",
            "train.num_threads=1", f"out_dir={out_dir}", *extra]


def iter_help(cls, prefix: str = ""):
    """(dotted key, help) for every settable key of a config dataclass, nested configs flattened."""
    import dataclasses
    import typing

    from sltrain_cli.config_io import field_help

    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types[f.name]):
            yield from iter_help(types[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", field_help(cls, f.name)


def load_documents(cfg):
    """(train documents, validation documents) of an in-memory corpus."""
    from sltrain_cli.data import open_corpus

    return open_corpus(cfg).documents()
