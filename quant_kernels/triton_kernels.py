"""Triton GPU kernels: packed low-bit weight matmul (W{1..8}A16/A32) and int8 W8A8 matmul.

Optional: the module imports without triton (`available()` is then False). With TRITON_INTERPRET=1
the kernels also run on CPU tensors through Triton's interpreter (used by the tests).
Packing layout: see `quant_kernels.packing`; dequantization: w = scale * (q - zero).
The kernels call only triton builtins (tl.full, not the @jit tl.zeros), so `ptx_for` also works while
TRITON_INTERPRET=1 (the interpreter turns triton.language's own @jit helpers into Python functions).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from .layout import PackedWeight

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without the extra
    triton = None
    tl = None

__all__ = ["available", "matmul_triton", "w8a8_triton", "ptx_for"]


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """True if triton imports and can run here: a CUDA device, or the interpreter is on."""
    if triton is None:
        return False
    return _interpreting() or torch.cuda.is_available()


if triton is not None:

    def _matmul_kernel(x_ptr, qw_ptr, sc_ptr, qz_ptr, gidx_ptr, bias_ptr, out_ptr,
                       M, N, K, stride_xm, stride_qn, stride_sn, stride_zn, stride_om, group_size,
                       BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr,
                       HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of x @ W^T; W's codes and zeros are unpacked from int32 words in-kernel."""
        MASK: tl.constexpr = (1 << BITS) - 1
        STRADDLE: tl.constexpr = (32 % BITS) != 0
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        qw_rows = qw_ptr + rn.to(tl.int64)[None, :] * stride_qn
        sc_rows = sc_ptr + rn.to(tl.int64)[None, :] * stride_sn
        qz_rows = qz_ptr + rn.to(tl.int64)[None, :] * stride_zn
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            a = tl.load(x_rows + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            bmask = mask_k[:, None] & mask_n[None, :]
            # codes [BLOCK_K, BLOCK_N]: value k of row n sits at stream bits [k*BITS, (k+1)*BITS)
            start = rk[:, None] * BITS
            word = start >> 5
            off = (start & 31).to(tl.uint32)
            lo = tl.load(qw_rows + word, mask=bmask, other=0).to(tl.uint32, bitcast=True)
            q = (lo >> off) & MASK
            if STRADDLE:  # high part of a straddling value: low bits of the next word
                cross = (off + BITS) > 32
                hi = tl.load(qw_rows + word + 1, mask=bmask & cross, other=0).to(tl.uint32, bitcast=True)
                q = q | ((hi << ((32 - off) & 31)) & MASK)
            if HAS_GIDX:
                g = tl.load(gidx_ptr + rk, mask=mask_k, other=0)
            else:
                g = rk // group_size
            s = tl.load(sc_rows + g[:, None], mask=bmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:  # zeros use the same bit-stream layout along the group axis
                zstart = g[:, None] * BITS
                zoff = (zstart & 31).to(tl.uint32)
                zlo = tl.load(qz_rows + (zstart >> 5), mask=bmask, other=0).to(tl.uint32, bitcast=True)
                z = (zlo >> zoff) & MASK
                if STRADDLE:
                    zcross = (zoff + BITS) > 32
                    zhi = tl.load(qz_rows + (zstart >> 5) + 1, mask=bmask & zcross, other=0).to(tl.uint32, bitcast=True)
                    z = z | ((zhi << ((32 - zoff) & 31)) & MASK)
                zf = z.to(tl.int32).to(tl.float32)
            else:
                zf = (1 << (BITS - 1)) * 1.0
            w = (q.to(tl.int32).to(tl.float32) - zf) * s
            if IS_F32:
                acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
            else:  # fp16/bf16 operands, fp32 accumulation (tensor cores)
                acc = tl.dot(a, w.to(a.dtype), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    def _w8a8_kernel(xq_ptr, sx_ptr, wq_ptr, sw_ptr, bias_ptr, out_ptr,
                     M, N, K, stride_xm, stride_wn, stride_om,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One tile of int8 x int8 -> int32 (tl.dot), then y = acc * sx[m] * sw[n] (+ bias) in fp32."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        x_rows = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm
        w_rows = wq_ptr + rn.to(tl.int64)[None, :] * stride_wn
        acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            a = tl.load(x_rows + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
            b = tl.load(w_rows + rk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
            acc = tl.dot(a, b, acc)
        sx = tl.load(sx_ptr + rm, mask=mask_m, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=mask_n, other=0.0)
        y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    _RAW: dict[str, Callable[..., Any]] = {"matmul": _matmul_kernel, "w8a8": _w8a8_kernel}

_LAUNCHERS: dict[tuple[str, bool], Any] = {}


def _launcher(name: str) -> Any:
    """The jitted kernel; wrapped on first use so TRITON_INTERPRET is read at launch, not at import."""
    if triton is None:
        raise RuntimeError("quant_kernels.triton_kernels needs triton (pip install triton)")
    key = (name, _interpreting())
    if key not in _LAUNCHERS:
        _LAUNCHERS[key] = triton.jit(_RAW[name])
    return _LAUNCHERS[key]


def _pow2(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << max(0, n - 1).bit_length()))


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Validate a caller-supplied output (contiguous, right shape/dtype/device) or allocate one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    return out


def matmul_triton(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W^T (+ bias) with the packed weight unpacked in-kernel; result in x's dtype."""
    kernel = _launcher("matmul")
    if not x.dtype.is_floating_point or x.dtype == torch.float64:
        raise ValueError(f"matmul_triton supports float16/bfloat16/float32 activations, got {x.dtype}")
    K, N = pw.in_features, pw.out_features
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects {K}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape [{N}], got {list(bias.shape)}")
    if pw.device != x.device:
        raise ValueError(f"input is on {x.device} but the packed weight is on {pw.device}")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = _check_out(out, lead + (N,), x.dtype, x.device).view(M, N)
    if M == 0:
        return y.view(*lead, N)
    qw, sc = pw.qweight.contiguous(), pw.scales.contiguous()
    qz = pw.qzeros.contiguous() if pw.qzeros is not None else qw
    gidx = pw.g_idx.contiguous() if pw.g_idx is not None else qw
    gs = pw.group_size if pw.group_size != -1 else K
    bm, bn, bk = _pow2(M, 16, 64), _pow2(N, 16, 64), _pow2(K, 16, 64)
    grid = (-(-M // bm), -(-N // bn))
    kernel[grid](
        x2, qw, sc, qz, gidx, bias if bias is not None else sc, y,
        M, N, K, x2.stride(0), qw.stride(0), sc.stride(0), qz.stride(0), y.stride(0), gs,
        BITS=pw.bits, HAS_ZEROS=pw.qzeros is not None, HAS_GIDX=pw.g_idx is not None,
        HAS_BIAS=bias is not None, IS_F32=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return y.view(*lead, N)


def w8a8_triton(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 xq [M, K] x int8 wq [N, K] -> fp32 [M, N] = (xq @ wq^T) * sx[m] * sw[n] (+ bias)."""
    kernel = _launcher("w8a8")
    if xq.dtype != torch.int8 or wq.dtype != torch.int8 or xq.dim() != 2 or wq.dim() != 2:
        raise ValueError("xq [M, K] and wq [N, K] must be 2-D int8 tensors")
    (M, K), N = xq.shape, wq.shape[0]
    if wq.shape[1] != K:
        raise ValueError(f"xq has K={K} but wq has K={wq.shape[1]}")
    sx = sx.reshape(-1).to(torch.float32).contiguous()
    sw = sw.reshape(-1).to(torch.float32).contiguous()
    if sx.numel() != M or sw.numel() != N:
        raise ValueError(f"sx must hold {M} per-token scales and sw {N} per-channel scales")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape [{N}], got {list(bias.shape)}")
    xq, wq = xq.contiguous(), wq.contiguous()
    y = _check_out(out, (M, N), torch.float32, xq.device)
    if M == 0:
        return y
    bm, bn, bk = _pow2(M, 16, 64), _pow2(N, 16, 64), _pow2(K, 32, 64)
    grid = (-(-M // bm), -(-N // bn))
    kernel[grid](
        xq, sx, wq, sw, bias if bias is not None else sw, y, M, N, K, xq.stride(0), wq.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return y


def _signature(kernel_name: str, c: dict[str, Any]) -> dict[str, str]:
    """Triton 3.x ASTSource signature (arg name -> type string, 'constexpr' for constants)."""
    if kernel_name == "matmul":
        xt = "*fp32" if c["IS_F32"] else "*fp16"
        ptrs = {"x_ptr": xt, "qw_ptr": "*i32", "sc_ptr": "*fp16", "qz_ptr": "*i32", "gidx_ptr": "*i32",
                "bias_ptr": "*fp16", "out_ptr": xt}
        ints = ["M", "N", "K", "stride_xm", "stride_qn", "stride_sn", "stride_zn", "stride_om", "group_size"]
    else:
        ptrs = {"xq_ptr": "*i8", "sx_ptr": "*fp32", "wq_ptr": "*i8", "sw_ptr": "*fp32", "bias_ptr": "*fp32",
                "out_ptr": "*fp32"}
        ints = ["M", "N", "K", "stride_xm", "stride_wn", "stride_om"]
    return {**ptrs, **{i: "i32" for i in ints}, **{k: "constexpr" for k in c}}


def ptx_for(kernel_name: str, arch: int, **constexprs: Any) -> str:
    """AOT-compile kernel 'matmul' (default W4A16 fp16, asymmetric) or 'w8a8' for sm_<arch>; return its PTX."""
    if triton is None:
        raise RuntimeError("ptx_for needs triton")
    if kernel_name not in ("matmul", "w8a8"):
        raise ValueError(f"kernel_name must be 'matmul' or 'w8a8', got {kernel_name!r}")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    c: dict[str, Any] = {"HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
    if kernel_name == "matmul":
        c.update(BITS=4, HAS_ZEROS=True, HAS_GIDX=False, IS_F32=False)
    c.update(constexprs)
    src = ASTSource(fn=JITFunction(_RAW[kernel_name]), signature=_signature(kernel_name, c), constexprs=c)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": 4, "num_stages": 3, "enable_fp_fusion": True})
    return compiled.asm["ptx"]
