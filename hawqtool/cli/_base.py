"""Shared CLI plumbing: the `main` group, error guard, logging and common options.

Exit codes: 0 ok, 1 user error (one line), 2 internal error (message + log file), 130 Ctrl-C.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import tempfile
import traceback

import click

from ..errors import UserError
from .params import SEED, HawqtoolGroup

log = logging.getLogger("hawqtool")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "gguf", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # transformers' own weight-loading bars would interleave with ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def guarded(fn):
    """Turn UserError into one line + exit 1, Ctrl-C into exit 130, anything else into exit 2."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: finished stages/blocks are kept; re-run the same command to resume", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except OSError as e:
            if e.errno not in _USER_OS_ERRORS:
                raise _internal(e)
            where = e.filename if e.filename is not None else "an input or output path"
            click.echo(f"error: {where}: {e.strerror or os.strerror(e.errno)}; check that the path is a writable "
                       f"place with free space (or pass another path)", err=True)
            sys.exit(1)
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise _internal(e)
            click.echo("error: out of memory; lower --nsamples, --seqlen or --batch-size (or free memory)", err=True)
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - the user sees one line, the log has the trace
            raise _internal(e)
        finally:
            from ..outputs import release_all

            release_all()
    return wrapper


# errors of the machine's paths, not of hawqtool: permissions, read-only or full file systems, a file where a
# folder must be. The user fixes them (another -o, free space), so they are exit 1 like any bad input.
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                   errno.ENAMETOOLONG}


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation (Python's MemoryError, torch's CPU/CUDA allocator errors): sizes the user chose
    exceed this machine, which they fix with smaller settings."""
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def _internal(e: BaseException) -> SystemExit:
    """Write the current traceback to a log file, print the one-line internal error naming it: exit 2."""
    fd, logpath = tempfile.mkstemp(prefix="hawqtool-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        traceback.print_exc(file=f)
    click.echo(f"internal error: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
               f"(traceback in {logpath})", err=True)
    return SystemExit(2)


def common(fn):
    """-q/-v/--json on every command."""
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress bars or tables.")(fn)
    fn = click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(fn)
    return fn


def overwrite_option(fn):
    """--overwrite: let -o replace something hawqtool did not write (never an input)."""
    return click.option("--overwrite", is_flag=True,
                        help="Replace -o even if it holds something hawqtool did not write (never an input).")(fn)


def calib_options(fn):
    fn = click.option("--seed", type=SEED, default=0, show_default=True,
                      help="Seed for calibration windows and probes.")(fn)
    fn = click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code to run.")(fn)
    return fn


@click.group(cls=HawqtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hawqtool")
def main() -> None:
    """Hessian-aware mixed-precision quantization.

    \b
    hawqtool run --avg-bits 3.0 -o out/          # whole pipeline on the embedded default
    hawqtool sensitivity MODEL --calib wiki -o sens.json
    hawqtool allocate sens.json --avg-bits 3.0 -o plan.json
    hawqtool quantize MODEL --plan plan.json --calib wiki -o ckpt/
    hawqtool eval ckpt/ --data wiki
    hawqtool export ckpt/ --format compressed-tensors -o ckpt-ct/
    """
