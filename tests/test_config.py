"""Every shipped config composes and validates; bad input is one line, exit code 2; the core stays pure."""
import dataclasses
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sltrain_cli import configs
from sltrain_cli.cli import app
from sltrain_cli.compose import expand_aliases, expand_grid, group_options, load_config, run_name
from sltrain_cli.config_io import field_help, from_container, to_container, to_yaml
from sltrain_cli.configs import ConfigError, MethodName, Precision, RunConfig

from helpers import iter_help  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("group", ["model", "method", "data", "optim", "train", "experiment"])
def test_every_conf_file_composes(group):
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        extra = ["data.path=corpus/*.txt"] if (group, option) == ("data", "local") else []
        cfg = load_config([f"{group}={option}", *extra])
        if group == "method":
            assert cfg.method.name == MethodName(option)
        if group == "model":
            assert cfg.model.name == option


def test_experiment_recipe_per_method():
    sl = load_config(["experiment=paper_60m"])
    ga = load_config(["experiment=paper_60m", "method=galore"])
    assert sl.model.name == "llama_60m" and sl.method.rank == 128 and sl.optim.lr == 0.003
    assert sl.train.total_batch_size == 512 and sl.train.precision == Precision.bf16_pure
    assert ga.method.name == MethodName.galore and ga.optim.lr == 0.01 and ga.method.rank == 128
    # the command line wins over the recipe
    assert load_config(["experiment=paper_60m", "method=galore", "lr=0.02"]).optim.lr == 0.02


def test_aliases_and_grid():
    assert expand_aliases(["rank=8", "delta=0.1", "lr=1e-3", "steps=5", "seed=3", "alpha=4"]) == [
        "method.rank=8", "method.delta=0.1", "optim.lr=1e-3", "train.steps=5", "seed=3", "method.alpha=4"]
    cfg = load_config(["rank=8", "delta=0.1", "steps=5"])
    assert (cfg.method.rank, cfg.method.delta, cfg.train.steps) == (8, 0.1, 5)
    grid = expand_grid(["rank=1,2", "delta=0.1,0.2,0.3", "model=tiny"])
    assert len(grid) == 6 and grid[0] == ["rank=1", "delta=0.1", "model=tiny"]
    assert run_name(["model=tiny", "rank=8"]) == run_name(["model=tiny", "rank=8"]) == "model=tiny,rank=8"


@pytest.mark.parametrize("override,key", [
    ("method.delta=1.5", "method.delta"),
    ("method.rank=-1", "method.rank"),
    ("model=nonexistent", "model"),
    ("experiment=paper_60", "experiment"),  # an optional group: Hydra alone would train the defaults
    ("method.nonexistent_key=3", "method.nonexistent_key"),
    ("train.precision=fp8", "train.precision"),
    ("optim.lr=abc", "optim.lr"),
])
def test_bad_values_raise_config_error(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("override,key", [
    ("method.delta=1.5", "method.delta"),
    ("method.rank=-1", "method.rank"),
    ("model=nonexistent", "model"),
])
def test_cli_bad_input_exit_2_one_line(tmp_path, override, key):
    result = CliRunner().invoke(app, ["pretrain", override, f"out_dir={tmp_path}"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], result.output
    assert "Traceback" not in result.output
    assert not any(tmp_path.iterdir()), "no run folder may be left behind"


def test_print_config():
    result = CliRunner().invoke(app, ["pretrain", "model=tiny", "rank=8", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "rank: 8" in result.output and "hidden_size: 64" in result.output
    lines = result.output.splitlines()
    assert lines[lines.index("  rank: 8") - 1] == "  # r of B (out, r) @ A (r, in); 0 = no low-rank part"
    assert "  # numeric precision of weights and compute (fp32 | bf16-mixed | bf16-pure)" in lines


CONFIG_CLASSES = [c for c in vars(configs).values() if dataclasses.is_dataclass(c) and c.__module__ == configs.__name__]


def test_every_config_field_has_help():
    assert {c.__name__ for c in CONFIG_CLASSES} >= {"ModelConfig", "MethodConfig", "DataConfig", "TokenizerConfig",
                                                    "OptimConfig", "TrainConfig", "RunConfig"}
    for cls in CONFIG_CLASSES:
        assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), f"{cls.__name__} has no docstring"
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help")
            assert isinstance(text, str) and text.strip(), f"{cls.__name__}.{f.name} has no help"
            assert "\n" not in field_help(cls, f.name)
    # iter_help covers every settable key of the composed config, and only those
    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "method_recipes":
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield prefix + k
    helps = dict(iter_help(RunConfig))
    assert list(helps) == list(leaves(to_container(load_config([]))))
    assert helps["method.rank"] == field_help(RunConfig, "method.rank") == field_help(load_config([]).method, "rank")
    assert helps["method.rank"].startswith("r of B (out, r) @ A (r, in)")
    assert helps["train.precision"].endswith("(fp32 | bf16-mixed | bf16-pure)")  # allowed values, as users write them
    with pytest.raises(KeyError):
        field_help(RunConfig, "method.nonexistent")


@pytest.mark.parametrize("overrides", [[], ["model=tiny", "method=sltrain", "rank=8"],
                                       ["experiment=paper_60m", "method=relora", "train.precision=bf16-mixed",
                                        "method.target_modules=[q,v]", "data.path='docs/a b: c.txt'"]])
def test_to_yaml_round_trips_with_help_comments(overrides):
    cfg = load_config(overrides)
    text = to_yaml(cfg)
    assert from_container(yaml.safe_load(text)) == cfg
    assert to_container(from_container(yaml.safe_load(text))) == to_container(cfg)
    lines = text.splitlines()
    rank = lines.index(f"  rank: {cfg.method.rank}")
    assert lines[rank - 1] == f"  # {field_help(RunConfig, 'method.rank')}"
    assert f"# {RunConfig.__doc__.strip()}" in lines[0] and "# LLaMA decoder dimensions." in lines
    # a key's own line holds only its value: comments go above it
    assert all(" #" not in line for line in lines if not line.lstrip().startswith("#"))


@pytest.mark.slow  # a Python subprocess: ~2 s (test-fast: test_structure's [train] import check)
@pytest.mark.parametrize("overrides", [[], *([f"experiment={e}"] for e in group_options("experiment")),
                                       *([f"method={m}"] for m in group_options("method")),
                                       ["train.precision=bf16-mixed", "data=local", "data.path=a.txt", "lr=1e-3",
                                        "run_name=première", "train.loggers=[jsonl,tensorboard]"],
                                       ["run_name='1e-3'", "tokenizer.cache_dir=on"]])  # strings YAML would retype
def test_the_runtime_config_io_agrees_with_omegaconf(overrides):
    """config_io stores and reloads configs without OmegaConf; OmegaConf (what it replaced) is the reference."""
    import yaml
    from omegaconf import OmegaConf

    from sltrain_cli.config_io import _dump, from_container, to_container

    cfg = load_config(overrides)
    reference = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    assert to_container(cfg) == reference
    assert from_container(reference) == OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig),
                                                                            reference)) == cfg
    for section, values in reference.items():
        assert _dump({section: values}) == OmegaConf.to_yaml({section: values})
    assert from_container(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize("data, key", [({"train": {"stepz": 3}}, "train.stepz"), ({"train": {"steps": "many"}},
                                                                                   "train.steps"),
                                       ({"method": {"name": "lora"}}, "method.name"), ({"seed": [1]}, "seed")])
def test_a_stored_config_with_a_bad_key_or_value_names_it(data, key):
    from sltrain_cli.config_io import from_container

    with pytest.raises(ConfigError, match=f"^{key}: "):
        from_container(data)


def test_a_tokenizer_path_that_would_be_ignored_is_refused():
    """tokenizer.kind=auto trains a BPE for local corpora: a tokenizer.path beside it used to be silently unused."""
    with pytest.raises(ConfigError, match="^tokenizer.path: .*set tokenizer.kind=pretrained"):
        load_config(["tokenizer.path=/some/spiece.model"])
    assert load_config(["tokenizer.path=/some/spiece.model", "tokenizer.kind=pretrained"]).tokenizer.path
