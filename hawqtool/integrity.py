"""Integrity of a folder artifact (a checkpoint): every file a reader opens is listed and verified.

A checkpoint folder holds its manifest plus exactly the files the manifest's `files` lists, each a
regular file (never a symlink, which would let a loader read or an exporter copy something outside
the checkpoint) whose sha256 matches. Anything else in the folder is refused, so a loader that opens
files by name (transformers' tokenizer and config readers) only ever opens verified bytes.

JSON read from such folders goes through `read_json`: a size cap before reading and a one-line error
for nesting too deep for the parser (RecursionError), instead of a huge allocation or a traceback.
"""
from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

from .errors import UserError

MIB = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path, *, cap: int, what: str, fix: str):
    """Parse a JSON file of at most `cap` bytes; UserError (naming `what` and `fix`) if it is larger, not
    UTF-8, not JSON, or nested too deeply to parse."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > cap:
            raise UserError(f"{what} {path} is {size} bytes, more than the {cap} a valid one can hold; {fix}")
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{what} {path} is not valid JSON ({e.__class__.__name__}); {fix}") from e
    except RecursionError as e:
        raise UserError(f"{what} {path} is nested too deeply to be a valid one; {fix}") from e
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror}); {fix}") from e


def check_listed_names(files, where: Path) -> dict[str, str]:
    """The manifest's `files` map (name -> sha256 hex) if well-formed: plain names inside the folder."""
    fix = "re-create the checkpoint with `hawqtool quantize`"
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise UserError(f"{where} has a malformed 'files' list; {fix}")
    for name in files:
        if name in ("", ".", "..") or Path(name).name != name or "/" in name or "\\" in name:
            raise UserError(f"{where} lists a file outside the checkpoint ({name!r}); {fix}")
    return files


def check_folder(folder: Path, files: dict[str, str], *, manifest: str, required: tuple[str, ...] = (),
                 caps: dict[str, int] | None = None, hashes: bool = True) -> None:
    """Refuse `folder` unless it holds exactly `manifest` + the listed `files`, all regular files (no
    symlinks, no sub-folders), every name in `required` listed, no file above its cap in `caps`, and
    (with `hashes`) every sha256 equal to the listed one."""
    folder = Path(folder)
    fix = "re-create the checkpoint with `hawqtool quantize`"
    where = folder / manifest
    for name in required:
        if name not in files:
            raise UserError(f"{where} does not list {name}, so it cannot be verified; {fix}")
    for entry in sorted(folder.iterdir()):
        st = entry.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise UserError(f"checkpoint entry {entry} is a symbolic link; a checkpoint holds only its own "
                            f"files: replace the link by the file, or {fix}")
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"checkpoint entry {entry} is not a regular file; remove it, or {fix}")
        if entry.name != manifest and entry.name not in files:
            raise UserError(f"checkpoint file {entry} is not listed in {manifest}, so it cannot be verified; "
                            f"remove it, or {fix}")
    for name, digest in files.items():
        f = folder / name
        if not f.is_file():
            raise UserError(f"checkpoint file {f} is missing; {fix}")
        cap = (caps or {}).get(name)
        if cap is not None and f.stat().st_size > cap:
            raise UserError(f"checkpoint file {f} is {f.stat().st_size} bytes, more than the {cap} a valid one "
                            f"can hold; {fix}")
        if hashes and sha256_file(f) != digest:
            raise UserError(f"checkpoint file {f} is corrupt (sha256 mismatch); {fix}")
