"""Resume state of the block-wise quantizers (CK.partial/): hashed when written, verified when read.

After block i a driver saves block_i.safetensors (what the block produced), hidden_i.safetensors (the
next block's inputs) and block_i.json, written last as the commit point: the run's key (fingerprint of
model, data and options), the driver's metadata and the sha256 of both tensor files, sealed by a
sha256 of the record itself. Only the newest hidden file is kept.

A rerun resumes after the blocks whose records parse, carry the same key, match their seal and whose
files match their sha256, provided the newest hidden file is intact. Anything damaged (a flipped byte,
a truncated file, a record from another run) is never used: since the inputs of earlier blocks are not
kept, the blocks are recomputed from the start, and the user is told why on stderr.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..integrity import sha256_file
from ..outputs import ensure_free_space, write_error
from ..tensorfile import save_tensors, tensors_nbytes

log = logging.getLogger("hawqtool")

# every name this module writes, and the parked embedding/head of a streamed model (streaming.Streamer.parked)
_OWN = re.compile(r"^(\.?(block|hidden)_-?\d{4}\.(safetensors|json)(\.tmp)?|outside-blocks-\d+\.safetensors)$")


def _seal(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class Damaged(Exception):
    """A saved block that cannot be trusted; the message says which file and why."""


class BlockState:
    """The saved blocks of one run (`key`) in `folder`."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key

    def _path(self, kind: str, i: int, ext: str = "safetensors") -> Path:
        return self.folder / f"{kind}_{i:04d}.{ext}"

    def save(self, i: int, tensors: dict[str, torch.Tensor], hidden: dict[str, torch.Tensor], meta: dict) -> None:
        """Commit block i: its tensors, the next block's inputs (`hidden`) and the driver's `meta` (JSON)."""
        need = tensors_nbytes(tensors) + tensors_nbytes(hidden) + 4096 + len(json.dumps(meta))
        created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            ensure_free_space(self.folder, need, self.folder)
            files = {}
            for kind, t in (("block", tensors), ("hidden", hidden)):
                path = self._path(kind, i)
                tmp = path.with_name("." + path.name + ".tmp")
                try:
                    save_tensors(t, tmp)
                    files[path.name] = sha256_file(tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
            record = {"key": self.key, "block": i, "meta": meta, "files": files}
            tmp = self.folder / f".block_{i:04d}.json.tmp"
            try:
                tmp.write_text(json.dumps({"record": record, "seal": _seal(record)}))
                os.replace(tmp, self._path("block", i, "json"))  # the commit point of block i
            finally:
                tmp.unlink(missing_ok=True)
        except BaseException as e:
            if created and self.folder.is_dir() and not any(self.folder.iterdir()):
                self.folder.rmdir()  # nothing committed: leave no empty folder behind
            if isinstance(e, OSError) and (err := write_error(e, self.folder, need)) is not e:
                raise err from e
            raise
        self._path("hidden", i - 1).unlink(missing_ok=True)

    def _record(self, i: int) -> dict | None:
        """Block i's verified record; None if there is none or it belongs to another run; Damaged if broken."""
        path = self._path("block", i, "json")
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            record = d["record"]
            sealed = d["seal"] == _seal(record)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise Damaged(f"{path.name} is unreadable ({type(e).__name__})") from e
        if isinstance(record, dict) and sealed and record.get("key") != self.key:
            return None  # a block of another run (other model, data or options): start afresh
        if not sealed or not isinstance(record, dict) or record.get("block") != i:
            raise Damaged(f"{path.name} does not match its seal")
        return record

    def _tensors(self, path: Path, digest, load: bool = True) -> dict[str, torch.Tensor] | Path:
        """The tensors of a saved file once its sha256 matches (load=False: the verified file's path)."""
        if not path.is_file():
            raise Damaged(f"{path.name} is missing")
        if sha256_file(path) != digest:
            raise Damaged(f"{path.name} does not match its sha256")
        if not load:
            return path
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise Damaged(f"{path.name} is unreadable") from e

    def resume(self, load: bool = True) -> tuple[list[tuple[dict, dict[str, torch.Tensor] | Path]],
                                                 dict[str, torch.Tensor] | Path | None]:
        """([(meta, tensors) of each finished block in order], inputs of the next block), or ([], None) to
        start from block 0. Files of blocks that are not resumed are removed. load=False: each block's verified
        and inputs file instead of their tensors (read later, one at a time)."""
        if not self.folder.is_dir():
            return [], None
        done: list[tuple[dict, dict[str, torch.Tensor]]] = []
        hidden = None
        try:
            records = []
            while (record := self._record(len(records))) is not None:
                records.append(record)
            for i, record in enumerate(records):
                done.append((record["meta"], self._tensors(self._path("block", i), record["files"].get(
                    self._path("block", i).name), load)))
            if records:
                last = self._path("hidden", len(records) - 1)
                hidden = self._tensors(last, records[-1]["files"].get(last.name), load)
        except Damaged as e:
            log.warning("the saved state in %s is damaged (%s): it is not used; the blocks are recomputed",
                        self.folder, e)
            done, hidden = [], None
        self._remove_all_but(len(done))
        return done, hidden

    def _remove_all_but(self, n: int) -> None:
        """Delete this module's files in the folder except the first n blocks and hidden_{n-1}."""
        keep = {self._path("block", i, ext).name for i in range(n) for ext in ("json", "safetensors")}
        if n:
            keep.add(self._path("hidden", n - 1).name)
        for entry in self.folder.iterdir():
            if _OWN.match(entry.name) and entry.name not in keep and entry.is_file():
                entry.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the state once the checkpoint is written (the folder too, if nothing else is in it)."""
        if self.folder.is_dir():
            self._remove_all_but(0)
            try:
                self.folder.rmdir()
            except OSError:
                pass
