"""Shared CLI test helpers: run a command in-process, and check a one-line error."""
from __future__ import annotations

from click.testing import CliRunner

from hawqtool.cli import main


def invoke(*args, ok: bool = True):
    """Run `hawqtool ARGS` in-process; with ok, assert exit 0."""
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, (res.output, res.stderr)
    return res


def one_line_error(res, *words):
    """Exit code 1 and a single 'error: ...' line naming the problem, no traceback."""
    assert res.exit_code == 1, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for w in words:
        assert w in lines[0], lines[0]
