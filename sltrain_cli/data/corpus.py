"""The one protocol every data source follows, and the document-level train/validation split they share.

A source is one small class in its own file (sotu.py, local.py, c4.py) registered in sources.py under its
``data.name``. It says where documents come from and how they split; rows.py and streams.py turn them into
token rows, whatever the source:

  key               identifies the corpus and its split: the cache key of token ids and trained tokenizers
  name              how tables name it
  streaming         True: read as a stream (``stream``), else held in memory (``documents``)
  default_tokenizer the tokenizer.kind ``auto`` means for it ("bpe" trained on it, or "t5")
  documents()       in-memory: (train documents, validation documents)
  all_documents()   in-memory: every document (a corpus scored whole by eval-ppl)
  stream(split)     streaming: an iterable of examples with a "text" field, in the order the run reads them
                    (the training split shuffled with data.seed, its epoch set)
  keep(split, text) streaming: whether a document of the stream belongs to that split
  texts(examples)   the "text" of each example, a reading error turned into one line naming the file
  split_texts(split, epoch)  streaming: the documents of that split in the run's order (the three above together)
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple

from ..configs import ConfigError, DataConfig


class Corpus:
    """A data source (see the module doc); subclasses override what differs."""

    default_tokenizer = "bpe"
    whole_when_foreign = False  # eval-ppl scores a corpus the run did not train on whole (user files)

    def __init__(self, cfg: DataConfig, name: str, key: str, files: Sequence[Path] = ()):
        self.cfg, self.name, self.key, self.files = cfg, name, key, list(files)

    @property
    def streaming(self) -> bool:
        return self.cfg.streaming

    def all_documents(self) -> List[str]:
        raise NotImplementedError(f"data={self.cfg.name.value} is a stream; it has no in-memory document list")

    def documents(self) -> Tuple[List[str], List[str]]:
        return split_documents(self.all_documents(), self.cfg.val_fraction, self.cfg.split_seed, "data.max_docs")

    def stream(self, split: str, epoch: int = 0):
        raise NotImplementedError(f"data={self.cfg.name.value} is held in memory; it has no stream")

    def keep(self, split: str, text: str) -> bool:
        return bool(text and text.strip())

    def texts(self, examples: Iterable[dict]) -> Iterator[str]:
        for ex in examples:
            yield ex["text"]

    def split_texts(self, split: str, epoch: int = 0) -> Iterator[str]:
        """Streaming: the documents of ``split`` in the order the run reads them (train: shuffled for ``epoch``)."""
        return (t for t in self.texts(self.stream(split, epoch)) if self.keep(split, t))


def split_documents(docs: List[str], val_fraction: float, seed: int,
                    key: str = "data.max_docs") -> Tuple[List[str], List[str]]:
    """Hold out round(n * val_fraction) documents (at least 1, at most n - 1) by a seeded permutation;
    both parts keep the corpus order."""
    n = len(docs)
    if n < 2:
        raise ConfigError(key, f"need at least 2 non-empty documents for a train/validation split, found {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[: min(n - 1, max(1, round(n * val_fraction)))])
    return [d for i, d in enumerate(docs) if i not in val], [docs[i] for i in sorted(val)]


def shuffled(ds, seed: int, buffer_size: int, epoch: int = 0, one_shard_at_a_time: bool = True):
    """A `datasets` IterableDataset shuffled (its shard list, then a buffer of ``buffer_size`` documents) with
    ``seed``, at ``epoch``. ``one_shard_at_a_time`` fills the buffer from one shard at a time (the classic
    behaviour; interleaving shards reads them on threads, and a parquet reader then sleeps 5 s at every shutdown,
    apache/arrow#45214); False keeps datasets' default, which is what the harness's ``shuffle(seed=42)`` does."""
    import inspect

    kw = {}
    if one_shard_at_a_time and "max_buffer_input_shards" in inspect.signature(ds.shuffle).parameters:
        kw["max_buffer_input_shards"] = 1
    ds = ds.shuffle(seed=seed, buffer_size=buffer_size, **kw)
    ds.set_epoch(epoch)
    return ds
