"""Shared CLI plumbing: the `main` group, error guard, logging and common options.

Exit codes: 0 ok, 1 user error (one line), 2 internal error (message + log file), 130 Ctrl-C.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import traceback

import click

from ..errors import UserError

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
        except Exception as e:  # noqa: BLE001 - the user sees one line, the log has the trace
            fd, logpath = tempfile.mkstemp(prefix="hawqtool-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                traceback.print_exc(file=f)
            click.echo(f"internal error: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                       f"(traceback in {logpath})", err=True)
            sys.exit(2)
        finally:
            from ..outputs import release_all

            release_all()
    return wrapper


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
    fn = click.option("--seed", default=0, show_default=True, help="Seed for calibration windows and probes.")(fn)
    fn = click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code to run.")(fn)
    return fn


def _bits(s: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(x) for x in s.split(",") if x.strip()}))
    except ValueError:
        raise UserError(f"--bits must be a comma-separated list of integers like 2,3,4,8, got {s!r}")
    if not out or any(not 1 <= b <= 8 for b in out):
        raise UserError(f"--bits values must be between 1 and 8, got {s!r}")
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
