"""The error the quantizer really leaves, per layer and option: GPTQ (or RTN) run on the layer's own
calibration Hessian, its output error ‖ΔW x‖² expressed in the units of importance.py's weighted
error (divided by the mean input second moment), so the allocator's Ω can use it in place of the
searched-RTN estimate. GPTQ exploits input correlations that a diagonal estimate cannot see, and its
gain over RTN differs from layer to layer: this is the error that the quantize stage will leave.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from ..artifacts import qerror_key
from ..models import weight_matrix
from .quantizer import QuantSpec

if TYPE_CHECKING:
    from .driver import QuantizeOptions


def layer_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict],
                   first_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """H = (2/n) Σ x xᵀ of every Linear / HF Conv1D input over the batches, in one forward pass of the
    full-precision model (position 0 weighted by `first_weight`, as the quantize stage does)."""
    from transformers.pytorch_utils import Conv1D

    from .hessians import collect_hessians

    dense = {n: m for n, m in layers.items() if isinstance(m, (nn.Linear, Conv1D))}
    acc = collect_hessians(model, dense, None, early_stop=False, batches=batches, first_weight=first_weight)
    return {n: a.H for n, a in acc.items()}


def measured_errors(W: torch.Tensor, H: torch.Tensor, specs: Iterable[QuantSpec], opts: QuantizeOptions,
                    ) -> dict[str, float]:
    """{qerror key: ½·ΔW H ΔWᵀ / mean(diag(H)/2)} for each spec, with ΔW what the quantize stage leaves
    under `opts` (method gptq or rtn, grid, act-order): the same units as weighted_quant_error."""
    from .output_error import output_error
    from .gptq import gptq_quantize
    from .quantizer import rtn

    W = W.detach().float()
    norm = float(H.diagonal().double().mean()) / 2
    search = opts.grid == "search"
    out = {}
    for spec in specs:
        if opts.method == "rtn":
            Q = rtn(W, spec, search=search, d=H.diagonal()).dequantize()
        else:
            Q = gptq_quantize(W, H, spec, blocksize=opts.blocksize, percdamp=opts.percdamp, act_order=opts.act_order,
                              static_groups=opts.static_groups, search=search).dequantized
        out[qerror_key(spec.bits, spec.group_size, spec.symmetric)] = output_error(W, Q, H) / max(norm, 1e-30)
    return out


def measured_table(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict], specs: list[QuantSpec],
                   opts: QuantizeOptions) -> dict[str, dict[str, float]]:
    """measured_errors for every dense layer of the model (Hessians from one forward pass, position 0
    weighted by opts.first_token_weight)."""
    Hs = layer_hessians(model, layers, batches, opts.first_token_weight)
    return {n: measured_errors(weight_matrix(layers[n]).float(), H, specs, opts) for n, H in Hs.items()}
