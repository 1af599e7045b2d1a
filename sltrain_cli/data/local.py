"""data=local: your own files under data.path (a file, a directory, a glob, or a comma-separated list of them).

Formats by name: .txt (each file one document), .jsonl / .json / .jsonl.gz / .json.gz (rows with data.text_field)
and .parquet. A file that cannot be read is one line naming it (and the line or byte offset where it breaks)."""
from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import itertools
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from ..configs import ConfigError, DataConfig, EncodingErrors, UserError
from .cache import digest
from .corpus import Corpus, shuffled, split_documents

_FORMATS = ((".jsonl.gz", "json"), (".json.gz", "json"), (".jsonl", "json"), (".json", "json"),
            (".parquet", "parquet"), (".txt", "text"))
_KINDS = ".txt, .jsonl, .json, .jsonl.gz, .json.gz or .parquet"


class LocalCorpus(Corpus):
    """Files under data.path; documents in memory (split by a seeded permutation) or, with data.streaming, a
    stream split by a hash of each document's text (the document count is not known up front)."""

    whole_when_foreign = True

    @classmethod
    def open(cls, cfg: DataConfig) -> "LocalCorpus":
        files = resolve_files(cfg.path or "")
        ident = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        decoding = {"encoding_errors": "replace"} if cfg.encoding_errors == EncodingErrors.replace else {}
        split = {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "max_docs": cfg.max_docs}
        key = digest({"local": ident, "text_field": cfg.text_field, "streaming": cfg.streaming, **split, **decoding})
        return cls(cfg, "local:" + Path(cfg.path.split(",")[0].strip()).name, key, files)

    def all_documents(self) -> List[str]:
        """Every non-empty document, in corpus order (up to data.max_docs)."""
        docs = self.texts(open_files(self.files, self.cfg))
        return list(itertools.islice((d for d in docs if d and d.strip()), self.cfg.max_docs))

    def documents(self) -> Tuple[List[str], List[str]]:
        docs = self.all_documents()
        if len(docs) == 1:  # one .txt file: split it into chunks instead
            docs = chunk_document(docs[0])
        # max_docs >= 2, so fewer than 2 documents is what the files hold, not the cap
        if len(docs) < 2:
            raise ConfigError("data.path", f"need at least 2 non-empty documents for a train/validation split, "
                                           f"found {len(docs)} in {self.cfg.path} (each .txt file is one "
                                           "document, each .jsonl / .parquet row one)")
        return split_documents(docs, self.cfg.val_fraction, self.cfg.split_seed, "data.max_docs")

    def stream(self, split: str, epoch: int = 0):
        ds = open_files(self.files, self.cfg)
        ds = ds.take(self.cfg.max_docs) if self.cfg.max_docs is not None else ds
        return shuffled(ds, self.cfg.seed, self.cfg.shuffle_buffer, epoch) if split == "train" else ds

    def keep(self, split: str, text: str) -> bool:
        if not (text and text.strip()):
            return False
        hashed = hashlib.blake2b(f"{self.cfg.split_seed}\0{text}".encode(), digest_size=8).digest()
        is_val = int.from_bytes(hashed, "big") / 2.0**64 < self.cfg.val_fraction
        return is_val == (split == "validation")

    def texts(self, examples: Iterable[dict]) -> Iterator[str]:
        return read_texts(examples, self.files, self.cfg)

def open_files(files: Sequence[Path], cfg: DataConfig):
    """``files`` as one `datasets` stream with a "text" column (data.text_field renamed), in file order."""
    from datasets import concatenate_datasets, load_dataset

    # the json builder logs its own error before raising; the error is reported in one line instead
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    replace = cfg.encoding_errors == EncodingErrors.replace
    parts = []
    for builder, run in itertools.groupby(files, key=_file_format):
        run = list(run)
        kw = {"sample_by": "document"} if builder == "text" else {}
        if replace and builder == "text":
            kw["encoding_errors"] = "replace"
        elif replace and builder == "json":
            # the json builder hands utf-8 bytes to pyarrow undecoded and applies encoding_errors only
            # when it decodes, i.e. for an encoding spelled other than "utf-8" ("utf_8" is the same codec)
            kw.update(encoding="utf_8", encoding_errors="replace")
        field = "text" if builder == "text" else cfg.text_field
        with explained(files, cfg):
            ds = load_dataset(builder, data_files=[str(p) for p in run], split="train", streaming=True, **kw)
            columns = ds.column_names
            if columns is not None and field not in columns:
                raise ConfigError("data.text_field", f"no column {field!r} in the {builder} files of data.path "
                                                     f"(columns: {', '.join(columns)})")
            ds = ds.select_columns([field])
        kind = (ds.features or {}).get(field)
        if kind is not None and getattr(kind, "dtype", None) not in ("string", "large_string"):
            what = getattr(kind, "dtype", None) or type(kind).__name__
            where = run[0] if len(run) == 1 else f"{run[0]} (and {len(run) - 1} more)"
            raise ConfigError("data.text_field", f"column {field!r} of {where} holds {what} values, not text; "
                                                 "name a text column")
        parts.append(ds.rename_column(field, "text") if field != "text" else ds)
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


_END = object()


def read_texts(examples: Iterable[dict], files: Sequence[Path], cfg: DataConfig) -> Iterator[str]:
    """The "text" of each example read from ``files``; a file that cannot be read (not UTF-8, a malformed JSON
    line, a column that is not text, a truncated .gz, ...) is a one-line UserError naming it and the row."""
    it = iter(examples)
    while True:
        with explained(files, cfg):
            ex = next(it, _END)
        if ex is _END:
            return
        text = ex["text"]
        if text is not None and not isinstance(text, str):
            raise ConfigError("data.text_field", f"column {cfg.text_field!r} holds {type(text).__name__} values, "
                                                 "not text; name a text column")
        yield text


@contextlib.contextmanager
def explained(files: Sequence[Path], cfg: DataConfig):
    """Errors of `datasets` reading ``files`` -> one line naming the file (found by scanning the files); an error
    the files do not explain is re-raised."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        problem = find_bad_file(files, cfg)
        if problem is None:
            import pyarrow as pa

            if not isinstance(err, (OSError, EOFError, UnicodeError, pa.ArrowException)):
                raise
            problem = ConfigError("data.path", f"cannot read the files of {cfg.path}: "
                                               f"{type(err).__name__}: {_first_line(err)}")
        raise problem from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def find_bad_file(files: Sequence[Path], cfg: DataConfig) -> Optional[ConfigError]:
    """The first problem of local data files as a ConfigError naming the file (and byte offset or line), or
    None: bytes that are not UTF-8 (unless data.encoding_errors=replace), a malformed .jsonl line, a parquet
    file that cannot be read or whose data.text_field is missing or not text. Reads every file once."""
    for path in files:
        fmt = _file_format(path)
        try:
            problem = _parquet_problem(path, cfg.text_field) if fmt == "parquet" else _text_problem(path, fmt, cfg)
        except OSError as err:
            problem = f"cannot read {path}: {err.strerror or _first_line(err)}"
        if problem:
            return ConfigError("data.path", problem)
    return None


def _text_problem(path: Path, fmt: str, cfg: DataConfig) -> Optional[str]:
    """Scan a .txt / .jsonl(.gz) file line by line (a UTF-8 sequence never holds a newline byte)."""
    strict = cfg.encoding_errors == EncodingErrors.strict
    gz = path.name.lower().endswith(".gz")
    array: Optional[List[str]] = None  # the lines of a .jsonl file that holds one JSON array of rows
    lines = _lines(path, gz)
    offset = 0
    for lineno, raw in enumerate(lines, 1):
        if isinstance(raw, str):  # the file broke off: _lines says where
            return raw
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if strict:
                where = "of the decompressed data " if gz else ""
                return (f"{path} is not UTF-8 text: byte {raw[err.start]:#04x} at byte offset "
                        f"{offset + err.start} {where}(line {lineno}) cannot be decoded; set "
                        "data.encoding_errors=replace to read bad bytes as U+FFFD")
            line = raw.decode("utf-8", errors="replace")
        offset += len(raw)
        if fmt != "json":
            continue
        if offset == len(raw):
            line = line.lstrip("\ufeff")
        if array is None and not line.strip():
            continue
        if array is None and offset == len(raw) and line.lstrip().startswith("["):
            array = []
        if array is not None:
            array.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path}:{lineno}: malformed JSON line ({_json_error(err)})"
        if not isinstance(row, dict):
            return f"{path}:{lineno}: a JSON line must be an object with a {cfg.text_field!r} field"
    if array is not None:
        try:
            json.loads("".join(array))
        except json.JSONDecodeError as err:
            return f"{path}:{err.lineno}: malformed JSON ({_json_error(err)})"
    return None


def _lines(path: Path, gz: bool) -> Iterator:
    """The raw lines of a file; a .gz that is truncated or damaged ends with one message (a str) saying after
    which line it breaks."""
    rows = 0
    with (gzip.open if gz else open)(path, "rb") as f:
        try:
            for raw in f:
                rows += 1
                yield raw
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            broke = "is truncated" if isinstance(err, EOFError) else f"is damaged ({_first_line(err)})"
            yield f"{path} {broke}: its gzip stream breaks after row {rows}"


def _json_error(err: json.JSONDecodeError) -> str:
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def _parquet_problem(path: Path, field: str) -> Optional[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except pa.ArrowException as err:
        return f"{path} is not a readable parquet file ({_first_line(err)})"
    if field not in schema.names:
        return f"no column {field!r} in {path} (data.text_field; columns: {', '.join(schema.names)})"
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return f"column {field!r} of {path} holds {kind} values, not text (data.text_field)"
    return None


SINGLE_DOC_CHUNKS = 20  # a corpus of one document is cut into this many pieces for its train/validation split


def chunk_document(text: str, chunks: int = SINGLE_DOC_CHUNKS) -> List[str]:
    """One document -> about ``chunks`` consecutive pieces of similar length, cut at line ends (at spaces when a
    piece holds no line end, never inside a word), each non-empty: the units a single-file corpus is split by."""
    target = max(1, len(text) // chunks)
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + target)
        if end < len(text):
            cut = text.rfind("\n", start + 1, end + 1)
            cut = cut if cut > start else text.rfind(" ", start + 1, end + 1)
            if cut <= start:  # a word longer than the piece: cut after it
                found = [i for i in (text.find("\n", end), text.find(" ", end)) if i >= 0]
                cut = min(found) if found else len(text) - 1
            end = cut + 1
        piece = text[start:end]
        if piece.strip():
            out.append(piece)
        start = end
    return out


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
                raise ConfigError("data.path", f"{part} is not a {_KINDS} file")
            found = [path]
        else:
            raise ConfigError("data.path", f"{part} does not exist")
        if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError("data.path", f"cannot read the folder {part}: permission denied")
        found = [p for p in found if p.is_file() and _file_format(p) is not None]
        if not found:
            raise ConfigError("data.path", f"no {_KINDS} files in {part}")
        for p in found:  # unreadable files fail here, in one line, not in the middle of reading
            try:
                with open(p, "rb"):
                    pass
            except OSError as err:
                raise ConfigError("data.path", f"cannot read {p}: {err.strerror or _first_line(err)}") from None
        files += [Path(os.path.abspath(p)) for p in found]  # a symlink keeps its own name
    if not files:
        raise ConfigError("data.path", "is empty")
    return list(dict.fromkeys(files))
