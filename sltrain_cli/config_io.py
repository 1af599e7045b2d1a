"""RunConfig <-> plain containers and YAML, the help of every field, and what may change on resume -- in plain
Python (dataclasses + PyYAML), so that the training runtime stores, reloads and compares configs without Hydra or
OmegaConf (compose.py, the CLI side, builds a RunConfig from conf/ and overrides with them).

    to_container(cfg) -> dict            enums by name: what checkpoints store (torch.load(weights_only) reads it)
    from_container(dict) -> RunConfig    its inverse: unknown keys and wrong types are ConfigErrors naming the key
    to_yaml(cfg) -> str                  config.yaml / --print-config: each key under its help as a # comment
    config_changes(a, b, free)           the keys two configs disagree on, outside ``free`` (state.RESUME_FREE_KEYS)
"""
from __future__ import annotations

import dataclasses
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from .configs import ConfigError, RunConfig
from .methods import get_method


def unused_method_keys(method_cfg) -> List[str]:
    """The MethodConfig fields ``method_cfg.name`` does not read (``Method.keys``), e.g. ['rank', 'delta', ...]
    for full; --print-config and config.yaml mark them "(unused by method=...)"."""
    method = get_method(method_cfg.name)
    return [f.name for f in dataclasses.fields(method_cfg)
            if f.name not in ("name", "warm_start") and not method.uses(f.name)]


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (enums by value), as saved in every run folder and printed by
    ``sltrain pretrain --print-config``: each section under its dataclass docstring and each key under its
    help (``field_help``), as ``#`` comments. The comments sit on the line above, so that a key's
    line is only ``key: value`` (line diffs of two runs' configs stay clean); they change nothing it loads to."""
    from dataclasses import fields, is_dataclass
    from textwrap import wrap

    def plain(value):  # enums by value (bf16-mixed, as users write it; loading accepts either spelling)
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    def comment(text: str, indent: str) -> List[str]:
        return [f"{indent}# {line}" for line in wrap(" ".join(text.split()), max(40, 108 - len(indent)))]

    unused = set(unused_method_keys(cfg.method))
    method = cfg.method.name.value

    def emit(obj, data: dict, indent: str, out: List[str]) -> None:
        after_section = False
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                doc = field_help(obj, f.name) or type(value).__doc__ or ""
                out += ["", *comment(doc, indent), f"{indent}{f.name}:"]
                emit(value, data[f.name], indent + "  ", out)
                after_section = True
                continue
            if after_section:
                out.append("")
            after_section = False
            text = field_help(obj, f.name)
            if obj is cfg.method and f.name in unused:  # kept, so that the file loads back to the same config
                text = f"(unused by method={method}) {text}"
            out += comment(text, indent)
            text = _dump({f.name: data[f.name]})
            out += [indent + line if line else line for line in text.rstrip("\n").split("\n")]

    lines = comment(type(cfg).__doc__ or "", "")
    emit(cfg, plain(_container(cfg, enum=lambda e: e)), "", lines)
    return "\n".join(lines) + "\n"


def to_container(cfg: RunConfig) -> dict:
    """Plain dict (enums by name), safe for torch.save(weights_only) and JSON."""
    return _container(cfg, enum=lambda e: e.name)


def _container(obj, enum: Callable[[Enum], Any]):
    if dataclasses.is_dataclass(obj):
        return {f.name: _container(getattr(obj, f.name), enum) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return enum(obj)
    if isinstance(obj, dict):
        return {k: _container(v, enum) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_container(v, enum) for v in obj]
    return obj


def from_container(data: dict) -> RunConfig:
    """Inverse of to_container (a config stored in a checkpoint, or a config.yaml read back): enums by name or
    value, numbers from their strings; keys added to the schema since take their defaults."""
    return _build(RunConfig, data, "")


def _build(cls: type, data, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"must be a mapping, got {data!r}")
    types = _field_types(cls)
    unknown = [k for k in data if k not in types]
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", "unknown key")
    values = {k: _value(types[k], v, f"{prefix}{k}") for k, v in data.items()}
    return cls(**values)


def _value(hint, value, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _value(next(a for a in args if a is not type(None)), value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {value!r}")
        return [_value(args[0] if args else Any, v, key) for v in value]
    if origin in (dict, Dict) or hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, Enum):
        if isinstance(value, hint):
            return value
        try:
            return hint[value]  # by name or, with configs._accept_values, by value
        except (KeyError, TypeError):
            allowed = ", ".join(m.value for m in hint)
            raise ConfigError(key, f"must be one of {allowed}, got {value!r}") from None
    return _scalar(hint, value, key)


def _scalar(hint, value, key: str):
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()) or (
                isinstance(value, str) and _parses(int, value)):
            return int(value)
    elif hint is float and not isinstance(value, bool):
        if isinstance(value, (int, float)) or (isinstance(value, str) and _parses(float, value)):
            return float(value)
    elif hint is str and not isinstance(value, (dict, list)):
        return value if isinstance(value, str) else str(value)
    kind = getattr(hint, "__name__", str(hint))
    raise ConfigError(key, f"must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value!r}")


def read_config_file(path: Path | str) -> dict:
    """A run folder's config.yaml as a plain container (like ``to_container``); ConfigError if unreadable."""
    try:
        return to_container(from_container(yaml.safe_load(Path(path).read_text()) or {}))
    except (OSError, yaml.YAMLError, ValueError) as err:
        raise ConfigError("config.yaml", f"cannot read {path}: {str(err).splitlines()[0]}") from None


class _Dumper(yaml.Dumper):
    """YAML as config.yaml has always been written: a string that would read back as a bool or a number is
    quoted ('1e-3', 'yes'); everything else plain, block style, keys in their order."""


def _str(dumper: yaml.Dumper, text: str) -> yaml.ScalarNode:
    looks_typed = text in _YAML_BOOLS or _parses(int, text) or _parses(float, text)
    return dumper.represent_scalar(yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG, text,
                                   style="'" if looks_typed else None)


def _parses(cast, text: str) -> bool:
    try:
        cast(text)
        return True
    except ValueError:
        return False


_YAML_BOOLS = {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE", "false", "False",
               "FALSE", "on", "On", "ON", "off", "Off", "OFF"}
_Dumper.add_representer(str, _str)


def _dump(data: dict) -> str:
    return yaml.dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=_Dumper)


def flatten(data, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (empty dicts stay as values)."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def config_changes(stored: dict, current: dict, free: Sequence[str] = ()) -> List[tuple]:
    """[(dotted key, stored value, current value)] for every key two configs (plain containers, see
    ``to_container``) disagree on, outside ``free`` and their sub-keys."""
    a, b = flatten(stored), flatten(current)
    keep = [k for k in sorted(set(a) | set(b)) if not any(k == f or k.startswith(f + ".") for f in free)]
    return [(k, a.get(k), b.get(k)) for k in keep if a.get(k) != b.get(k)]


def _config_class(cls_or_instance) -> type:
    cls = cls_or_instance if isinstance(cls_or_instance, type) else type(cls_or_instance)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"not a config dataclass: {cls!r}")
    return cls


def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)  # resolves the string annotations of ``from __future__ import annotations``


def _enum_of(hint) -> Optional[type]:
    for t in (hint, *typing.get_args(hint)):  # Optional[E] too
        if isinstance(t, type) and issubclass(t, Enum):
            return t
    return None


def field_help(cls_or_instance, name: str) -> str:
    """The help of one field: ``field_help(RunConfig, "method.rank")`` or ``field_help(cfg.method, "rank")``.
    An Enum field's help ends with its allowed values; a nested config's help is its docstring."""
    cls = _config_class(cls_or_instance)
    head, _, rest = name.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        raise KeyError(f"{cls.__name__} has no field {head!r}")
    hint = _field_types(cls)[head]
    if rest:
        return field_help(hint, rest)
    text = " ".join(str(fields[head].metadata.get("help", "")).split())
    enum_cls = _enum_of(hint)
    if enum_cls is not None:
        text += f" ({' | '.join(m.value for m in enum_cls)})"
    return text
