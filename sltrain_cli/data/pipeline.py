"""The training stream of a streaming corpus (c4, local with data.streaming): one global order of rows, each
rank's share tokenized off the training thread, resumable without tokenizing what was consumed.

Order. Every rank reads the same document stream (``Corpus.stream("train", epoch)``); global row i goes to step
i // rows_per_step and, within it, to rank (i % rows_per_step) // (rows_per_step / world_size), as for in-memory
corpora. So 1 and N processes train on the same global batches, and the rows never depend on data.num_workers.
One document per row (packing off, the harness): a rank tokenizes only its own documents (a prefix of each,
rows.encode_heads). Packing on: every rank tokenizes every document (rows cross documents).

Workers. ``num_workers`` 0 reads and tokenizes on the training thread. N > 0: a producer thread reads documents
and hands chunks of them to N tokenizer threads (the `tokenizers` and sentencepiece libraries release the GIL),
takes their results back in submission order, assembles batches and keeps up to ``prefetch`` ready.

Resume. The state after a step is (epoch, documents consumed in it, the packed tokens carried over). A resumed
stream skips the consumed documents without tokenizing them and restores the carried tokens.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import queue
import threading
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

import torch

from ..configs import ConfigError, UserError
from .corpus import Corpus
from .rows import Batch, _rows_to_batch, _stream_rows, document_rows

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

STREAM_SAMPLE_TOKENS = 1 << 20  # training tokens a unigram model of a stream is fitted on,
STREAM_SAMPLE_DOCS = 2048  # from at most this many documents (a short run reads no more than it trains on)
CHUNK_DOCS = 64  # documents per tokenizer call
_EPOCH_END = object()


class StreamingTrainStream:
    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, *, rows_per_step: int, rank: int, world_size: int,
                 num_workers: int = 0, prefetch: int = 4):
        self.corpus, self.tokenizer, self.cfg = corpus, tokenizer, corpus.cfg
        self.rows_per_step, self.rank, self.world_size = rows_per_step, rank, world_size
        self.per_rank = rows_per_step // world_size
        self.num_workers, self.prefetch = num_workers, prefetch
        self.name, self.seq_len, self.vocab_size = corpus.name, corpus.cfg.seq_len, tokenizer.vocab_size
        self.num_tokens = self.num_docs = self.num_rows = None  # unknown for a stream
        self.state = {"epoch": 0, "docs": 0, "carry": []}
        self._batches: Optional[Iterator[Tuple[Batch, dict]]] = None

    # -- reading: documents in the global order, as chunks marked with what this rank must tokenize
    def _chunks(self, epoch: int, skip: int) -> Iterator:
        """Chunks of (text, mine) from epoch ``epoch`` on (its first ``skip`` documents skipped untokenized);
        _EPOCH_END after each epoch. ``mine``: this rank needs the document tokenized."""
        lo, hi, n = self.rank * self.per_rank, (self.rank + 1) * self.per_rank, 0
        packing = self.cfg.packing
        while True:
            texts, empty = itertools.islice(self.corpus.split_texts("train", epoch), skip, None), skip == 0
            while chunk := list(itertools.islice(texts, CHUNK_DOCS)):
                empty = False
                marked = []
                for t in chunk:
                    marked.append((t, packing or lo <= n % self.rows_per_step < hi))
                    n += 1
                yield marked
            if empty:
                raise ConfigError("data.seq_len", f"the {self.name} training stream yields no document")
            yield _EPOCH_END
            epoch, skip = epoch + 1, 0

    def _tokenize(self, chunk) -> list:
        """A chunk's documents -> per document: its row (packing off; None when not this rank's) or its ids."""
        if chunk is _EPOCH_END:
            return chunk
        if self.cfg.packing:
            return self.tokenizer.encode_batch([t for t, _ in chunk])
        mine = [t for t, m in chunk if m]
        rows = iter(document_rows(self.tokenizer, mine, self.seq_len))
        return [next(rows) if m else None for _, m in chunk]

    def _tokenized(self, chunks: Iterator) -> Iterator:
        """``_tokenize`` of each chunk, in order; on ``num_workers`` threads with a bounded look-ahead."""
        if self.num_workers == 0:
            yield from map(self._tokenize, chunks)
            return
        with concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="sltrain-tok") as pool:
            pending = collections.deque()
            for chunk in chunks:
                pending.append(pool.submit(self._tokenize, chunk))
                if len(pending) > 2 * self.num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    # -- assembling: rows -> this rank's batch of each step, with the state after it
    def _steps(self, start: dict) -> Iterator[Tuple[Batch, dict]]:
        epoch, docs, carry = int(start["epoch"]), int(start["docs"]), list(start.get("carry", ()))
        skip_rows = int(start.get("skip_rows", 0))  # a checkpoint of the older stream state: replay its rows
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        eos, seq_len, k, mine = self.tokenizer.eos_id, self.seq_len, 0, []
        whole, made = docs == 0, 0  # whether this epoch was read from its start, rows it made
        for result in self._tokenized(self._chunks(epoch, docs)):
            if result is _EPOCH_END:
                if whole and not made:
                    raise ConfigError("data.seq_len", f"the {self.name} training stream yields no row of "
                                                      f"{seq_len} tokens")
                epoch, docs, carry, whole, made = epoch + 1, 0, [], True, 0
                continue
            for item in result:
                docs += 1
                if self.cfg.packing:  # rows cut off the carry one at a time: it never holds a taken row
                    carry += item + [eos]
                    rows = iter(functools.partial(self._cut, carry), None)
                else:
                    rows = [item]  # None: another rank's document
                for row in rows:
                    made += 1
                    if skip_rows:
                        skip_rows -= 1
                        continue
                    if lo <= k < hi:
                        mine.append(row)
                    k += 1
                    if k == self.rows_per_step:
                        yield _rows_to_batch(mine), {"epoch": epoch, "docs": docs, "carry": list(carry)}
                        k, mine = 0, []

    def _cut(self, carry: List[int]) -> Optional[Tuple[List[int], int]]:
        """The next packed row off the front of ``carry`` (in place), or None when it holds less than a row."""
        if len(carry) < self.seq_len:
            return None
        row = carry[:self.seq_len]
        del carry[:self.seq_len]
        return row, self.seq_len

    def _background(self, steps: Iterator) -> Iterator:
        """``steps`` produced on a daemon thread, up to ``prefetch`` ahead; its errors re-raised here."""
        ready: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()

        def hand_over(entry) -> bool:
            """Put ``entry`` in the queue unless the consumer has stopped; whether it was put."""
            while not stop.is_set():
                try:
                    ready.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in steps:
                    if not hand_over((item, None)):
                        return
            except BaseException as err:  # noqa: BLE001 - handed to the training thread
                hand_over((None, err))
            finally:
                steps.close()  # the tokenizer threads finish their chunks in flight and stop

        thread = threading.Thread(target=produce, name="sltrain-data", daemon=True)
        thread.start()
        try:
            while True:
                item, err = ready.get()
                if err is not None:
                    raise err
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)  # chunks in flight (seconds at most); a daemon thread past that ends with us

    def next_batch(self) -> Batch:
        """(input_ids, labels) of this rank for the next global step."""
        if self._batches is None:
            steps = self._steps(self.state)
            self._batches = self._background(steps) if self.num_workers else steps
        batch, self.state = next(self._batches)
        return batch

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def state_dict(self) -> dict:
        return {"epoch": self.state["epoch"], "docs": self.state["docs"],
                "carry": torch.tensor(self.state["carry"], dtype=torch.int32)}

    def load_state_dict(self, state: dict) -> None:
        if "docs" in state:
            carry = state.get("carry")
            carry = carry.tolist() if isinstance(carry, torch.Tensor) else list(carry or ())
            new = {"epoch": int(state["epoch"]), "docs": int(state["docs"]), "carry": carry}
        elif "rows" in state:  # older checkpoints kept the rows consumed: replay them
            rows = int(state["rows"]) * self.world_size
            new = {"epoch": int(state["epoch"]), "docs": 0, "carry": [], "skip_rows": rows}
        else:
            raise UserError(f"data: cannot resume a stream from an in-memory data position ({state})")
        self.close()
        self.state = new

    def sample_tokens(self, max_tokens: int = STREAM_SAMPLE_TOKENS) -> torch.Tensor:
        """About max_tokens real tokens from the first STREAM_SAMPLE_DOCS documents of the training stream (the
        stream state is untouched)."""
        texts = itertools.islice(self.corpus.split_texts("train"), STREAM_SAMPLE_DOCS)
        rows: List[Tuple[List[int], int]] = []
        total = 0
        for row in _stream_rows(texts, self.tokenizer, self.seq_len, self.cfg.packing):
            rows.append(row)
            total += row[1]
            if total >= max_tokens:
                break
        ids, labels = _rows_to_batch(rows) if rows else (torch.zeros(0, dtype=torch.long),) * 2
        return ids[labels != -100]
