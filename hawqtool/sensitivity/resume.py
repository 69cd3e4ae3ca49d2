"""The sensitivity stage's resume files: what a killed run already measured, kept in sealed JSON files beside the
report (REPORT.partial) and reused by a re-run with the same fingerprint, so the resumed report equals an
uninterrupted one. A damaged file is never used (its work is redone, and the user is told)."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any


class SealedJSON:
    """One JSON value kept under a key (the sensitivity fingerprint) and sealed with its sha256; written atomically."""

    def __init__(self, path, key: str, writer: bool = True):
        self.path, self.key, self.writer = Path(path), key, writer

    @staticmethod
    def _seal(key: str, value: Any) -> str:
        return hashlib.sha256(json.dumps([key, value], sort_keys=True).encode()).hexdigest()

    def read(self, field: str) -> Any:
        """The value saved under this key, or None (no file, another run's, or damaged: the user is warned)."""
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            d = None
        if isinstance(d, dict) and "seal" not in d and d.get("key") != self.key:
            return None  # another run's (other model, data or settings)
        v = d.get(field) if isinstance(d, dict) else None
        if not isinstance(d, dict) or d.get("seal") != self._seal(d.get("key"), v):
            logging.getLogger("hawqtool").warning("the saved work in %s is damaged: it is not used; it is redone",
                                                  self.path)
            return None
        return v if d.get("key") == self.key else None

    def write(self, field: str, value: Any) -> None:
        from ..artifacts import write_atomic

        if self.writer:
            write_atomic(self.path, json.dumps({"key": self.key, field: value, "seal": self._seal(self.key, value)}))

    def clear(self) -> None:
        if self.writer:
            self.path.unlink(missing_ok=True)


class ProbeLog(SealedJSON):
    """Per-probe samples (written after every probe); probes are seeded per probe, so the resumed run equals an
    uninterrupted one."""

    def load(self, names: list[str]) -> dict[str, list[float]] | None:
        s = self.read("samples")
        if not isinstance(s, dict) or set(s) != set(names) or len({len(v) for v in s.values()}) != 1:
            return None
        return {n: [float(x) for x in s[n]] for n in names}

    def save(self, samples: dict[str, list[float]]) -> None:
        self.write("samples", samples)


class QerrorLog(SealedJSON):
    """Each layer's quantization errors (‖Q(W)−W‖² per option) as the error pass finishes it: on a large model that
    pass takes longer than the probes (90 min of one core for a 3B model), so a re-run starts after the last layer
    saved. Saved at most every EVERY seconds (a 3B model's layers take ~30 s each; SmolLM2's, a second)."""

    EVERY = 30.0

    def __init__(self, path, key: str, writer: bool = True):
        super().__init__(path, key, writer)
        self.last = 0.0

    def load(self) -> dict[str, dict[str, float]]:
        q = self.read("qerror")
        if not isinstance(q, dict) or not all(isinstance(v, dict) for v in q.values()):
            return {}
        return {n: {k: float(x) for k, x in v.items()} for n, v in q.items()}

    def save(self, done: dict[str, dict[str, float]]) -> None:
        import time

        now = time.monotonic()
        if now - self.last >= self.EVERY:
            self.write("qerror", done)
            self.last = now
