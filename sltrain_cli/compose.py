"""Overrides -> typed RunConfig, through Hydra's Compose API. The only hydra/omegaconf import (memory.py
reads the paper presets through ``option_values``).

    load_config(["model=llama_60m", "rank=64", "lr=3e-3"]) -> RunConfig

Steps: expand the short aliases (rank -> method.rank, ...), compose conf/config.yaml with the overrides,
apply the experiment preset's per-method recipe, merge into the structured RunConfig schema (an unknown
key or a wrongly typed value fails here) and instantiate the dataclasses (ranges are checked in their
``__post_init__``). Every failure becomes a ``ConfigError`` whose message starts with the offending key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .configs import ConfigError, RunConfig
from .methods import get_method

ALIASES = {
    "rank": "method.rank",
    "delta": "method.delta",
    "alpha": "method.alpha",
    "lr": "optim.lr",
    "steps": "train.steps",
    "seed": "seed",
}
GROUPS = ("model", "method", "data", "optim", "train", "experiment")
RECIPES_KEY = "method_recipes"  # experiment presets: {method name: {dotted key: value}}

def unused_method_keys(method_cfg) -> List[str]:
    """The MethodConfig fields ``method_cfg.name`` does not read (``Method.keys``), e.g. ['rank', 'delta', ...]
    for full; --print-config and config.yaml mark them "(unused by method=...)"."""
    method = get_method(method_cfg.name)
    return [f.name for f in dataclasses.fields(method_cfg)
            if f.name not in ("name", "warm_start") and not method.uses(f.name)]


def conf_dir() -> Path:
    """$SLTRAIN_CONF_DIR if set; else the conf/ shipped inside the installed package (sltrain_cli/conf, mapped
    from the repository's conf/ by pyproject.toml); else the checkout's top-level conf/ (editable install)."""
    env = os.environ.get("SLTRAIN_CONF_DIR")
    if env:
        path = Path(env)
        if not (path / "config.yaml").is_file():
            raise ConfigError("SLTRAIN_CONF_DIR", f"no config.yaml in {path}; point it at sltrain's conf/ folder")
        return path
    from importlib.resources import files

    packaged = Path(str(files(__package__) / "conf"))  # a plain folder: wheels install unzipped
    checkout = Path(__file__).resolve().parents[1] / "conf"
    for path in (packaged, checkout):
        if (path / "config.yaml").is_file():
            return path
    raise ConfigError("SLTRAIN_CONF_DIR", f"sltrain's conf/ is missing (looked in {packaged} and {checkout}); "
                                          "reinstall sltrain or point SLTRAIN_CONF_DIR at a conf/ folder")


def group_options(group: str) -> List[str]:
    """The option names of a config group, e.g. group_options('model') -> ['llama_130m', ...]."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def option_values(group: str, option: str) -> dict:
    """The values conf/<group>/<option>.yaml sets itself, as a plain dict (its defaults list dropped, nothing
    composed or checked): a cheap read of one preset, e.g. option_values('experiment', 'paper_7b')['method']."""
    data = OmegaConf.to_container(OmegaConf.load(conf_dir() / group / f"{option}.yaml")) or {}
    data.pop("defaults", None)
    return data


def split_override(override: str) -> tuple[str, str]:
    """'lr=3e-3' -> ('lr', '3e-3'); anything without '=' is a one-line ConfigError."""
    if "=" not in override:
        raise ConfigError(override, "overrides are key=value (e.g. model=llama_60m, rank=64)")
    key, value = override.split("=", 1)
    return key.strip(), value


def expand_aliases(overrides: Iterable[str]) -> List[str]:
    out = []
    for ov in overrides:
        key, value = split_override(ov)
        prefix = key[: len(key) - len(key.lstrip("+~"))]
        bare = key[len(prefix):]
        out.append(f"{prefix}{ALIASES.get(bare, bare)}={value}")
    return out


PATH_KEYS = ("data.path",)  # comma lists of files: one value, never a grid (quoted for Hydra's grammar)


def quote_paths(overrides: Sequence[str]) -> List[str]:
    """data.path=a.txt,b.txt -> data.path='a.txt,b.txt' (Hydra would read an unquoted comma list as a sweep);
    a value with non-ASCII letters (run_name=première) is quoted too: Hydra's grammar takes them only quoted."""
    out = []
    for o in overrides:
        key, value = split_override(o)
        unquoted = value[:1] not in ("'", '"', "[")
        if unquoted and ((override_key(o) in PATH_KEYS and "," in value) or not value.isascii()):
            o = f"{key}={quote(value)}"
        out.append(o)
    return out


def _check_appended_keys(overrides: Sequence[str], schema: DictConfig) -> None:
    """``+key=value`` adds a key to the composed config, and the merge into the schema then drops it without a
    word: a key that is not in the schema is refused here, as it is without the ``+``."""
    for o in overrides:
        key = split_override(o)[0]
        bare = key.lstrip("+")
        if bare == key or bare in GROUPS or bare.split(".")[0] == RECIPES_KEY:
            continue
        if OmegaConf.select(schema, bare, default=_ABSENT) is _ABSENT:
            raise ConfigError(bare, "unknown key (see `sltrain pretrain --print-config` for the valid keys)")


_ABSENT = object()


def expand_grid(overrides: Sequence[str]) -> List[List[str]]:
    """Cartesian product of comma-separated values: ['rank=1,2', 'lr=3'] -> [['rank=1','lr=3'], ['rank=2','lr=3']].
    A value in brackets (a list, e.g. method.target_modules=[q,v]) is kept whole."""
    axes = []
    for ov in overrides:
        key, value = split_override(ov)
        if value.startswith("[") or "," not in value or override_key(ov) in PATH_KEYS:
            axes.append([f"{key}={value}"])
        else:
            axes.append([f"{key}={v.strip()}" for v in value.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]


SCHEMA_NAME = "sltrain_schema"  # conf/config.yaml lists it first in its defaults


def _compose(overrides: List[str]) -> DictConfig:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)  # typed from the start: typos fail
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _hydra_error(err: Exception, overrides: List[str]) -> ConfigError:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    m = re.search(r"Could not find '([^/']+)/([^']+)'", str(err))
    if m:
        group, option = m.groups()
        return ConfigError(group, f"unknown option {option!r}; choose from {', '.join(group_options(group))}")
    m = re.search(r"Could not override '([^']+)'", str(err)) or re.search(r"Key '([^']+)' is not in struct", str(err))
    if m:
        return ConfigError(m.group(1), "unknown key (see `sltrain pretrain --print-config` for the valid keys)")
    if "Ambiguous value" in str(err):
        key = next((split_override(o)[0] for o in overrides if o in str(err)), "overrides")
        return ConfigError(key, "a comma list is a grid: run it with `sltrain sweep`")
    for ov in overrides:  # the grammar error names the override text
        if ov in str(err):
            return ConfigError(split_override(ov)[0], msg)
    return ConfigError("overrides", msg)


def _apply_recipe(cfg: DictConfig, user_keys: set[str]) -> None:
    """An experiment preset may carry per-method settings (GaLore's lr differs from SLTrain's); apply the
    chosen method's entries unless the user set the same key on the command line."""
    recipes = cfg.get(RECIPES_KEY) or {}
    method = cfg.method.name.value if hasattr(cfg.method.name, "value") else str(cfg.method.name)
    for key, value in (recipes.get(method) or {}).items():
        if key not in user_keys:
            OmegaConf.update(cfg, key, value, merge=False)


def _omegaconf_error(err: OmegaConfBaseException, schema: DictConfig) -> ConfigError:
    key = getattr(err, "full_key", None) or "config"
    text = str(err).splitlines()[0]
    if "not in struct" in text or ("Key '" in text and "not" in text):
        return ConfigError(key, "unknown key (see `sltrain pretrain --print-config` for the valid keys)")
    m = re.search(r"Invalid value '([^']*)', expected one of", text)
    if m:
        node = OmegaConf.select(schema, key, throw_on_missing=False)
        allowed = ", ".join(e.value for e in type(node)) if node is not None else ""
        return ConfigError(key, f"must be one of {allowed}, got {m.group(1)!r}")
    m = re.search(r"Value '([^']*)' of type '\w+' could not be converted to (\w+)", text)
    if m:
        kind = m.group(2).lower()
        return ConfigError(key, f"must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {m.group(1)!r}")
    return ConfigError(key, text)


def _check_group_options(overrides: List[str]) -> None:
    """Every group=option names a file of that group. Hydra itself misses one case: conf/config.yaml lists
    ``optional experiment: null``, and an optional group skips an option it cannot find, so
    ``experiment=paper_60`` would silently train the defaults."""
    for ov in overrides:
        key, value = split_override(ov)
        group, value = key.lstrip("+~"), value.strip().strip("'\"")  # model='tiny' is Hydra for tiny
        if group in GROUPS and value not in group_options(group):
            raise ConfigError(group, f"unknown option {value!r}; choose from {', '.join(group_options(group))}")


def compose_dict(overrides: Sequence[str] = ()) -> DictConfig:
    """Composed DictConfig, typed by the RunConfig schema (no __post_init__ range checks yet)."""
    overrides = quote_paths(expand_aliases(overrides))
    _check_group_options(overrides)
    schema = OmegaConf.structured(RunConfig)
    _check_appended_keys(overrides, schema)
    try:
        cfg = _compose(overrides)
    except HydraException as err:
        inner = err.__cause__ or err.__context__  # a schema error inside a composed file (or an override)
        if isinstance(inner, OmegaConfBaseException):
            raise _omegaconf_error(inner, schema) from None
        raise _hydra_error(err, overrides) from None
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, schema) from None
    _apply_recipe(cfg, {split_override(o)[0].lstrip("+~") for o in overrides})
    try:
        return OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, schema) from None


def to_run_config(cfg: DictConfig) -> RunConfig:
    return OmegaConf.to_object(cfg)


def load_config(overrides: Sequence[str] = ()) -> RunConfig:
    """Compose conf/ with Hydra overrides (aliases allowed) and return a validated RunConfig."""
    return to_run_config(compose_dict(overrides))


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (enums by value), as saved in every run folder and printed by
    ``sltrain pretrain --print-config``: each section under its dataclass docstring and each key under its
    help (``field_help``), as ``#`` comments. The comments sit on the line above, so that a key's
    line is only ``key: value`` (line diffs of two runs' configs stay clean); they change nothing it loads to."""
    from dataclasses import fields, is_dataclass
    from enum import Enum
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
            text = OmegaConf.to_yaml({f.name: data[f.name]})
            out += [indent + line if line else line for line in text.rstrip("\n").split("\n")]

    lines = comment(type(cfg).__doc__ or "", "")
    emit(cfg, plain(OmegaConf.to_container(OmegaConf.structured(cfg))), "", lines)
    return "\n".join(lines) + "\n"


def to_container(cfg: RunConfig) -> dict:
    """Plain dict (enums as strings), safe for torch.save(weights_only) and JSON."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def from_container(data: dict) -> RunConfig:
    """Inverse of to_container (a config stored in a checkpoint)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))
    except OmegaConfBaseException as err:
        raise ConfigError(getattr(err, "full_key", None) or "config", str(err).splitlines()[0]) from None


NOT_IN_RUN_NAME = ("out_dir", "run_name", "timestamp", "train.resume", "train.overwrite")  # where / how, not what


def read_config_file(path: Path | str) -> dict:
    """A run folder's config.yaml as a plain container (like ``to_container``); ConfigError if unreadable."""
    try:
        return to_container(from_container(OmegaConf.to_container(OmegaConf.load(str(path)))))
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError("config.yaml", f"cannot read {path}: {str(err).splitlines()[0]}") from None


def run_name(overrides: Sequence[str]) -> str:
    """Deterministic folder name from the user's overrides, whatever their order:
    ['rank=8', 'model=tiny'] -> 'model=tiny,rank=8' (a key given twice keeps its last value)."""
    last = {}
    for o in expand_aliases(overrides):
        key = split_override(o)[0].lstrip("+~")
        if key not in NOT_IN_RUN_NAME:
            last[key] = o
    if not last:
        return "default"
    shown = [last[k].replace("method.", "").replace("optim.", "").replace("train.", "") for k in last]
    name = ",".join(sorted(shown, key=lambda p: split_override(p)[0]))
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    return name if len(name) <= 120 else name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


# Keys that may change when a run is resumed: how often it logs, evaluates and saves, where and how fast it
# runs. Anything else changes the numbers, so a resume with another value is refused.
# (train.compile too: it fuses the same ops, so only rounding moves, as with train.num_threads.)
RESUME_FREE_KEYS = ("train.log_every", "train.eval_every", "train.save_every", "train.eval_tokens",
                    "train.num_threads", "train.device", "train.keep_checkpoints", "train.resume", "train.overwrite",
                    "train.loggers", "train.peak_flops", "train.compile", "tokenizer.cache_dir", "out_dir", "run_name",
                    "timestamp", "method_recipes")


def flatten(data, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (empty dicts stay as values)."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def config_changes(stored: dict, current: dict, free: Sequence[str] = RESUME_FREE_KEYS) -> List[tuple]:
    """[(dotted key, stored value, current value)] for every key two configs (plain containers, see
    ``to_container``) disagree on, outside ``free`` and their sub-keys."""
    a, b = flatten(stored), flatten(current)
    keep = [k for k in sorted(set(a) | set(b)) if not any(k == f or k.startswith(f + ".") for f in free)]
    return [(k, a.get(k), b.get(k)) for k in keep if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------------ override strings
def override_key(override: str) -> str:
    """The canonical key an override sets: '+steps=5' -> 'train.steps' (aliases resolved, +/~ dropped)."""
    key = override.split("=", 1)[0].strip().lstrip("+~")
    return ALIASES.get(key, key)


def quote(value: str) -> str:
    """A Hydra-quoted override value (paths and trial names may hold '=' and ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_value(text: str):
    """'64' -> 64, '0.03' -> 0.03, anything else stays a string (only for tables and plots)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def drop_keys(overrides: Sequence[str], keys: Sequence[str]) -> List[str]:
    """The overrides without those setting any of ``keys`` (aliases resolved: 'steps' matches 'train.steps')."""
    canonical = {ALIASES.get(k, k) for k in keys}
    return [o for o in overrides if override_key(o) not in canonical]


def find_override(overrides: Sequence[str], key: str) -> Optional[str]:
    """The value the overrides give ``key`` (last one wins), or None."""
    found = None
    for o in overrides:
        if "=" in o and override_key(o) == ALIASES.get(key, key):
            found = o.split("=", 1)[1]
    return found


# ------------------------------------------------------------------------------ field help
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


def iter_help(cls_or_instance=None, prefix: str = ""):
    """(dotted key, help) for every settable key, nested configs flattened: ('method.rank', 'r of B ...')."""
    cls = _config_class(RunConfig if cls_or_instance is None else cls_or_instance)
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types[f.name]):
            yield from iter_help(types[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", field_help(cls, f.name)
