"""`--max-memory` sizes (3GiB, 512MiB, 8GB, bytes), parsed without importing torch so `--help` stays fast."""
from __future__ import annotations

import re

from .errors import UserError

GIB = 1 << 30
_UNITS = {"gib": GIB, "g": GIB, "mib": 1 << 20, "m": 1 << 20, "gb": 10**9, "mb": 10**6, "b": 1, None: 1}


def parse_memory(text: str) -> int:
    """Bytes of a `--max-memory` value: 3GiB, 512MiB, 8GB, or a plain byte count (more than zero)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|mib|gb|mb|g|m|b)?\s*", str(text).lower())
    if not m:
        raise UserError(f"--max-memory {text!r} is not a size; write e.g. 3GiB or 512MiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise UserError(f"--max-memory {text!r} must be more than zero")
    return value
