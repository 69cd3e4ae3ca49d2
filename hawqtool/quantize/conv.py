"""GPTQ for convolutions: a conv is a matmul of its flattened weight with unfolded input patches.

Conv2d weight [out, in/groups, kh, kw] flattened to [out, d], d = in/groups·kh·kw (channel-major,
the order of `weight.flatten(1)` and of `F.unfold`), times the patch vectors u ∈ R^d of each
output position gives the conv output (without bias). So the layer Hessian is H = (2/n) Σ u uᵀ
over all n patch positions, and gptq.py's math applies to the flattened weight unchanged.
Grouped/depthwise convs: output rows of group g only read input channels of group g, so each
group has its own H[g] ([groups, d, d]) and is quantized as an independent [out/groups, d] matrix.
Conv1d is handled as a Conv2d with a 1-high kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gptq import GPTQResult, gptq_quantize
from .quantizer import QuantizedWeight, QuantSpec

CHUNK_ELEMENTS = 1 << 24  # max patch-matrix elements formed at once (bounds unfold memory)


def _geometry(conv: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int, int, int]]:
    """(kernel, dilation, stride, F.pad amounts) of a Conv1d/Conv2d as 2-D tuples."""
    if isinstance(conv, nn.Conv2d):
        k, d, s = conv.kernel_size, conv.dilation, conv.stride
    elif isinstance(conv, nn.Conv1d):
        k, d, s = (1, conv.kernel_size[0]), (1, conv.dilation[0]), (1, conv.stride[0])
    else:
        raise TypeError(f"expected nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
    if conv.padding == "valid":
        pad = (0, 0, 0, 0)
    elif conv.padding == "same":  # PyTorch's rule: the extra pixel goes right/bottom
        tw, th = d[1] * (k[1] - 1), d[0] * (k[0] - 1)
        pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        p = conv.padding if isinstance(conv, nn.Conv2d) else (0, conv.padding[0])
        pad = (p[1], p[1], p[0], p[0])
    return k, d, s, pad


def conv_patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Unfolded input patches [groups, N·L, d] such that patches[g] @ W_g.flatten(1)ᵀ is group g's output."""
    k, d, s, pad = _geometry(conv)
    if x.dim() == conv.weight.dim() - 1:
        x = x.unsqueeze(0)  # unbatched input
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(-2)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    u = F.unfold(x, kernel_size=k, dilation=d, stride=s)  # [N, C·kh·kw, L], channel-major rows
    G = conv.groups
    N, CK, L = u.shape
    return u.reshape(N, G, CK // G, L).permute(1, 0, 3, 2).reshape(G, N * L, CK // G)


def _patch_gram(x: torch.Tensor, conv: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(Σ u uᵀ per group [groups, d, d] in `dtype`, number of patches), unfolding a few images at a time."""
    x = x.detach()
    if x.dim() == conv.weight.dim() - 1:
        x = x.unsqueeze(0)
    if x.shape[0] == 0:
        raise ValueError("conv Hessian update got an empty batch")
    step = max(1, CHUNK_ELEMENTS // conv_patches(x[:1], conv).numel())
    S, m = None, 0
    for start in range(0, x.shape[0], step):
        P = conv_patches(x[start:start + step].to(dtype), conv)
        XtX = torch.bmm(P.transpose(1, 2), P)
        S = XtX if S is None else S + XtX
        m += P.shape[1]
    return S, m


def conv_hessian_update(H: torch.Tensor | None, x: torch.Tensor, conv: nn.Module,
                        n_samples: int = 0) -> tuple[torch.Tensor, int]:
    """Running-mean update over the m new patches u: H ← (n·H + 2 Σ u uᵀ)/(n + m).

    Returns (H [groups, d, d], n + m); H=None starts from zero. Same convention as gptq's
    HessianAccumulator; computed in float64 if x or H is float64, else float32.
    """
    dtype = torch.float64 if torch.float64 in (x.dtype, getattr(H, "dtype", None)) else torch.float32
    S, m = _patch_gram(x, conv, dtype)
    H = torch.zeros_like(S) if H is None else H.to(dtype)
    if H.shape != S.shape:
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {tuple(S.shape)} for this conv")
    total = n_samples + m
    return H * (n_samples / total) + S * (2.0 / total), total


class ConvHessianAccumulator:
    """Running H [groups, d, d] of one conv's input patches; same interface as gptq.HessianAccumulator.

    Each batch's Σ u uᵀ is formed in float32 and summed in float64 (no drift over many batches).
    """

    def __init__(self, conv: nn.Module) -> None:
        self.conv = conv
        self.n_samples = 0
        self._sum: torch.Tensor | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the patches of a conv input [N, C, H, W] (or [N, C, L] for Conv1d)."""
        S, m = _patch_gram(x, self.conv, torch.float64 if x.dtype == torch.float64 else torch.float32)
        self._sum = S.double() if self._sum is None else self._sum + S.double()
        self.n_samples += m

    def release(self) -> None:
        """Drop the float64 sums once `.H` has been taken."""
        self._sum = None

    @property
    def H(self) -> torch.Tensor:
        """(2/n) Σ u uᵀ per group as float32 [groups, d, d]."""
        if self._sum is None or self.n_samples == 0:
            raise RuntimeError("ConvHessianAccumulator.H requested before any inputs were added")
        return (self._sum * (2.0 / self.n_samples)).float()


@dataclass
class ConvGPTQResult:
    """Quantized conv: flattened QuantizedWeight [out, d], the dequantized native weight, per-group runs."""

    weight: QuantizedWeight
    dequantized: torch.Tensor  # conv.weight.shape, equals weight.dequantize().reshape(...)
    groups: list[GPTQResult] = field(default_factory=list)

    @property
    def damp(self) -> float:
        return max(g.damp for g in self.groups)

    @property
    def retries(self) -> int:
        return sum(g.retries for g in self.groups)

    @property
    def notes(self) -> list[str]:
        return [f"group {i}: {n}" if len(self.groups) > 1 else n for i, g in enumerate(self.groups) for n in g.notes]

    @property
    def proxy_loss(self) -> float:
        return sum(g.proxy_loss for g in self.groups)


def gptq_conv(conv: nn.Module, H: torch.Tensor, spec: QuantSpec | None = None, **gptq_kwargs: Any) -> ConvGPTQResult:
    """GPTQ on the flattened conv weight, one independent run per conv group (rows of group g use H[g]).

    H: [groups, d, d] (or [d, d] when groups == 1); spec defaults to 4-bit per output channel.
    The conv is not modified; write `result.dequantized` back to apply it.
    """
    spec = spec or QuantSpec(bits=4, group_size=-1)
    G = conv.groups
    W = conv.weight.detach()
    out, d = W.shape[0], W[0].numel()
    if H.dim() == 2:
        H = H.unsqueeze(0)
    if H.shape != (G, d, d):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({G}, {d}, {d}) for this conv")
    if G > 1 and gptq_kwargs.get("act_order") and spec.group_size != -1 and not gptq_kwargs.get("static_groups"):
        raise ValueError("act_order with group_size != -1 on a grouped conv needs static_groups=True "
                         "(each conv group would have its own column permutation, one g_idx cannot hold them)")
    Wf = W.reshape(G, out // G, d)
    runs = [gptq_quantize(Wf[g], H[g], spec, **gptq_kwargs) for g in range(G)]
    weight = QuantizedWeight(
        q=torch.cat([r.weight.q for r in runs]),
        scales=torch.cat([r.weight.scales for r in runs]),
        zeros=torch.cat([r.weight.zeros for r in runs]),
        spec=spec,
        g_idx=runs[0].weight.g_idx if G == 1 else None,
        scale_step=None if runs[0].weight.scale_step is None else torch.cat([r.weight.scale_step for r in runs]),
    )
    deq = weight.dequantize().reshape(W.shape)
    return ConvGPTQResult(weight, deq, runs)
