"""tokenizer.py: the BPE, SentencePiece and transformers backends, save/load round trips, t5 offline."""
import json

import pytest

from sltrain_cli import data as D
from sltrain_cli.configs import DataConfig, TokenizerConfig, UserError
from sltrain_cli.data import tokenizer as T

from helpers import SMALL


def test_t5_without_path_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)  # no cached t5-base
    with pytest.raises(UserError, match="tokenizer.path=") as err:
        T.build_tokenizer(D.open_corpus(DataConfig(**SMALL)), TokenizerConfig(kind="t5"), tmp_path)
    assert "tokenizer.kind=bpe" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="^tokenizer.path: "):
        T.build_tokenizer(D.open_corpus(DataConfig(**SMALL)), TokenizerConfig(kind="pretrained"), tmp_path)


def test_bpe_save_load_round_trip(tok, tmp_path):
    text = "Fellow-Citizens of the Senate:\n\n  I embrace, with great satisfaction — 1790."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.encode_batch([text, "x"])[0] == ids
    tok.save(tmp_path / "tok")
    back = T.load_tokenizer(tmp_path / "tok")
    assert (back.encode(text), back.vocab_size, back.eos_id, back.pad_id) == (ids, tok.vocab_size, 1, 0)
    assert back.fingerprint == tok.fingerprint and max(ids) < back.vocab_size


SENTENCE = "I embrace with great satisfaction the opportunity which now presents itself."


@pytest.mark.parametrize("kind", ["t5", "pretrained"])
def test_sentencepiece_model_path(spiece, tmp_path, kind):
    path, sp = spiece
    corpus = D.open_corpus(DataConfig(**SMALL))
    tk = T.build_tokenizer(corpus, TokenizerConfig(kind=kind, path=str(path)), tmp_path)
    assert tk.backend == "sentencepiece" and (tk.eos_id, tk.pad_id, tk.vocab_size) == (1, 0, 300)
    assert tk.encode(SENTENCE) == sp.encode(SENTENCE) and tk.decode(tk.encode(SENTENCE)) == SENTENCE
    tk.save(tmp_path / "t")
    assert T.load_tokenizer(tmp_path / "t").encode(SENTENCE) == sp.encode(SENTENCE)
    train, _ = D.build_datasets(corpus, tk, rows_per_step=2, cache_root=tmp_path)
    assert int(train.ids.max()) < 300


def test_transformers_tokenizer_dir(spiece, tmp_path):
    path, sp = spiece
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "spiece.model").write_bytes(path.read_bytes())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    tk = T.build_tokenizer(D.open_corpus(DataConfig(**SMALL)), TokenizerConfig(kind="pretrained", path=str(hf_dir)),
                           tmp_path)
    assert tk.backend == "transformers" and tk.encode(SENTENCE) == sp.encode(SENTENCE)  # the ids are right
    assert (tk.eos_id, tk.pad_id, tk.vocab_size) == (1, 0, 300) and tk.decode(tk.encode(SENTENCE)) == SENTENCE
    tk.save(tmp_path / "saved")
    back = T.load_tokenizer(tmp_path / "saved")
    assert back.encode_batch([SENTENCE]) == [sp.encode(SENTENCE)] and back.fingerprint == tk.fingerprint
