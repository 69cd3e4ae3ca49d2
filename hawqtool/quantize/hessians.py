"""GPTQ's H = 2/n Σ x xᵀ of each layer's input, collected with hooks while a block (or the whole model) runs over
the calibration batches. Under torch.distributed each rank runs its strided share of the batches in lockstep and
the per-batch XᵀX are added in global batch order (distributed.ordered_sum): the same H, bit for bit, as one
process gives, so N ranks write the 1-rank checkpoint."""
from __future__ import annotations

import torch
from torch import nn

from ..blocks import BlockInputs, _Stop, run_block, stop_after
from ..distributed import ordered_sum, steps, world
from ..errors import UserError
from ..streaming import tail_of
from .conv import ConvHessianAccumulator
from .gptq import HessianAccumulator


def is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d))


def padded_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as the convolution sees it: timm's Conv2dSame pads dynamically (TF 'SAME') inside its
    forward with `padding` left at 0, so its patches must be taken from the padded input."""
    if type(m).__name__ == "Conv2dSame":
        from timm.layers.padding import pad_same

        return pad_same(x, m.weight.shape[-2:], m.stride, m.dilation)
    return x


def first_scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x [batch, positions, features] with each sequence's first position times `factor` (the attention sink's
    weight in H and D); x itself when factor is 1 or x has no sequence dimension."""
    if factor == 1.0 or x.dim() != 3:
        return x
    return torch.cat([x[:, :1] * factor, x[:, 1:]], dim=1)


def _accumulators(group: dict[str, nn.Module]) -> dict[str, HessianAccumulator | ConvHessianAccumulator]:
    from ..models import weight_matrix

    return {n: ConvHessianAccumulator(m) if is_conv(m) else HessianAccumulator(weight_matrix(m).shape[1])
            for n, m in group.items()}


def collect_hessians(module: nn.Module, group: dict[str, nn.Module], inputs: BlockInputs | None, *,
                     early_stop: bool, batches: list[dict] | None = None, first_weight: float = 1.0,
                     final: BlockInputs | None = None, n_total: int | None = None) -> dict[str, HessianAccumulator]:
    """Accumulate H for each layer of `group` while running `module`: a block over `inputs` (stopping once the
    group has run, with `early_stop`), or the model over `batches` (`final`: a streamed model's last block
    outputs, so only what follows the blocks runs). `n_total`: the number of batches over all ranks (this
    rank's are its strided share)."""
    rank, size = world()
    if size > 1 and any(is_conv(m) for m in group.values()):
        raise UserError("data-parallel quantize supports Linear and Conv1D layers; quantize convolutional models "
                        "in one process")
    acc = _accumulators(group)
    seen: dict[tuple, tuple] = {}  # input of this batch -> (first layer, tensor kept alive so its
    # memory cannot be reused by a different tensor within the same forward)
    alias: dict[str, str] = {}  # q/k/v (gate/up) read one tensor: its XᵀX is computed once
    step: dict[str, HessianAccumulator] = {}  # data parallel: this step's part of each accumulator

    def hook(_m, a, n):
        x = a[0]
        if is_conv(group[n]):  # patches depend on the conv's own kernel/stride: no sharing
            acc[n].add_batch(padded_input(group[n], x.detach()))
            return
        key = (x.data_ptr(), tuple(x.shape))
        first = seen.setdefault(key, (n, x))[0]
        if first != n:
            alias[n] = first
        else:
            x = x.detach()
            # XᵀX then weighs the first position first_weight; scaled in fp32 (a bf16 model's inputs would round)
            x = first_scaled(x.float(), first_weight ** 0.5)
            (step.setdefault(n, HessianAccumulator(acc[n].in_features)) if size > 1 else acc[n]).add_batch(x)

    local = len(inputs.hidden) if inputs is not None else len(batches)
    rounds = steps(n_total if n_total is not None else local, size) if size > 1 else local
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: hook(_m, a, n)) for n, m in group.items()]
    try:
        with torch.no_grad(), (stop_after(list(group.values())) if early_stop and inputs is not None
                               else _nullctx()) as ctx:
            for j in range(rounds):
                seen.clear()
                step.clear()
                if j < local:
                    _run(module, inputs, batches, final, j, ctx if early_stop and inputs is not None else None)
                if size > 1:
                    _add_step(acc, step, group)
    finally:
        for h in handles:
            h.remove()
    for n, first in alias.items():
        acc[n] = acc[first]
    return acc


def _run(module: nn.Module, inputs: BlockInputs | None, batches: list[dict] | None, final: BlockInputs | None,
         j: int, ctx) -> None:
    """Batch j through the block (until the group has run) or through the model (its tail, when streamed)."""
    if inputs is None:
        b = batches[j]
        with tail_of(module, final, j) if final is not None else _nullctx():
            module(**b, **({"use_cache": False} if "input_ids" in b else {}))
        return
    if ctx is not None:
        ctx.reset()
    try:
        run_block(module, inputs, j)
    except _Stop:
        pass


def _add_step(acc: dict, step: dict[str, HessianAccumulator], group: dict[str, nn.Module]) -> None:
    """Every rank's part of this step, added to the accumulators in rank (= global batch) order. A layer whose
    input another layer reads (q/k/v) has no part of its own; all ranks know which from the first step's
    names, so they take part in the same gathers."""
    for n in group:
        a = acc[n]
        part = step.get(n)
        like = torch.zeros(a.in_features, a.in_features, dtype=torch.float64,
                           device=part._sum.device if part is not None else _device_of(group[n]))
        has = torch.tensor([float(part is not None)], dtype=torch.float64, device=like.device)
        if float(ordered_sum(has, has, None)) == 0:  # an aliased layer (no rank had a part for it)
            continue
        a._sum = ordered_sum(part._sum if part is not None else None, like, a._sum)
        rows = torch.tensor([float(part.n_samples if part is not None else 0)], dtype=torch.float64, device=like.device)
        a.n_samples += int(ordered_sum(rows, rows, None).item())


def _device_of(m: nn.Module) -> torch.device:
    return next((p.device for p in m.parameters() if p.device.type != "meta"), torch.device("cpu"))


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def collect_cross(block: nn.Module, float_block: nn.Module, group: dict[str, nn.Module], inputs: BlockInputs,
                  float_inputs: BlockInputs, *, first_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """D = Σ_t w_t (x_fp,t − x_t) x_tᵀ [in, in] (float64) for each layer of `group`: x_t its input in the block
    being quantized (on the quantized chain's inputs), x_fp,t the same layer's input in `float_block` (the block
    before quantization) on the float model's inputs; w_t the first-token weight, as in H. Layers reading one
    tensor (q/k/v) share their D."""
    names = list(group)
    inner = {id(m): n for n, m in block.named_modules()}  # a group layer's name inside the block
    fmods = dict(float_block.named_modules())
    fgroup = {n: fmods[inner[id(m)]] for n, m in group.items()}
    D: dict[str, torch.Tensor] = {}
    got: dict[str, dict[str, torch.Tensor]] = {"q": {}, "f": {}}

    def hook(kind, n):
        def h(_m, a):
            got[kind][n] = a[0].detach()
        return h

    handles = [m.register_forward_pre_hook(hook("q", n)) for n, m in group.items()]
    handles += [m.register_forward_pre_hook(hook("f", n)) for n, m in fgroup.items()]
    try:
        with torch.no_grad(), stop_after(list(group.values())) as qctx, stop_after(list(fgroup.values())) as fctx:
            for j in range(len(inputs.hidden)):
                for ctx, mod, inp in ((qctx, block, inputs), (fctx, float_block, float_inputs)):
                    ctx.reset()
                    try:
                        run_block(mod, inp, j)
                    except _Stop:
                        pass
                done: dict[tuple, torch.Tensor] = {}
                for n in names:
                    x, xf = got["q"][n], got["f"][n]
                    key = (x.data_ptr(), xf.data_ptr(), tuple(x.shape))
                    if key not in done:
                        x2 = x.reshape(-1, x.shape[-1]).float()
                        d = (xf.reshape(-1, x.shape[-1]).float() - x2)
                        w = first_scaled(x.float(), first_weight).reshape(-1, x.shape[-1])
                        done[key] = (d.t() @ w).double()
                    D[n] = D[n] + done[key] if n in D else done[key].clone()
                got["q"].clear()
                got["f"].clear()
    finally:
        for h in handles:
            h.remove()
    return D


def float_target(W: torch.Tensor, D: torch.Tensor, S: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The weight whose outputs on the quantized chain's inputs best match W's on the float model's inputs:
    argmin_V Σ_t w_t ‖W x_fp,t − V x_t‖² = W + W D S⁻¹ (S = Σ w_t x_t x_tᵀ, D from collect_cross), with S damped
    by percdamp · mean(diag S) as GPTQ damps H. GPTQ on this weight minimises Σ‖W x_fp − Q x‖² exactly (the
    least-squares residual is orthogonal to the inputs), GPTAQ's asymmetric calibration (Li et al. 2025)."""
    S = S.double()
    Sd = S + percdamp * float(S.diagonal().mean()) * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    dead = S.diagonal() == 0
    Sd[dead, dead] = 1
    L = torch.linalg.cholesky(Sd)
    corr = torch.cholesky_solve((W.double() @ D).t(), L).t()  # W D S⁻¹ (S symmetric)
    corr[:, dead] = 0
    return (W.double() + corr).to(W.dtype)
