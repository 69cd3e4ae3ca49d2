"""safetensors files written byte-reproducibly, one tensor at a time.

`save_tensors` writes the format itself: the header (tensors ordered as the safetensors library orders them, by
dtype then name; `__metadata__` first with its keys sorted; padded with spaces to 8 bytes), then each tensor's
bytes in that order. The bytes equal the library's `save_file` with sorted metadata (a test holds them to it),
but a tensor may be a `LazyTensor`, read only when its turn comes: a checkpoint of a model larger than memory is
written without holding its tensors at once (the library wants them all in memory). Write failures (a full disk)
surface as the OSError the OS raised, so writers can tell the user.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# safetensors' dtype names, in the library's order (its files list larger kinds first: this order, reversed)
_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
           torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
           torch.int64: "I64", torch.uint64: "U64"}
_RANK = {d: i for i, d in enumerate(_DTYPES)}
TORCH_DTYPE = {name: d for d, name in _DTYPES.items()}  # a safetensors header's dtype name -> torch dtype


@dataclass(frozen=True)
class LazyTensor:
    """A tensor save_tensors reads only when it writes it: its dtype and shape, and the function that reads it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def _nbytes(t: torch.Tensor | LazyTensor) -> int:
    return int(torch.Size(t.shape).numel()) * torch.empty(0, dtype=t.dtype).element_size()


def tensors_nbytes(tensors: dict[str, torch.Tensor | LazyTensor]) -> int:
    """Bytes of the safetensors file of `tensors`: their data plus a generous header estimate (name, dtype,
    shape and offsets of each tensor), for free-space checks before writing."""
    return 8 + 4096 + sum(_nbytes(t) + len(k.encode()) + 128 for k, t in tensors.items())


def safetensors_header(tensors: dict[str, torch.Tensor | LazyTensor], metadata: dict[str, str] | None) -> tuple[
        bytes, list[str]]:
    """The file's first bytes (length and padded JSON header) and the tensors' names in the order of their data."""
    for k, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"safetensors cannot store {k} of dtype {t.dtype}")
    order = sorted(tensors, key=lambda k: (-_RANK[tensors[k].dtype], k))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}
    offset = 0
    for k in order:
        n = _nbytes(tensors[k])
        header[k] = {"dtype": _DTYPES[tensors[k].dtype], "shape": list(tensors[k].shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


def save_tensors(tensors: dict[str, torch.Tensor | LazyTensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` as safetensors with a canonical header, holding one tensor at a time beyond
    those the caller holds (LazyTensors are read in turn and dropped)."""
    head, order = safetensors_header(tensors, metadata)
    with open(Path(path), "wb") as f:
        _write(f, head)
        for k in order:
            t = tensors[k]
            if isinstance(t, LazyTensor):
                got = t.read()
                if got.dtype != t.dtype or tuple(got.shape) != tuple(t.shape):
                    raise ValueError(f"{k} read as {got.dtype} {tuple(got.shape)}, expected {t.dtype} {tuple(t.shape)}")
                t = got
            data = t.detach().cpu().contiguous().reshape(-1)
            if data.numel():
                _write(f, memoryview(data.view(torch.uint8).numpy()))


def _write(f, data) -> None:
    """One write of the file (where tests inject a full disk)."""
    f.write(data)


HEADER_CAP = 1 << 27  # 128 MiB: a header lists ~100 bytes per tensor


def tensor_sizes(path: Path) -> dict[str, tuple[list[int], int]]:
    """{name: (shape, data bytes)} of every tensor in a safetensors file, from its header alone (the data
    offsets, so the bytes are exactly what the file stores). OSError/ValueError for a damaged header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= HEADER_CAP:
            raise ValueError(f"{path} has a safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = (list(info["shape"]), int(end) - int(start))
    return out
