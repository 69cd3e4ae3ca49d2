"""Where and in what precision a stage computes: `--device auto|cpu|cuda|cuda:N`, `--dtype auto|float32|
bfloat16|float16`. A stage reads the device from its model (`model_device`) and puts everything it creates
there; statistics that need the range (Hessians, Cholesky, traces) stay fp32/fp64 whatever the dtype.
A CUDA request on a machine without CUDA is a one-line error, never a silent CPU run."""
from __future__ import annotations

import os

import torch
from torch import nn

from .errors import UserError

DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device a `--device` value names: auto = the current CUDA device when there is one, else the CPU."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return _local_cuda() if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {spec!r} is not a device; use {DEVICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UserError(f"--device {spec!r} is not supported; use {DEVICES}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {spec} asked for CUDA, but torch {torch.__version__} sees no CUDA device here; "
                        "use --device cpu (or auto), or install a CUDA build of torch")
    index = _local_cuda().index if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered 0..{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def _local_cuda() -> torch.device:
    """This process's GPU: torchrun's LOCAL_RANK-th (one GPU per rank), else the current one."""
    local = os.environ.get("LOCAL_RANK")
    index = int(local) % torch.cuda.device_count() if local is not None else torch.cuda.current_device()
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The model's compute dtype: auto = bfloat16 on CUDA, float32 on the CPU (CPU kernels and the
    reproducibility guarantees are fp32)."""
    if isinstance(spec, torch.dtype):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise UserError(f"--dtype {spec!r} is not a dtype; use auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def model_device(model: nn.Module) -> torch.device:
    """The device a model computes on: that of its first parameter not on the meta device (CPU if none)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its first floating-point parameter (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch of model keyword inputs with every tensor on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
