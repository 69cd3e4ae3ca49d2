"""Output paths are sacred: a command replaces only what hawqtool wrote, never an input, and two
runs never write one output at once.

`claim_output` is called at the CLI boundary before any work: it refuses a path that holds
something else than an artifact of the same kind (unless --overwrite), a path inside or above an
input, and takes a lock beside the output (locks.py: a kernel lock, released when the process exits).
`replace_dir` re-checks at the moment of the rename. `staged_output` is the one way a folder output is
written: stale temporaries of dead processes are cleaned first, free space is checked where the size
is known, the folder is built in OUT.tmp-PID and renamed into place, and on any failure the temporary
is removed and the previous output is left as it was (a full disk is a one-line error naming the bytes).
Single-file outputs (kind "gguf") are staged the same way (`staged_output(..., file=True)`: OUT.tmp-PID is a
file) and count as our own when their header carries gguf_export's marker key.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError
from .locks import release_locks, take_lock

log = logging.getLogger("hawqtool")

# what marks a folder/file as hawqtool's own output of each kind
CHECKPOINT_MARKER = "hawqtool_manifest.json"
EXPORT_MARKER = "hawqtool_export.json"
RUN_FILES = ("summary.json", "sensitivity.json", "plan.json", "plan_uniform.json", "job.yaml")  # job.yaml: a batch run
JSON_KINDS = ("sensitivity", "plan", "latency-table")
BATCH_MARKER = ".hawqtool-batch"
RUN_MARKER = ".hawqtool-run"  # written when a run starts, so a run killed before its first artifact is still ours
_OVERWRITE: set[str] = set()  # foreign outputs the user let this process replace (--overwrite)


def is_own_output(path: Path, kind: str) -> bool:
    """True if `path` holds a hawqtool output of this kind (checkpoint, export, run, json, gguf)."""
    path = Path(path)
    if path.is_symlink():
        return False
    if kind == "checkpoint":
        return path.is_dir() and (path / CHECKPOINT_MARKER).is_file()
    if kind == "export":
        return path.is_dir() and (path / EXPORT_MARKER).is_file()
    if kind == "run":  # marked when it starts; a folder from before the marker: by its artifacts' contents, not names
        return path.is_dir() and (not any(path.iterdir()) or (path / RUN_MARKER).is_file()
                                  or any(is_own_output(path / f, "json") for f in RUN_FILES if f.endswith(".json")))
    if kind == "batch":  # marked when the batch starts, so a killed one is still ours
        return path.is_dir() and (not any(path.iterdir()) or (path / BATCH_MARKER).is_file())
    if kind == "json":
        try:
            return path.is_file() and path.stat().st_size < 1 << 30 and \
                json.loads(path.read_text(encoding="utf-8")).get("kind") in JSON_KINDS
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
    if kind == "gguf":
        from .gguf_export import is_gguf_export

        return path.is_file() and is_gguf_export(path)
    raise ValueError(f"unknown output kind {kind!r}")


def _related(a: Path, b: Path) -> bool:
    """a equals b, lies inside b, or contains b (resolved paths)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def claim_output(out: Path, kind: str, *, inputs: Iterable[Path | str | None] = (), overwrite: bool = False,
                 lock: bool = True) -> None:
    """Refuse `out` unless it is free, or an output of ours of the same kind (or --overwrite), and not
    inside/above any existing input path; then lock it for this process."""
    out = Path(os.path.abspath(out))  # `-o .`: the folder's own name, not an empty one
    for ref in inputs:
        if ref is None or not Path(ref).exists():
            continue
        if _related(out, Path(ref)):
            raise UserError(f"output {out} is the input {ref}, inside it or above it; writing there would "
                            "replace the input: choose another -o")
    if kind in ("json", "gguf") and out.is_dir():
        example = out / ("plan.json" if kind == "json" else "model.gguf")
        raise UserError(f"{out} is a folder; -o takes a file path here (e.g. {example})")
    if kind in ("checkpoint", "export", "run", "batch") and out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; -o takes a folder here: choose another -o")
    if out.exists() or out.is_symlink():
        if not is_own_output(out, kind):
            if not overwrite:
                what = "folder" if out.is_dir() else "file"
                raise UserError(f"{out} exists and is a {what} hawqtool did not write ({kind}); pass --overwrite "
                                "to replace it, or choose another -o")
            log.warning("--overwrite: %s will be replaced", out)
            _OVERWRITE.add(str(out.resolve()))
        elif kind not in ("run", "batch"):
            log.warning("replacing the earlier hawqtool %s output at %s", kind, out)
    if lock:
        take_lock(out)
        clean_stale(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_all() -> None:
    """Release every lock this process holds (end of a command, or exit)."""
    release_locks()
    _OVERWRITE.clear()


def replace_dir(tmp: Path, out: Path, kind: str = "checkpoint") -> Path:
    """Move a finished folder (or file) into place. An existing `out` must be our own output of this kind (or
    claimed with --overwrite in this process); it is swapped aside and removed only after the rename,
    so `out` is never half-written (and is put back if the rename fails)."""
    tmp, out = Path(tmp), Path(out)
    if out.exists() or out.is_symlink():
        if not is_own_output(out, kind) and str(out.resolve()) not in _OVERWRITE:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{out} exists and is not a hawqtool {kind}; it was left untouched (nothing written); "
                            "pass --overwrite or choose another -o")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        _remove(old)
    else:
        os.replace(tmp, out)
    return out


# ---- temporaries: written beside the output, removed on failure, cleaned after a crash ----

_TEMPORARY = re.compile(r"^(?P<stem>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)$")
# an OSError of these kinds is the user's to fix (space, permissions), not an internal error
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _remove(path: Path) -> None:
    """Delete a file, link or folder (not following links); nothing if it is absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(out: Path) -> None:
    """Remove what dead processes left beside `out`: half-written temporaries (OUT.tmp-PID, .OUT.tmp-PID)
    and previous outputs swapped aside (.OUT.old-PID), which are put back where `out` itself is gone.
    Entries of live processes (and this one) are left alone."""
    out = Path(out)
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if m is None or m["stem"] not in (out.name, "." + out.name):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        if m["what"] == "old" and not (out.exists() or out.is_symlink()):
            os.replace(entry, out)
            log.warning("restored %s from %s, where a process that no longer runs (PID %d) left it", out, entry, pid)
            continue
        _remove(entry)
        log.warning("removed %s, left half-written by a process that no longer runs (PID %d)", entry, pid)


def write_error(e: OSError, out: Path, need_bytes: int = 0) -> Exception:
    """The one-line UserError for an OSError the user can fix (full disk, read-only, no permission) while
    writing `out`; any other error is returned as it was."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f" (it needs about {need_bytes} bytes)" if need_bytes else ""
        return UserError(f"no space left on the device of {out} while writing it{need}; nothing was written: "
                         "free some space or choose another -o")
    if e.errno in _USER_ERRNOS:
        return UserError(f"cannot write {out} ({e.strerror}); nothing was written: choose a writable -o")
    return e


def ensure_free_space(folder: Path, need_bytes: int, out: Path) -> None:
    """UserError naming the bytes needed when the device of `folder` has less free space than that."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need_bytes > free:
        raise UserError(f"not enough free space for {out}: it needs about {need_bytes} bytes and {free} are free "
                        "on that device; free some space or choose another -o")


@contextmanager
def staged_output(out: Path, kind: str, need_bytes: int = 0, *, file: bool = False) -> Iterator[Path]:
    """Context for writing the folder output `out`: yields an empty temporary beside it (OUT.tmp-PID; with
    `file`, the path of a temporary file to create there, for a single-file output), then
    moves it into place (replace_dir). Before: stale temporaries of `out` are cleaned and `need_bytes` (if
    known) is checked against the free space. On any failure the temporary is removed, `out` is left as it
    was, and a full disk or a read-only/forbidden path becomes a one-line UserError."""
    out = Path(os.path.abspath(out))
    clean_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        _remove(tmp)
        if file:
            tmp.parent.mkdir(parents=True, exist_ok=True)
        else:
            tmp.mkdir(parents=True)
        ensure_free_space(tmp.parent if file else tmp, need_bytes, out)
        yield tmp
        replace_dir(tmp, out, kind)
    except OSError as e:
        _remove(tmp)
        err = write_error(e, out, need_bytes)
        if err is e:
            raise
        raise err from e
    except BaseException:
        _remove(tmp)
        raise
