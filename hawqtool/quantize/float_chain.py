"""What the block loop does with the float model's own block outputs (the float chain, carried beside the quantized
one): GPTAQ's retargeting of each layer before GPTQ (--float-target) and block tuning after it (--tune-iters)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..blocks import BlockInputs
from ..errors import UserError
from ..models import set_weight_matrix, weight_matrix
from ..options import QuantizeOptions
from .hessians import collect_cross, float_target, is_conv

log = logging.getLogger("hawqtool")


def uses_float_chain(opts: QuantizeOptions) -> bool:
    """Whether the block loop carries the float model's block inputs (GPTAQ's targets, block tuning's)."""
    return opts.float_target or (opts.tune_iters > 0 and opts.method == "gptq")


def retarget(group: dict[str, nn.Module], Hs: dict, block: nn.Module, inputs: BlockInputs,
             floats: tuple[nn.Module, BlockInputs], opts: QuantizeOptions) -> None:
    """Replace each layer's weight by the one that maps the quantized chain's inputs onto the float block's
    outputs (hessians.float_target), which GPTQ then quantizes."""
    if any(is_conv(m) for m in group.values()):
        raise UserError("--float-target supports Linear and Conv1D layers; quantize convolutional models without it")
    Ds = collect_cross(block, floats[0], group, inputs, floats[1], first_weight=opts.first_token_weight)
    for n, m in group.items():
        W = weight_matrix(m)
        set_weight_matrix(m, float_target(W.float(), Ds[n], Hs[n]._sum, opts.percdamp).to(W.dtype))


def tune_results(block: nn.Module, in_block: dict[str, nn.Module], results: dict, inputs: BlockInputs,
                 targets: list[torch.Tensor], opts: QuantizeOptions, i: int, n_total: int) -> list | None:
    """Block tuning (tune.py) of block i's GPTQ results (driver.LayerResult): each result's weight becomes the tuned
    one (or stays GPTQ's) with a note of the block's error; the caller puts them into the block. Returns the
    block's outputs on `inputs` with the tuned weights (the block engine's next inputs), None where not tuned."""
    from .tune import tune_block

    res = tune_block(block, in_block, {n: results[n].weight for n in in_block},
                     {n: results[n].updated for n in in_block}, inputs, targets, iters=opts.tune_iters,
                     lr=opts.tune_lr or None, scale_lr=opts.tune_scale_lr, loss=opts.tune_loss,
                     first_weight=opts.first_token_weight, seed=i, n_total=n_total, dtype=opts.tune_dtype)
    for n in in_block:
        results[n].updated = None  # GPTQ's compensated weights are needed no more
    if not res.tuned:
        return None
    log.info("block %d tuned in %.1f s: output error %.4g -> %.4g%s, %.2f%% of codes moved", i, res.seconds,
             res.loss_before, res.loss_after, " (worse: GPTQ's kept)" if res.kept else "", 100 * res.changed)
    for n in res.tuned:
        r = results[n]
        r.weight = res.weights[n]
        r.notes = r.notes + [f"block tuned ({opts.tune_iters} steps): block output error {res.loss_before:.6g} -> "
                             f"{res.loss_after:.6g}" + ("; GPTQ's codes kept" if res.kept else "")]
    return res.outputs
