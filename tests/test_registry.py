"""The method registry: a method is one module in sltrain_cli/methods/ plus conf/method/NAME.yaml, and no other
source file decides anything by a method's name."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sltrain_cli.configs import MethodConfig, MethodName
from sltrain_cli.methods import all_methods, get_method, method_names

from helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
# Source files outside methods/ that may spell a method's name, and why (each is checked to still need it).
NAMED_ON_PURPOSE = {
    "sltrain_cli/configs.py": "full",  # the schema's default method
    "sltrain_cli/ablate_pruning.py": "sltrain",  # the pruning study's subject is SLTrain's L0 + pruned S form
}


def test_the_registry_is_the_package_and_the_schema_follows_it():
    names = method_names()
    assert set(names) == {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert [m.name for m in all_methods()] == [m.value for m in MethodName]
    for name in names:
        method = get_method(name)
        assert method.name == name and (ROOT / f"sltrain_cli/methods/{name}.py").is_file()
        assert set(method.keys) <= set(MethodConfig.__dataclass_fields__), name
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_no_source_file_outside_methods_branches_on_a_method_name():
    """MethodName.<name>, ``method == 'name'``, ``name in ('a', 'b')`` or ``name='x'`` outside methods/ would be a
    second place deciding per method. (Quoted words that are parameter kinds, such as 'lowrank' for A and B, or
    the tool's own name, are not decisions about a method and are not matched.)"""
    names = "|".join(method_names())
    decisions = re.compile(rf"""MethodName\.({names})\b"""
                           rf"""|(?:method|name)\w*\s*(?:==|!=|not in|in)\s*\(?\s*["']({names})["']"""
                           rf"""|\bname=["']({names})["']""")
    found = {}
    for path in sorted((ROOT / "sltrain_cli").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if not rel.startswith("sltrain_cli/methods/"):
            hits = sorted({next(g for g in m.groups() if g) for m in decisions.finditer(path.read_text())})
            if hits:
                found[rel] = hits
    assert found == {k: [v] for k, v in NAMED_ON_PURPOSE.items()}, found


@pytest.mark.slow  # four subprocesses on a copy of the package (a pretrain among them): ~13 s
def test_a_new_method_is_one_module_and_one_yaml(tmp_path, cache_dir):
    """Copy the package, add methods/toy.py and conf/method/toy.yaml, and nothing else: the new method trains,
    is listed, is estimated, is refused where its module says so, and its own config field is a key of method.*
    like any other (checked, shown, marked unused for the other methods)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "sltrain_cli", src / "sltrain_cli", ignore=ignore)
    shutil.copytree(ROOT / "conf", src / "conf", ignore=ignore)
    (src / "sltrain_cli/methods/toy.py").write_text(
        '"""method=toy: low-rank target layers that refuse FSDP, with a field of its own (a test method)."""\n'
        "from dataclasses import dataclass\n\n"
        "from . import fields, lowrank\n\n\n"
        "@dataclass\n"
        "class Config(lowrank.Config):\n"
        '    gain: float = fields.option(1.0, "toy: a setting only this method has", at_least=0)\n\n\n'
        "class Toy(lowrank.LowRank):\n"
        '    name, order = "toy", 50\n'
        "    Config = Config\n"
        "    fsdp = False\n\n\n"
        "METHOD = Toy()\n")
    (src / "conf/method/toy.yaml").write_text("# Toy: W = B A, a method added by one module and this file.\n"
                                              "name: toy\nrank: 4\ngain: 2.0\n")
    env = {**os.environ, "PYTHONPATH": str(src), "SLTRAIN_CONF_DIR": str(src / "conf"), "OMP_NUM_THREADS": "1"}

    def sltrain(*args):
        return subprocess.run([sys.executable, "-m", "sltrain_cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    listed = sltrain("list", "methods")
    assert listed.returncode == 0 and "toy" in listed.stdout and "a method added by one module" in listed.stdout
    run = sltrain("pretrain", "--quiet", *tiny_overrides(tmp_path / "out", "method=toy", "run_name=toy", "steps=2"))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = (tmp_path / "out/pretrain/toy/summary.json").read_text()
    assert '"method": "toy"' in summary and '"rank": 4' in summary and '"delta": null' in summary
    estimate = sltrain("memory-estimate", "--size", "tiny", "--method", "toy", "--format", "csv")
    assert estimate.returncode == 0 and "\ntoy," in estimate.stdout, estimate.stderr
    refused = sltrain("pretrain", *tiny_overrides(tmp_path / "out", "method=toy", "method.rank=0"))
    assert refused.returncode == 2 and "method.rank: must be >= 1 for method=toy" in refused.stderr
    refused = sltrain("pretrain", *tiny_overrides(tmp_path / "out", "method=toy", "method.gain=-1"))
    assert refused.returncode == 2 and "method.gain: must be >= 0, got -1" in refused.stderr, refused.stderr
    shown = sltrain("pretrain", "--print-config", *tiny_overrides(tmp_path / "out", "method=toy", "method.gain=3"))
    assert shown.returncode == 0 and "gain: 3.0" in shown.stdout, shown.stderr
    other = sltrain("pretrain", "--print-config", *tiny_overrides(tmp_path / "out", "method=sltrain"))
    lines = other.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("gain:"))
    assert other.returncode == 0 and "(unused by method=sltrain) toy: a setting only" in lines[at - 1], lines[at - 1]
