"""Data parallel over torch.distributed ranks (launched by torchrun; gloo on CPU, nccl on GPU): no launcher here.

Batch g of a stage's calibration or evaluation list belongs to rank g mod W (strided). Sums that must equal the
single-process result bit for bit are formed in lockstep: at step t every rank contributes its batch t·W + r
(or an empty part when it has none), the parts are gathered and added in rank order, which is the global batch
order a single process adds them in. Results computed once (a GPTQ layer) are made by their owner rank and
broadcast."""
from __future__ import annotations

import os
from typing import Any, Callable

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
        import atexit

        atexit.register(_shutdown)
    return dist.get_rank(), dist.get_world_size()


def _shutdown() -> None:
    """At exit: wait until every rank is here, then tear the process group down. The wait goes through torchrun's
    key-value store, not gloo: a gloo barrier let the first rank out close its sockets while a peer was still
    finishing the same barrier, which then failed, and that rank could abort in teardown ('terminate called without
    an active exception', twice in CI). Past this wait no rank has a gloo operation left."""
    import logging

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        all_arrived("exit")
    except Exception as e:  # noqa: BLE001 - a peer gone first, or failed (torchrun reports that one)
        logging.getLogger(__name__).info("at exit, waiting for the other ranks failed (%s); tearing down anyway", e)
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).debug("at exit, destroy_process_group failed (%s)", e)


def end_rank(code: int | str | None) -> None:
    """End a torchrun rank whose command has finished with exit `code` (no-op without a process group): the exit
    functions run now (the ranks' wait and the group's teardown, lock release, log flush), then the process ends
    without the interpreter's teardown, whose C++ destructors can still meet gloo threads and abort a finished run.
    A failed rank does not wait for the others (they may be blocked in a collective that needs it: torchrun stops
    them when it sees the failure). Every output is complete before this (written atomically, files closed)."""
    import atexit
    import sys

    dist = sys.modules.get("torch.distributed")  # not imported: no group (and no torch import for `--help`)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if code is not None and not isinstance(code, int):  # sys.exit("message"): print it, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    if code:
        atexit.unregister(_shutdown)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 0)


def all_arrived(name: str) -> None:
    """Block until every rank has called all_arrived(name), counting in the process group's store (a counter and a
    flag the last arrival sets; keyed by torchrun's restart count so a restarted job starts from zero)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    store, size = _get_default_store(), dist.get_world_size()
    key = f"hawqtool/{name}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if store.add(key, 1) == size:
        store.set(f"{key}/all", "1")
    store.wait([f"{key}/all"])


def comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU under nccl, the CPU under gloo."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def my_share(items: list, rank: int, size: int) -> list:
    """The items this rank handles: every size-th from its rank (strided, so gathers restore global order)."""
    return items[rank::size]


def steps(n: int, size: int) -> int:
    """Lockstep rounds over n strided items: every rank runs this many, some with nothing in the last."""
    return -(-n // size)


def ordered_sum(part: torch.Tensor | None, like: torch.Tensor, total: torch.Tensor | None) -> torch.Tensor:
    """total + the parts of all ranks for this step, added one by one in rank order (None: this rank has no part;
    it adds nothing). `like` gives the shape and dtype of a part. Single process: total + part."""
    rank, size = world()
    if size == 1:
        return part.clone() if total is None else total + part
    import torch.distributed as dist

    dev = comm_device()
    mine = torch.stack([torch.tensor(float(part is not None), device=dev)])
    x = (part if part is not None else torch.zeros_like(like)).to(dev).contiguous()
    xs, flags = [torch.empty_like(x) for _ in range(size)], [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(flags, mine)
    dist.all_gather(xs, x)
    for f, p in zip(flags, xs):
        if float(f) > 0:
            p = p.to(like.device)
            total = p.clone() if total is None else total + p
    return total


def gather_list(items: list[Any], n: int) -> list[Any]:
    """All ranks' strided shares of an n-item list (each rank holding `items` = its share), back in global order
    on every rank (objects pickled: for small results such as per-batch sums or CPU activations)."""
    rank, size = world()
    if size == 1:
        return list(items)
    import torch.distributed as dist

    shares: list = [None] * size
    dist.all_gather_object(shares, list(items))
    return [shares[g % size][g // size] for g in range(n)]


def broadcast_from(owner: int, make: Callable[[], Any]) -> Any:
    """make() on the owner rank, its result (a picklable object, e.g. CPU tensors) given to every rank."""
    rank, size = world()
    if size == 1:
        return make()
    import torch.distributed as dist

    box = [make() if rank == owner else None]
    dist.broadcast_object_list(box, src=owner)
    return box[0]


def broadcast_tensors(owner: int, tensors: list[torch.Tensor] | None, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """The owner rank's `tensors` on every rank (others pass None; `like` gives shapes, dtypes and devices), sent as
    one flat tensor. Single process: `tensors` itself."""
    rank, size = world()
    if size == 1:
        return tensors
    import torch.distributed as dist

    dev = comm_device()
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(dev) if rank == owner else \
        torch.empty(sum(t.numel() for t in like), dtype=like[0].dtype, device=dev)
    dist.broadcast(flat, src=owner)
    out, at = [], 0
    for t in like:
        out.append(flat[at:at + t.numel()].reshape(t.shape).to(t.device))
        at += t.numel()
    return out


def barrier() -> None:
    rank, size = world()
    if size > 1:
        import torch.distributed as dist

        dist.barrier()


def owners(sizes: dict[str, int], size: int) -> dict[str, int]:
    """Each item's owner rank, greedily balancing the summed sizes (largest first; ties by name: every rank
    computes the same assignment)."""
    load = [0] * size
    out: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(size), key=lambda i: (load[i], i))
        out[name] = r
        load[r] += sizes[name]
    return out
