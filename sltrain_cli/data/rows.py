"""Token ids and rows: tokenize documents (token ids cached on disk), pack or pad them into seq_len rows."""
from __future__ import annotations

import itertools
import sys
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, List, Sequence, Tuple

import torch

from ..files import atomic_torch_save
from .corpus import Corpus

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

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


PREFIX_CHARS_PER_TOKEN = 8  # a document's prefix of this many characters per needed token is tokenized first
PREFIX_MARGIN = 16  # tokens beyond the needed ones the prefix must give (the cut word's pieces are dropped)


def encode_heads(tokenizer: Tokenizer, texts: Sequence[str], need: int) -> List[List[int]]:
    """The first ``need`` token ids of each text, tokenizing a prefix of it: the text up to the last whitespace
    before ``need * PREFIX_CHARS_PER_TOKEN`` characters. Pre-tokenization splits at whitespace, so the ids of a
    prefix cut there are the whole text's ids up to the cut; a prefix giving fewer than need + PREFIX_MARGIN ids
    (dense text) is tokenized whole instead. Same ids as ``encode(text)[:need]``, tested."""
    limit = need * PREFIX_CHARS_PER_TOKEN
    heads = []
    for t in texts:
        cut = max(t.rfind(" ", 0, limit), t.rfind("\n", 0, limit)) if len(t) > limit else -1
        heads.append(t[:cut] if cut > 0 else t)
    out = tokenizer.encode_batch(heads)
    again = [i for i, (h, ids) in enumerate(zip(heads, out)) if h is not texts[i] and len(ids) < need + PREFIX_MARGIN]
    for i, ids in zip(again, tokenizer.encode_batch([texts[i] for i in again]) if again else []):
        out[i] = ids
    return [ids[:need] for ids in out]


def document_rows(tokenizer: Tokenizer, texts: Sequence[str], seq_len: int) -> List[Tuple[List[int], int]]:
    """One row per document (the harness's rows): its first seq_len - 1 tokens, EOS, then pad; with the number of
    real tokens (labels are -100 after them)."""
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    rows = []
    for ids in encode_heads(tokenizer, texts, seq_len - 1):
        ids = ids + [eos]
        rows.append((ids + [pad] * (seq_len - len(ids)), len(ids)))
    return rows


def _stream_rows(texts: Iterable[str], tokenizer: Tokenizer, seq_len: int, packing: bool,
                 batch: int = 64) -> Iterator[Tuple[List[int], int]]:
    """Rows of a text stream as (seq_len ids, number of real tokens), packed or one document per row."""
    eos, buf = tokenizer.eos_id, []
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, batch)):
        if not packing:
            yield from document_rows(tokenizer, chunk, seq_len)
            continue
        for ids in tokenizer.encode_batch(chunk):
            buf += ids + [eos]
            while len(buf) >= seq_len:
                yield buf[:seq_len], seq_len
                del buf[:seq_len]


def _rows_to_batch(rows: Sequence[Tuple[List[int], int]]) -> Batch:
    ids = torch.tensor([r for r, _ in rows], dtype=torch.long)
    real = torch.tensor([n for _, n in rows])
    return ids, torch.where(torch.arange(ids.size(1)) < real[:, None], ids, -100)

