"""Bad input through the CLI: one line on stderr, exit code 2, no traceback, no run folder (issue 11, item 6);
damaged caches are rebuilt with a one-line note."""
import builtins
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sltrain_cli.cli import app

from helpers import load_documents, tiny_overrides

runner = CliRunner()
GOOD = "The state of the union is strong, and the people of this nation are at work. " * 20


def _refused(out: Path, *args: str, names=()) -> str:
    """Run `pretrain` with tiny overrides; assert the one-line refusal and return that line."""
    result = runner.invoke(app, ["pretrain", "--quiet", *tiny_overrides(out, *args)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert not (out / "pretrain").exists() or not any((out / "pretrain").iterdir()), "a run folder was created"
    return lines[0]


def _local(path: Path, *extra: str):
    return ("data=local", f"data.path={path}", *extra)


# ------------------------------------------------------------------------------------------------ encodings
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".jsonl.gz"])
def test_non_utf8_names_the_file_and_byte_offset(tmp_path, cache_dir, suffix):
    bad = b"caf\xe9 au lait"  # latin-1, not UTF-8: 0xe9 at offset 3 of this text
    if suffix == ".txt":
        blob, offset = GOOD.encode() + bad, len(GOOD.encode()) + 3
    else:
        first = json.dumps({"text": GOOD}).encode() + b"\n"
        blob, offset = first + b'{"text": "' + bad + b'"}\n', len(first) + len('{"text": "') + 3
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
    (tmp_path / f"other{suffix}").write_bytes(path.read_bytes())
    line = _refused(tmp_path / "out", *_local(path), names=[path, f"byte offset {offset}",
                                                             "data.encoding_errors=replace"])
    assert "0xe9" in line


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
@pytest.mark.parametrize("streaming", [False, True])
def test_encoding_errors_replace_reads_bad_bytes_as_replacement_char(tmp_path, suffix, streaming):
    from sltrain_cli.configs import DataConfig
    from sltrain_cli.data import open_corpus

    bad = b"caf\xe9 au lait"
    for i in range(2):
        blob = (GOOD + str(i)).encode() + bad if suffix == ".txt" else \
            json.dumps({"text": GOOD + str(i)}).encode() + b'\n{"text": "' + bad + b'"}\n'
        (tmp_path / f"doc{i}{suffix}").write_bytes(blob)
    cfg = dict(name="local", path=str(tmp_path), streaming=streaming)
    corpus = open_corpus(DataConfig(**cfg, encoding_errors="replace"))
    docs = list(corpus.texts(corpus.stream("train"))) if streaming else corpus.all_documents()
    assert len(docs) == (2 if suffix == ".txt" else 4)
    assert any("caf\ufffd au lait" in d for d in docs)
    assert corpus.key != open_corpus(DataConfig(**cfg)).key, "cached token ids of strict and replace differ"


def test_encoding_errors_is_checked(tmp_path, cache_dir):
    _refused(tmp_path / "out", *_local(tmp_path, "data.encoding_errors=ignore"), names=["data.encoding_errors"])


# ----------------------------------------------------------------------------------------- malformed files
def test_malformed_jsonl_line_names_file_and_line(tmp_path, cache_dir):
    path = tmp_path / "rows.jsonl"
    rows = [json.dumps({"text": GOOD + str(i)}) for i in range(4)]
    rows[2] = '{"text": "no closing quote}'
    path.write_text("\n".join(rows) + "\n")
    _refused(tmp_path / "out", *_local(path), names=[f"{path}:3"])


def test_parquet_column_that_is_not_text(tmp_path, cache_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [GOOD] * 4, "n": [1, 2, 3, 4]}), path)
    _refused(tmp_path / "out", *_local(path, "data.text_field=n"), names=["data.text_field", "'n'", "int64"])


def test_jsonl_field_that_is_not_text(tmp_path, cache_dir):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": i, "body": GOOD}) + "\n" for i in range(4)))
    _refused(tmp_path / "out", *_local(path), names=["data.text_field", "'text'", "int64"])


# ------------------------------------------------------------------------------------ missing or unreadable
def test_missing_file(tmp_path, cache_dir):
    _refused(tmp_path / "out", *_local(tmp_path / "nope.txt"), names=["data.path", tmp_path / "nope.txt",
                                                                      "does not exist"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway (see the injected variant)")
def test_permission_denied_file(tmp_path, cache_dir):
    path = tmp_path / "secret.txt"
    path.write_text(GOOD)
    path.chmod(0)
    try:
        _refused(tmp_path / "out", *_local(path), names=["data.path", path, "Permission denied"])
    finally:
        path.chmod(0o644)


def test_permission_denied_file_injected(tmp_path, cache_dir, monkeypatch):
    """The same refusal where permissions do not apply (root): the data module's open() is denied the file."""
    from sltrain_cli.data import local as corpora

    path = (tmp_path / "secret.txt").resolve()
    path.write_text(GOOD)

    def denied(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(corpora, "open", denied, raising=False)
    _refused(tmp_path / "out", *_local(path), names=["data.path", path, "Permission denied"])


def test_folder_without_usable_files(tmp_path, cache_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "notes.md").write_text(GOOD)
    _refused(tmp_path / "out", *_local(folder), names=["data.path", folder])


def test_empty_txt(tmp_path, cache_dir):
    path = tmp_path / "empty.txt"
    path.write_text("")
    _refused(tmp_path / "out", *_local(path), names=["data.path"])


# ------------------------------------------------------------------------------ caches and eval-ppl (one run)
@pytest.fixture(scope="module")
def rebuilt_run(tmp_path_factory, cache_dir):
    """Fill a private cache for a small local corpus, truncate its tokenizer and token-id files, then run."""
    from sltrain_cli.compose import load_config
    from sltrain_cli.configs import DataConfig
    from sltrain_cli.data import build_datasets, open_corpus
    from sltrain_cli.data.tokenizer import build_tokenizer

    tmp = tmp_path_factory.mktemp("rebuilt")
    corpus_dir, cache, out = tmp / "corpus", tmp / "cache", tmp / "out"
    corpus_dir.mkdir()
    train_docs, val_docs = load_documents(DataConfig(max_docs=6))
    for i, doc in enumerate(train_docs + val_docs):
        (corpus_dir / f"speech{i}.txt").write_text(doc)
    args = tiny_overrides(out, *_local(corpus_dir), f"tokenizer.cache_dir={cache}", "run_name=a")
    cfg = load_config(args)
    corpus = open_corpus(cfg.data)
    tok = build_tokenizer(corpus, cfg.tokenizer, cache)
    build_datasets(corpus, tok, rows_per_step=cfg.train.total_batch_size, cache_root=cache)
    damaged = [*(cache / "tokenizers").glob("bpe-*.json"), *(cache / "tokens").glob("*.pt")]
    assert len(damaged) == 2
    for path in damaged:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = runner.invoke(app, ["pretrain", "--quiet", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out / "pretrain" / "a", damaged, result.output, corpus, cache


def test_damaged_caches_are_rebuilt_with_a_note(rebuilt_run):
    from sltrain_cli.data.tokenizer import load_tokenizer

    _, (tok_file, ids_file), output, _, _ = rebuilt_run
    lines = output.splitlines()
    assert f"note: the cached tokenizer {tok_file} was unreadable; rebuilt it" in lines, output
    assert f"note: the cached token ids {ids_file} were unreadable; rebuilt them" in lines, output
    assert "Traceback" not in output
    load_tokenizer(tok_file)
    assert set(torch.load(ids_file, weights_only=True)) == {"train_tokens", "train_offsets", "val_tokens",
                                                            "val_offsets"}


def test_eval_ppl_without_checkpoint(rebuilt_run, tmp_path):
    run_dir = rebuilt_run[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(run_dir, no_ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    for folder in (empty, no_ckpt):
        result = runner.invoke(app, ["eval-ppl", str(folder)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith("error: RUN: ") and str(folder) in lines[0] and "checkpoint" in lines[0]
        assert "Traceback" not in result.output


def test_eval_ppl_on_a_checkpoint_of_another_model(rebuilt_run, tmp_path):
    """A run folder whose tokenizer/ is not the one its checkpoint was trained with (another vocabulary)."""
    from sltrain_cli.configs import TokenizerConfig
    from sltrain_cli.data.tokenizer import build_tokenizer

    run_dir, _, _, corpus, cache = rebuilt_run
    mixed = tmp_path / "mixed"
    shutil.copytree(run_dir, mixed)
    shutil.rmtree(mixed / "tokenizer")
    build_tokenizer(corpus, TokenizerConfig(vocab_size=600), cache).save(mixed / "tokenizer")
    result = runner.invoke(app, ["eval-ppl", str(mixed)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output + repr(result.exception)
    assert lines[0].startswith("error: RUN: ") and str(mixed) in lines[0], lines[0]
    assert "[512, 64]" in lines[0] and "[600, 64]" in lines[0] and "tokenizer/" in lines[0], lines[0]
    assert "Traceback" not in result.output
