"""Calibration text: sources, windows, seeds, errors."""

from __future__ import annotations

import pytest
import torch

import tailorkit as tk
from tailorkit.calibration import default_texts, load_texts, token_windows


class CharTokenizer:
    """One token per character (ids are code points mod 256), EOS = 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 255 + 1 for c in text]}


def test_default_text_ships_with_the_package():
    texts = default_texts()
    assert len(texts) == 3
    assert any("From fairest creatures we desire increase" in t for t in texts)
    assert sum(len(t) for t in texts) > 100_000


def test_sources_list_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("beta")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    assert load_texts(["x", "y"]) == ["x", "y"]
    assert load_texts(tmp_path / "a.txt") == ["alpha"]
    assert load_texts(tmp_path) == ["alpha", "beta"]  # text files only, in name order
    with pytest.raises(tk.TailorkitError, match="not a file or folder"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(tk.TailorkitError, match="bad.txt is not UTF-8"):
        load_texts(tmp_path)


def test_windows_are_seeded_whole_and_distinct():
    tok = CharTokenizer()
    text = "".join(chr(65 + i % 50) for i in range(1000))
    a = token_windows(tok, [text], seq_len=32, num_windows=5, seed=1)
    b = token_windows(tok, [text], seq_len=32, num_windows=5, seed=1)
    c = token_windows(tok, [text], seq_len=32, num_windows=5, seed=2)
    assert a.shape == (5, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    every = token_windows(tok, [text], seq_len=32, num_windows=None)
    assert every.shape == (31, 32)  # 1001 tokens (EOS added) -> 31 whole windows
    assert all(any(torch.equal(w, e) for e in every) for w in a)


def test_too_little_text_is_a_clear_error():
    tok = CharTokenizer()
    with pytest.raises(
        tk.TailorkitError, match="too short: 11 tokens, fewer than one window of 64"
    ):
        token_windows(tok, ["short text"], seq_len=64)
    alphabet = "".join(chr(65 + i % 26) for i in range(30))
    with pytest.raises(tk.TailorkitError, match="gives 3 windows of 10 tokens, 8 were asked"):
        token_windows(tok, [alphabet], seq_len=10, num_windows=8)
    with pytest.raises(tk.TailorkitError, match="has 2 distinct tokens in 301: it is not text"):
        token_windows(tok, ["x" * 300], seq_len=10)  # "x" and the end-of-text token


def test_hub_dataset_needs_the_network_and_says_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(tk.TailorkitError, match="needs the `datasets` package"):
        load_texts("hf:wikitext:train")
