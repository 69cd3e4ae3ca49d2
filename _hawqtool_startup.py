"""Runs at interpreter start (hawqtool-torchvision.pth beside it in site-packages) so that a plain
`from transformers import LlamaConfig` works in hawqtool's environments without importing hawqtool first.

Why: PyPI has no CPU build of torchvision; the one matching torch 2.13 (pulled in by timm, the vision and
test extras) is a CUDA build whose compiled ops cannot load beside the CPU torch the set-up installs, and
its import then fails at `torchvision::nms`. transformers imports torchvision whenever it is installed,
so every model import fails too. `hawqtool._compat.patch_torchvision_ops` declares the missing op schemas
(only when torchvision's ops cannot load); this module runs it just before torchvision's first import in
any interpreter of the environment. Until then it costs nothing: it only adds a finder that waits for
the name `torchvision` (torch is imported then, as torchvision would import it anyway).
"""
from __future__ import annotations

import sys


class _BeforeTorchvision:
    """A meta-path finder that never finds anything: it runs the fix-up once when `torchvision` is looked up
    (import or importlib.util.find_spec), then lets the normal finders do the work."""

    done = False

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision" and not cls.done:
            cls.done = True  # first, so that the look-ups made by the fix-up itself pass straight through
            try:
                from hawqtool._compat import patch_torchvision_ops

                patch_torchvision_ops()
            except Exception:  # noqa: BLE001 - never break an import over a fix-up; it fails as it would have
                pass
        return None


def install() -> None:
    """Put the finder first on sys.meta_path, once, unless torchvision is already imported."""
    if "torchvision" not in sys.modules and _BeforeTorchvision not in sys.meta_path:
        sys.meta_path.insert(0, _BeforeTorchvision)


install()
