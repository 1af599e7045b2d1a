"""Overrides -> typed RunConfig, through Hydra's Compose API. The only hydra/omegaconf import (memory.py
reads the paper presets through ``option_values``).

    load_config(["model=llama_60m", "rank=64", "lr=3e-3"]) -> RunConfig

Steps: expand the short aliases (rank -> method.rank, ...), compose conf/config.yaml with the overrides,
apply the experiment preset's per-method recipe, merge into the structured RunConfig schema (an unknown
key or a wrongly typed value fails here) and instantiate the dataclasses (ranges are checked in their
``__post_init__``). Every failure becomes a ``ConfigError`` whose message starts with the offending key.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .configs import ConfigError, RunConfig

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


def option_defaults(group: Optional[str] = None, option: Optional[str] = None) -> Dict[str, str]:
    """The group choices a YAML's defaults list makes: conf/config.yaml's (no arguments) or a preset's
    ('override /model: llama_60m' -> {'model': 'llama_60m'}); entries that choose no group option are skipped."""
    path = conf_dir() / "config.yaml" if group is None else conf_dir() / group / f"{option}.yaml"
    found = {}
    for entry in (OmegaConf.to_container(OmegaConf.load(path)) or {}).get("defaults") or []:
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
            name = key.replace("override", "").replace("optional", "").strip().lstrip("/")
            if name in GROUPS and value is not None:
                found[name] = value
    return found


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


NOT_IN_RUN_NAME = ("out_dir", "run_name", "timestamp", "train.resume", "train.overwrite")  # where / how, not what


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


