"""Training streams (in-memory and streaming, sharded by rank, resumable), the validation set, the unigram bar."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..configs import ConfigError, DataConfig, UserError
from .cache import default_cache_root, digest
from .corpus import Corpus
from .pipeline import STREAM_SAMPLE_TOKENS, StreamingTrainStream
from .rows import Batch, _packed_rows, _padded_rows, _rows_to_batch, _stream_rows, _tokenized_corpus, tokenize_documents
from .sources import open_corpus

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(digest(["order", seed, epoch]), 16) & (2**63 - 1)



class TrainStream:
    """In-memory rows in a seeded per-epoch order; global batch k = the next rows_per_step rows of that order,
    of which this rank returns its contiguous slice. The state (epoch, pos) is the same on every rank."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, *, rows_per_step: int, rank: int, world_size: int,
                 seed: int, name: str, num_docs: int, vocab_size: int):
        self.ids, self.labels = ids, labels
        self.rows_per_step, self.rank, self.world_size, self.seed = rows_per_step, rank, world_size, seed
        self.per_rank = rows_per_step // world_size
        self.name, self.num_docs, self.vocab_size = name, num_docs, vocab_size
        self.num_rows, self.seq_len = ids.shape
        self.num_tokens = int((labels != -100).sum())  # real (non-pad) tokens in the training rows
        self.epoch, self.pos = 0, 0
        self._perm: Tuple[int, Optional[torch.Tensor]] = (-1, None)

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.num_rows, generator=gen))
        return self._perm[1]

    def next_batch(self) -> Batch:
        """(input_ids, labels), each (rows_per_step // world_size, seq_len) int64."""
        parts, need = [], self.rows_per_step
        while need:
            part = self._order(self.epoch)[self.pos: self.pos + need]
            parts.append(part)
            need -= part.numel()
            self.pos += part.numel()
            if self.pos == self.num_rows:
                self.epoch, self.pos = self.epoch + 1, 0
        idx = torch.cat(parts)[self.rank * self.per_rank: (self.rank + 1) * self.per_rank]
        return self.ids[idx], self.labels[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "num_rows": self.num_rows}

    def close(self) -> None:
        """Nothing to stop (the rows are in memory); streams stop their reader threads."""

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_rows", self.num_rows) != self.num_rows or "pos" not in state:
            raise UserError(f"data: cannot resume, the checkpoint's data position is for another corpus "
                            f"({state}); this one has {self.num_rows} rows (data.* settings changed?)")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def sample_tokens(self) -> torch.Tensor:
        """All real training tokens (for the unigram baseline)."""
        return self.ids[self.labels != -100]


class ValSet:
    """A fixed validation set: the first rows in corpus order (streams are read lazily, as far as asked)."""

    def __init__(self, name: str, ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                 rows: Optional[Iterator[Tuple[List[int], int]]] = None, num_docs: Optional[int] = None):
        self.name, self.num_docs = name, num_docs
        self._ids, self._labels, self._rows, self._pending = ids, labels, rows, []
        self.num_rows = None if ids is None else ids.size(0)
        self.num_tokens = None if labels is None else int((labels != -100).sum())

    def _prefix(self, max_tokens: Optional[int]) -> Batch:
        """The shortest prefix of rows holding >= max_tokens real label tokens (all rows when there are fewer)."""
        if self._rows is not None:  # a stream: read on until the budget is covered
            budget = STREAM_SAMPLE_TOKENS if max_tokens is None else max_tokens
            have = sum(n for _, n in self._pending)
            while have < budget and (row := next(self._rows, None)) is not None:
                self._pending.append(row)
                have += row[1]
            if not self._pending:
                raise UserError(f"data: the {self.name} validation stream is empty")
            self._ids, self._labels = _rows_to_batch(self._pending)
        if max_tokens is None:
            return self._ids, self._labels
        counts = (self._labels != -100).sum(1).cumsum(0)
        n = min(int(torch.searchsorted(counts, torch.tensor(max_tokens))) + 1, counts.numel())
        return self._ids[:n], self._labels[:n]

    def batches(self, max_tokens: Optional[int], batch_size: int, rank: int = 0, world_size: int = 1) -> List[Batch]:
        """This rank's share (every world_size-th batch) of the first validation rows up to max_tokens tokens.

        Every rank gets the same number of batches: a rank short of one gets a copy of batch 0 with all labels
        -100, which adds no loss and no tokens but keeps collective forwards (FSDP) in step.
        """
        ids, labels = self._prefix(max_tokens)
        every = [(ids[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, ids.size(0), batch_size)]
        mine = every[rank::world_size]
        filler = (every[0][0], torch.full_like(every[0][1], -100))
        return mine + [filler] * (math.ceil(len(every) / world_size) - len(mine))


def build_datasets(corpus: Union[Corpus, DataConfig], tokenizer: Tokenizer, *, rows_per_step: int, rank: int = 0,
                   world_size: int = 1, cache_root: Optional[Union[str, Path]] = None, num_workers: int = 0
                   ) -> Tuple[Union[TrainStream, StreamingTrainStream], ValSet]:
    """(training stream, validation set) of an opened corpus (a DataConfig is opened here). rows_per_step is
    the global batch in sequences; next_batch() returns this rank's rows_per_step // world_size of them.
    Token ids are cached under cache_root (runs pass ``cache.cache_root(tokenizer cfg)``; default:
    $SLTRAIN_CACHE_DIR or ~/.cache/sltrain). num_workers: tokenizer threads of a stream (0: the caller's thread;
    runs pass ``data.workers(device)``)."""
    if rows_per_step < 1 or rows_per_step % world_size:
        raise ConfigError("train.total_batch_size", f"must be a positive multiple of the {world_size} processes, "
                                                    f"got {rows_per_step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if not isinstance(corpus, Corpus):
        corpus = open_corpus(corpus)
    data_cfg = corpus.cfg
    if corpus.streaming:
        val = ValSet(corpus.name, rows=_stream_rows(corpus.split_texts("validation"), tokenizer, data_cfg.seq_len,
                                                    data_cfg.packing))
        return StreamingTrainStream(corpus, tokenizer, rows_per_step=rows_per_step, rank=rank, world_size=world_size,
                                    num_workers=num_workers), val
    root = Path(cache_root).expanduser() if cache_root else default_cache_root()
    data = _tokenized_corpus(corpus, tokenizer, root)
    built = {}
    for split in ("train", "val"):
        tokens, offsets = data[f"{split}_tokens"], data[f"{split}_offsets"]
        if data_cfg.packing:
            ids = _packed_rows(tokens, offsets, tokenizer.eos_id, data_cfg.seq_len)
            built[split] = (ids, ids)
        else:
            built[split] = _padded_rows(tokens, offsets, tokenizer.eos_id, tokenizer.pad_id, data_cfg.seq_len)
        if built[split][0].size(0) == 0:
            raise ConfigError("data.seq_len", f"the {corpus.name} {split} split has {tokens.numel()} tokens, "
                                              f"less than one row of {data_cfg.seq_len}; lower data.seq_len or "
                                              f"use more documents (data.max_docs, data.val_fraction)")
    train = TrainStream(*built["train"], rows_per_step=rows_per_step, rank=rank, world_size=world_size,
                        seed=data_cfg.seed, name=corpus.name, num_docs=data["train_offsets"].numel() - 1,
                        vocab_size=tokenizer.vocab_size)
    return train, ValSet(corpus.name, *built["val"], num_docs=data["val_offsets"].numel() - 1)


def build_whole_corpus_set(corpus: Union[Corpus, DataConfig], tokenizer: Tokenizer) -> ValSet:
    """Every document of an in-memory corpus as one evaluation set (for a corpus the model never trained on:
    `sltrain eval-ppl RUN data=local data.path=FILE`)."""
    if not isinstance(corpus, Corpus):
        corpus = open_corpus(corpus)
    data_cfg = corpus.cfg
    if corpus.streaming:
        raise ConfigError("data.streaming", "whole-corpus evaluation reads the files into memory; "
                                            "set data.streaming=false")
    tokens, offsets = tokenize_documents(tokenizer, corpus.all_documents())
    if data_cfg.packing:
        ids = _packed_rows(tokens, offsets, tokenizer.eos_id, data_cfg.seq_len)
        ids, labels = ids, ids
    else:
        ids, labels = _padded_rows(tokens, offsets, tokenizer.eos_id, tokenizer.pad_id, data_cfg.seq_len)
    if ids.size(0) == 0:
        raise ConfigError("data.seq_len", f"{corpus.name} has {tokens.numel()} tokens, less than one row of "
                                          f"{data_cfg.seq_len}")
    return ValSet(corpus.name, ids, labels, num_docs=offsets.numel() - 1)


def unigram_perplexity(train: Union[TrainStream, StreamingTrainStream, torch.Tensor, Sequence[int]],
                       val_set: ValSet, max_tokens: Optional[int] = None, vocab_size: Optional[int] = None) -> float:
    """Perplexity of an add-one-smoothed unigram model of the training tokens on the validation targets
    (labels[:, 1:], the tokens the language model is scored on): the bar a model must clear to have learned
    more than token frequencies. max_tokens limits the validation rows as ``ValSet.batches`` does."""
    tokens = train.sample_tokens() if hasattr(train, "sample_tokens") else torch.as_tensor(train)
    tokens = tokens.flatten().long()
    targets = torch.cat([y[:, 1:][y[:, 1:] != -100] for _, y in val_set.batches(max_tokens, 1024)])
    size = max(vocab_size or getattr(train, "vocab_size", 0) or 0,
               int(tokens.max()) + 1 if tokens.numel() else 0, int(targets.max()) + 1 if targets.numel() else 0)
    counts = torch.bincount(tokens, minlength=size).double()
    log_p = torch.log((counts + 1) / (counts.sum() + size))
    return math.exp(-float(log_p[targets].mean())) if targets.numel() else float("nan")
