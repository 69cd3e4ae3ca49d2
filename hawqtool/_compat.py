"""Keep transformers importable next to a torchvision wheel built for another torch (FACTS.md).

PyPI's torchvision 0.28.0 is a CUDA build; beside CPU torch its C++ ops are missing and
`import torchvision` fails at `torchvision::nms`, which breaks every transformers model
import (its image utilities import torchvision). Declaring the missing op schemas before the
first import lets torchvision, timm and transformers import (torchvision.ops stay unusable).
Does nothing when torchvision is absent or its ops are registered.
"""
from __future__ import annotations

import importlib.util

_LIB = None  # the Library must stay alive for its definitions to stay registered


def patch_torchvision_ops() -> None:
    global _LIB
    if _LIB is not None or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - raises if the op is not registered
        return
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        try:
            _LIB.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass
