"""Get a trained model out: a Hugging Face folder (``export_run``); text samples are infer.py's.

    out = export_run("outputs/pretrain/default")          # -> outputs/pretrain/default/export
    AutoModelForCausalLM.from_pretrained(out); AutoTokenizer.from_pretrained(out)

The export is a plain ``transformers.LlamaForCausalLM`` folder (config.json, model.safetensors, generation_config.json,
the tokenizer, README.md): every method's target layers are multiplied out into dense weights (SLTrain and sparse:
(alpha/r) B A + S; low-rank: B A; ReLoRA: W0 + (alpha/r) B A; full and GaLore: as trained), so loading it needs
transformers only, and the memory saving of the factored form is gone.

Default folder: RUN_DIR/export for the run's latest checkpoint, RUN_DIR/export-step_NNNNNN for an earlier one. The
folder is written next to its final place and renamed into it, so a failed export leaves no half folder; an
existing export there is replaced.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .configs import ConfigError, Precision, UserError
from .files import _umask
from .methods import get_method
from .runs import LoadedRun, load_run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# our module names -> Hugging Face LlamaForCausalLM names (inside model.layers.{i}. for the per-block ones)
TOP_NAMES = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
               "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
               "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
               "mlp.down": "mlp.down_proj"}
PROBE_TEXTS = ("The state of the union is strong.", "  Hello,   world!\n\nNumbers 1234 and caf\u00e9 \u00fc.",
               "We the People of the United States, in Order to form a more perfect Union")


class ExportNote(UserWarning):
    """Something the user should know about an export that still succeeded (e.g. a tokenizer left out)."""


def _dense(module: nn.Module, where: str) -> torch.Tensor:
    """The (out, in) weight a module computes with: dense_weight() of the method layers, .weight of the rest."""
    if getattr(module, "bias", None) is not None:
        raise UserError(f"{where} has a bias, which a Llama checkpoint has no place for")
    if hasattr(module, "dense_weight"):
        with torch.no_grad():
            return module.dense_weight().detach()
    if isinstance(module, (nn.Linear, nn.Embedding)) or hasattr(module, "weight"):
        return module.weight.detach()
    raise UserError(f"cannot export {where} ({type(module).__name__}): it has no weight or dense_weight()")


def hf_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict:
    """Our LlamaForCausalLM (any method) -> a Hugging Face LlamaForCausalLM state dict of dense ``dtype`` tensors.

    Dense weights are formed in fp32 (the model's own dtype if wider) and cast once at the end."""
    state = {}

    def put(name: str, module: nn.Module, where: str) -> None:
        w = _dense(module, where)
        state[f"{name}.weight"] = w.to(dtype).contiguous().clone()

    for ours, theirs in TOP_NAMES.items():
        put(theirs, getattr(model, ours), ours)
    for i, block in enumerate(model.layers):
        for ours, theirs in BLOCK_NAMES.items():
            module = block.get_submodule(ours)
            put(f"model.layers.{i}.{theirs}", module, f"layers.{i}.{ours}")
    return state


def hf_config(run: LoadedRun, dtype: str = "fp32"):
    """A transformers LlamaConfig with the run's dimensions, rope theta, norm eps and special-token ids."""
    import transformers

    m, tok = run.cfg.model, run.tokenizer
    bos = getattr(tok._impl, "bos_token_id", None) if tok.backend == "transformers" else None
    return transformers.LlamaConfig(
        vocab_size=run.model.embed_tokens.num_embeddings, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads, head_dim=m.head_dim, hidden_act="silu",
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
        initializer_range=m.init_std, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=bos, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype], architectures=["LlamaForCausalLM"])


# ----------------------------------------------------------------------------------------------- tokenizer
def _spm_as_fast(tok):
    """A SentencePiece processor -> a transformers fast tokenizer (via transformers' converter), or None."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    sp = tok._impl

    class _Slow:  # what SpmConverter reads from a slow tokenizer
        vocab_file, legacy, add_prefix_space = None, False, True

    slow = _Slow()
    with tempfile.TemporaryDirectory() as tmp:  # the converter reads the model from a file
        slow.vocab_file = os.path.join(tmp, "spiece.model")
        Path(slow.vocab_file).write_bytes(sp.serialized_model_proto())
        try:
            fast = SpmConverter(slow).converted()
            piece = {name: (sp.id_to_piece(i) if i >= 0 else None) for name, i in
                     (("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", sp.unk_id()), ("bos", sp.bos_id()))}
            return PreTrainedTokenizerFast(tokenizer_object=fast, eos_token=piece["eos"], pad_token=piece["pad"],
                                           unk_token=piece["unk"], bos_token=piece["bos"])
        except Exception:  # noqa: BLE001 -- any converter failure means "not exportable", said in one line
            return None


def save_hf_tokenizer(tok, directory: Path, max_len: int) -> Optional[str]:
    """Save ``tok`` (a data.tokenizer.Tokenizer) so AutoTokenizer.from_pretrained(directory) gives the same ids.

    Returns None when it does, else a one-line reason why the folder has no transformers tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tok.backend == "tokenizers":
        impl = tok._impl
        hf = PreTrainedTokenizerFast(tokenizer_object=impl, eos_token=impl.id_to_token(tok.eos_id),
                                     pad_token=impl.id_to_token(tok.pad_id), model_max_length=max_len)
    elif tok.backend == "transformers":
        hf = tok._impl
    else:
        hf = _spm_as_fast(tok)
        if hf is None:
            return "its SentencePiece tokenizer could not be converted for transformers"
        hf.model_max_length = max_len
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # saved and checked aside, then moved in
        try:
            hf.save_pretrained(tmp)
            conf = Path(tmp) / "tokenizer_config.json"
            data = json.loads(conf.read_text())
            if data.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name; 4.x knows the alias
                conf.write_text(json.dumps({**data, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
            back = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
            same = all(back(t, add_special_tokens=False)["input_ids"] == tok.encode(t) for t in PROBE_TEXTS)
        except Exception:  # noqa: BLE001 -- whatever fails, the saved tokenizer is not one to ship
            same = False
        if same:
            for f in Path(tmp).iterdir():
                f.rename(directory / f.name)
            return None
    return f"its {tok.backend} tokenizer does not tokenize the same once saved for transformers"


# ----------------------------------------------------------------------------------------------- export
def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def default_out(run: LoadedRun) -> Path:
    """RUN_DIR/export for the run's latest checkpoint, RUN_DIR/export-step_NNNNNN for an earlier one."""
    if run.newest:  # not a fallback past a damaged newer checkpoint, nor one chosen by name
        return run.run_dir / "export"
    return run.run_dir / f"export-{Path(run.checkpoint).name.split('.')[0]}"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ConfigError("--out", f"{out} exists and is not an export folder (no config.json); "
                                   "choose another --out or remove it")


def _summary(run: LoadedRun) -> dict:
    path = run.run_dir / "summary.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _fmt(x, spec: str = ",") -> str:
    return "n/a" if x is None else format(x, spec)


def model_card(run: LoadedRun, state: dict, dtype: str, tokenizer_note: Optional[str], out: Path) -> str:
    """README.md of an export: method, sizes, tokens, validation perplexity and the resolved config."""
    from .config_io import to_yaml
    from .core.convert import count_parameters

    cfg, method = run.cfg, run.cfg.method
    name = getattr(method.name, "value", method.name)
    counts = count_parameters(run.model)
    summary = _summary(run)
    at_end = summary.get("steps") == run.step
    exported = sum(t.numel() for t in state.values())
    rows = [("method", name), ("model", cfg.model.name), *get_method(name).card_rows(method)]
    rows += [("parameters as trained", f"{counts['total']:,} (low-rank {counts['lowrank']:,}, sparse values "
                                       f"{counts['sparse_values']:,}, dense {counts['dense']:,})"),
             ("parameters exported (dense)", f"{exported:,}"), ("exported dtype", dtype),
             ("checkpoint", f"{Path(run.checkpoint).name} (step {run.step})"),
             ("training tokens", _fmt(summary.get("tokens")) if at_end else f"n/a for step {run.step}"),
             ("validation perplexity", _fmt(summary.get("val_ppl"), ".2f") if at_end else
              f"n/a for step {run.step} (the run's final: {_fmt(summary.get('val_ppl'), '.2f')})"),
             ("status", summary.get("status", "n/a")), ("tokenizer", run.tokenizer.name)]
    cfg_file = run.run_dir / "config.yaml"
    config = cfg_file.read_text() if cfg_file.is_file() else to_yaml(cfg)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    tok_line = (f"\n**No tokenizer in this folder:** {tokenizer_note}; use the run's tokenizer "
                f"({run.run_dir / 'tokenizer'}).\n" if tokenizer_note else "")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [{", ".join(dict.fromkeys(["llama", "sltrain", name]))}]
---
# {run.run_dir.name}: a {cfg.model.name} LLaMA trained with {name}

Exported by `sltrain export` from `{run.checkpoint}`. The method's layers were multiplied out into dense weights,
so this is a plain `LlamaForCausalLM` (no sltrain needed to load it, and no memory saving left).
{tok_line}
| | |
|---|---|
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model, tok = AutoModelForCausalLM.from_pretrained("{out}"), AutoTokenizer.from_pretrained("{out}")
ids = tok("The state of the union", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

## Training config (config.yaml)

```yaml
{config.rstrip()}
```
"""


def open_run(path: Union[str, Path], precision: Optional[Precision] = None) -> LoadedRun:
    """load_run, with a folder that is no run and a damaged or foreign file turned into one line naming RUN."""
    path = Path(path)
    if path.is_dir() and not (path / "checkpoints").is_dir() and not (path / "extra.pt").is_file():
        runs = sorted(p.name for p in path.iterdir() if (p / "checkpoints").is_dir())
        hint = f"; it holds the runs {', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}" if runs else ""
        if path.name == "checkpoints" and (path.parent / "config.yaml").is_file():
            hint = f"; the run folder is {path.parent}"
        raise ConfigError("RUN", f"{path} is not a run folder (no checkpoints/) nor a sharded checkpoint{hint}")
    try:
        return load_run(path, key="RUN", precision=precision)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- a file torch cannot read as a checkpoint, whatever the reason
        raise ConfigError("RUN", f"{path} is not a readable checkpoint ({type(err).__name__}); expected a run "
                                 "folder or RUN_DIR/checkpoints/step_NNNNNN.pt") from None


def export_command(run: Union[str, Path], out: Optional[Union[str, Path]], dtype: str) -> tuple:
    """`sltrain export`: (the folder written, the run as loaded, the notes for the user). --dtype is checked
    before the (slow) load; the dense weights are formed in fp32 and cast once."""
    import warnings

    if dtype not in DTYPES:
        raise ConfigError("--dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportNote)
        loaded = open_run(run, precision=Precision.fp32)
        path = export_run(loaded, out, dtype)
    return path, loaded, [str(n.message) for n in caught if issubclass(n.category, ExportNote)]


def export_run(path: Union[str, Path, LoadedRun], out: Optional[Union[str, Path]] = None, dtype: str = "fp32") -> Path:
    """Write a Hugging Face LlamaForCausalLM folder for a run folder or checkpoint; returns the folder.

    ``dtype`` fp32 | bf16 (dense weights are formed in fp32 either way). A tokenizer transformers cannot
    reproduce exactly is left out with an ExportNote warning (and a line in README.md)."""
    if dtype not in DTYPES:
        raise ConfigError("--dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out is not None:
        _check_out(Path(out))
    run = path if isinstance(path, LoadedRun) else open_run(path, precision=Precision.fp32)  # dense weights in fp32
    out = Path(out) if out is not None else default_out(run)
    _check_out(out)
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    state = hf_state_dict(run.model, DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _tmp_sibling(out), out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = hf_config(run, dtype)
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o666 & ~_umask())  # safetensors writes 0600; files.py's rule
        note = save_hf_tokenizer(run.tokenizer, tmp, run.cfg.model.max_seq_len)
        if note:
            run.tokenizer.save(tmp / "sltrain_tokenizer")
            note += "; the run's own tokenizer is in sltrain_tokenizer/"
        (tmp / "README.md").write_text(model_card(run, state, dtype, note, out))
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if note:
        warnings.warn(f"{out}: no transformers tokenizer: {note}", ExportNote, stacklevel=2)
    return out
