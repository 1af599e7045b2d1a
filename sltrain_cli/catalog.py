"""What the shipped configs hold and what a run uses: the rows of `sltrain list`, the config-group lines of
the commands' --help, and the printed pretrain summary (rank / delta only where the method uses them).

    group_rows("models") -> [{"option": "llama_130m", "description": "LLaMA 130m (...)", "hidden": 768, ...}, ...]

A row is the option's name, its one-line description (the first sentence of the YAML's first comment line)
and the values that tell the options apart: the option's YAML over its dataclass defaults, without composing
or checking (data=local is listed although it needs data.path); an experiment preset's row combines the files
it names (``experiment_values``).
"""
from __future__ import annotations

import dataclasses
from enum import Enum
from textwrap import wrap
from typing import Dict, List, Optional

from .compose import GROUPS, RECIPES_KEY, conf_dir, group_options, option_defaults, option_values
from .configs import DataConfig, MethodConfig, ModelConfig, OptimConfig, TrainConfig, UserError
from .methods import get_method, method_names

# what users type -> conf/ folder; singular names work too
GROUP_NAMES = {"models": "model", "methods": "method", "data": "data", "optim": "optim", "train": "train",
               "experiments": "experiment"}
SLICES = {"model": ModelConfig, "method": MethodConfig, "data": DataConfig, "optim": OptimConfig,
          "train": TrainConfig}


def resolve_group(name: str) -> str:
    """'models' or 'model' -> 'model'; anything else is a one-line UserError listing the groups."""
    key = name.strip().lower()
    if key in GROUP_NAMES:
        return GROUP_NAMES[key]
    if key in GROUP_NAMES.values():
        return key
    raise UserError(f"group: unknown config group {name!r}; choose from {', '.join(GROUP_NAMES)}")


def description(group: str, option: str) -> str:
    """The first sentence of the first comment line of conf/<group>/<option>.yaml ('' if it has none)."""
    for line in (conf_dir() / group / f"{option}.yaml").read_text().splitlines():
        text = line.strip().lstrip("#").strip()
        if line.lstrip().startswith("#") and text and not text.startswith("@package"):
            return text.split(". ", 1)[0].rstrip(".")
    return ""


def _values(group: str, option: str) -> Dict[str, object]:
    """The option's YAML values over its dataclass defaults (enums as their values), nothing validated."""
    out = {}
    for f in dataclasses.fields(SLICES[group]):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    out.update(option_values(group, option))
    return {k: v.value if isinstance(v, Enum) else v for k, v in out.items()}


def experiment_values(option: str) -> dict:
    """What `sltrain list experiments` shows of a preset, read from the YAML files it combines (the root's group
    choices, the preset's overrides and values, its method recipe) without composing it through Hydra, which
    takes about half a second per preset; tests check it against the composed config."""
    picks = {**option_defaults(), **option_defaults("experiment", option)}
    own = option_values("experiment", option)
    method = (own.get("method") or {}).get("name") or _values("method", picks["method"])["name"]
    for key, value in ((own.get(RECIPES_KEY) or {}).get(method) or {}).items():  # as compose._apply_recipe
        section, _, name = key.partition(".")
        own.setdefault(section, {})[name] = value

    def get(group: str, key: str):
        section = own.get(group) or {}
        value = section[key] if key in section else _values(group, picks[group])[key]
        return value.value if isinstance(value, Enum) else value

    return {"model": get("model", "name"), "data": get("data", "name"), "method": method,
            "rank": get("method", "rank"), "delta": get("method", "delta"), "steps": get("train", "steps"),
            "batch": get("train", "total_batch_size"), "lr": get("optim", "lr"), "precision": get("train", "precision")}


def _row(group: str, option: str) -> dict:
    row = {"option": option, "description": description(group, option)}
    if group == "experiment":
        return {**row, **experiment_values(option)}
    v = _values(group, option)
    if group == "model":
        return {**row, "hidden": v["hidden_size"], "intermediate": v["intermediate_size"],
                "layers": v["num_layers"], "heads": v["num_heads"]}
    if group == "method":
        method = get_method(v["name"])
        extras = ", ".join(f"{k}={v[k]}" for k in method.catalog_extras)
        return {**row, **{k: v[k] if method.uses(k) else None for k in ("rank", "delta", "alpha")}, "also": extras}
    if group == "data":
        return {**row, "seq_len": v["seq_len"], "streaming": v["streaming"], "path": v["path"]}
    if group == "optim":
        return {**row, "lr": v["lr"], "weight_decay": v["weight_decay"], "schedule": v["schedule"],
                "warmup_ratio": v["warmup_ratio"]}
    return {**row, "steps": v["steps"], "batch": v["total_batch_size"], "micro_batch": v["micro_batch_size"],
            "precision": v["precision"]}


def group_rows(name: str) -> List[dict]:
    """One row per option of a config group (see the module docstring)."""
    group = resolve_group(name)
    return [_row(group, option) for option in group_options(group)]


# ------------------------------------------------------------------------------ for the CLI
def groups_text(groups: Optional[List[str]] = None) -> str:
    """'Config groups ...' and one wrapped line per group with its option names, for a command's --help."""
    lines = ["Config groups (group=option; sltrain list GROUP describes each option):"]
    for group in groups or GROUPS:
        try:
            names = ", ".join(group_options(group))
        except UserError as err:  # no conf/ found: say so instead of failing the help
            return str(err)
        lines += wrap(names, 74, initial_indent=f"  {group:<11} ", subsequent_indent=" " * 14)
    return "\n".join(lines)


PEAK_KINDS = {"cuda_max_memory_allocated": "CUDA max allocated", "cpu_peak_rss": "process peak RSS"}


def without_unused(row: dict) -> dict:
    """rank / delta blanked (None) where the row's method does not use them (full: neither, sparse: no rank)."""
    if row.get("method") not in method_names():
        return dict(row)
    method = get_method(row["method"])
    return {k: (None if k in ("rank", "delta") and not method.uses(k) else v) for k, v in row.items()}


def summary_view(summary: dict) -> dict:
    """The printed pretrain summary: rank / delta only where the method uses them, the vocabulary the
    tokenizer gave the model, memory in GB with what each figure covers."""
    view = {k: summary.get(k) for k in ("run", "model", "method", "rank", "delta")}
    view = {k: v for k, v in without_unused(view).items() if v is not None or k not in ("rank", "delta")}
    peak = summary.get("peak_mem_bytes")
    kind = PEAK_KINDS.get(summary.get("peak_mem_kind"), summary.get("peak_mem_kind") or "peak")
    view.update({"vocab_size (tokenizer)": summary.get("vocab_size"),
                 **{k: summary.get(k) for k in ("params_total", "params_trainable", "tokens", "val_ppl",
                                                "tokens_per_s")},
                 f"memory GB, measured ({kind})": round(peak / 1e9, 3) if peak else None,
                 "memory GB, estimate (params + Adam states, bf16)": summary.get("est_mem_gb"),
                 "status": summary.get("status")})
    return view


def memory_view(row: dict) -> dict:
    """A narrow view of one memory_rows() row for the terminal (all fields stay in csv/json/md)."""
    row = without_unused(row)
    out = {"method": row["method"], "rank": row.get("rank"), "delta": row.get("delta"),
           "params M": round(row["params_total"] / 1e6, 2), "trainable M": round(row["params_trainable"] / 1e6, 2),
           "param GB": row["param_mem_gb"], "optim GB": row["optimizer_mem_gb"], "paper GB": row["total_mem_gb"],
           "grads GB": row.get("full_grad_mem_gb"), "activ GB": row.get("activation_mem_gb"),
           "ours GB": row.get("full_total_gb")}
    if "measured_gb" in row:
        out.update({"measured GB": row["measured_gb"], "measured/ours": row.get("ratio")})
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def outcome_lines(summary: dict, overrides) -> tuple:
    """(the result line for stdout or None, the line for stderr or None) of a finished `sltrain pretrain`."""
    status, result, warning = summary["status"], None, None
    if status == "completed" and summary.get("val_ppl") is not None:
        result = (f"validation perplexity {summary['val_ppl']:.2f} on {summary['val_tokens']:,} tokens "
                  f"(unigram baseline of this corpus: {summary['unigram_ppl']:.2f})")
    resume = " ".join([*(o for o in overrides if not o.startswith("train.resume=")), "train.resume=true"])
    if status == "interrupted":
        saved = f"step {summary['steps']} is saved" if summary.get("last_checkpoint") else "no checkpoint was saved"
        warning = (f"interrupted ({summary.get('signal', 'SIGINT')}): {saved}; resume with: sltrain pretrain "
                   f"{resume}")
    elif status == "diverged":
        warning = (f"diverged at step {summary['diverged_step']}: {summary.get('diverged_reason')}; the last "
                   f"checkpoint is {summary.get('last_checkpoint') or 'none'}. Lower the learning rate (lr=) or "
                   "enable clipping (optim.grad_clip=1.0) and start over with train.overwrite=true")
    return result, warning
