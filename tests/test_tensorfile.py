"""tensorfile.save_tensors writes safetensors itself, one tensor at a time: its bytes must equal the safetensors
library's for every dtype, name and shape it may meet, and lazy tensors must be read one at a time."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hawqtool.tensorfile import _DTYPES, LazyTensor, save_tensors, tensors_nbytes


def _every_kind() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, d in enumerate(_DTYPES):
        raw = torch.randint(0, 256, (5 * (i + 1) * 8,), generator=g, dtype=torch.uint8)
        t = raw.view(d) if d != torch.bool else raw % 2 == 1  # every bit pattern (NaNs too), and valid bools
        out[f"layers.{i}.w"] = t[: 3 * (i + 1)].reshape(3, -1).clone()
        out[f"layers.{i}.v"] = t[5:10].clone()
        out[f"b{i}"] = t[:1].reshape(()).clone()  # a scalar
    out["empty"] = torch.zeros(0, 4)
    out["ü \"quoted\"\n\\ /x\u0001"] = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # JSON escapes
    out["strided"] = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()  # not contiguous
    return out


def _metadata_sorted(raw: bytes) -> bytes:
    """A library file with its `__metadata__` keys sorted (the library writes them in hash-map order)."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:]


@pytest.mark.parametrize("metadata", [None, {}, {"format": "hawqtool", "zero_point": "w = s*(q-z)", "a": "é\"\n"}])
def test_the_bytes_equal_the_safetensors_library(tmp_path, metadata):
    t = _every_kind()
    save_tensors(t, tmp_path / "ours.safetensors", metadata)
    save_file({k: v.contiguous() for k, v in t.items()}, tmp_path / "lib.safetensors",
              metadata=None if metadata is None else dict(sorted(metadata.items())))
    assert (tmp_path / "ours.safetensors").read_bytes() == _metadata_sorted((tmp_path / "lib.safetensors").read_bytes())
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(t) and f.metadata() == metadata
        for k, v in t.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.view(torch.uint8) if got.dim() else got.reshape(1).view(torch.uint8),
                               v.contiguous().view(torch.uint8) if v.dim() else v.reshape(1).view(torch.uint8))
    assert tensors_nbytes(t) >= (tmp_path / "ours.safetensors").stat().st_size


def test_lazy_tensors_are_read_in_turn_and_give_the_same_bytes(tmp_path):
    t = _every_kind()
    save_tensors(t, tmp_path / "whole.safetensors")
    live: list[str] = []

    def reader(k):
        def read():
            live.append(k)
            return t[k].clone()
        return read

    lazy = {k: LazyTensor(v.dtype, tuple(v.shape), reader(k)) for k, v in t.items()}
    save_tensors(lazy, tmp_path / "lazy.safetensors")
    assert (tmp_path / "lazy.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert sorted(live) == sorted(t)  # each read exactly once
    wrong = {"x": LazyTensor(torch.float32, (2, 2), lambda: torch.zeros(3))}
    with pytest.raises(ValueError, match="expected"):
        save_tensors(wrong, tmp_path / "bad.safetensors")


def test_a_dtype_safetensors_cannot_store_is_refused(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        save_tensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")


def test_a_full_disk_is_the_oserror(tmp_path, monkeypatch):
    calls = []

    def full(f, data):
        calls.append(len(bytes(data)))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        f.write(data)

    monkeypatch.setattr("hawqtool.tensorfile._write", full)
    with pytest.raises(OSError) as e:
        save_tensors({"a": torch.zeros(4), "b": torch.ones(4)}, tmp_path / "x.safetensors")
    assert e.value.errno == errno.ENOSPC
