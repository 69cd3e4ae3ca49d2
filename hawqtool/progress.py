"""Progress bars and messages for the CLI (rich), silent in quiet/JSON mode."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """Hands out progress callbacks; library code only ever sees plain callables."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True)

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=self.console, disable=self.quiet, transient=False)

    def lines(self, description: str, total: int):
        """advance(n) for a loop of `total` steps that prints a line at every tenth of it (no live display: usable
        inside another bar, and what batch-job logs show)."""
        done = [0, 0]

        def advance(n: int = 1) -> None:
            done[0] += n
            decile = 10 * done[0] // max(total, 1)
            if decile > done[1] and not self.quiet:
                done[1] = decile
                self.console.print(f"{description}: {done[0]}/{total}")

        return advance

    @contextlib.contextmanager
    def bar(self, description: str, total: int):
        """Yields advance(n) for a loop of `total` steps (plain 10% lines when not on a terminal,
        so batch-job logs show progress)."""
        if not self.quiet and not is_tty():
            yield self.lines(description, total)
            return
        with self._progress() as p:
            task = p.add_task(description, total=total, info="")
            yield lambda n=1: p.advance(task, n)

    @contextlib.contextmanager
    def probe_bar(self, max_probes: int):
        """Yields callback(done, max_probes, worst_rel_se) for the Hutchinson loop."""
        if not self.quiet and not is_tty():
            def line(done: int, total: int, worst: float) -> None:
                self.console.print(f"sensitivity probe {done}/{total}: worst rel. s.e. {worst:.1%}")

            yield line
            return
        with self._progress() as p:
            task = p.add_task("sensitivity probes", total=max_probes, info="")

            def cb(done: int, total: int, worst: float) -> None:
                p.update(task, completed=done, total=total, info=f"worst rel. s.e. {worst:.1%}")

            yield cb

    def skip(self, stage: str) -> None:
        self.say(f"[dim]{stage}: artifact is current, skipped[/dim]")

    def say(self, msg: str) -> None:
        """One message line, never wrapped at the console's width (a path broken over two lines cannot be
        copied or found in a log)."""
        if not self.quiet:
            self.console.print(msg, soft_wrap=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
