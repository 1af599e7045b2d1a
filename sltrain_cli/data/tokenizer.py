"""Tokenizers: what turns a corpus's documents into the token ids the model reads.

  bpe          a byte-level BPE (GPT-2 style pre-tokenization, <pad>=0, <eos>=1) trained on the training split of
               the opened corpus once, then read from tokenizers/ under the cache root
               (tokenizer.cache_dir, else $SLTRAIN_CACHE_DIR or ~/.cache/sltrain; keyed by the corpus identity and
               the vocab size). The default for every corpus but c4.
  t5           t5-base (the GaLore harness's tokenizer; the default for c4): from tokenizer.path when given (a folder
               holding spiece.model and/or tokenizer.json, or the file), else from the Hugging Face hub.
  pretrained   any tokenizer directory, tokenizer.json or SentencePiece .model at tokenizer.path.

With kind t5, a folder holding spiece.model is read with sentencepiece itself: t5-base's 32,000 pieces, the
vocabulary of the paper's configs (transformers' T5 tokenizer adds 100 <extra_id_N> sentinels, 32,100).

``Tokenizer`` puts one face over the three backends (`tokenizers`, transformers, sentencepiece);
``Tokenizer.save(dir)`` + ``load_tokenizer(dir)`` let eval-ppl reuse a run's tokenizer exactly.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Union

from ..configs import ConfigError, TokenizerConfig, TokenizerKind, UserError
from ..files import atomic_write
from .cache import digest, hub_unreachable

if TYPE_CHECKING:
    from .corpus import Corpus

PAD, EOS = "<pad>", "<eos>"  # the BPE's special tokens (ids 0 and 1, as in T5)
C4_TRAIN_DOCS_FOR_BPE = 20000  # documents of the C4 train stream a BPE is trained on (tokenizer.kind=bpe)


class Tokenizer:
    """One face over three backends: a `tokenizers` BPE, a transformers tokenizer, a bare SentencePiece model.

    ``encode`` adds no special tokens; the data pipeline appends ``eos_id`` itself.
    """

    META = "sltrain_tokenizer.json"

    def __init__(self, backend: str, impl, name: str, eos_id: Optional[int] = None, pad_id: Optional[int] = None):
        self.backend, self._impl, self.name = backend, impl, name
        if backend == "tokenizers":
            ids = [impl.token_to_id(t) for t in (EOS, "</s>", "<|endoftext|>")]
            eos = eos_id if eos_id is not None else next((i for i in ids if i is not None), None)
            pad = pad_id if pad_id is not None else impl.token_to_id(PAD)
        elif backend == "transformers":
            eos = eos_id if eos_id is not None else impl.eos_token_id
            pad = pad_id if pad_id is not None else impl.pad_token_id
        else:
            eos = eos_id if eos_id is not None else (impl.eos_id() if impl.eos_id() >= 0 else None)
            pad = pad_id if pad_id is not None else (impl.pad_id() if impl.pad_id() >= 0 else None)
        if eos is None:
            raise ConfigError("tokenizer.path", f"tokenizer {name} has no end-of-sequence token")
        self.eos_id, self.pad_id = int(eos), int(eos if pad is None else pad)

    @property
    def vocab_size(self) -> int:
        """Rows the model's embedding needs (every id the tokenizer can emit is below it)."""
        if self.backend == "tokenizers":
            return self._impl.get_vocab_size(with_added_tokens=True)
        if self.backend == "transformers":
            return len(self._impl)
        return self._impl.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        texts = list(texts)
        if self.backend == "sentencepiece":
            return self._impl.encode(texts, out_type=int)
        fast = self._impl if self.backend == "tokenizers" else getattr(self._impl, "backend_tokenizer", None)
        if fast is not None:
            return [e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False)]
        return self._impl(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._impl.decode([int(i) for i in ids])

    @property
    def fingerprint(self) -> str:
        """Hash of the vocabulary and merges: the token-id cache key."""
        if self.backend == "tokenizers":
            blob = self._impl.to_str()
        elif self.backend == "sentencepiece":
            blob = self._impl.serialized_model_proto().hex()
        elif getattr(self._impl, "backend_tokenizer", None) is not None:
            blob = self._impl.backend_tokenizer.to_str()
        else:
            blob = json.dumps(sorted(self._impl.get_vocab().items()))
        return digest([self.backend, blob, self.eos_id, self.pad_id])

    def save(self, directory: Union[str, Path]) -> None:
        """Write the tokenizer and a small meta file; ``load_tokenizer(directory)`` gives it back exactly."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.backend == "tokenizers":
            atomic_write(directory / "tokenizer.json", self._impl.to_str(pretty=True))
        elif self.backend == "transformers":
            self._impl.save_pretrained(str(directory))
        else:
            atomic_write(directory / "spiece.model", self._impl.serialized_model_proto())
        meta = {"backend": self.backend, "name": self.name, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "vocab_size": self.vocab_size}
        atomic_write(directory / self.META, json.dumps(meta, indent=1) + "\n")

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, backend={self.backend}, vocab_size={self.vocab_size})"


def load_tokenizer(path: Union[str, Path], key: str = "tokenizer.path", t5: bool = False) -> Tokenizer:
    """A saved run tokenizer, a transformers tokenizer directory, a tokenizer.json, or a SentencePiece .model.
    ``t5``: a folder holding spiece.model is read with sentencepiece itself, whatever else it holds."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist")
    meta = {}
    if path.is_dir() and (path / Tokenizer.META).is_file():
        try:
            meta = json.loads((path / Tokenizer.META).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(key, f"cannot read {path / Tokenizer.META}: {_first_line(err)}") from None
        if not isinstance(meta, dict):
            raise ConfigError(key, f"{path / Tokenizer.META} is not a tokenizer meta file")
    ids = {"eos_id": meta.get("eos_id"), "pad_id": meta.get("pad_id")}
    name = meta.get("name", path.name)
    backend = meta.get("backend")
    if backend is None:
        if t5 and path.is_dir() and (path / "spiece.model").is_file():  # t5's own model: 32,000 pieces
            backend = "sentencepiece"
        elif path.is_file():
            backend = "sentencepiece" if path.suffix == ".model" else "tokenizers" if path.suffix == ".json" else None
        elif (path / "tokenizer_config.json").is_file():
            backend = "transformers"
        elif (path / "tokenizer.json").is_file():
            backend = "tokenizers"
        elif sorted(path.glob("*.model")):
            backend = "sentencepiece"
    try:
        if backend == "tokenizers":
            from tokenizers import Tokenizer as _Fast

            return Tokenizer("tokenizers", _Fast.from_file(str(path if path.is_file() else path / "tokenizer.json")),
                             name, **ids)
        if backend == "sentencepiece":
            import sentencepiece

            model = path if path.is_file() else min(path.glob("*.model"), key=lambda p: p.name != "spiece.model")
            return Tokenizer("sentencepiece", sentencepiece.SentencePieceProcessor(model_file=str(model)), name, **ids)
        if backend == "transformers":
            from transformers import AutoTokenizer

            return Tokenizer("transformers", AutoTokenizer.from_pretrained(str(path), local_files_only=True),
                             name, **ids)
    except Exception as err:  # noqa: BLE001 - `tokenizers` raises a bare Exception for a damaged tokenizer.json
        raise ConfigError(key, f"cannot load a tokenizer from {path}: {_first_line(err)}") from None
    raise ConfigError(key, f"{path} is not a tokenizer (expected a directory with tokenizer_config.json or "
                           "tokenizer.json, a spiece.model, or a tokenizer.json file)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _t5_base() -> Tokenizer:
    """t5-base from the local Hugging Face cache, else from the hub, else a one-line UserError."""
    from huggingface_hub import try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache(r, "tokenizer_config.json"), str)
                 for r in ("t5-base", "google-t5/t5-base"))
    reason = None if cached else hub_unreachable()
    if reason:
        raise UserError(f"tokenizer.kind=t5 needs t5-base from the Hugging Face hub, which is unreachable ({reason}); "
                        "pass tokenizer.path= (a spiece.model or tokenizer dir) or use tokenizer.kind=bpe")
    from transformers import AutoTokenizer

    try:
        return Tokenizer("transformers", AutoTokenizer.from_pretrained("t5-base", local_files_only=cached), "t5-base")
    except Exception as err:  # noqa: BLE001
        raise UserError(f"tokenizer.kind=t5: cannot load t5-base ({type(err).__name__}); pass tokenizer.path= "
                        "(a spiece.model or tokenizer dir) or use tokenizer.kind=bpe") from None


def _train_bpe(docs: Iterable[str], vocab_size: int, length: Optional[int] = None):
    """A byte-level BPE (GPT-2 style pre-tokenization, no unknown tokens) with <pad>=0, <eos>=1."""
    from tokenizers import Tokenizer as _Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _Fast(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=length)
    return tok


def build_tokenizer(corpus: Corpus, tok_cfg: TokenizerConfig, cache_root: Path) -> Tokenizer:
    """The tokenizer ``tok_cfg`` asks for (kind auto: t5 for c4, BPE otherwise) for an opened corpus; a BPE is
    trained on the training split once and then read from tokenizers/ under cache_root
    (``sltrain_cli.data.cache_root(tok_cfg)`` in a run)."""
    data_cfg = corpus.cfg
    kind = TokenizerKind(corpus.default_tokenizer) if tok_cfg.kind == TokenizerKind.auto else tok_cfg.kind
    root = Path(cache_root)
    if kind in (TokenizerKind.t5, TokenizerKind.pretrained):
        if tok_cfg.path:
            tok = load_tokenizer(tok_cfg.path, t5=kind == TokenizerKind.t5)
        elif kind == TokenizerKind.pretrained:
            raise ConfigError("tokenizer.path", "is required for tokenizer.kind=pretrained "
                                                "(a tokenizer directory or a spiece.model)")
        else:
            tok = _t5_base()
        return tok
    path = root / "tokenizers" / f"bpe-{digest(['bpe-v1', corpus.key, tok_cfg.vocab_size])}.json"
    damaged = False
    if path.is_file():
        try:
            tok = load_tokenizer(path)
        except ConfigError:
            damaged = True  # a truncated or otherwise damaged cache file: train again and replace it
        else:
            tok.name = f"bpe{tok.vocab_size}-{corpus.name}"
            return tok
    if corpus.streaming:
        texts = itertools.islice(corpus.split_texts("train"), data_cfg.max_docs or C4_TRAIN_DOCS_FOR_BPE)
        bpe = _train_bpe(texts, tok_cfg.vocab_size)
    else:
        train_docs, _ = corpus.documents()
        bpe = _train_bpe(train_docs, tok_cfg.vocab_size, length=len(train_docs))
    atomic_write(path, bpe.to_str(pretty=True))
    if damaged:
        print(f"note: the cached tokenizer {path} was unreadable; rebuilt it", file=sys.stderr, flush=True)
    tok = load_tokenizer(path)
    tok.name = f"bpe{tok.vocab_size}-{corpus.name}"
    return tok
