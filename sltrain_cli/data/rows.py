"""Token ids and rows: tokenize documents (token ids cached on disk), pack or pad them into seq_len rows."""
from __future__ import annotations

import itertools
import sys
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, List, Sequence, Tuple

import torch

from ..files import atomic_torch_save
from .corpora import Corpus

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

Batch = Tuple[torch.Tensor, torch.Tensor]
_TOKEN_KEYS = ("train_tokens", "train_offsets", "val_tokens", "val_offsets")


def tokenize_documents(tokenizer: Tokenizer, docs: Sequence[str],
                       batch: int = 512) -> Tuple[torch.Tensor, torch.Tensor]:
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
    damaged = False
    if path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            if isinstance(data, dict) and all(isinstance(data.get(k), torch.Tensor) for k in _TOKEN_KEYS):
                return data
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
            pass
        damaged = True
    data = {}
    for split, docs in zip(("train", "val"), corpus.documents()):
        data[f"{split}_tokens"], data[f"{split}_offsets"] = tokenize_documents(tokenizer, docs)
    atomic_torch_save(path, data)
    if damaged:
        print(f"note: the cached token ids {path} were unreadable; rebuilt them", file=sys.stderr, flush=True)
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

