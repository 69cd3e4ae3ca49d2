"""safetensors files written byte-reproducibly, with write errors reported as OSError.

safetensors keeps a file's `__metadata__` in a hash map, so its keys come out in a different order
per process and identical runs gave files with different sha256. `save_tensors` writes the file and
then rewrites its JSON header in place with the metadata keys sorted (the header keeps its length;
the library pads headers with spaces, which every reader accepts), so the same tensors and metadata
give the same bytes. The library reports I/O failures (a full disk) as SafetensorError with the OS
error number in the text; they are re-raised as OSError with that errno so writers can tell the user.
"""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the safetensors file of `tensors`: their data plus a generous header estimate (name, dtype,
    shape and offsets of each tensor), for free-space checks before writing."""
    return 8 + 4096 + sum(t.numel() * t.element_size() + len(k.encode()) + 128 for k, t in tensors.items())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (made contiguous) to `path` as safetensors with a canonical header."""
    path = Path(path)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    except SafetensorError as e:
        m = _OS_ERROR.search(str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e
    canonical_header(path)


def canonical_header(path: Path) -> None:
    """Rewrite the JSON header of a safetensors file in place with `__metadata__` keys sorted."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) > n:  # cannot happen for a reordering; never corrupt the file if it ever did
            raise OSError(errno.EINVAL, "canonical safetensors header is longer than the original", str(path))
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


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
