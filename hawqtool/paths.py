"""Where hawqtool keeps cached conversions (the embedded default model)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$HAWQTOOL_CACHE, else $XDG_CACHE_HOME/hawqtool, else ~/.cache/hawqtool."""
    env = os.environ.get("HAWQTOOL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hawqtool"
