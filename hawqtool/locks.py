"""One writer per output: a kernel lock (flock) on a file beside the output, held while this process writes it.

The kernel drops the lock when its holder exits, however it exits, so a crashed run never leaves a lock that
has to be guessed stale from a PID, and two processes can never both break the same stale lock (the race a
PID-only lock has). The file names the holder's PID and host, for the message a second writer gets. On a shared
file system the lock is as good as the file system's own locking (Linux NFS maps flock onto NFS locks).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from .errors import UserError

log = logging.getLogger("hawqtool")

_HELD: dict[str, int] = {}  # output path -> the open descriptor that holds its lock


def lock_path(out: Path) -> Path:
    """The lock file of output `out`: `.NAME.hawqtool-lock` beside it."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.hawqtool-lock")


def _holder(fd: int) -> str:
    """What a lock file says about its holder ("PID 123" or "PID 123 on host h"), '' when it says nothing."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        words = os.read(fd, 512).decode("utf-8", "replace").split()
    except OSError:
        return ""
    if not words or not words[0].isdigit():
        return ""
    host = words[1] if len(words) > 1 else ""
    return f"PID {words[0]}" + (f" on host {host}" if host and host != socket.gethostname() else "")


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path`."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def take_lock(out: Path) -> None:
    """Hold the lock of `out` for this process (released by release_lock or at exit); a one-line UserError if
    another live process holds it."""
    key = str(Path(os.path.abspath(out)))
    if key in _HELD:
        return
    lp = lock_path(out)
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder of {out}: {e.strerror}; choose a writable -o") from e
    for _ in range(8):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write beside {out}: {e.strerror}; choose a writable -o") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd) or "unknown PID"
            os.close(fd)
            raise UserError(f"another hawqtool process ({who}) is writing {out}; wait for it to finish "
                            f"or choose another -o (lock: {lp})") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):  # e.g. Lustre mounted without flock
                log.warning("%s has no file locks (%s): nothing stops a second hawqtool process from writing %s at "
                            "the same time", lp.parent, e.strerror, out)
                with contextlib.suppress(OSError):
                    if lp.stat().st_size == 0:  # the empty file just opened: not left behind
                        lp.unlink()
                return
            raise UserError(f"cannot lock {lp}: {e.strerror}; choose -o on a file system with file locks") from e
        try:
            if not _same_file(fd, lp):  # the holder we waited on removed the file after we opened it: retry
                os.close(fd)
                continue
            before = _holder(fd)
            if before:
                log.warning("taking over the stale lock %s of a process that no longer holds it (%s)", lp, before)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError as e:  # never keep a lock this process does not record (it would lock itself out)
            os.close(fd)
            raise UserError(f"cannot write the lock {lp}: {e.strerror}; choose a writable -o") from e
        if not _HELD:
            atexit.register(release_locks)
        _HELD[key] = fd
        return
    raise UserError(f"could not take the lock {lp}: other processes keep replacing it; retry")


def release_lock(out: Path) -> None:
    """Give up this process's lock on `out` and remove its file (no-op if this process does not hold it)."""
    fd = _HELD.pop(str(Path(os.path.abspath(out))), None)
    if fd is None:
        return
    try:  # removed while still held, so no other process can be holding the file this unlinks
        lock_path(out).unlink(missing_ok=True)
    except OSError:
        pass
    os.close(fd)


def release_locks() -> None:
    """Give up every lock this process holds."""
    for out in list(_HELD):
        release_lock(Path(out))
