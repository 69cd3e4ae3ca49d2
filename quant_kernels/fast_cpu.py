"""Fast CPU path: an AVX2/FMA C++ extension (csrc/qkernels.cpp) on a one-time repack of each weight.

Repack (cached on the PackedWeight): columns are reordered so every group is a contiguous run
of 16-column units (a group is padded with columns that read a zero input), codes become
bytes (two 4-bit codes per byte for widths <= 4, one code per byte above), and scales and
scale*zero become fp32. Then each call is one extension call (`linear`: gather x, group sums, kernel, bias):

* M <= GEMV_MAX_ROWS input rows: one pass over the codes per row, fp32 FMA per group, and
  y = Σ_g s·(q·x)_g − s·z·(Σx)_g: never a dequantized matrix.
* GEMV_MAX_ROWS < M < BLAS_MIN_ROWS: each thread decodes 4 weight rows into an L1-resident fp32
  buffer once and multiplies them with every input row (one x load feeds 4 FMAs).
* M >= BLAS_MIN_ROWS (prefill): 256-row tiles are decoded to fp32 and multiplied by torch's BLAS;
  the decode is O(N·K) against the product's O(M·N·K), and no whole dequantized matrix exists.

With int8 activations (W8A8, W{2,3,4}A8; csrc/int8_act.cpp, driven by int8_ops.py) the dot products are
integer at every row count: maddubs/madd on the same nibble codes, exact int32 group sums, tiles of
1 channel × 4 tokens (4 channels × 1 token for decode).

Kernels are parallel over output channels with OpenMP (torch's own libgomp, which the extension links
against by SONAME; at::parallel_for without -fopenmp would run on one thread).

The extension is compiled once on first use (~1 min) into the cache folder; without a C++
compiler or without AVX2/FMA the portable torch path (quant_kernels.cpu) is used and
`backend_info()` and a warning say so. HAWQTOOL_KERNELS=torch forces the portable path.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .layout import PackedWeight
from .packing import unpack
from .torch_ops import kernel, register_fakes

log = logging.getLogger("quant_kernels")

GEMV_MAX_ROWS = 4
BLAS_MIN_ROWS = 16  # from here on: decode 256-row tiles, multiply with torch's BLAS (bench_kernels.py)
_STATE: dict = {}


def cpu_has_avx2_fma() -> bool:
    """True if this CPU reports AVX2 and FMA (Linux /proc/cpuinfo; other systems: False)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _build_dir() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("HAWQTOOL_CACHE", os.path.expanduser("~/.cache/hawqtool")), "ext")
    d = Path(base) / f"qkernels-torch{torch.__version__.split('+')[0]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def extension():
    """The compiled extension, or None (reason in backend_reason()). Builds once, then loads from cache."""
    if "ext" in _STATE:
        return _STATE["ext"]
    _STATE["ext"], _STATE["reason"] = None, ""
    if os.environ.get("HAWQTOOL_KERNELS", "").lower() == "torch":
        _STATE["reason"] = "HAWQTOOL_KERNELS=torch"
        return None
    if not cpu_has_avx2_fma():
        _STATE["reason"] = "CPU lacks AVX2/FMA"
    else:
        from torch.utils.cpp_extension import load

        csrc = Path(__file__).with_name("csrc")
        src = [csrc / "qkernels.cpp", csrc / "int8_act.cpp", csrc / "int8_conv.cpp", csrc / "grid_search.cpp"]
        d = _build_dir()
        fresh = not any(d.glob("*.so"))
        if fresh:
            print("quant_kernels: building the AVX2 CPU extension (once, about a minute)...", file=sys.stderr,
                  flush=True)
        t0 = time.perf_counter()
        try:
            _STATE["ext"] = load(name="hawq_qkernels", sources=[str(p) for p in src], build_directory=str(d),
                                 extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", f"-I{csrc}"],
                                 extra_ldflags=["-fopenmp"], verbose=False)
            register_fakes()
            if fresh:
                print(f"quant_kernels: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the portable path, loudly
            _STATE["reason"] = f"extension build failed ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
    if _STATE["ext"] is None:
        log.warning("quant_kernels: using the portable torch CPU path (%s); expect slower low-bit layers",
                    _STATE["reason"])
    return _STATE["ext"]


def backend_reason() -> str:
    """Why the fast path is off ('' when it is on or not yet tried)."""
    return _STATE.get("reason", "")


@dataclass
class KernelWeight:
    """A PackedWeight in the extension's layout (see module docstring)."""

    codes: torch.Tensor  # uint8 [N, units*8] (nibble) or [N, units*16]
    scales: torch.Tensor  # fp32 [N, G]
    zs: torch.Tensor  # fp32 [N, G], scale * zero
    gunit: torch.Tensor  # int32 [G+1], group g = units [gunit[g], gunit[g+1])
    xidx: torch.Tensor  # int64 [units*16], input column of each kernel column (in_features = the zero column)
    nibble: bool
    identity: bool = False  # xidx == arange(in_features): the kernel reads x as it is


def repack(pw: PackedWeight) -> KernelWeight:
    """Kernel layout of a PackedWeight (cached on the object; the PackedWeight itself is unchanged)."""
    kw = getattr(pw, "_kernel_weight", None)
    if kw is not None:
        return kw
    K, G = pw.in_features, pw.n_groups
    q = unpack(pw.qweight, pw.bits, K).to(torch.uint8)
    gidx = pw.group_index()
    scales = pw.scales.float()
    if pw.symmetric:
        zeros = torch.full_like(scales, float(pw.implicit_zero))
    else:
        zeros = unpack(pw.qzeros, pw.bits, G).float()
    cols, gunit = [], [0]
    order = torch.argsort(gidx, stable=True)
    counts = torch.bincount(gidx, minlength=G).tolist()
    start = 0
    for g in range(G):
        c = order[start:start + counts[g]]
        start += counts[g]
        pad = (-len(c)) % 16
        cols.append(torch.cat([c, torch.full((pad,), K, dtype=torch.int64)]))
        gunit.append(gunit[-1] + (len(c) + pad) // 16)
    xidx = torch.cat(cols)
    qp = torch.cat([q, torch.zeros(q.shape[0], 1, dtype=torch.uint8)], dim=1).index_select(1, xidx)
    nibble = pw.bits <= 4
    if nibble:
        u = qp.view(q.shape[0], -1, 16)
        codes = (u[:, :, :8] | (u[:, :, 8:] << 4)).reshape(q.shape[0], -1).contiguous()
    else:
        codes = qp.contiguous()
    kw = KernelWeight(codes=codes, scales=scales.contiguous(), zs=(scales * zeros).contiguous(),
                      gunit=torch.tensor(gunit, dtype=torch.int32), xidx=xidx, nibble=nibble,
                      identity=len(xidx) == K and bool((xidx == torch.arange(K)).all()))
    pw._kernel_weight = kw
    return kw


def matmul_fast(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) through the extension; x (..., in) fp32/bf16, result in x's dtype."""
    kw = repack(pw)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), pw.in_features).to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = kernel("linear")(x2, kw.codes, kw.scales, kw.zs, kw.gunit, kw.xidx, kw.identity, kw.nibble, b,
                         GEMV_MAX_ROWS, BLAS_MIN_ROWS)
    return y.to(x.dtype).reshape(*lead, pw.out_features)


def w8a8_supported(pw: PackedWeight) -> bool:
    """The int8 kernel's weight type: symmetric 8-bit, one scale per output channel, no act-order."""
    return pw.bits == 8 and pw.symmetric and pw.n_groups == 1 and pw.g_idx is None


def repack_w8a8(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes q − 128 [N, K rounded up to 16], fp32 per-channel scales [N]); cached on the weight."""
    cached = getattr(pw, "_w8a8_weight", None)
    if cached is not None:
        return cached
    K = pw.in_features
    q = unpack(pw.qweight, 8, K).to(torch.int16) - pw.implicit_zero
    wq = torch.zeros(pw.out_features, -(-K // 16) * 16, dtype=torch.int8, device=q.device)
    wq[:, :K] = q.to(torch.int8)
    pw._w8a8_weight = (wq, pw.scales[:, 0].float().contiguous())
    return pw._w8a8_weight


def a8_supported(pw: PackedWeight) -> bool:
    """The W{2,3,4}A8 integer kernel's weight type: codes of at most 4 bits (any groups, zeros, act-order)."""
    return pw.bits <= 4
