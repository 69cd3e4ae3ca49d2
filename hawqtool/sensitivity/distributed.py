"""Probes spread over torch.distributed ranks (torchrun; gloo on CPU, nccl on GPU).

Probe k is seeded by (seed, k) alone, so which rank computes it does not matter. Ranks take
probes round-robin (rank r computes k ≡ r mod W) and all-gather each round's per-layer
values; every rank then sees the single-process sequence of samples in the same order and
takes the same stopping decision, so N ranks give the 1-process estimate (about N× faster).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..distributed import comm_device, world  # noqa: F401  (world: re-exported for the estimators)


def probe_seed(seed: int, k: int) -> int:
    """Seed of probe k: independent of rank and of the order probes are computed in."""
    return (seed * 1_000_003 + k) % (2**63 - 1)


def round_robin(probe: Callable[[int], list[float]], rank: int, size: int) -> Callable[[int], list[float]]:
    """probe(k) for k = 0, 1, … in order, computing only this rank's share and gathering the rest."""
    if size == 1:
        return probe
    import torch.distributed as dist

    cache: dict[int, list[float]] = {}

    def get(k: int) -> list[float]:
        if k not in cache:
            start = (k // size) * size
            mine = torch.tensor(probe(start + rank), dtype=torch.float64, device=comm_device())
            parts = [torch.empty_like(mine) for _ in range(size)]
            dist.all_gather(parts, mine)
            cache.clear()
            for r, t in enumerate(parts):
                cache[start + r] = t.tolist()
        return cache[k]

    return get
