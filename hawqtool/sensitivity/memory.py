"""Activation checkpointing of a model's repeated blocks while estimating traces (a memory option).

Each block's forward runs under torch.utils.checkpoint (non-reentrant, which supports the double
backward of Hessian-vector products): only block inputs are kept from the forward pass and the
rest is recomputed in the backward. Measured on SmolLM2 at 512 tokens: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from ..blocks import find_blocks


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[int]:
    """Run every repeated block under activation checkpointing (KV caching off); restored on exit.
    Yields the number of blocks wrapped."""
    _, blocks = find_blocks(model)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None and use_cache is not None:
        config.use_cache = False  # a cache would be appended to twice: once in forward, once in recompute
    saved = [(b, b.forward) for b in blocks]
    try:
        for b, fwd in saved:
            b.forward = functools.partial(_checkpointed, fwd)
        yield len(saved)
    finally:
        for b, fwd in saved:
            b.forward = fwd
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
