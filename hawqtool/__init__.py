"""hawqtool: Hessian-aware mixed-precision quantization.

The five stages as library calls (the CLI wraps exactly these):
    load_model -> compute_sensitivity -> allocate_bits -> quantize_stage -> perplexity
and `load_quantized(path)` to run a saved checkpoint on quant_kernels. Names are
imported lazily so that `hawqtool --help` does not pay for torch and transformers.
"""
from __future__ import annotations

import importlib

from ._compat import patch_torchvision_ops

__version__ = "0.1.0"
patch_torchvision_ops()

_API = {
    "load_model": "models", "quantizable_layers": "models",
    "calibration_windows": "data", "eval_windows": "data",
    "compute_sensitivity": "stages", "quantize_stage": "stages",
    "allocate_bits": "allocate.plan", "fixed_plan": "allocate.plan",
    "QuantizeOptions": "quantize.driver", "QuantSpec": "quantize.quantizer",
    "perplexity": "evaluate", "load_quantized": "loader",
    "RunConfig": "run", "run_pipeline": "run", "UserError": "errors",
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'hawqtool' has no attribute {name!r}")
