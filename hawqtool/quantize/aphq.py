"""APHQ-ViT (Wu et al., CVPR 2025, "APHQ-ViT: Post-Training Quantization with Average Perturbation
Hessian Based Reconstruction for Vision Transformers"), math only; orchestration is aphq_driver.py.

APH importance. For a block output z and the output loss L(z) of the rest of the float model
(KL(softmax(f_fp/T) ‖ softmax(f(z)/T)) for logits, ½‖f(z) − f_fp‖² for hidden states), per sample n
    ĥ_n = |g_n(z + δv) − g_n(z − δv)| / 2δ,   g_n = ∂L_n/∂z,
which is |H_n(z')·v| for some z' between the two points (mean value theorem), averaged over the
samples into one [tokens, channels] map that weights the block reconstruction error mean(ĥ ⊙ (ẑ − z)²).
The paper perturbs along v = 1 (all ones) and reads the result as diag(H); it is the row sums H·1.
For pre-LayerNorm transformers (ViT, DeiT, Swin) H·1 = 0 exactly: adding c·1 to a block output
shifts every token's channels equally, which every later LayerNorm and the final norm remove, so
L(z + c·1) = L(z). The official code (δ = 1e-6 in float32, at or below one ulp of |z| ≥ 8) then
measures float32 rounding noise ε, i.e. |H·ε|. Here v is a fresh Rademacher vector (±1 per
element) per sample (`probe="rademacher"`, the default): ĥ = mean_n |H_n v_n|, a deterministic-
precision version of that random probe (on the tiny test ViT it correlates 0.93 with diag H and
0.997 with the row norms ‖H_i·‖). `probe="ones"` is the paper's literal all-ones direction.
δ = aph_delta · rms(z) (1e-3): g(z) = 0 at the float point (L is at its minimum), so g(z ± δv) ≈
±δ·Hv with no cancellation, rounding adds ~1e-7·|f|/(δ·|Jv|) ≈ 1e-4 relative, truncation O(δ²).

AdaRound (Nagel et al. 2020). Ŵ = s·(clamp(B + h(V) + z, 0, 2^b−1) − z), h(V) = clamp(σ(V)(ζ−γ)+γ, 0, 1),
integer base B, hard rounding h = 1[V > 0]. From initial codes c (RTN or GPTQ): up = (c − z > W/s),
B = c − z − up, h₀ = clamp(W/s − B, 0, 1) with V's sign forced to `up`: the hard codes at initialisation
are exactly c (for RTN B = ⌊W/s⌋ and h₀ is the rounding fraction).
LSQ (Esser et al. 2020), static per tensor, asymmetric: x̂ = s·(clamp(⌊x/s⌉ + z, 0, 2^b−1) − z), exactly
quant_kernels.int8_ops.fake_quant; s = s₀·e^θ is learned (log scale: one lr for any range) through the
straight-through estimator, the integer zero z stays fixed.
Block reconstruction: Adam on V and θ minimising mean(ĥ ⊙ (ẑ − z)²)/(its value at the initial codes)
+ λ·mean(1 − |2h − 1|^β), β annealed 20 → 2 after a warm-up without the regulariser, on the quantized
chain's inputs against the float block outputs. QDrop (Wei et al. 2022; the official configs use
drop_prob 0.5): while optimising, each input and quantized-activation element is the quantized one
with probability p, else the float one; it reduced overfitting to the calibration set on test ViTs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from ..device import model_device
from ..models import weight_matrix
from .quantizer import QuantizedWeight

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1


@dataclass
class APHQOptions:
    """How APHQ runs (per-layer weight specs and activation bits come from the caller)."""

    iters: int = 1000  # optimisation steps per block
    batch_size: int = 32
    # AdaRound's 1e-3 moves V by at most 1 in 1000 Adam steps, h(V) reaches 0/1 only at |V| ≥ 2.4: at 1000 iters
    # 1e-3 left 90% of the h undecided on a 4-block test ViT, 3e-2 with λ = 10 left 1-3% and the lowest block losses
    lr_round: float = 3e-2
    lr_act: float = 4e-3  # Adam on log activation scales, cosine-annealed to 0
    round_weight: float = 10.0  # λ of the rounding regulariser (a mean over weights; the recon. loss starts at 1)
    warmup: float = 0.2  # fraction of iters with the reconstruction loss alone
    beta: tuple[float, float] = (20.0, 2.0)
    mlp_relu: bool = True
    relu_clip_percentile: float = 99.9  # of the positive GELU outputs
    refit_iters: int = 300
    refit_lr: float = 1e-3
    init: str = "rtn"  # rtn | gptq: AdaRound's start; GPTQ was no better after reconstruction on the test ViT
    act_init: str = "mse"  # minmax | percentile | mse: initial static activation ranges
    aph_delta: float = 1e-3  # perturbation, relative to the rms of the block output
    aph_probe: str = "rademacher"  # rademacher | ones (the paper's; a null direction of pre-LN models) | none (MSE)
    aph_mix: float = 0.0  # weights (1 − mix)·ĥ/mean(ĥ) + mix: a uniform (MSE) share
    temperature: float = 20.0  # KL on softmax(logits / T), as the official code
    keep_better: bool = True  # a block whose reconstruction ends worse than its init keeps the init
    drop_prob: float = 0.5  # QDrop (Wei et al. 2022): while training, each element is quantized with this probability
    seed: int = 0


# ---------------------------------------------------------------- APH importance

def output_loss(out: torch.Tensor, target: torch.Tensor, kind: str, temperature: float = 1.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_n KL(softmax(target/T) ‖ softmax(out/T)) ("kl") or ½ Σ mask·(out − target)² ("mse")."""
    if kind == "kl":
        logp = torch.log_softmax(target.float() / temperature, dim=-1)
        return (logp.exp() * (logp - torch.log_softmax(out.float() / temperature, dim=-1))).sum()
    if kind == "mse":
        d2 = (out.float() - target.float()).pow(2)
        if mask is not None and d2.dim() == 3 and tuple(mask.shape) == tuple(d2.shape[:2]):
            d2 = d2 * mask[..., None].float()
        return d2.sum() / 2
    raise ValueError(f"loss must be 'kl' or 'mse', got {kind!r}")


def aph_importance(model: nn.Module, block: nn.Module, batches: list[dict], output_fn: Callable[[Any], torch.Tensor],
                   targets: list[torch.Tensor], z_fp: list[torch.Tensor], kind: str, *, delta: float = 1e-3,
                   temperature: float = 1.0, masks: list[torch.Tensor | None] | None = None,
                   probe: str = "rademacher", gen: torch.Generator | None = None) -> torch.Tensor:
    """mean_n |g_n(z+δv_n) − g_n(z−δv_n)| / 2δ over all samples, shape z.shape[1:] (tokens padded to the
    longest); v_n = 1 ("ones") or Rademacher, drawn from `gen` per batch as randint(0, 2, z.shape)·2 − 1."""
    if probe not in ("rademacher", "ones"):
        raise ValueError(f"probe must be 'rademacher' or 'ones', got {probe!r}")
    sums, counts = [], []
    for j, b in enumerate(batches):
        z = z_fp[j].float()
        d = delta * float(z.pow(2).mean().sqrt().clamp_min(1e-12))
        v = torch.ones_like(z) if probe == "ones" else torch.randint(0, 2, z.shape, generator=gen, device=gen.device).to(z) * 2 - 1
        g = []
        for sign in (1.0, -1.0):
            zz = (z + sign * d * v).requires_grad_(True)
            handle = block.register_forward_hook(  # the block's output becomes zz
                lambda _m, _a, o, zz=zz: zz if isinstance(o, torch.Tensor) else (zz, *o[1:]))
            try:
                with torch.enable_grad():
                    L = output_loss(output_fn(model(**b)), targets[j], kind, temperature, masks[j] if masks else None)
                    g.append(torch.autograd.grad(L, zz)[0])
            finally:
                handle.remove()
        sums.append(((g[0] - g[1]).abs() / (2 * d)).sum(0))
        counts.append(z.shape[0])
    return _padded_mean(sums, counts)


def _padded_mean(sums: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Σ sums / Σ counts with the token dim (0) aligned at the start and padded to the longest batch."""
    T = max(s.shape[0] for s in sums)
    acc, cnt = sums[0].new_zeros((T, *sums[0].shape[1:])), sums[0].new_zeros(T)
    for s, n in zip(sums, counts):
        acc[:s.shape[0]] += s
        cnt[:s.shape[0]] += n
    return acc / cnt.clamp_min(1).reshape(-1, *[1] * (acc.dim() - 1))


def aph_error(out: torch.Tensor, z: torch.Tensor, h: torch.Tensor | None,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(Σ ĥ ⊙ (out − z)² over real tokens, number of terms): the APH-weighted squared error."""
    e = (out.float() - z.float()).pow(2)
    if h is not None:
        e = e * h[:e.shape[1]] if e.dim() > 1 else e * h
    if mask is not None and e.dim() == 3 and tuple(mask.shape) == tuple(e.shape[:2]):
        m = mask.float()[..., None]
        return (e * m).sum(), float(m.sum()) * e.shape[-1]
    return e.sum(), float(e.numel())


# ---------------------------------------------------------------- quantizers

def rectified_sigmoid(V: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)


class AdaRoundWeight(nn.Module):
    """Learned rounding of one [out, in] weight on fixed scales/zeros taken from its initial codes."""

    def __init__(self, W: torch.Tensor, init: QuantizedWeight) -> None:
        super().__init__()
        if init.g_idx is not None:
            raise ValueError("AdaRound needs groups in column order (no act_order g_idx)")
        self.init = init
        g = init.group_index()
        S, Z = init.scales[:, g].float(), init.zeros[:, g].float()
        u = W.detach().float() / S
        c = init.q.float() - Z
        up = c > u
        B = c - up.float()
        p = ((torch.clamp(u - B, 0, 1) - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
        V = torch.log(p / (1 - p)).abs()
        self.V = nn.Parameter(torch.where(up, V.clamp_min(1e-6), -V))
        self.register_buffer("S", S)
        self.register_buffer("Z", Z)
        self.register_buffer("B", B)
        self.maxq = init.spec.maxq

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.V)

    def soft(self) -> torch.Tensor:
        """s·(clamp(B + h(V) + z) − z), differentiable in V."""
        return self.S * (torch.clamp(self.B + self.h() + self.Z, 0, self.maxq) - self.Z)

    def codes(self) -> torch.Tensor:
        """Hard integer codes clamp(B + 1[V > 0] + z) as int32."""
        return torch.clamp(self.B + (self.V.detach() > 0).float() + self.Z, 0, self.maxq).to(torch.int32)

    def hard(self) -> QuantizedWeight:
        i = self.init
        return QuantizedWeight(self.codes(), i.scales.clone(), i.zeros.clone(), i.spec)

    def reg(self, beta: float) -> torch.Tensor:
        """Σ 1 − |2h − 1|^β: zero only when every h is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class LSQAct(nn.Module):
    """Static asymmetric per-tensor fake quantizer with a learned scale s = s₀·e^θ and a fixed integer zero;
    `drop` (p, generator) keeps each element quantized with probability p and float otherwise (QDrop)."""

    def __init__(self, bits: int, scale: float, zero: float, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.bits, self.maxq, self.zero = bits, 2 ** bits - 1, float(zero)
        self.register_buffer("s0", torch.tensor(float(scale), device=device))
        self.theta = nn.Parameter(torch.zeros((), device=device))
        self.drop: tuple[float, torch.Generator | None] | None = None

    def scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale()
        t = x.float() / s
        t = t + (torch.round(t) - t).detach()  # straight-through rounding; the value is exactly round(t)
        xq = (s * (torch.clamp(t + self.zero, 0, self.maxq) - self.zero)).to(x.dtype)
        if self.drop is None:
            return xq
        return torch.where((torch.rand(x.shape, generator=self.drop[1], device=self.drop[1].device) < self.drop[0]).to(x.device), xq, x)

    def export(self) -> tuple[float, float]:
        """(scale, zero) in quant_kernels.int8_ops.fake_quant's convention."""
        return float(self.scale().detach()), self.zero


# ---------------------------------------------------------------- block reconstruction

@dataclass
class BlockData:
    """A block's calibration batches: inputs (quantized chain), extra args/kwargs, float targets, token masks,
    and the float chain's inputs (for QDrop)."""

    x: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    z: list[torch.Tensor]
    masks: list[torch.Tensor | None]
    x_fp: list[torch.Tensor] | None = None


def _rows(obj: Any, idx: torch.Tensor, n: int) -> Any:
    """obj with every tensor whose first dim is the batch (n > 1) restricted to rows idx."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if n > 1 and obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows(o, idx, n) for o in obj)
    if isinstance(obj, dict):
        return {k: _rows(v, idx, n) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, data: BlockData, j: int, rows: torch.Tensor | None = None,
              params: dict[str, torch.Tensor] | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
    """Block output on batch j (optionally rows of it, or input x instead), with weights overridden by `params`."""
    a, k = data.args[j], data.kwargs[j]
    if rows is not None:
        n = data.x[j].shape[0]
        a, k = _rows(a, rows, n), _rows(k, rows, n)
    if x is None:
        x = data.x[j] if rows is None else data.x[j][rows]
    out = functional_call(block, params or {}, (x, *a), k, strict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def block_error(block: nn.Module, data: BlockData, h: torch.Tensor | None,
                params: dict[str, torch.Tensor] | None = None) -> float:
    """APH-weighted mean squared error of the block output over all calibration batches."""
    num, den = 0.0, 0.0
    with torch.no_grad():
        for j in range(len(data.x)):
            e, n = aph_error(run_block(block, data, j, params=params), data.z[j], h, data.masks[j])
            num, den = num + float(e), den + n
    return num / max(den, 1.0)


def native_weight(layer: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """A [out, in] matrix in the layer's own weight layout (HF Conv1D is transposed)."""
    return W.t() if type(layer).__name__ == "Conv1D" else W.reshape(layer.weight.shape)


def reconstruct_block(block: nn.Module, weights: dict[str, QuantizedWeight], acts: dict[str, tuple[int, float, float]],
                      data: BlockData, h: torch.Tensor | None, opts: APHQOptions, *, gen: torch.Generator | None = None,
                      progress: Callable[[str], None] | None = None, tag: str = "") -> dict:
    """Learn rounding (AdaRound) of `weights` and scales (LSQ) of `acts` (rel. name -> bits, scale, zero)
    minimising the APH-weighted block output error; returns weights, act, loss_before, loss_after, kept."""
    mods = dict(block.named_modules())
    ada = {n: AdaRoundWeight(weight_matrix(mods[n]).float(), q) for n, q in weights.items()}
    lsq = {n: LSQAct(*a, device=model_device(block)) for n, a in acts.items()}
    handles = [mods[n].register_forward_pre_hook(lambda _m, a, q=q: (q(a[0]), *a[1:])) for n, q in lsq.items()]

    def params(hard: bool) -> dict[str, torch.Tensor]:
        return {f"{n}.weight": native_weight(mods[n], a.hard().dequantize() if hard else a.soft())
                .to(mods[n].weight.dtype) for n, a in ada.items()}

    try:
        before = block_error(block, data, h, params(True))
        iters = opts.iters if (ada or lsq) and before > 0 else 0
        V, theta = [a.V for a in ada.values()], [q.theta for q in lsq.values()]
        opt_w = torch.optim.Adam(V, lr=opts.lr_round) if V else None
        opt_a = torch.optim.Adam(theta, lr=opts.lr_act) if theta else None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=max(iters, 1), eta_min=0.0) if theta else None
        n_w = max(sum(v.numel() for v in V), 1)
        sizes = torch.tensor([float(x.shape[0]) for x in data.x], device="cpu")
        drop = opts.drop_prob < 1 and data.x_fp is not None
        for t in range(iters):
            j = int(torch.multinomial(sizes / sizes.sum(), 1, generator=gen))
            rows = torch.randperm(int(sizes[j]), generator=gen, device=gen.device)[:opts.batch_size]
            m = data.masks[j][rows] if data.masks[j] is not None else None
            x = data.x[j][rows]
            if drop:  # QDrop: a random mix of quantized and float inputs, and of quantized and float activations
                x = torch.where((torch.rand(x.shape, generator=gen, device=gen.device) < opts.drop_prob).to(x.device), x, data.x_fp[j][rows])
            for q in lsq.values():
                q.drop = (opts.drop_prob, gen) if drop else None
            with torch.enable_grad():
                e, n = aph_error(run_block(block, data, j, rows, params(False), x=x), data.z[j][rows], h, m)
                rec = loss = e / n / before
            for q in lsq.values():
                q.drop = None
            beta = beta_schedule(t, iters, opts.warmup, opts.beta)
            if V and not math.isnan(beta):
                with torch.enable_grad():
                    loss = rec + opts.round_weight * sum(a.reg(beta) for a in ada.values()) / n_w
            grads = torch.autograd.grad(loss, V + theta, allow_unused=True)
            for p, g in zip(V + theta, grads):
                p.grad = g
            for o in (opt_w, opt_a):
                if o is not None:
                    o.step()
            if sched is not None:
                sched.step()
            if progress and (t + 1) % max(iters // 10, 1) == 0:
                progress(f"{tag} iter {t + 1}/{iters} rec {float(rec.detach()):.4g}")
        after = block_error(block, data, h, params(True))
        soft = block_error(block, data, h, params(False)) if iters else before
        hs = [a.h().detach().reshape(-1) for a in ada.values()]
        undecided = float(sum(((x > 0) & (x < 1)).sum() for x in hs) / max(sum(x.numel() for x in hs), 1))
    finally:
        for hd in handles:
            hd.remove()
    stats = dict(loss_before=before, loss_recon=after, loss_soft=soft, undecided=undecided, iters=iters)
    if opts.keep_better and after > before:
        return dict(stats, weights=dict(weights), act={n: (a[1], a[2]) for n, a in acts.items()},
                    loss_after=before, kept="init")
    return dict(stats, weights={n: a.hard() for n, a in ada.items()}, act={n: q.export() for n, q in lsq.items()},
                loss_after=after, kept="recon")


def beta_schedule(t: int, iters: int, warmup: float, beta: tuple[float, float]) -> float:
    """β at step t: none (nan) during the warm-up, then linear from beta[0] to beta[1]."""
    warm = int(warmup * iters)
    if t < warm:
        return math.nan
    return beta[1] + (beta[0] - beta[1]) * (1 - (t - warm) / max(iters - warm, 1))
