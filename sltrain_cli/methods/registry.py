"""Name -> Method. A method is one module in this package that defines ``METHOD`` (a ``base.Method``); its file
name is the method's name (``method=NAME`` on the command line, ``conf/method/NAME.yaml``). Nothing else in sltrain
lists the methods: the names are the package's modules, read without importing them, so the config schema can
check ``method.name`` cheaply; a method's module is imported when its behaviour is first needed.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path
from typing import Tuple

from .base import Method

_NOT_METHODS = {"base", "fields", "registry"}


@functools.lru_cache(maxsize=None)
def method_names() -> Tuple[str, ...]:
    """Every method's name, sorted (no method module is imported)."""
    here = str(Path(__file__).resolve().parent)
    return tuple(sorted(m.name for m in pkgutil.iter_modules([here]) if m.name not in _NOT_METHODS))


@functools.lru_cache(maxsize=None)
def get_method(name) -> Method:
    """The Method called ``name`` (a string or the MethodName enum). Unknown names are a ValueError; the config
    schema has refused them long before."""
    name = getattr(name, "value", name)
    if name not in method_names():
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    method = importlib.import_module(f"{__package__}.{name}").METHOD
    assert method.name == name, f"methods/{name}.py defines METHOD.name={method.name!r}"
    return method


def all_methods() -> Tuple[Method, ...]:
    """Every Method, in display order (``Method.order``: dense baselines first)."""
    return tuple(sorted((get_method(n) for n in method_names()), key=lambda m: (m.order, m.name)))
