"""Block tuning after GPTQ: signed-gradient rounding and scale refinement (SignRound, Cheng et al. 2023, the method
of Intel's AutoRound), math only; the driver calls it once a block's layers are quantized.

AutoRound rounds W/s + V; here W is replaced by U, the error-compensated weights GPTQ rounded each column from
(GPTQResult.updated), so that V = θ = 0 is GPTQ's result exactly and the weights nearest a rounding boundary flip
first. Each layer's scales s (fp16) and integer zeros z become
    Ŵ = s·e^θ ⊙ (clamp(⌊U / (s·e^θ) + V⌉ + z, 0, 2^b − 1) − z),   V ∈ [−½, ½] per weight, θ ∈ [−θmax, θmax] per group,
with ⌊·⌉ passed straight through. The loss is the block's output error against the float model's block on the
float chain's inputs, with the quantized chain's inputs going in (AutoRound's targets):
    L = Σ_t ‖block_Ŵ(x̂)_t − block_W(x)_t‖²   (or, loss="relative", each token's term over ‖block_W(x)_t‖²).
SignRound's update: V ← V − lr_t·sign(∂L/∂V), θ likewise with lr_t·scale_lr, lr_t decayed linearly from lr
(default 1/iters, AutoRound's) to 0, one calibration batch per step; sign() makes the step independent of the
loss's scale. A block whose loss over every calibration batch ends above GPTQ's keeps GPTQ's result (the tuned one
is measured with its scales rounded to fp16, as stored).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..blocks import BlockInputs
from ..distributed import broadcast_tensors, gather_list, world
from .hessians import is_conv
from .quantizer import QuantizedWeight

THETA_MAX = 0.5  # the scales move within e^±0.5


@dataclass
class TuneResult:
    """One block's tuning: its layers' weights (tuned or GPTQ's) and the losses that decided."""

    weights: dict[str, QuantizedWeight]
    loss_before: float  # Σ over calibration batches of the squared output error, GPTQ's weights
    loss_after: float  # the same, tuned weights (fp16 scales)
    kept: bool  # True: the tuned weights were worse, GPTQ's are returned
    changed: float  # fraction of codes that moved
    seconds: float
    tuned: tuple[str, ...] = ()  # the block's layers that were tunable

    def summary(self) -> dict:
        return dict(loss_before=self.loss_before, loss_after=self.loss_after, kept_gptq=self.kept,
                    codes_changed=self.changed)


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


class _Tunable:
    """One layer's V and θ around GPTQ's compensated weights U, and the weight they give."""

    def __init__(self, qw: QuantizedWeight, U: torch.Tensor, transposed: bool) -> None:
        self.qw, self.transposed = qw, transposed
        self.U = U.to(qw.scales.device).float()
        self.z = qw.zeros.float()
        self.g = qw.group_index()
        self.V = torch.zeros_like(self.U, requires_grad=True)
        self.theta = torch.zeros_like(qw.scales, requires_grad=True)

    def _codes(self, s: torch.Tensor, hard: bool) -> torch.Tensor:
        x = self.U / s[:, self.g] + self.V
        return torch.clamp((torch.round(x) if hard else _round_ste(x)) + self.z[:, self.g], 0, self.qw.spec.maxq)

    def weight(self) -> torch.Tensor:
        s = self.qw.scales * torch.exp(self.theta)
        W = s[:, self.g] * (self._codes(s, False) - self.z[:, self.g])
        return W.t() if self.transposed else W

    def final(self) -> QuantizedWeight:
        """The tuned weight as stored: fp16-exact scales, the integer codes rounded against them."""
        from dataclasses import replace

        with torch.no_grad():
            s = (self.qw.scales * torch.exp(self.theta)).to(torch.float16).to(torch.float32)
            s = torch.where(s == 0, torch.full_like(s, 2**-14), s)
            q = self._codes(s, True).to(torch.int32)
        return replace(self.qw, q=q, scales=s)


def _block_loss(block: nn.Module, params: dict[str, torch.Tensor], inputs: BlockInputs, targets: list[torch.Tensor],
                j: int, relative: bool) -> torch.Tensor:
    """Σ over batch j's tokens of ‖ŷ_t − y_t‖² (relative: each divided by ‖y_t‖², so a token with massive
    activations, the attention sink, counts as much as any other)."""
    out = functional_call(block, params, (inputs.hidden[j], *inputs.args[j]), inputs.kwargs[j])
    out = out[0] if isinstance(out, (tuple, list)) else out
    y = targets[j].to(out.device).float()
    err = (out.float() - y).pow(2).sum(-1)
    if relative:
        err = err / y.pow(2).sum(-1).clamp_min(1e-30)
    return err.sum()


def _total(block, params, inputs, targets, relative: bool, n_total: int) -> float:
    """The loss summed over every calibration batch in global order (data parallel: each rank's share gathered
    first, so the sum is the one process's to the last bit)."""
    with torch.no_grad():
        mine = [float(_block_loss(block, params, inputs, targets, j, relative)) for j in range(len(inputs.hidden))]
    return sum(gather_list(mine, n_total))


def tune_block(block: nn.Module, layers: dict[str, nn.Module], weights: dict[str, QuantizedWeight],
               updated: dict[str, torch.Tensor | None], inputs: BlockInputs, targets: list[torch.Tensor], *,
               iters: int, lr: float | None = None, scale_lr: float = 1.0, loss: str = "mse",
               seed: int = 0, n_total: int | None = None) -> TuneResult:
    """Tune the quantized `weights` of `layers` (global name → module inside `block`), GPTQ's compensated weights
    `updated`, so the block's outputs on `inputs` (the quantized chain's) approach `targets` (the float block's on
    the float chain's); see the module docstring. Layers without compensated weights (ggml formats, RTN) are left
    as they are. loss: "mse" (AutoRound's) or "relative" (each token's error relative to its target's norm).
    Data parallel (n_total batches, this rank holding its strided share): every rank walks the same batch order;
    each step's gradients come from the rank holding that batch, so every rank makes the one process's updates."""
    from transformers.pytorch_utils import Conv1D

    if loss not in ("mse", "relative"):
        raise ValueError(f"tune loss must be 'mse' or 'relative', got {loss!r}")
    relative = loss == "relative"
    t0 = time.perf_counter()
    inner = {id(m): n for n, m in block.named_modules()}
    tun = {n: _Tunable(weights[n].to(layers[n].weight.device), updated[n], isinstance(layers[n], Conv1D))
           for n in layers if weights[n].grid is None and updated.get(n) is not None and not is_conv(layers[n])}
    if not tun:  # nothing tunable in this block (ggml formats, convolutions)
        return TuneResult(dict(weights), 0.0, 0.0, True, 0.0, time.perf_counter() - t0)
    key = {n: inner[id(layers[n])] + ".weight" for n in tun}

    def params(weight_of) -> dict[str, torch.Tensor]:
        return {key[n]: weight_of(n).to(layers[n].weight.dtype) for n in tun}

    rank, size = world()
    n_total = len(inputs.hidden) if n_total is None else n_total
    before = _total(block, params(lambda n: tun[n].weight()), inputs, targets, relative, n_total)
    lr = 1.0 / max(iters, 1) if lr is None else lr
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    saved = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(iters):
                if not order:
                    order = torch.randperm(n_total, generator=gen, device="cpu").tolist()
                g = order.pop()
                leaves = [t for n in tun for t in (tun[n].V, tun[n].theta)]
                grads = None
                if g % size == rank:  # this rank holds global batch g (distributed.my_share's strided split)
                    err = _block_loss(block, params(lambda n: tun[n].weight()), inputs, targets, g // size, relative)
                    grads = list(torch.autograd.grad(err, leaves))
                grads = broadcast_tensors(g % size, grads, leaves)
                lr_t = lr * (1 - step / iters)
                with torch.no_grad():
                    for k, n in enumerate(tun):
                        t = tun[n]
                        t.V.sub_(lr_t * grads[2 * k].sign()).clamp_(-0.5, 0.5)
                        t.theta.sub_(lr_t * scale_lr * grads[2 * k + 1].sign()).clamp_(-THETA_MAX, THETA_MAX)
    finally:
        for p in block.parameters():
            p.requires_grad_(saved[id(p)])
    tuned = {n: t.final() for n, t in tun.items()}
    after = _total(block, params(lambda n: tuned[n].dequantize()), inputs, targets, relative, n_total)
    kept = not after < before
    out = dict(weights)
    moved, total = 0, 0
    if not kept:
        for n, qw in tuned.items():
            moved += int((qw.q != weights[n].q.to(qw.q.device)).sum())
            total += qw.q.numel()
            out[n] = qw.to("cpu")
    return TuneResult(out, before, after, kept, moved / total if total else 0.0, time.perf_counter() - t0, tuple(tun))
