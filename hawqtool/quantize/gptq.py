"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), math only, following IST-DASLab/gptq's gptq.py.

Notation: W [rows=out, columns=in], H = (2/n) Σ x xᵀ [in, in], Hinv = upper Cholesky factor
U of H⁻¹ (H⁻¹ = UᵀU). Quantizing column j with error err = (w − q)/U_jj and updating the later
columns by −err·U[j, j+1:] is the OBS update with the inverse Hessian of the not-yet-quantized
columns; blocks of `blocksize` columns apply the updates to later blocks lazily (one matmul).

Precision: W and the recurrence are float32 (float64 when W is float64, as the tests use);
H⁻¹ and its Cholesky factor are computed in float64 and cast back (O(in³) once per layer).

One deliberate difference from the reference: when column j starts a group, the reference
reads W[:, j:j+g] from the global W, which lacks the updates of earlier columns of the same
block whenever groups and blocks are not aligned. Here the group parameters come from the
fully error-updated columns, so the result does not depend on `blocksize` (identical to the
reference when group_size is a multiple of blocksize or the groups start at block starts).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .groups import group_qparams, snap_groups
from .quantizer import SCALE_BITS, QuantizedWeight, QuantSpec, ggml_weight, qparams, quant_codes
from .scale_codes import row_steps, snap


class GPTQError(RuntimeError):
    """GPTQ could not run on this layer (H unusable even after extra damping)."""


class HessianAccumulator:
    """Running H = (2/n) Σ x xᵀ over all rows x of the inputs seen (any leading shape).

    Each batch's XᵀX is formed in float32 (the costly part) and summed in float64, so many
    batches do not drift; `.H` is float32. n counts rows (tokens, or unfolded conv patches).
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.n_samples = 0
        self._sum: torch.Tensor | None = None  # float64 [in, in], made on the first batch's device

    def add_batch(self, X: torch.Tensor) -> None:
        """Add the rows of X [..., in] to the running sum."""
        if X.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(X.shape)}")
        X = X.detach().reshape(-1, self.in_features).float()
        if X.shape[0] == 0:
            return
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=X.device)
        self._sum += (X.t() @ X).double()
        self.n_samples += X.shape[0]

    def release(self) -> None:
        """Drop the float64 sum once `.H` has been taken (no more batches or reads after this)."""
        self._sum = None

    @property
    def H(self) -> torch.Tensor:
        """(2/n) Σ x xᵀ as float32 [in, in]."""
        if self.n_samples == 0:
            raise RuntimeError("HessianAccumulator.H requested before any input rows were added")
        return (self._sum * (2.0 / self.n_samples)).float()


@dataclass
class GPTQResult:
    """Quantized layer plus how the run went."""

    weight: QuantizedWeight
    dequantized: torch.Tensor  # [out, in], equals weight.dequantize() exactly
    damp: float  # relative damping finally used (fraction of mean(diag H))
    retries: int
    notes: list[str] = field(default_factory=list)
    proxy_loss: float = 0.0  # ½ Σ err²/d² = ½ tr(ΔW H_damped ΔWᵀ): mean ‖(W−Q)x‖² under damped H
    # keep_updated: the error-compensated weights each column was rounded from ([out, in], input order), so that
    # codes = clamp(round(updated / scale) + zero) (block tuning starts from them, tune.py)
    updated: torch.Tensor | None = None


def _inverse_cholesky(H: torch.Tensor, percdamp: float, max_retries: int) -> tuple[torch.Tensor, float, list[str]]:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, raising damp ×10 on failure.
    At most two float64 [in, in] matrices live at once (an 8192-wide layer: 1 GB, not 2.7): the damped H is
    rebuilt from H for a retry rather than kept."""
    mean_diag = float(H.diagonal().double().mean())
    damp, notes = percdamp, []
    for attempt in range(max_retries + 1):
        Hd = H.double()
        if Hd.data_ptr() == H.data_ptr():
            Hd = Hd.clone()
        Hd.diagonal().add_(damp * mean_diag)
        try:
            L = torch.linalg.cholesky(Hd)
            del Hd
            Hinv = torch.cholesky_inverse(L)
            del L
            Hinv = torch.linalg.cholesky(Hinv, upper=True)
            reason = "" if torch.isfinite(Hinv).all() else "non-finite factor"
        except torch.linalg.LinAlgError:
            reason = "not positive definite"
        if not reason:
            return Hinv.to(H.dtype), damp, notes
        if attempt < max_retries:
            notes.append(f"Cholesky failed at damp {damp:g} ({reason}), retried at {damp * 10:g}")
        damp *= 10
    raise GPTQError(f"Cholesky of the damped Hessian failed {max_retries + 1} times (relative damping "
                    f"{percdamp:g} to {damp / 10:g}, mean diag {mean_diag:g}); H is far from positive definite")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  max_retries: int = 4, search: bool = False, keep_updated: bool = False) -> GPTQResult:
    """Quantize W [out, in] column by column with GPTQ given H = (2/n) Σ x xᵀ; W, H untouched.
    search: each group's scale/zero by the diag(H)-weighted grid search (grid.py), not min-max.
    keep_updated: also return the error-compensated columns the codes were rounded from (GPTQResult.updated)."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dtype).clone()
    H = H.detach().to(device=W.device, dtype=dtype).clone()
    rows, columns = W.shape
    if H.shape != (columns, columns):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({columns}, {columns}) for W {tuple(W.shape)}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if not torch.isfinite(H).all():
        raise GPTQError("H has non-finite entries (NaN/inf); the calibration activations are broken")
    if not torch.isfinite(W).all():
        raise GPTQError("W has non-finite entries (NaN/inf)")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    grouped = spec.group_size != -1
    gw = spec.group_width(columns)
    dH = torch.diag(H).float()
    grid = None
    if spec.fmt:  # a ggml type: its block scales (and mins) fixed before the sweep, weighted by diag(H)
        from .ggml_grid import fit_grid

        if not spec.ggml.fits(columns):
            raise ValueError(f"{spec.fmt} needs rows that are a multiple of {spec.ggml.block}, got {columns}")
        grid = fit_grid(W, spec.ggml, dH, search=search)
        A, B = (x.to(device=W.device, dtype=dtype) for x in grid.scale_offset())
    elif not grouped:
        scale, zero = qparams(W, spec, search=search, d=dH)
    elif static_groups or spec.scale_bits != SCALE_BITS:
        gscales, gzeros = group_qparams(W, spec, search=search, d=dH)  # [rows, groups]
    step = None
    if grid is None and grouped and spec.scale_bits != SCALE_BITS:  # scale codes: each row's step from the
        step = row_steps(gscales, spec.scale_bits)  # weights as they come
        if static_groups:
            gscales, gzeros = snap_groups(W, dH, gscales, gzeros, step, spec)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        dH = dH[perm]

    Hinv, damp, notes = _inverse_cholesky(H, percdamp, max_retries)

    codes = torch.zeros_like(W)
    updated = torch.zeros_like(W) if keep_updated else None
    Losses = torch.zeros(rows, dtype=dtype, device=W.device)
    scales, zeros = [], []
    column = perm.tolist() if perm is not None else range(columns)  # original index of column j (no per-column sync)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            j = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if grid is not None:
                g = column[j] // gw
                a, b = A[:, g], B[:, g]
                c = torch.where(a != 0, torch.clamp(torch.round((w - b) / a), 0, spec.maxq), torch.zeros_like(w))
                codes[:, j] = c
                err1 = (w - (a * c + b)) / d
                Losses += err1 ** 2
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
                continue
            if grouped and static_groups:
                scale, zero = gscales[:, column[j] // gw], gzeros[:, column[j] // gw]
            elif grouped and j % gw == 0:
                cols = W1[:, i:i + gw]
                if j + gw > i2:  # group spills into later blocks: apply their pending update
                    tail = W[:, i2:j + gw] - Err1[:, :i] @ Hinv[i1:j, i2:j + gw]
                    cols = torch.cat([cols, tail], dim=1)
                scale, zero = qparams(cols, spec, search=search, d=dH[j:j + cols.shape[1]])
                if step is not None:
                    scale, zero = snap(cols, dH[j:j + cols.shape[1]], scale, zero, step, spec.scale_bits, spec.maxq,
                                       spec.symmetric)
                scales.append(scale)
                zeros.append(zero)
            c = quant_codes(w, scale, zero, spec.maxq)
            q = scale * (c - zero)
            codes[:, j] = c
            if updated is not None:
                updated[:, j] = w
            err1 = (w - q) / d
            Losses += err1 ** 2
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if grid is not None:
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
        weight = ggml_weight(W, spec, q=codes.to(torch.int32), grid=grid)
        return GPTQResult(weight, weight.dequantize(), damp, len(notes), notes, float(Losses.sum() / 2))
    if not grouped:
        scales, zeros = [scale], [zero]
    elif static_groups:
        scales, zeros = list(gscales.unbind(1)), list(gzeros.unbind(1))
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        updated = None if updated is None else updated[:, invperm]
        if grouped and not static_groups:
            g_idx = (torch.arange(columns, device=W.device) // gw)[invperm].to(torch.int32)
    weight = QuantizedWeight(
        q=codes.to(torch.int32),
        scales=torch.stack(scales, dim=1).float(),
        zeros=torch.stack(zeros, dim=1).to(torch.int32),
        spec=spec,
        g_idx=g_idx,
        scale_step=None if step is None else step.float(),
    )
    return GPTQResult(weight, weight.dequantize(), damp, len(notes), notes, float(Losses.sum() / 2),
                      None if updated is None else updated.float())
