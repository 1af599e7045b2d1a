"""method=full: dense weights trained with (8-bit) AdamW -- the full-rank baseline."""
from .base import Method


class Full(Method):
    name, order = "full", 0


METHOD = Full()
