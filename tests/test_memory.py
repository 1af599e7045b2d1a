"""Memory estimate (paper convention and fuller figures), config loading, and measurement."""
from __future__ import annotations

from pathlib import Path

import pytest

from sltrain_cli.configs import MethodConfig, ModelConfig, UserError
from sltrain_cli.measure import measure_memory, memory_rows
from sltrain_cli.memory import _paper_recipe, estimate_memory, load_model_config

# The LLaMA shapes the paper trains (60M-1B: Table 2, 7B: Table 4 of "SLTrain: a sparse plus low-rank approach for
# parameter and memory efficient pretraining", Han et al., NeurIPS 2024, arXiv:2406.02214; the dims of GaLore's
# reference configs, which SLTrain's code reuses), written out independently of conf/, so a conf typo cannot hide.
PAPER_SHAPES = {  # hidden, intermediate, layers, heads
    "60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12), "350m": (1024, 2736, 24, 16),
    "1b": (2048, 5461, 24, 32), "7b": (4096, 11008, 32, 32),
}

# The paper's parameter (M) and estimated memory (G) cells (SLTrain, Han et al., NeurIPS 2024, arXiv:2406.02214,
# Appendix F: bf16 parameters + Adam moments, int64 indices, 1G = 1e9 B), recomputed from the configs with that
# convention: the printed cells were rounded by hand (and 60M Full / ReLoRA params misprinted). (M params, G memory).
PAPER_TABLE = {
    "full": {"60m": (58.07, 0.348), "130m": (134.11, 0.805), "350m": (367.97, 2.208), "1b": (1339.08, 8.035)},
    "lowrank": {"60m": (42.77, 0.257), "130m": (94.00, 0.564), "350m": (185.22, 1.111), "1b": (609.31, 3.656)},
    "relora": {"60m": (100.84, 0.373), "130m": (228.10, 0.832), "350m": (553.19, 1.847), "1b": (1948.39, 6.334)},
    "galore": {"60m": (58.07, 0.280), "130m": (134.11, 0.611), "350m": (367.97, 1.389), "1b": (1339.08, 4.763)},
    "sltrain": {"60m": (43.53, 0.267), "130m": (96.55, 0.600), "350m": (194.29, 1.238), "1b": (645.55, 4.163)},
}


def paper_cfg(size: str) -> ModelConfig:
    d, m, L, h = PAPER_SHAPES[size]
    return ModelConfig(name=f"llama_{size}", hidden_size=d, intermediate_size=m, num_layers=L, num_heads=h,
                       vocab_size=32000)


@pytest.mark.parametrize("method", list(PAPER_TABLE))
@pytest.mark.parametrize("size", ["60m", "130m", "350m", "1b"])
def test_paper_table_reproduced(method, size):
    params_m, mem_g = PAPER_TABLE[method][size]
    r = estimate_memory(paper_cfg(size), method, vocab_size=32000)  # rank/delta from the paper preset
    assert r["params_total"] / 1e6 == pytest.approx(params_m, abs=0.05)
    assert r["total_mem_gb"] == pytest.approx(mem_g, abs=0.01)
    assert r["total_mem_gb"] == pytest.approx(r["param_mem_gb"] + r["optimizer_mem_gb"])


def test_paper_convention_details():
    cfg = paper_cfg("60m")
    sl = estimate_memory(cfg, "sltrain", 128, 0.03)
    lr = estimate_memory(cfg, "lowrank", 128)
    full = estimate_memory(cfg, "full")
    # SLTrain's count includes the sparse values, not the indices; its memory includes int64 indices.
    nnz = sl["index_entries"]
    assert nnz == 8 * sum(int(0.03 * o * i) for o, i in [(512, 512)] * 4 + [(1376, 512)] * 3)
    assert sl["params_total"] == lr["params_total"] + nnz
    assert sl["param_mem_gb"] * 1e9 == 2 * sl["params_total"] + 8 * nnz
    # paper figures ignore the fuller options; fuller figures follow them
    sl32 = estimate_memory(cfg, "sltrain", 128, 0.03, index_dtype="int32", optimizer="adamw8bit")
    assert sl32["total_mem_gb"] == sl["total_mem_gb"]
    assert sl["full_param_mem_gb"] - sl32["full_param_mem_gb"] == pytest.approx(4 * nnz / 1e9)
    assert sl32["full_optimizer_mem_gb"] < sl["full_optimizer_mem_gb"] / 1.9
    # ReLoRA's real model is full + adapters; the paper adds the whole low-rank model
    rl = estimate_memory(cfg, "relora", 128)
    assert rl["params_total"] == full["params_total"] + lr["params_total"]
    assert rl["model_params_trainable"] == lr["params_trainable"]
    adapters = 8 * (4 * 2 * 128 * 512 + 3 * 128 * (512 + 1376))
    assert rl["model_params_total"] == full["params_total"] + adapters
    # sparse is rank 0: embeddings, head, norms and the sparse values only
    sp = estimate_memory(cfg, "sparse", 999, 0.03)
    assert sp["rank"] == 0 and sp["params_total"] == 2 * 32000 * 512 + (2 * 8 + 1) * 512 + nnz


def test_fuller_figures():
    cfg = paper_cfg("60m")
    full = estimate_memory(cfg, "full", optimizer="adamw")
    n = full["params_total"]
    assert full["full_param_mem_gb"] * 1e9 == 2 * n
    assert full["full_grad_mem_gb"] * 1e9 == 2 * n
    n_tensors = 2 + 8 * 9 + 1  # embed, head, final norm; per block 2 norms + 7 matrices
    assert full["full_optimizer_bytes"] == 4 * n + 4 * n_tensors  # bf16 moments + fp32 step per tensor
    fp32 = estimate_memory(cfg, "full", param_bytes=4)
    assert fp32["full_optimizer_bytes"] == 8 * n + 4 * n_tensors and fp32["total_mem_gb"] == full["total_mem_gb"]
    lw = estimate_memory(cfg, "full", layerwise=True)
    assert lw["full_grad_mem_gb"] * 1e9 == 2 * 32000 * 512  # the largest single gradient (embedding)
    # 8-bit: 1 B per moment entry + fp32 absmax per 256 block; norms (< 4096 entries) stay fp32
    b8 = estimate_memory(cfg, "full", optimizer="adamw8bit")
    big = [32000 * 512] * 2 + [512 * 512] * 32 + [1376 * 512] * 24
    expect = sum(2 * (k + 4 * -(-k // 256)) for k in big) + (2 * 8 + 1) * 512 * 8 + 2 * 256 * 4
    assert b8["full_optimizer_bytes"] == expect
    # activations grow with tokens (less than in proportion: the loss holds one chunk of at most 524 rows of fp32
    # logits at 32000 vocab, 255 rows at batch 1) and shrink with checkpointing
    a1 = estimate_memory(cfg, "full", batch_size=1)["activation_mem_gb"]
    a4 = estimate_memory(cfg, "full", batch_size=4)["activation_mem_gb"]
    ac = estimate_memory(cfg, "full", batch_size=4, activation_checkpointing=True)["activation_mem_gb"]
    assert 2 * a1 < a4 < 4 * a1 and ac < a4
    for r in (full, b8, lw):  # the peak over phases: at least params + state + the larger of the two
        base = r["full_param_mem_gb"] + r["full_optimizer_mem_gb"]
        every = sum(r[k] for k in ("full_grad_mem_gb", "activation_mem_gb", "workspace_mem_gb", "step_temp_mem_gb"))
        assert base + max(r["activation_mem_gb"], r["full_grad_mem_gb"]) <= r["full_total_gb"] + 1e-12
        assert r["full_total_gb"] <= base + every + 1e-12
        assert r["peak_phase"] in ("loss", "backward_start", "backward_end", "optimizer_step")
    # on CUDA, torch AdamW's foreach step keeps one sqrt(v) list: params + grads + 2 moments + 1 = 5 x bf16
    assert full["full_total_gb"] == pytest.approx(10 * n / 1e9 + 4 * n_tensors / 1e9)


@pytest.mark.parametrize("method,optimizer,layerwise,paper_gb,tol", [
    ("full", "adamw", False, 67.4, 0.02), ("full", "adamw8bit", True, 29.4, 0.05),
    ("galore", "adamw8bit", True, 22.0, 0.05), ("sltrain", "adamw8bit", True, 18.3, 0.10)])
def test_figure3_7b(method, optimizer, layerwise, paper_gb, tol):
    """The fuller estimate reproduces the paper's measured 7B peaks (Figure 3, batch 1, A100).
    The 350M / 1B columns are not reproduced (measured 1.2-2.2x our estimate); see memory.py."""
    r = estimate_memory(paper_cfg("7b"), method, optimizer=optimizer, layerwise=layerwise, device="cuda")
    assert r["full_total_gb"] == pytest.approx(paper_gb, rel=tol)


def test_estimate_for_7b_builds_nothing_real():
    # the estimate counts a model built on the meta device: a real 7B build would need ~27 GB (fp32 weights alone);
    # the process's peak resident set may not grow by even 1 GB (a memory bound, not a timing assert)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rows = [estimate_memory(paper_cfg("7b"), m, optimizer="adamw8bit", layerwise=True)
            for m in ("full", "lowrank", "relora", "galore", "sltrain", "sparse")]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2 ** 20
    assert all(r["full_total_gb"] > 0 for r in rows)


def test_bad_inputs():
    cfg = paper_cfg("60m")
    with pytest.raises(UserError, match="--method"):
        estimate_memory(cfg, "dense")
    with pytest.raises(UserError, match="--rank"):
        estimate_memory(cfg, "lowrank", 0)
    with pytest.raises(UserError, match="--rank"):
        estimate_memory(cfg, "sltrain", 4096)
    with pytest.raises(UserError, match="--delta"):
        estimate_memory(cfg, "sltrain", 8, 1.5)
    with pytest.raises(UserError, match="--optimizer: must be one of adamw, adamw8bit"):
        estimate_memory(cfg, "full", optimizer="sgd")
    # one vocabulary (optim=adamw | adamw8bit); the first spelling of this command still means the same
    assert estimate_memory(cfg, "full", optimizer="adam8bit") == estimate_memory(cfg, "full", optimizer="adamw8bit")
    with pytest.raises(UserError, match="--index-dtype"):
        estimate_memory(cfg, "sltrain", index_dtype="int16")


def test_load_model_config_unknown():
    with pytest.raises(UserError, match=r"--size: unknown model 'x'; choose from .*60m"):
        load_model_config("x")


@pytest.mark.parametrize("size", list(PAPER_SHAPES))
def test_load_model_config_matches_paper(size):
    for alias in (size, size.upper(), f"llama_{size}"):
        cfg = load_model_config(alias)
        d, m, L, h = PAPER_SHAPES[size]
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads) == (d, m, L, h)
        assert cfg.vocab_size == 32000


def test_sources_cite_the_paper_not_a_file_outside_the_repository():
    """Issue 20: `sltrain list` (the conf/ comments) and README.md cited a notes file that the repository does not hold;
    they cite the paper itself (SLTrain, Han et al., NeurIPS 2024, arXiv:2406.02214)."""
    from sltrain_cli.catalog import group_rows

    missing = "PAPER" + ".md"  # spelled apart so that this file does not cite it either
    rows = group_rows("models") + group_rows("experiments")
    assert not [r["option"] for r in rows if missing in r["description"]]
    assert not [r["option"] for r in rows if r["option"] != "tiny" and "arXiv:2406.02214" not in r["description"]]
    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *root.glob("conf/**/*.yaml"), *root.glob("sltrain_cli/**/*.py"),
             *root.glob("tests/*.py"), *root.glob("benchmarks/*")]
    assert not [str(p.relative_to(root)) for p in files if p.is_file() and missing in p.read_text()]


def test_load_model_config_env(tmp_path, monkeypatch):
    import shutil

    tmp_path = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", tmp_path)  # a conf/ with a model of its own
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\nhidden_size: 32\nnum_heads: 2\n")
    monkeypatch.setenv("SLTRAIN_CONF_DIR", str(tmp_path))
    assert load_model_config("mine").hidden_size == 32
    (tmp_path / "model" / "bad.yaml").write_text("name: bad\nhiden_size: 32\n")
    with pytest.raises(UserError, match="hiden_size"):
        load_model_config("bad")


def test_memory_rows_all():
    rows = memory_rows("60m", "all", None, None, "adamw", False, "int64", 1, 256, False, False, None)
    assert [r["method"] for r in rows] == ["full", "lowrank", "relora", "galore", "sltrain", "sparse", "apollo", "fira"]
    sl = next(r for r in rows if r["method"] == "sltrain")
    assert {"rank": sl["rank"], "delta": sl["delta"]} == _paper_recipe("60m")  # conf/experiment/paper_60m.yaml
    assert sl["device"] == "cuda" and all("measured_gb" not in r for r in rows)
    assert memory_rows("llama_60m", "sltrain", 64, 0.1)[0]["rank"] == 64


# ----------------------------------------------------------------------------- against the real core
torch = pytest.importorskip("torch")
METHODS = ["full", "lowrank", "sltrain", "sparse", "relora", "galore"]


def _model(cfg, method, rank, device=None, dtype=None):
    from sltrain_cli.core.convert import apply_method
    from sltrain_cli.core.model import LlamaForCausalLM

    mcfg = MethodConfig(name=method, rank=0 if method == "sparse" else rank, delta=0.03)
    if device == "meta":
        with torch.device("meta"):
            return apply_method(LlamaForCausalLM(cfg), mcfg), mcfg
    torch.manual_seed(0)
    return apply_method(LlamaForCausalLM(cfg), mcfg).to(dtype or torch.float32), mcfg


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size,rank", [("tiny", 16), ("60m", 128)])
def test_counts_match_real_model(size, rank, method):
    from sltrain_cli.core.convert import count_parameters

    cfg = load_model_config(size)
    model, _ = _model(cfg, method, rank, device="meta")
    c = count_parameters(model)
    e = estimate_memory(cfg, method, rank, 0.03)
    assert (c["total"], c["trainable"], c["indices"]) == (
        e["model_params_total"], e["model_params_trainable"], e["index_entries"])
    if method != "relora":  # ReLoRA's paper count adds the whole low-rank model (embeddings twice)
        assert (c["total"], c["trainable"]) == (e["params_total"], e["params_trainable"])


def _real_state_bytes(cfg, method, optim, layerwise, dtype):
    from sltrain_cli.configs import OptimConfig
    from sltrain_cli.core.optim import LayerwiseOptimizer, build_optimizer, optimizer_state_bytes

    model, mcfg = _model(cfg, method, 16, dtype=dtype)
    ocfg = OptimConfig(name=optim, grad_clip=0.0)
    opt = LayerwiseOptimizer(model, ocfg, mcfg) if layerwise else build_optimizer(model, ocfg, mcfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    model(ids, labels=ids).loss.backward()  # layer-wise: the hooks step inside backward
    if not layerwise:
        opt.step()
    return optimizer_state_bytes(opt)


CASES = ([(m, "adamw", False, torch.float32) for m in METHODS]
         + [("sltrain", "adamw", False, torch.bfloat16), ("galore", "adamw", True, torch.float32),
            ("apollo", "adamw", False, torch.float32), ("apollo", "adamw", False, torch.bfloat16),
            ("fira", "adamw", False, torch.float32), ("fira", "adamw", True, torch.bfloat16),
            ("full", "adamw8bit", False, torch.float32), ("sltrain", "adamw8bit", True, torch.float32),
            ("galore", "adamw8bit", False, torch.float32), ("galore", "adamw8bit", True, torch.bfloat16)])
SLOW_CASES = [(m, o, lw, dt) for m in METHODS for o in ("adamw", "adamw8bit") for lw in (False, True)
              for dt in (torch.float32, torch.bfloat16) if (m, o, lw, dt) not in CASES]


def _check_state(method, optim, layerwise, dtype):
    if optim == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    cfg = load_model_config("tiny")
    got = _real_state_bytes(cfg, method, optim, layerwise, dtype)
    e = estimate_memory(cfg, method, 16, 0.03, optimizer="adamw8bit" if optim == "adamw8bit" else "adamw",
                        layerwise=layerwise, param_bytes=dtype.itemsize)
    assert got == e["full_optimizer_bytes"]


@pytest.mark.parametrize("method,optim,layerwise,dtype", CASES)
def test_optimizer_state_matches_real(method, optim, layerwise, dtype):
    _check_state(method, optim, layerwise, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("method,optim,layerwise,dtype", SLOW_CASES)
def test_optimizer_state_matches_real_all(method, optim, layerwise, dtype):
    _check_state(method, optim, layerwise, dtype)


@pytest.mark.parametrize("layerwise,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_galore_8bit_state_matches_estimate(layerwise, dtype):
    """8-bit GaLore with projected moments large enough to be 8-bit (tiny's are not at rank 16): R of q/k/v/o
    is 128 x 32 = 4096 entries, of gate/up/down 352 x 32; embeddings 8-bit, norms fp32."""
    pytest.importorskip("bitsandbytes")
    from sltrain_cli.configs import OptimConfig
    from sltrain_cli.core.convert import apply_method
    from sltrain_cli.core.model import LlamaForCausalLM
    from sltrain_cli.core.optim import LayerwiseOptimizer, build_optimizer, optimizer_state_bytes

    cfg = ModelConfig(name="small", hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                      vocab_size=512)
    mcfg = MethodConfig(name="galore", rank=32)
    torch.manual_seed(0)
    model = apply_method(LlamaForCausalLM(cfg), mcfg).to(dtype)
    ocfg = OptimConfig(name="adamw8bit", grad_clip=0.0)
    opt = LayerwiseOptimizer(model, ocfg, mcfg) if layerwise else build_optimizer(model, ocfg, mcfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    model(ids, labels=ids).loss.backward()
    if not layerwise:
        opt.step()
    q = model.layers[0].attn.q.weight
    assert opt.state[q]["state1"].dtype == torch.uint8
    e = estimate_memory(cfg, "galore", 32, 0.03, optimizer="adamw8bit", layerwise=layerwise,
                        param_bytes=dtype.itemsize)
    assert optimizer_state_bytes(opt) == e["full_optimizer_bytes"]


def test_measure_tiny_cpu():
    cfg = load_model_config("tiny")
    r = measure_memory(cfg, MethodConfig(name="sltrain", rank=16, delta=0.03), batch_size=1, seq_len=64,
                       steps=2, device="cpu", precision="bf16-pure")
    assert r["peak_bytes"] > 0 and r["measure_kind"] == "cpu_profiler_alloc_peak"
    e = estimate_memory(cfg, "sltrain", 16, 0.03, batch_size=1, seq_len=64, device="cpu")
    assert 0.85 < r["measured_gb"] / e["full_total_gb"] < 1.15


@pytest.mark.parametrize("batch_size,seq_len", [(1, 256), (4, 128)])
def test_measure_tiny_with_a_full_vocab_matches_estimate(batch_size, seq_len):
    """Issue 20: `memory-estimate --size tiny --measure` (batch 1 x 256) measured 0.77 of our estimate. The estimate
    still counted the unchunked fp32 cross-entropy (12 B x tokens x vocab), which core/model.py's chunked loss never
    holds; at a 32000 vocab that term is most of a small model's peak (the peak phase here is the loss)."""
    cfg = load_model_config("tiny")
    assert cfg.vocab_size == 32000
    r = measure_memory(cfg, MethodConfig(name="sltrain", rank=16, delta=0.03), batch_size=batch_size,
                       seq_len=seq_len, steps=2, device="cpu", precision="bf16-pure")
    e = estimate_memory(cfg, "sltrain", 16, 0.03, batch_size=batch_size, seq_len=seq_len, device="cpu")
    assert e["peak_phase"] == "loss"
    assert 0.95 < r["measured_gb"] / e["full_total_gb"] < 1.05  # measured 1.001 and 1.000


@pytest.mark.parametrize("method,rank", [("sltrain", 128), ("sparse", 0)])
def test_factored_kernel_cache_matches_real(method, rank):
    """Layers that `auto` puts on the factored kernel keep their CSR plan (12 B per nonzero at int32): counted to
    the byte (it was missing: sltrain / sparse at 60m-130m measured 1.02-1.06 of our estimate)."""
    from sltrain_cli.core.convert import apply_method
    from sltrain_cli.core.model import LlamaForCausalLM
    from sltrain_cli.core.sparse_lowrank import SparseLowRankLinear, choose_kernels

    cfg = ModelConfig(name="w", hidden_size=512, intermediate_size=1376, num_layers=2, num_heads=8, vocab_size=512)
    torch.manual_seed(0)
    model = apply_method(LlamaForCausalLM(cfg), MethodConfig(name=method, rank=rank, delta=0.03)).to(torch.bfloat16)
    kernels = choose_kernels(model, 256, torch.bfloat16, "cpu")  # what a layer's first call picks at 256 tokens
    assert "factored" in kernels.values()  # (sparse keeps 512->512 on compose: a mix)
    kept = 0
    for layer in model.modules():
        if isinstance(layer, SparseLowRankLinear) and layer.chosen_kernel == "factored":
            plan = layer._csr.plan(layer.indices, layer.out_features, layer.in_features)
            kept += sum(t.numel() * t.element_size() for t in (plan.crow, plan.col, plan.t_crow, plan.t_col,
                                                                plan.t_perm, plan.perm) if t is not None)
    e = estimate_memory(cfg, method, rank, 0.03, batch_size=1, seq_len=256, device="cpu")
    assert kept > 0 and e["kernel_cache_mem_gb"] * 1e9 == kept
    # at 4 x 256 tokens every layer runs compose, which keeps nothing
    assert estimate_memory(cfg, method, rank, 0.03, batch_size=4, seq_len=256, device="cpu")["kernel_cache_mem_gb"] == 0


SETTINGS = [("adamw", False, False, "bf16-pure"), ("adamw", False, True, "fp32"),
            ("adamw8bit", True, False, "bf16-pure")]


@pytest.mark.slow
@pytest.mark.parametrize("method,optimizer,layerwise,ckpt,precision", [
    (m, *s) for s in SETTINGS for m in METHODS])
def test_measure_close_to_estimate(method, optimizer, layerwise, ckpt, precision):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    from sltrain_cli.configs import ModelConfig as MC

    cfg = MC(name="small", hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, vocab_size=512)
    kw = dict(optimizer=optimizer, layerwise=layerwise, batch_size=4, seq_len=128, activation_checkpointing=ckpt)
    r = measure_memory(cfg, MethodConfig(name=method, rank=0 if method == "sparse" else 16, delta=0.03),
                       steps=2, device="cpu", precision=precision, **kw)
    e = estimate_memory(cfg, method, 16, 0.03, device="cpu", param_bytes=2 if precision == "bf16-pure" else 4, **kw)
    assert 0.85 < r["measured_gb"] / e["full_total_gb"] < 1.15


def test_memory_rows_measure_tiny():
    rows = memory_rows("tiny", "lowrank", 8, None, "adamw", False, "int64", 1, 32, False, True, "cpu")
    assert rows[0]["measured_gb"] > 0 and rows[0]["ratio"] > 0 and rows[0]["device"] == "cpu"


def test_memory_rows_measure_refused_keeps_row(monkeypatch):
    import sltrain_cli.measure as measure

    def refuse(*args, **kwargs):
        raise UserError("method=galore: refused here")

    monkeypatch.setattr(measure, "measure_memory", refuse)  # a setting the core refuses
    rows = memory_rows("tiny", "galore", 8, None, "adamw8bit", False, "int64", 1, 32, False, True, "cpu")
    assert rows[0]["measured_gb"] is None and "galore" in rows[0]["measure_error"]
    assert rows[0]["full_total_gb"] > 0


# ----------------------------------------------------------------------------- through the CLI
def _cli(*args):
    from typer.testing import CliRunner

    from sltrain_cli.cli import app

    return CliRunner().invoke(app, ["memory-estimate", *args])


def test_memory_estimate_cli_formats_and_out(tmp_path):
    import io
    import json

    import pandas as pd

    result = _cli("--size", "60m", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["method"] for r in rows] == ["full", "lowrank", "relora", "galore", "sltrain", "sparse", "apollo", "fira"]
    by_method = {r["method"]: r for r in rows}
    for method, sizes in PAPER_TABLE.items():  # the paper's numbers, through the command line
        params_m, mem_g = sizes["60m"]
        assert by_method[method]["params_total"] / 1e6 == pytest.approx(params_m, abs=0.05), method
        assert by_method[method]["total_mem_gb"] == pytest.approx(mem_g, abs=0.0015), method
        assert by_method[method]["size"] == "60m"

    csv = _cli("--size", "60m", "--format", "csv")
    assert csv.exit_code == 0, csv.output
    df = pd.read_csv(io.StringIO(csv.stdout))
    assert df["method"].tolist() == [r["method"] for r in rows]
    assert df["params_total"].tolist() == [r["params_total"] for r in rows]
    assert df["total_mem_gb"].tolist() == pytest.approx([r["total_mem_gb"] for r in rows])

    md = _cli("--size", "60m", "--format", "md")
    assert md.exit_code == 0, md.output
    lines = [line for line in md.stdout.splitlines() if line.startswith("|")]
    assert lines[0].split("|")[1].strip() == "method" and set(lines[1]) <= set("|-: ")
    assert [line.split("|")[1].strip() for line in lines[2:]] == [r["method"] for r in rows]

    # --size picks the model, --method one row; --out writes the table in the format its suffix names
    for suffix in ("json", "csv", "md"):
        out = tmp_path / f"mem.{suffix}"
        one = _cli("--size", "7b", "--method", "sltrain", "--format", "json", "--out", str(out))
        assert one.exit_code == 0, one.output
        (row,) = json.loads(one.stdout)
        assert row["method"] == "sltrain" and row["size"] == "7b" and row["params_total"] > 50 * rows[4]["params_total"]
        text = out.read_text()
        if suffix == "json":
            assert json.loads(text) == [row]
        elif suffix == "csv":
            assert pd.read_csv(out)["params_total"].tolist() == [row["params_total"]]
        else:
            assert text.startswith("| method |") and f"{row['params_total']:,}" in text


@pytest.mark.parametrize("args, key", [(["--method", "dense"], "--method"), (["--size", "huge"], "--size"),
                                       (["--format", "xml"], "--format")])
def test_memory_estimate_cli_bad_input_exits_2(tmp_path, args, key):
    result = _cli(*args, "--out", str(tmp_path / "t.csv"))
    assert result.exit_code == 2, result.output
    assert key in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t.csv").exists()


def _one_line_exit_2(result, *words):
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output and result.stdout == "", result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_measure_on_cuda_without_cuda_is_one_line_exit_2(tmp_path):
    """Issue 20: --device cuda --measure on a machine without CUDA printed torch's traceback."""
    result = _cli("--size", "tiny", "--device", "cuda", "--measure", "--out", str(tmp_path / "t.csv"))
    _one_line_exit_2(result, "error: --device:", "cuda is not available on this machine", "--device cpu")
    assert not (tmp_path / "t.csv").exists()


def test_measure_on_an_unknown_or_absent_device_is_one_line_exit_2(monkeypatch):
    _one_line_exit_2(_cli("--size", "tiny", "--device", "tpu", "--measure"), "--device", "auto, cpu or cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, as far as the check sees
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _one_line_exit_2(_cli("--size", "tiny", "--device", "cuda:3", "--measure"), "--device", "cuda:3", "cuda:0")
