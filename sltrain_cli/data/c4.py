"""data=c4: allenai/c4 "en" as the GaLore / SLTrain benchmark harness reads it, from a local mirror or the hub.

``data.path`` set: a local copy of the allenai/c4 dataset repository, read offline. The path is the repository
root (holding ``en/``), ``en/`` itself, or a glob; training shards are the files named
``c4-train.NNNNN-of-NNNNN.json.gz`` and validation shards ``c4-validation.NNNNN-of-NNNNN.json.gz`` (``.json`` too),
each list sorted by name as the hub lists them. ``data.path`` unset: streamed from the Hugging Face hub.

Either way, the harness's order: the training split shuffled with ``data.seed`` (42) and a buffer of
``data.shuffle_buffer`` (1000) documents exactly as ``datasets``' ``shuffle(seed=42)`` does, the validation split
shuffled with seed 42. Document order is a property of the `datasets` version (the one a run used is in its
summary.json); rows.py makes each document one row (first seq_len - 1 tokens, EOS, pad).
"""
from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Dict, List

from ..configs import ConfigError, DataConfig, UserError
from .cache import _OFFLINE_HINT, digest, require_c4
from .corpus import Corpus, shuffled
from .local import open_files, read_texts

VAL_SEED = 42  # the harness shuffles the validation split with seed 42 (train: data.seed, 42 in c4.yaml)
SHARD = {"train": re.compile(r"^c4-train\.\d{5}-of-\d{5}\.json(\.gz)?$"),
         "validation": re.compile(r"^c4-validation\.\d{5}-of-\d{5}\.json(\.gz)?$")}
PATTERN = "c4-{train,validation}.NNNNN-of-NNNNN.json.gz"


def mirror_shards(spec: str) -> Dict[str, List[Path]]:
    """data.path of a local C4 mirror -> {"train": shards, "validation": shards}, each sorted by name."""
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        found = [Path(p) for p in glob.glob(str(path), recursive=True)]
    elif path.is_dir():
        path = path / "en" if (path / "en").is_dir() else path
        found = list(path.iterdir())
    elif path.is_file():
        found = [path]
    else:
        raise ConfigError("data.path", f"{spec} does not exist (data=c4 reads a local allenai/c4 mirror: the folder "
                                       "holding en/, en/ itself, or a glob)")
    shards = {split: sorted((p for p in found if rule.match(p.name) and p.is_file()), key=lambda p: p.name)
              for split, rule in SHARD.items()}
    for split, files in shards.items():
        if not files:
            names = sorted(p.name for p in found)
            seen = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") or "nothing"
            raise ConfigError("data.path", f"no C4 {split} shards in {path}: expected files named {PATTERN}, "
                                           f"found {seen}")
    return shards


class C4Corpus(Corpus):
    default_tokenizer = "t5"

    @classmethod
    def open(cls, cfg: DataConfig) -> "C4Corpus":
        if not cfg.path:
            require_c4()
            return cls(cfg, "c4", digest({"c4": "allenai/c4 en", "max_docs": cfg.max_docs}))
        shards = mirror_shards(cfg.path)
        # identified by shard names and sizes: a copy of the mirror elsewhere is the same data
        ident = {split: [(p.name, p.stat().st_size) for p in files] for split, files in shards.items()}
        corpus = cls(cfg, "c4", digest({"c4": "local mirror", **ident, "max_docs": cfg.max_docs}),
                     shards["train"] + shards["validation"])
        corpus.shards = shards
        return corpus

    shards: Dict[str, List[Path]] = {}  # empty: the hub

    @property
    def streaming(self) -> bool:
        return True

    def stream(self, split: str, epoch: int = 0):
        if self.shards:
            ds = open_files(self.shards[split], self.cfg)
        else:
            from datasets import load_dataset

            try:
                ds = load_dataset("allenai/c4", "en", split=split, streaming=True)
            except Exception as err:  # noqa: BLE001 - any hub failure is the same advice to the user
                raise UserError(f"data=c4: cannot open allenai/c4 ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); {_OFFLINE_HINT}") from None
        ds = ds.take(self.cfg.max_docs) if self.cfg.max_docs is not None else ds
        seed, epoch = (self.cfg.seed, epoch) if split == "train" else (VAL_SEED, 0)
        return shuffled(ds, seed, self.cfg.shuffle_buffer, epoch, one_shard_at_a_time=False)

    def keep(self, split: str, text: str) -> bool:
        return True  # every document is a row, an empty one too (the harness's rule)

    def texts(self, examples):
        return read_texts(examples, self.files, self.cfg) if self.shards else super().texts(examples)
