"""Keep transformers importable next to a torchvision wheel built for another torch (FACTS.md).

PyPI's torchvision 0.28.0 is a CUDA build; beside CPU torch its C++ ops are missing and
`import torchvision` fails at `torchvision::nms`, which breaks every transformers model
import (its image utilities import torchvision). Declaring the missing op schemas before the
first import lets torchvision, timm and transformers import (torchvision.ops stay unusable).
Does nothing when torchvision is absent or its compiled ops load (a torchvision matching torch):
declaring the schemas there would clash with the library's own definitions.

`import hawqtool` runs this; so does `_hawqtool_startup` (through hawqtool-torchvision.pth,
which the set-up installs) before torchvision's first import in any interpreter of the venv.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os

_LIB = None  # the Library must stay alive for its definitions to stay registered


def _ops_load(spec) -> bool:
    """True if torchvision's compiled ops (its `_C` extension) load beside this torch; loading registers
    them, exactly as `import torchvision` would."""
    import torch

    if os.name == "nt" or not spec.submodule_search_locations:
        return True  # Windows wheels are CPU builds that match; leave them alone
    finder = importlib.machinery.FileFinder(list(spec.submodule_search_locations)[0],
                                            (importlib.machinery.ExtensionFileLoader,
                                             importlib.machinery.EXTENSION_SUFFIXES))
    lib = finder.find_spec("_C")
    if lib is None or not lib.origin:
        return False
    try:
        torch.ops.load_library(lib.origin)
        return True
    except OSError:  # e.g. libc10_cuda.so missing: a CUDA build beside CPU torch
        return False


def patch_torchvision_ops() -> None:
    global _LIB
    if _LIB is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - raises if the op is not registered
        return
    except (AttributeError, RuntimeError):
        pass
    if _ops_load(spec):
        return
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        try:
            _LIB.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass
