"""sltrain export / generate: a Hugging Face folder equal to the trained model, and sampling from it."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sltrain_cli.cli import app
from sltrain_cli.runs import load_run

from helpers import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
# Everything on the `runs` fixture is slow; test-fast keeps test_generation_stops_at_eos here, and the CLI export
# of a run in test_fault_matrix.test_damaged_bytes_are_found_and_the_previous_checkpoint_is_used_by_every_reader.

runner = CliRunner()
TEXTS = ["The state of the union is strong.", "We must act now, and we must act together!",
         "  In 1863,\tthe Congress met again; caf\u00e9 \u00fc\n\nNew paragraph."]
RUNS = {"full": ["method=full"], "lowrank": ["method=lowrank", "rank=8"], "sltrain": ["method=sltrain", "rank=8"],
        "sparse": ["method=sparse"], "relora": ["method=relora", "rank=8", "method.merge_every=3"]}


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, spiece):
    """One tiny 8-step run per method, plus an SLTrain run with a SentencePiece tokenizer ("spm")."""
    out = tmp_path_factory.mktemp("runs")
    extra = dict(RUNS, spm=["method=sltrain", "rank=8", "tokenizer.kind=pretrained", f"tokenizer.path={spiece[0]}"])
    made = {}
    for name, overrides in extra.items():
        result = _invoke("pretrain", "--quiet", *tiny_overrides(out, *overrides, f"run_name={name}"))
        assert result.exit_code == 0, result.output + repr(result.exception)
        made[name] = out / "pretrain" / name
    return made


@pytest.fixture(scope="module")
def exported(runs):
    """Each run exported once through the CLI with the defaults: name -> (run folder, export folder)."""
    done = {}
    for name, run_dir in runs.items():
        result = _invoke("export", run_dir)
        assert result.exit_code == 0, result.output + repr(result.exception)
        done[name] = (run_dir, run_dir / "export")
    return done


def _logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits.float()


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
@pytest.mark.parametrize("name", [*RUNS, "spm"])
def test_export_loads_in_transformers_and_equals_the_run(exported, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, out = exported[name]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".lock"]  # no temp folders left
    run = load_run(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    for text in TEXTS:
        ids = run.tokenizer.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        if tok.unk_token_id not in ids:  # SentencePiece renders an unknown piece as " \u2047 ", transformers as <unk>
            assert tok.decode(ids) == run.tokenizer.decode(ids)
        diff = (_logits(hf, ids) - _logits(run.model, ids)).abs().max()
        assert float(diff) < 1e-4, (name, text, float(diff))
    assert tok.eos_token_id == run.tokenizer.eos_id and tok.pad_token_id == run.tokenizer.pad_id

    config = json.loads((out / "config.json").read_text())
    m = run.cfg.model
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is False
    assert config["mlp_bias"] is False and config["max_position_embeddings"] == m.max_seq_len
    assert config["rms_norm_eps"] == m.rms_norm_eps and config["eos_token_id"] == run.tokenizer.eos_id
    assert config["pad_token_id"] == run.tokenizer.pad_id and config["vocab_size"] == run.tokenizer.vocab_size
    assert hf.config.rope_parameters["rope_theta"] == m.rope_theta
    card = (out / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    method = name if name != "spm" else "sltrain"
    assert f"| method | {method} |" in card and f"{summary['val_ppl']:.2f}" in card
    assert f"{summary['tokens']:,}" in card and (run_dir / "config.yaml").read_text().strip() in card


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
def test_relora_export_holds_the_merged_weight_and_the_adapter(runs):
    """The run merged (W0 moved away from its init) and its live adapter is non-zero: the export needs both."""
    from sltrain_cli.runs import build_model

    run = load_run(runs["relora"])
    model_cfg = dataclasses.replace(run.cfg.model, vocab_size=run.tokenizer.vocab_size)
    init = build_model(model_cfg, run.cfg.method, run.cfg.seed, torch.device("cpu"))  # the weights at step 0
    q, q0 = run.model.layers[0].attn.q, init.layers[0].attn.q
    assert not torch.allclose(q.weight, q0.weight) and q.B.abs().max() > 0


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
def test_bf16_export(runs, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    result = _invoke("export", runs["sltrain"], "--dtype", "bf16", "--out", out)
    assert result.exit_code == 0, result.output
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    run = load_run(runs["sltrain"])
    ids = run.tokenizer.encode(TEXTS[0])
    assert float((_logits(hf, ids) - _logits(run.model, ids)).abs().max()) < 0.1


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
def test_earlier_checkpoint_default_folder_and_reexport(runs):
    from transformers import AutoModelForCausalLM

    run_dir = runs["sltrain"]
    ckpt = run_dir / "checkpoints" / "step_000004.pt"
    result = _invoke("export", ckpt)
    assert result.exit_code == 0, result.output
    out = run_dir / "export-step_000004"
    earlier = load_run(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = earlier.tokenizer.encode(TEXTS[0])
    assert float((_logits(hf, ids) - _logits(earlier.model, ids)).abs().max()) < 1e-4
    assert "step 4" in (out / "README.md").read_text()
    again = _invoke("export", ckpt)  # replaces the earlier export in place
    assert again.exit_code == 0, again.output
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == [".lock"]  # the run's, no temp


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
def test_failed_export_leaves_no_half_folder(runs, tmp_path, monkeypatch):
    import safetensors.torch

    from sltrain_cli.export import export_run

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_run(runs["lowrank"], tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    good = tmp_path / "good"
    monkeypatch.undo()
    export_run(runs["lowrank"], good)
    before = (good / "model.safetensors").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        export_run(runs["lowrank"], good)
    assert (good / "model.safetensors").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["good"]


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_exported_files_follow_the_umask(runs, tmp_path, umask):
    """Every exported file gets 0o666 & ~umask, as every other file the project writes (files.py); the weights
    were written 0600 by safetensors."""
    import os

    previous = os.umask(umask)
    try:
        result = _invoke("export", runs["sltrain"], "--out", tmp_path / "x")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in (tmp_path / "x").rglob("*") if p.is_file()}
    assert "x/model.safetensors" in modes and "x/config.json" in modes
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
def test_unconvertible_tokenizer_is_left_out_with_a_note(runs, tmp_path, monkeypatch):
    from sltrain_cli import export as export_mod

    monkeypatch.setattr(export_mod, "_spm_as_fast", lambda tok: None)
    with pytest.warns(export_mod.ExportNote, match="no transformers tokenizer"):
        out = export_mod.export_run(runs["spm"], tmp_path / "x")
    assert not (out / "tokenizer.json").exists() and (out / "sltrain_tokenizer" / "spiece.model").is_file()
    assert "No tokenizer in this folder" in (out / "README.md").read_text()
    result = _invoke("export", runs["spm"], "--out", tmp_path / "y")
    assert result.exit_code == 0 and "note:" in result.output and "no transformers tokenizer" in result.output


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
def test_greedy_generate_is_deterministic_and_equals_transformers(exported):
    from transformers import AutoModelForCausalLM

    from sltrain_cli.infer import generate

    run_dir, out = exported["sltrain"]
    run = load_run(run_dir)
    prompt = "The state of the union"
    a = generate(run, prompt, max_new_tokens=12, temperature=0)
    assert a == generate(run, prompt, max_new_tokens=12, temperature=0) and a.startswith(prompt)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = run.tokenizer.encode(prompt)
    theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=12, do_sample=False)[0].tolist()
    assert a == run.tokenizer.decode(theirs)
    result = _invoke("generate", run_dir, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12")
    assert result.exit_code == 0 and result.output.strip() == a.strip()
    # a batch (left-padded, one cache): each row equals transformers' generate of that prompt alone
    prompts = ["We", "The Congress shall have power to lay and collect taxes", "Fellow citizens"]
    batch = generate(run, prompts, max_new_tokens=16, temperature=0)
    for text, out in zip(prompts, batch):
        ids = run.tokenizer.encode(text)
        theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=16, do_sample=False)[0].tolist()
        assert out == run.tokenizer.decode(theirs), (text, out)
    file = run_dir.parent / "prompts.txt"
    file.write_text("\n".join(prompts[1:]) + "\n\n")
    result = _invoke("generate", run_dir, "--prompt", prompts[0], "--prompts-file", file, "--temperature", "0",
                     "--max-new-tokens", "16", "--threads", "1")
    assert result.exit_code == 0 and result.output.strip() == "\n\n".join(batch).strip(), result.output


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
def test_sampling_is_seeded_and_context_is_cropped(runs):
    from sltrain_cli.infer import generate

    run = load_run(runs["sltrain"])
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=20)
    assert generate(run, "We", seed=1, **kw) == generate(run, "We", seed=1, **kw)
    long = " ".join(["the union"] * 200)  # over max_seq_len=256 tokens: the context is cropped, not refused
    assert len(run.tokenizer.encode(long)) > run.cfg.model.max_seq_len
    assert generate(run, long, max_new_tokens=2, temperature=0).startswith(long)
    assert generate(run, "", max_new_tokens=3, seed=2, temperature=1.0) is not None


def test_generation_stops_at_eos_per_row():
    from sltrain_cli.infer import generate_ids

    class Scripted(torch.nn.Module):
        """Row i says token 3 until its call number reaches after[i], then EOS (1)."""

        def __init__(self, after):
            super().__init__()
            self.w, self.after, self.calls = torch.nn.Parameter(torch.zeros(1)), after, []
            self.config = type("C", (), {"max_seq_len": 8, "num_layers": 1, "num_heads": 1, "head_dim": 1})()

        def decode(self, ids, cache, mask=None):
            cache.append(torch.ones_like(ids, dtype=torch.bool) if mask is None else mask)
            self.calls.append(ids.shape[1])
            logits = torch.zeros(ids.shape[0], 10)
            for row, after in enumerate(self.after):
                logits[row, 1 if len(self.calls) > after else 3] = 1.0
            return logits

    model = Scripted(after=[2, 4])
    assert generate_ids(model, [[5, 6, 7], [5]], 10, eos_id=1) == [[3, 3], [3, 3, 3, 3]]
    assert model.calls == [3, 1, 1, 1, 1]  # one prefill of the padded batch, then one token per step
    model = Scripted(after=[100])
    assert generate_ids(model, [[5, 6, 7]], 9, eos_id=1) == [[3] * 9]  # the 8-position cache is rebuilt once
    assert model.calls == [3, 1, 1, 1, 1, 1, 4, 1, 1]


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.slow  # uses the module's `runs`: six tiny pretrains first (~8 s)
def test_bad_input_is_one_line_exit_2(runs, tmp_path):
    _one_line_error(_invoke("export", "/nonexistent"), "RUN", "/nonexistent")
    _one_line_error(_invoke("export", runs["full"], "--dtype", "fp16"), "--dtype", "fp32", "bf16")
    (tmp_path / "empty").mkdir()
    _one_line_error(_invoke("export", tmp_path / "empty"), "RUN", "not a run folder")
    _one_line_error(_invoke("export", runs["full"].parent), "RUN", "full")  # the folder that holds the runs
    _one_line_error(_invoke("export", runs["full"] / "config.yaml"), "RUN", "checkpoint")
    _one_line_error(_invoke("export", runs["full"], "--out", runs["full"]), "--out", "not an export folder")
    _one_line_error(_invoke("generate", "/nonexistent", "--prompt", "x"), "RUN")
    _one_line_error(_invoke("generate", runs["full"], "--prompt", "x", "--temperature", "-1"), "--temperature")
    assert not Path("/nonexistent").exists()
