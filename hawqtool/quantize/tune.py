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
is measured with its scales rounded to fp16, as stored). A retry of such blocks at a quarter of the step lowered
their error but raised the validation perplexity (RESULTS.md, 2026-12-05 16:10), so there is none.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import BlockInputs, run_block
from ..distributed import broadcast_tensors, gather_list, world
from ..models import set_weight_matrix
from .hessians import is_conv
from .quantizer import QuantizedWeight

THETA_MAX = 0.5  # the scales move within e^±0.5
SLICE = 1 << 22  # elements per row slice of the tuner's weight-sized temporaries


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
    outputs: list[torch.Tensor] | None = None  # the block's outputs on the inputs, tuned weights in place (not kept)

    def summary(self) -> dict:
        return dict(loss_before=self.loss_before, loss_after=self.loss_after, kept_gptq=self.kept,
                    codes_changed=self.changed)


class _Tunable:
    """One layer's V and θ around GPTQ's compensated weights U, the weight they give, and the loss's gradient in V
    and θ given its gradient in the weight. Everything weight-sized is formed in row slices of ≈ SLICE elements,
    so the temporaries stay small beside a large layer (one 8192-wide MLP projection is a quarter of its block)."""

    def __init__(self, qw: QuantizedWeight, U: torch.Tensor, transposed: bool, scales: bool = True) -> None:
        self.qw, self.transposed, self.scales = qw, transposed, scales
        self.U = U.to(qw.scales.device).float()
        self.z = qw.zeros.float()
        self.g = qw.group_index()
        self.V = torch.zeros_like(self.U)
        self.theta = torch.zeros_like(qw.scales)

    def _slices(self) -> list[slice]:
        step = max(1, SLICE // self.U.shape[1])
        return [slice(r, r + step) for r in range(0, self.U.shape[0], step)]

    def _s(self) -> torch.Tensor:
        return self.qw.scales * torch.exp(self.theta)

    def _codes(self, s: torch.Tensor, r: slice) -> torch.Tensor:
        """Rows r of the unclamped codes ⌊U/s_g + V⌉ + z_g."""
        return torch.round(self.U[r] / s[r][:, self.g] + self.V[r]) + self.z[r][:, self.g]

    def _weight(self, s: torch.Tensor, r: slice) -> torch.Tensor:
        return s[r][:, self.g] * (torch.clamp(self._codes(s, r), 0, self.qw.spec.maxq) - self.z[r][:, self.g])

    def weight(self) -> torch.Tensor:
        """Ŵ = s_g·(clamp(codes, 0, maxq) − z_g), s = s0·e^θ, [out, in]."""
        return self._weight(self._s(), slice(None))

    def write(self, layer: nn.Module) -> None:
        """Ŵ into the layer's own weight (its layout and dtype), a row slice at a time."""
        s = self._s()
        _write_rows(layer, self.transposed, self._slices(), lambda r: self._weight(s, r))

    def _grads(self, gW: torch.Tensor, s: torch.Tensor, r: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        gW = gW.float()
        sg, zg = s[r][:, self.g], self.z[r][:, self.g]
        c = self._codes(s, r)
        inside = (c >= 0) & (c <= self.qw.spec.maxq)
        gV = torch.where(inside, gW * sg, torch.zeros((), dtype=gW.dtype, device=gW.device))
        if not self.scales:
            return gV, None
        ds = gW * (torch.clamp(c, 0, self.qw.spec.maxq) - zg) - gV * self.U[r] / (sg * sg)
        return gV, torch.zeros_like(s[r]).index_add_(1, self.g, ds) * s[r]

    def grads(self, grad_W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """∂L/∂V and ∂L/∂θ from ∂L/∂Ŵ (`grad_W` in the layer's own layout), ⌊·⌉ passed straight through, as
        autograd's mul and clamp backward give: ∂L/∂V = s_g·∂L/∂Ŵ where the code is inside [0, maxq], else 0;
        ∂Ŵ/∂s_g = (clamp(c) − z_g) − inside·U/s_g, summed into groups, times ∂s/∂θ = s (None: scales not tuned)."""
        return self._grads(grad_W.t() if self.transposed else grad_W, self._s(), slice(None))

    def signs(self, grad_W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """sign(∂L/∂V) as int8 and sign(∂L/∂θ) (None: scales not tuned), formed a row slice at a time."""
        s = self._s()
        sV = torch.empty(self.V.shape, dtype=torch.int8, device=self.V.device)
        sθ = torch.empty(s.shape, dtype=torch.int8, device=s.device) if self.scales else None
        for r in self._slices():
            gV, gθ = self._grads(grad_W[:, r].t() if self.transposed else grad_W[r], s, r)
            sV[r] = gV.sign()
            if sθ is not None:
                sθ[r] = gθ.sign()
        return sV, sθ

    def final(self) -> QuantizedWeight:
        """The tuned weight as stored: fp16-exact scales (on the scale codes' grid where the spec has them), the
        integer codes rounded against them."""
        from dataclasses import replace

        s = (self.qw.scales * torch.exp(self.theta)).to(torch.float16).to(torch.float32)
        s = torch.where(s == 0, torch.full_like(s, 2**-14), s)
        if self.qw.scale_step is not None:  # scale codes: the nearest scale the row's step can store
            from .scale_codes import expand, scale_codes

            s = expand(scale_codes(s, self.qw.scale_step, self.qw.spec.scale_bits), self.qw.scale_step)
        q = torch.empty(self.V.shape, dtype=torch.int32, device=self.V.device)
        for r in self._slices():
            q[r] = torch.clamp(self._codes(s, r), 0, self.qw.spec.maxq)
        return replace(self.qw, q=q, scales=s)


def _write_rows(layer: nn.Module, transposed: bool, slices: list[slice], rows) -> None:
    """rows(r) ([out, in] rows r) into the layer's weight, in its layout (HF Conv1D: [in, out]) and dtype."""
    w = layer.weight.data
    with torch.no_grad():
        for r in slices:
            if transposed:
                w[:, r].copy_(rows(r).t())
            else:
                w[r].copy_(rows(r))


LOSSES = ("mse", "relative", "weighted")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the descent's autocast dtype


def _block_loss(block: nn.Module, inputs: BlockInputs, targets: list[torch.Tensor], j: int,
                relative: bool, first: float = 1.0, keep: list | None = None) -> torch.Tensor:
    """Σ over batch j's tokens of ‖ŷ_t − y_t‖² (relative: each divided by ‖y_t‖², so a token with massive
    activations, the attention sink, counts as much as any other; first ≠ 1: each window's first position
    weighted `first`, as GPTQ's H weighs it). keep: the block's output ŷ is appended to it."""
    out = run_block(block, inputs, j)
    if keep is not None:
        keep.append(out)
    y = targets[j].to(out.device).float()
    err = (out.float() - y).pow(2).sum(-1)
    if relative:
        err = err / y.pow(2).sum(-1).clamp_min(1e-30)
    if first != 1.0 and err.dim() > 1:
        err = torch.cat([err[..., :1] * first, err[..., 1:]], dim=-1)
    return err.sum()


def _total(block, inputs, targets, relative: bool, n_total: int, first: float = 1.0, keep: list | None = None) -> float:
    """The loss summed over every calibration batch in global order (data parallel: each rank's share gathered
    first, so the sum is the one process's to the last bit); keep: this rank's block outputs are appended."""
    with torch.no_grad():
        mine = [float(_block_loss(block, inputs, targets, j, relative, first, keep)) for j in range(len(inputs.hidden))]
    return sum(gather_list(mine, n_total))


def _descend(block: nn.Module, layers: dict[str, nn.Module], tun: dict[str, _Tunable], inputs: BlockInputs,
             targets: list[torch.Tensor], iters: int, lr: float, scale_lr: float, relative: bool, seed: int,
             n_total: int, first: float = 1.0, amp: torch.dtype | None = None) -> None:
    """SignRound's steps on the tunables' V (and θ), from their current values; the layers hold Ŵ throughout.
    amp: each step's forward under autocast to this dtype (its backward follows; ∂L/∂Ŵ lands in float32).
    Data parallel: every rank walks the same batch order; each step's gradient signs come from the rank holding
    that batch (distributed.my_share's strided split), so every rank makes the one process's updates."""
    rank, size = world()
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    saved = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    ws = [layers[n].weight for n in tun]
    tuners, index = list(tun.values()), {id(w): k for k, w in enumerate(ws)}
    shapes = [t.V for t in tuners] + ([t.theta for t in tuners] if scale_lr else [])
    like = [torch.empty(x.shape, dtype=torch.int8, device=x.device) for x in shapes] if size > 1 else None
    try:
        for w in ws:
            w.requires_grad_(True)
        for step in range(iters):
            if not order:
                order = torch.randperm(n_total, generator=gen, device="cpu").tolist()
            g = order.pop()
            signs = None
            if g % size == rank:  # this rank holds global batch g
                sV, sθ = [None] * len(tun), [None] * len(tun)

                def to_signs(w: torch.Tensor) -> None:  # each layer's ∂L/∂Ŵ is released as soon as it is formed
                    k = index[id(w)]
                    sV[k], sθ[k] = tuners[k].signs(w.grad)
                    w.grad = None

                hooks = [w.register_post_accumulate_grad_hook(to_signs) for w in ws]
                for w in ws:
                    w.grad = None
                try:
                    with torch.enable_grad():
                        with torch.autocast(ws[0].device.type, dtype=amp or torch.float32, enabled=amp is not None):
                            step_loss = _block_loss(block, inputs, targets, g // size, relative, first)
                        step_loss.backward()
                finally:
                    for h in hooks:
                        h.remove()
                signs = [x if x is not None else torch.zeros(y.shape, dtype=torch.int8, device=y.device)
                         for x, y in zip(sV + (sθ if scale_lr else []), shapes)]  # a layer the loss misses: no step
            signs = broadcast_tensors(g % size, signs, like)
            lr_t = lr * (1 - step / iters)
            with torch.no_grad():
                for k, (n, t) in enumerate(tun.items()):
                    t.V.sub_(lr_t * signs[k]).clamp_(-0.5, 0.5)
                    if scale_lr:
                        t.theta.sub_(lr_t * scale_lr * signs[len(tun) + k]).clamp_(-THETA_MAX, THETA_MAX)
                    t.write(layers[n])
    finally:
        for p in block.parameters():
            p.requires_grad_(saved[id(p)])


def tune_block(block: nn.Module, layers: dict[str, nn.Module], weights: dict[str, QuantizedWeight],
               updated: dict[str, torch.Tensor | None], inputs: BlockInputs, targets: list[torch.Tensor], *,
               iters: int, lr: float | None = None, scale_lr: float = 1.0, loss: str = "mse",
               first_weight: float = 1.0, seed: int = 0, n_total: int | None = None,
               dtype: str = "float32") -> TuneResult:
    """Tune the quantized `weights` of `layers` (global name → module inside `block`), GPTQ's compensated weights
    `updated`, so the block's outputs on `inputs` (the quantized chain's) approach `targets` (the float block's on
    the float chain's); see the module docstring. Layers without compensated weights (ggml formats, RTN) are left
    as they are; the tuned layers hold the returned weights afterwards. loss: "mse" (AutoRound's), "relative"
    (each token's error relative to its target's norm) or "weighted" (mse, each window's first position weighted
    `first_weight`, as GPTQ's H). dtype: the descent's autocast dtype (DTYPES); the before/after losses that decide
    are float32 whatever it is. A block whose error rose keeps GPTQ's codes.
    Memory: the layers' own weight tensors carry Ŵ and, one layer at a time, ∂L/∂Ŵ, of which only the signs in V
    (int8) are kept; beyond U the tuner holds V (plain autograd through Ŵ(V) held about five more copies).
    Data parallel: n_total batches, this rank holding its strided share (see _descend)."""
    from transformers.pytorch_utils import Conv1D

    if loss not in LOSSES:
        raise ValueError(f"tune loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if dtype not in DTYPES:
        raise ValueError(f"tune dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    relative = loss == "relative"
    first = first_weight if loss == "weighted" else 1.0
    t0 = time.perf_counter()
    names = [n for n in layers if weights[n].grid is None and updated.get(n) is not None and not is_conv(layers[n])]
    if not names:  # nothing tunable in this block (ggml formats, convolutions)
        return TuneResult(dict(weights), 0.0, 0.0, True, 0.0, time.perf_counter() - t0)
    n_total = len(inputs.hidden) if n_total is None else n_total
    lr = 1.0 / max(iters, 1) if lr is None else lr
    tun = {n: _Tunable(weights[n].to(layers[n].weight.device), updated[n], isinstance(layers[n], Conv1D),
                       scales=scale_lr != 0) for n in names}
    for n, t in tun.items():
        t.write(layers[n])
    before = _total(block, inputs, targets, relative, n_total, first)
    _descend(block, layers, tun, inputs, targets, iters, lr, scale_lr, relative, seed, n_total, first, DTYPES[dtype])
    tuned = {}
    for n in list(tun):  # each layer's V is released as its codes are formed; the block takes the stored weights
        t = tun.pop(n)
        tuned[n] = qw = t.final()
        g = qw.group_index()
        _write_rows(layers[n], t.transposed, t._slices(), lambda r: qw.dequantize_rows(r, g))
        del t
    outs: list[torch.Tensor] = []
    after = _total(block, inputs, targets, relative, n_total, first, keep=outs)
    kept = not after < before
    out = dict(weights)
    moved, total = 0, 0
    for n, qw in tuned.items():
        if kept:
            set_weight_matrix(layers[n], weights[n].dequantize())  # GPTQ's weights back in place
            continue
        moved += int((qw.q != weights[n].q.to(qw.q.device)).sum())
        total += qw.q.numel()
        out[n] = qw.to("cpu")
    return TuneResult(out, before, after, kept, moved / total if total else 0.0, time.perf_counter() - t0,
                      tuple(tuned), None if kept else outs)
