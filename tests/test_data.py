"""Data sources, disjoint calibration/evaluation slices, seeded windows, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from hawqtool.data import CALIB_FRACTION, EVAL_FRACTION, VALID_FRACTION, calibration_windows, eval_windows, read_text
from hawqtool.errors import UserError


class CharTokenizer:
    """One token per character: makes token positions easy to reason about."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[ord(c) % 1000 for c in text]])}


class PositionTokenizer:
    """Token id = character code: a text of distinct characters makes every id name its position."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}


def test_calibration_validation_and_evaluation_windows_share_no_token_position(tmp_path):
    n = 5000
    (tmp_path / "t.txt").write_text("".join(chr(0x4E00 + i) for i in range(n)), encoding="utf-8")
    tok, ref = PositionTokenizer(), str(tmp_path / "t.txt")
    pos = lambda w: set((w - 0x4E00).flatten().tolist())
    calib = set()
    for seed in range(20):  # many seeds: random windows reach the end of their slice
        calib |= pos(calibration_windows(tok, ref, 16, 64, seed=seed))
    valid = pos(eval_windows(tok, ref, 64, fraction=VALID_FRACTION))
    test = pos(eval_windows(tok, ref, 64))
    assert calib and valid and test
    assert not calib & valid and not calib & test and not valid & test
    assert max(calib) < CALIB_FRACTION[1] * n <= min(valid) and max(valid) < EVAL_FRACTION[0] * n <= min(test)


def test_windows_come_from_their_own_slice(tmp_path):
    text = "".join(chr(48 + (i % 40)) for i in range(10_000))
    (tmp_path / "t.txt").write_text(text)
    tok = CharTokenizer()
    ids = tok(text)["input_ids"][0]
    calib = calibration_windows(tok, str(tmp_path / "t.txt"), 16, 50, seed=3)
    again = calibration_windows(tok, str(tmp_path / "t.txt"), 16, 50, seed=3)
    assert torch.equal(calib, again) and calib.shape == (16, 50)
    ev = eval_windows(tok, str(tmp_path / "t.txt"), 100)
    assert ev.shape == (20, 100)  # the last 20% = 2000 tokens, cut from its start
    assert torch.equal(ev[0], ids[8000:8100])
    # every calibration window lies inside the first 60%
    calib_part = ids[:6000].tolist()
    s = "".join(map(chr, calib_part))
    for w in calib:
        assert "".join(map(chr, w.tolist())) in s


def test_jsonl_and_bad_files(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    assert read_text(str(p)) == "alpha\n\nbeta"
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="line 2"):
        read_text(str(p))
    with pytest.raises(UserError, match="does not exist"):
        read_text(str(tmp_path / "missing.txt"))
