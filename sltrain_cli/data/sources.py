"""The data sources by ``data.name``: one class per file behind corpus.Corpus's protocol."""
from __future__ import annotations

from ..configs import DataConfig, DataName
from .c4 import C4Corpus
from .corpus import Corpus
from .local import LocalCorpus
from .sotu import SotuCorpus

SOURCES = {DataName.sotu: SotuCorpus, DataName.local: LocalCorpus, DataName.c4: C4Corpus}


def open_corpus(cfg: DataConfig) -> Corpus:
    """The corpus ``cfg`` names, opened: its files found and its cache key computed (nothing is read yet)."""
    return SOURCES[cfg.name].open(cfg)

