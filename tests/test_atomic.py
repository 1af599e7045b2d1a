"""Atomic writes under interruption: a write that fails half-way (an injected failure inside the writer, after half
of the new bytes went out) leaves the previous file intact under its name, no partial file there, and no temp file
behind -- for a checkpoint and its `latest` marker, summary.json and a results table (CSV + Markdown)."""
import io
import json

import pandas as pd
import pytest
import torch

import sltrain_cli.files as files
from sltrain_cli.checkpoint import LATEST, latest_checkpoint, load_checkpoint, save_checkpoint
from sltrain_cli.files import read_summary, write_json
from sltrain_cli.results import upsert_row, write_table


class Interrupted(BaseException):
    """What the injected failure raises (a BaseException, as a KeyboardInterrupt or SystemExit would be)."""


@pytest.fixture
def interrupt(monkeypatch):
    """Make every write through files._write_then_replace stop half-way: the writer's bytes are produced, the
    first half reaches the file, then the write fails. Yields the list of paths that were interrupted."""
    real, hit = files._write_then_replace, []

    def half_then_fail(path, write):
        buf = io.BytesIO()
        write(buf)
        data = buf.getvalue()

        def writer(f):
            f.write(data[: len(data) // 2])
            f.flush()
            hit.append(str(path))
            raise Interrupted(str(path))

        return real(path, writer)

    def arm():
        monkeypatch.setattr(files, "_write_then_replace", half_then_fail)
        return hit

    yield arm
    monkeypatch.setattr(files, "_write_then_replace", real)


def _snapshot(folder):
    """Every file under ``folder`` (hidden ones too) -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_temps(folder):
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_an_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, interrupt):
    ckpt_dir = tmp_path / "checkpoints"
    old = {"model": {"w": torch.arange(1000.0)}, "step": 4, "config": {}}
    save_checkpoint(ckpt_dir, 4, old)
    before = _snapshot(ckpt_dir)
    hit = interrupt()
    new = {"model": {"w": -torch.arange(1000.0)}, "step": 4, "config": {}}
    with pytest.raises(Interrupted):
        save_checkpoint(ckpt_dir, 4, new)  # the same step again: the write replaces an existing file
    with pytest.raises(Interrupted):
        save_checkpoint(ckpt_dir, 8, {**new, "step": 8})  # a new step: nothing may appear under its name
    assert hit == [str(ckpt_dir / "step_000004.pt"), str(ckpt_dir / "step_000008.pt")]
    assert _snapshot(ckpt_dir) == before and _no_temps(ckpt_dir)
    assert torch.equal(load_checkpoint(ckpt_dir / "step_000004.pt")["model"]["w"], old["model"]["w"])
    assert latest_checkpoint(ckpt_dir).name == "step_000004.pt"


def test_an_interrupted_latest_marker_write_keeps_the_previous_marker(tmp_path, interrupt, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    save_checkpoint(ckpt_dir, 4, {"model": {}, "step": 4, "config": {}})
    real = files._write_then_replace
    hit = interrupt()
    broken = files._write_then_replace
    # only the marker's write fails: the step-8 file itself is written whole
    monkeypatch.setattr(files, "_write_then_replace",
                        lambda path, write: (broken if str(path).endswith(LATEST) else real)(path, write))
    with pytest.raises(Interrupted):
        save_checkpoint(ckpt_dir, 8, {"model": {}, "step": 8, "config": {}})
    assert hit == [str(ckpt_dir / LATEST)]
    assert (ckpt_dir / LATEST).read_text() == "step_000004.pt\n" and _no_temps(ckpt_dir)
    assert load_checkpoint(ckpt_dir / "step_000008.pt")["step"] == 8  # complete, just not yet marked


def test_an_interrupted_summary_write_keeps_the_previous_summary(tmp_path, interrupt):
    write_json(tmp_path / "summary.json", {"status": "completed", "steps": 8, "val_ppl": 123.4})
    before = _snapshot(tmp_path)
    interrupt()
    with pytest.raises(Interrupted):
        write_json(tmp_path / "summary.json", {"status": "interrupted", "steps": 3, "val_ppl": None,
                                               "note": "x" * 4000})
    assert _snapshot(tmp_path) == before and _no_temps(tmp_path)
    assert read_summary(tmp_path) == {"status": "completed", "steps": 8, "val_ppl": 123.4}


def test_an_interrupted_results_table_write_keeps_the_previous_table(tmp_path, interrupt):
    rows = [{"run": f"r{i}", "val_ppl": 100.0 + i, "status": "completed"} for i in range(3)]
    write_table(rows, tmp_path / "results")
    upsert_row(tmp_path / "pretrain.csv", rows[0])
    before = _snapshot(tmp_path)
    hit = interrupt()
    with pytest.raises(Interrupted):
        write_table([*rows, {"run": "r3", "val_ppl": 1.0, "status": "completed"}] * 50, tmp_path / "results")
    with pytest.raises(Interrupted):
        upsert_row(tmp_path / "pretrain.csv", rows[1])  # a pretrain adding its row to results.csv
    assert [h.rsplit("/", 1)[1] for h in hit] == ["results.csv", "pretrain.csv"]  # the first file already fails
    assert _snapshot(tmp_path) == before and _no_temps(tmp_path)
    assert pd.read_csv(tmp_path / "results.csv")["run"].tolist() == ["r0", "r1", "r2"]
    assert pd.read_csv(tmp_path / "pretrain.csv")["run"].tolist() == ["r0"]
    assert "r2" in (tmp_path / "results.md").read_text()


def test_an_uninterrupted_write_replaces_the_file(tmp_path):
    """The control: without the injected failure the same writes go through whole."""
    write_json(tmp_path / "summary.json", {"status": "completed"})
    write_json(tmp_path / "summary.json", {"status": "interrupted"})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "interrupted"}
    save_checkpoint(tmp_path, 4, {"w": torch.ones(3), "step": 4})
    save_checkpoint(tmp_path, 4, {"w": torch.zeros(3), "step": 4})
    assert torch.equal(load_checkpoint(tmp_path / "step_000004.pt")["w"], torch.zeros(3)) and _no_temps(tmp_path)
