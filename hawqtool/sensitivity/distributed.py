"""Probes spread over torch.distributed ranks (torchrun; gloo on CPU, nccl on GPU).

Probe k is seeded by (seed, k) alone, so which rank computes it does not matter. Ranks take
probes round-robin (rank r computes k ≡ r mod W) and all-gather each round's per-layer
values; every rank then sees the single-process sequence of samples in the same order and
takes the same stopping decision, so N ranks give the 1-process estimate (about N× faster).
"""
from __future__ import annotations

import os
from typing import Callable

import torch


def world() -> tuple[int, int]:
    """(rank, world size), starting the process group from torchrun's environment when needed."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per rank: torchrun's LOCAL_RANK (device.resolve_device agrees)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


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
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            mine = torch.tensor(probe(start + rank), dtype=torch.float64, device=dev)
            parts = [torch.empty_like(mine) for _ in range(size)]
            dist.all_gather(parts, mine)
            cache.clear()
            for r, t in enumerate(parts):
                cache[start + r] = t.tolist()
        return cache[k]

    return get
