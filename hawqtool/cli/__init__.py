"""Command line: parses arguments, shows progress, renders results. All work is in the library.

One module per command group; importing them registers their commands on `main`.
Exit codes: 0 ok, 1 user error (one line), 2 internal error (message + log file), 130 Ctrl-C.
"""
from ._base import main
from . import allocate_cmd, batch_cmd, bench_cmd, quantize_cmd, run_cmd, sensitivity_cmd  # noqa: F401  (registers commands)

__all__ = ["main"]
