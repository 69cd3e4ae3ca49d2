"""The block engine's activations on disk past a host-memory limit (streamed models larger than memory).

A list of boundary activations (one tensor per calibration batch) whose bytes exceed the limit is written to a file
per tensor and mapped back: the tensors read the same bytes, but their pages belong to the page cache, which the
kernel drops under memory pressure and reads again on use, instead of anonymous memory, which it cannot drop (or
must swap). Each file is unlinked as soon as it is mapped, so its blocks are freed with the last tensor that maps
it; the folder is the Spill's own temporary one, removed when it closes."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("hawqtool")

SHARE = 8  # the automatic limit: one list may hold an eighth of the memory available when the stage starts


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def default_limit() -> int:
    """Bytes one list of activations may take in memory: an eighth of the host's available memory. GPTQ with block
    tuning holds four lists at once (a block's inputs and float-chain inputs, and the two chains' outputs), so the
    lists kept in memory never take more than half of it."""
    import psutil

    return psutil.virtual_memory().available // SHARE


class Spill:
    """Keeps lists of activations on the host, in memory up to `limit` bytes per list and past it on disk, in a
    temporary folder made in `parent` on first use and removed by close() (limit None: always in memory)."""

    def __init__(self, parent: Path | None = None, limit: int | None = None):
        self.parent, self.limit, self.folder = parent, limit, None

    def __enter__(self) -> "Spill":
        """Also removes what a killed run's Spill left in `parent`: folders of this host's processes that are gone
        (the ranks of a torchrun job share `parent`: a live one's folder is never touched), holding only spilled
        files."""
        for old in Path(self.parent).glob(f"activations-{socket.gethostname()}-*") if self.parent is not None else ():
            pid = old.name.removeprefix(f"activations-{socket.gethostname()}-").split("-")[0]
            if pid.isdigit() and not _alive(int(pid)) and old.is_dir() and not old.is_symlink() \
                    and all(f.name.startswith("act-") for f in old.iterdir()):
                shutil.rmtree(old, ignore_errors=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spill folder (its files are unlinked already; a kill mid-write can leave one)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def keep(self, tensors: list[torch.Tensor], *, host: bool = True) -> list[torch.Tensor]:
        """`tensors` as the block engine keeps them: mapped from disk when on the host and over the limit; else
        moved to the CPU (host) or left where they are."""
        on_host = host or all(t.device.type == "cpu" for t in tensors)
        if self.limit is None or not on_host or nbytes(tensors) <= self.limit:
            return [t.cpu() for t in tensors] if host else tensors
        if self.folder is None:
            if self.parent is not None:
                Path(self.parent).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=f"activations-{socket.gethostname()}-{os.getpid()}-",
                                                dir=self.parent))
            log.info("activations (%.2f GiB per block) exceed the %.2f GiB kept in memory: spilled to %s",
                     nbytes(tensors) / 2**30, self.limit / 2**30, self.folder)
        return [mapped(t, self.folder) for t in tensors]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def mapped(t: torch.Tensor, folder: Path) -> torch.Tensor:
    """`t` written to a file in `folder` and mapped back read-only (private: a write copies the page), the file
    unlinked at once; a tensor already mapped from a file is returned as it is."""
    if getattr(t, "_hawq_mapped", False) or t.numel() == 0:
        return t.cpu()
    flat = t.detach().cpu().contiguous().reshape(-1)
    fd, path = tempfile.mkstemp(dir=folder, prefix="act-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(flat.view(torch.uint8).numpy()))
        out = torch.from_file(path, shared=False, size=flat.numel(), dtype=flat.dtype).view(t.shape)
    finally:
        os.unlink(path)
    out._hawq_mapped = True
    return out
