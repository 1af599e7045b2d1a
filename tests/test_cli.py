"""The command line as a new user meets it: an installed wheel, mistyped presets, `sltrain list`, --version,
help that fits 80 columns, a config that marks what the method ignores, quiet output."""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from sltrain_cli.catalog import description, group_rows, summary_view, without_unused
from sltrain_cli.cli import app
from sltrain_cli.compose import GROUPS, group_options, load_config
from sltrain_cli.config_io import from_container, read_config_file, to_container, to_yaml, unused_method_keys
from sltrain_cli.configs import MethodConfig
from sltrain_cli.methods import get_method, method_names

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(typer.main.get_command(app).commands)


def _lines(output: str) -> list:
    return [line for line in output.strip().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ 1. an installed wheel works
@pytest.mark.slow  # pip wheel + pip install into a folder, then a subprocess: ~3-4 s
def test_wheel_ships_conf_and_composes_outside_the_checkout(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("sltrain_cli", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("sltrain-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    conf = {f"sltrain_cli/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    code = {str(p.relative_to(ROOT)) for p in (ROOT / "sltrain_cli").rglob("*.py")}
    assert conf <= shipped and code <= shipped, sorted((conf | code) - shipped)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SLTRAIN_CONF_DIR"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    probe = ("import sltrain_cli, sltrain_cli.compose as c\n"
             "print(sltrain_cli.__file__); print(c.conf_dir())\n"
             "print(c.load_config(['model=llama_60m', 'experiment=paper_60m']).model.hidden_size)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=away, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    module, conf_dir, hidden = out.stdout.split()
    assert module.startswith(str(tmp_path / "site")) and conf_dir == str(tmp_path / "site/sltrain_cli/conf")
    assert hidden == "512"
    out = subprocess.run([sys.executable, "-m", "sltrain_cli", "--version"], cwd=away, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"sltrain {version('sltrain')}", out.stderr


def test_conf_dir_env_override(tmp_path, monkeypatch):
    from sltrain_cli.compose import conf_dir

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "conf/model/mine.yaml").write_text("# Mine.\nname: mine\nhidden_size: 96\n")
    monkeypatch.setenv("SLTRAIN_CONF_DIR", str(tmp_path / "conf"))
    assert conf_dir() == tmp_path / "conf" and load_config(["model=mine"]).model.hidden_size == 96
    monkeypatch.setenv("SLTRAIN_CONF_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["pretrain", "--print-config"])
    assert result.exit_code == 2 and _lines(result.output)[0].startswith("error: SLTRAIN_CONF_DIR: no config.yaml")


# ------------------------------------------------------------------------------ 2. a mistyped preset is an error
@pytest.mark.parametrize("override", ["experiment=foo", "experiment=paper_60", "+experiment=paper_60"])
def test_unknown_experiment_is_one_line_exit_2(tmp_path, override):
    result = CliRunner().invoke(app, ["pretrain", override, f"out_dir={tmp_path}"])
    assert result.exit_code == 2, result.output
    lines = _lines(result.output)
    presets = ", ".join(group_options("experiment"))
    assert lines == [f"error: experiment: unknown option {override.split('=')[1]!r}; choose from {presets}"]
    assert not any(tmp_path.iterdir()), "no run folder may be left behind"


# ------------------------------------------------------------------------------ 5. discoverable configs
def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sltrain {version('sltrain')}"


@pytest.mark.parametrize("group,conf,cells", [
    ("models", "model", {"llama_60m": ["512", "1376", "8"], "tiny": ["64", "176", "2"]}),
    ("methods", "method", {"sltrain": ["64", "0.03", "32"], "galore": ["64", "update_proj_gap=200"]}),
    ("data", "data", {"sotu": ["256"], "local": []}),
    ("optim", "optim", {"adamw": ["0.001"], "adamw8bit": ["sltrain[bnb]"]}),
    ("experiments", "experiment", {"paper_60m": ["llama_60m", "c4", "128", "11,000", "bf16-pure"]}),
])
def test_list_group(group, conf, cells):
    result = CliRunner().invoke(app, ["list", group])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
    assert sorted(rows) == group_options(conf)
    for option in group_options(conf):
        text = description(conf, option)
        assert text and not text.startswith("@package") and text in rows[option], (option, text)
    for option, values in cells.items():
        shown = [c.strip() for c in rows[option].split("│")]
        assert all(v in shown or any(v in c for c in shown) for v in values), (option, shown)


def test_list_shows_rank_delta_only_where_used():
    rows = {r["option"]: r for r in group_rows("methods")}
    assert (rows["full"]["rank"], rows["full"]["delta"]) == (None, None)
    assert rows["sparse"]["rank"] is None and rows["sparse"]["delta"] == 0.1
    assert rows["lowrank"]["delta"] is None and rows["sltrain"]["rank"] == 64


def test_list_all_and_unknown_group():
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0
    for group in GROUPS:
        assert f"{group}=OPTION" in result.output
    result = CliRunner().invoke(app, ["list", "model"])  # the folder name works too
    assert result.exit_code == 0 and "llama_60m" in result.output
    result = CliRunner().invoke(app, ["list", "modles"])
    assert result.exit_code == 2
    assert _lines(result.output) == ["error: group: unknown config group 'modles'; choose from models, methods, "
                                     "data, optim, train, experiments"]


def _help(args):
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_fits_80_columns(command):
    text = _help([command] if command else [])
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)
    assert "…" not in text, text  # rich cut something


def test_root_help_names_list_and_version():
    text = _help([])
    assert "--version" in text and "sltrain list" in text and " list " in text


@pytest.mark.parametrize("command,groups", [("pretrain", GROUPS), ("sweep", GROUPS), ("ablate-support", GROUPS),
                                            ("eval-ppl", ("data",)), ("memory-estimate", ("model",))])
def test_help_names_config_groups_and_options(command, groups):
    text = " ".join(_help([command]).split())  # options wrap over lines
    for group in groups:
        assert f" {group} " in text and ", ".join(group_options(group)) in text, group


def test_ablate_support_help_documents_every_study_key():
    from sltrain_cli.ablate import ALL_OWN, STUDIES

    text = _help(["ablate-support"])
    for key in ALL_OWN:
        assert f" {key}=" in text, key
    for study in STUDIES:
        assert f"study={study}" in text, study


# ------------------------------------------------------------------------------ 6. the config shows what is used
@pytest.mark.parametrize("method,unused", [("full", {"rank", "delta"}), ("lowrank", {"delta"}),
                                           ("relora", {"delta"}), ("galore", {"delta"}), ("sparse", {"rank"}),
                                           ("sltrain", set())])
def test_print_config_marks_keys_the_method_ignores(method, unused):
    result = CliRunner().invoke(app, ["pretrain", f"method={method}", "--print-config"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    section = lines[lines.index("method:"):]
    for key in ("rank", "delta"):
        row = next(i for i, line in enumerate(section) if line.startswith(f"  {key}: "))
        marked = section[row - 1].startswith(f"  # (unused by method={method}) ")
        assert marked == (key in unused), (key, section[row - 1])
    assert {"rank", "delta"} & set(unused_method_keys(MethodConfig(name=method))) == unused


def test_method_keys_name_real_fields():
    fields = set(MethodConfig.__dataclass_fields__)
    assert set(method_names()) == {m.value for m in type(MethodConfig().name)}
    assert all(set(get_method(n).keys) <= fields for n in method_names())


def test_marked_config_round_trips(tmp_path):
    cfg = load_config(["method=full", "rank=8", "delta=0.2", "model=tiny"])  # values the method ignores stay
    text = to_yaml(cfg)
    assert "  # (unused by method=full) r of B (out, r) @ A (r, in); 0 = no low-rank part" in text.splitlines()
    assert from_container(yaml.safe_load(text)) == cfg
    (tmp_path / "config.yaml").write_text(text)
    stored = read_config_file(tmp_path / "config.yaml")
    assert stored == to_container(cfg) and stored["method"]["rank"] == 8


SUMMARY = {"run": "r", "model": "tiny", "method": "full", "rank": 128, "delta": 0.03, "vocab_size": 512,
           "params_total": 10, "params_trainable": 10, "tokens": 64, "val_ppl": 400.0, "tokens_per_s": 1.0,
           "peak_mem_bytes": 563_077_120, "peak_mem_kind": "cpu_peak_rss", "est_mem_gb": 0.0014,
           "status": "completed"}


@pytest.mark.parametrize("method,shown", [("full", set()), ("sparse", {"delta"}), ("galore", {"rank"}),
                                          ("sltrain", {"rank", "delta"})])
def test_summary_shows_rank_delta_only_where_used(method, shown):
    view = summary_view({**SUMMARY, "method": method})
    assert {"rank", "delta"} & set(view) == shown
    assert view["vocab_size (tokenizer)"] == 512
    assert view["memory GB, measured (process peak RSS)"] == 0.563
    assert view["memory GB, estimate (params + Adam states, bf16)"] == 0.0014
    assert not [k for k in view if "bytes" in k]  # one unit
    row = without_unused({"method": method, "rank": 128, "delta": 0.03})
    assert {k for k in ("rank", "delta") if row[k] is not None} == shown


def test_memory_estimate_table_blanks_unused_rank():
    result = CliRunner().invoke(app, ["memory-estimate", "--size", "60m"])
    assert result.exit_code == 0, result.output
    rows = {c[1].strip(): [x.strip() for x in c] for c in (line.split("│") for line in result.output.splitlines())
            if len(c) > 4}
    assert rows["full"][2:4] == ["-", "-"] and rows["sparse"][2] == "-" and rows["sltrain"][2] != "-"


# ------------------------------------------------------------------------------ 10. quiet output
def _python(code: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


@pytest.mark.slow  # a Python subprocess importing torch: ~3 s
def test_measure_prints_no_profiler_lines():
    out = _python("""
        from sltrain_cli.configs import MethodConfig, ModelConfig
        from sltrain_cli.measure import measure_memory
        r = measure_memory(ModelConfig(vocab_size=128, max_seq_len=16), MethodConfig(name="sltrain", rank=4),
                           steps=1, seq_len=8, device="cpu")
        print(r["peak_bytes"] > 0)
    """)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
    assert "USDT" not in out.stderr and "STAGE" not in out.stderr, out.stderr


@pytest.mark.slow  # a gloo process group in-process (~3.5 s); the torchrun tests cover DDP end to end
def test_ddp_wrap_warns_nothing_and_keeps_buffers_rank_local():
    out = _python("""
        import os, tempfile, warnings
        import torch, torch.distributed as dist
        from sltrain_cli import distributed
        dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp()), rank=0, world_size=1)
        rt = distributed.Runtime(0, 2, 0, torch.device("cpu"), True)  # two ranks as far as wrap can tell
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = distributed.wrap(torch.nn.Linear(4, 4), rt, fsdp=False)
        print(getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers))
        print([str(w.message) for w in caught])
        dist.destroy_process_group()
    """)
    assert out.returncode == 0, out.stderr
    sync, caught = out.stdout.strip().splitlines()
    assert sync == "False" and caught == "[]", out.stdout


@pytest.mark.slow  # a Python subprocess importing torch: ~3 s
def test_single_process_load_of_a_sharded_checkpoint_warns_nothing(tmp_path):
    out = _python(f"""
        import warnings
        import torch, torch.distributed.checkpoint as dcp
        from sltrain_cli.checkpoint import load_model_weights
        path = {str(tmp_path / "step_000001")!r}
        model = torch.nn.Linear(3, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({{"model": model.state_dict()}}, checkpoint_id=path, no_dist=True)
        torch.save({{"step": 1}}, path + "/extra.pt")
        other = torch.nn.Linear(3, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            extra = load_model_weights(path, other)
        assert torch.equal(other.weight, model.weight) and extra["step"] == 1
        print([str(w.message) for w in caught])
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_list_reads_an_experiment_preset_as_hydra_composes_it(preset):
    """`sltrain list` reads presets from their files (Hydra takes ~0.5 s a preset); the composition is the truth."""
    from sltrain_cli.catalog import experiment_values

    cfg = load_config([f"experiment={preset}"])
    assert experiment_values(preset) == {
        "model": cfg.model.name, "data": cfg.data.name.value, "method": cfg.method.name.value,
        "rank": cfg.method.rank, "delta": cfg.method.delta, "steps": cfg.train.steps,
        "batch": cfg.train.total_batch_size, "lr": cfg.optim.lr, "precision": cfg.train.precision.value}


def test_list_applies_a_presets_recipe_for_its_own_method(tmp_path, monkeypatch):
    """A preset whose method_recipes covers its default method: the listed lr is the recipe's, as composed."""
    from sltrain_cli.catalog import experiment_values

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "conf/experiment/mine.yaml").write_text(
        "# @package _global_\n# Mine.\ndefaults:\n  - override /model: tiny\ntrain:\n  steps: 7\n"
        "method_recipes:\n  sltrain:\n    optim.lr: 0.123\n    method.rank: 3\n")
    monkeypatch.setenv("SLTRAIN_CONF_DIR", str(tmp_path / "conf"))
    cfg = load_config(["experiment=mine"])
    assert (cfg.optim.lr, cfg.method.rank) == (0.123, 3)
    assert experiment_values("mine") == {
        "model": cfg.model.name, "data": cfg.data.name.value, "method": cfg.method.name.value,
        "rank": cfg.method.rank, "delta": cfg.method.delta, "steps": cfg.train.steps,
        "batch": cfg.train.total_batch_size, "lr": cfg.optim.lr, "precision": cfg.train.precision.value}


@pytest.mark.parametrize("argv", [["list"], ["pretrain", "--print-config"]])
def test_listing_and_printing_a_config_load_no_torch(argv):
    """What keeps `sltrain list` and --print-config near a second: they never import torch (5 s on a loaded core)."""
    code = ("import sys\nfrom sltrain_cli.cli import app\n"
            f"try:\n    app({argv!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-800:]
