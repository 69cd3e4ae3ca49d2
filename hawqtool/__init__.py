"""hawqtool: Hessian-aware mixed-precision quantization.

The five stages as library calls (the CLI wraps exactly these):
    load_model -> compute_sensitivity -> allocate_bits -> quantize_model -> evaluate_perplexity
and `load_quantized(path)` to run a saved checkpoint on quant_kernels.
"""
__version__ = "0.1.0"

from .errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
