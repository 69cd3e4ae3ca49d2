"""What the library reports progress through: plain callables, handed out by a `Hooks` object. The CLI passes its
rich `progress.Reporter`; library callers pass nothing (`Silent`) or their own object with these methods."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Protocol


class Hooks(Protocol):
    def bar(self, description: str, total: int) -> ContextManager[Callable[[int], None]]: ...
    def probe_bar(self, max_probes: int) -> ContextManager[Callable[[int, int, float], None]]: ...
    def lines(self, description: str, total: int) -> Callable[[int], None]: ...
    def skip(self, stage: str) -> None: ...
    def say(self, msg: str) -> None: ...


class Silent:
    """Hooks that report nothing."""

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    @contextlib.contextmanager
    def probe_bar(self, max_probes: int) -> Iterator[Callable[[int, int, float], None]]:
        yield lambda done, total, worst: None

    def lines(self, description: str, total: int) -> Callable[[int], None]:
        return lambda n=1: None

    def skip(self, stage: str) -> None:
        pass

    def say(self, msg: str) -> None:
        pass
