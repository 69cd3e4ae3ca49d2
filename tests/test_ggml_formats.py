"""ggml block formats as tensors (quantize/ggml_types.py, ggml_pack.py, ggml_grid.py): dequantization bit-equal to
gguf's reader of our bytes, bytes round trips, gguf's own quantizer reproduced by the reference rule, the
importance-weighted search below the reference rule, sizes, ordering of the K family, and codes round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from hawqtool.quantize.ggml_grid import (  # noqa: E402
    GGMLGrid, dequantize_grid, fit_grid, grid_codes, pack_grid, quantize_rtn, unpack_grid)
from hawqtool.quantize.ggml_pack import LAYOUT  # noqa: E402
from hawqtool.quantize.ggml_types import TYPES, ggml_type  # noqa: E402

NAMES = list(TYPES)
LEGACY = [n for n in NAMES if not TYPES[n].is_kquant]
KFAMILY = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Normal weights with 1% outliers (8x), one all-zero row, one constant positive and one constant negative row."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[torch.rand(W.shape, generator=g) < 0.01] *= 8
    W[1] = 0
    W[2] = 0.0123
    W[3] = -0.0456
    return W


def importance(cols: int, seed: int, heavy: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(1.5 * torch.randn(cols, generator=g)) if heavy else 1 + torch.rand(cols, generator=g)


def werr(W: torch.Tensor, Q: torch.Tensor, d: torch.Tensor | None) -> float:
    dd = torch.ones(W.shape[1]) if d is None else d
    return float(((W - Q).double() ** 2 * dd.double()).sum())


def gguf_dequant(raw: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, GGMLQuantizationType[name]))


def random_blocks(name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes of ggml blocks (every bit pattern of codes and sub-scales), fp16 fields finite."""
    t = TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // t.block, t.type_size), dtype=np.uint8)
    o = 0
    for part, n in LAYOUT[name]:
        if part in ("d", "dmin") or (part == "m" and not t.is_kquant):
            d = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16)
            raw[:, o:o + 2] = d.reshape(-1, 1).view(np.uint8)
        o += n
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_is_bit_equal_to_gguf(name: str) -> None:
    """(1) our values of our codes equal gguf's dequantization of our bytes exactly: fitted grids (search and
    reference rule, with and without importance) on weights with outliers and zero/constant rows, and grids
    decoded from random bytes."""
    t = TYPES[name]
    cols = 512
    W = weights(12, cols, seed=1)
    for search in (True, False):
        for d in (None, importance(cols, 2)):
            q, grid = quantize_rtn(W, t, d, search=search)
            assert q.dtype == torch.int32 and q.shape == W.shape and int(q.min()) >= 0 and int(q.max()) <= t.maxq
            Q = dequantize_grid(q, grid)
            assert Q.dtype == torch.float32
            assert torch.equal(Q, gguf_dequant(pack_grid(q, grid), name)), (search, d is None)
            assert torch.equal(Q[1], torch.zeros(cols))  # an all-zero row stays exactly zero
            assert werr(W[2:4], Q[2:4], d) <= 1e-5 * werr(W[2:4], torch.zeros_like(W[2:4]), d)  # constant rows
    raw = random_blocks(name, 6, cols, seed=3)
    q, grid = unpack_grid(raw, t, cols)
    assert torch.equal(dequantize_grid(q, grid), gguf_dequant(raw, name))


@pytest.mark.parametrize("name", NAMES)
def test_pack_unpack_round_trip(name: str) -> None:
    """(2) bytes -> (codes, grid) -> bytes is the identity (every bit of every block is accounted for), and
    (codes, grid) -> bytes -> (codes, grid) returns equal codes and fields."""
    t = TYPES[name]
    raw = random_blocks(name, 5, 512, seed=4)
    q, grid = unpack_grid(torch.from_numpy(raw), t, 512)
    assert np.array_equal(pack_grid(q, grid), raw)
    q, grid = quantize_rtn(weights(6, 512, seed=5), t, importance(512, 6))
    raw = pack_grid(q, grid)
    assert raw.dtype == np.uint8 and raw.shape == (6, 512 // t.block * t.type_size)
    q2, grid2 = unpack_grid(raw, t, 512)
    assert torch.equal(q2, q)
    assert set(grid2.fields) == set(grid.fields)
    for k, v in grid.fields.items():
        assert torch.equal(grid2.fields[k].to(v.dtype), v), k
    with pytest.raises(ValueError):
        unpack_grid(raw[:, :-1], t, 512)


@pytest.mark.parametrize("name", LEGACY)
def test_reference_rule_gives_gguf_bytes(name: str) -> None:
    """(3) search=False reproduces gguf.quants.quantize byte for byte (Q4_0's d = max/-8 with trunc(x + 8.5),
    Q8_0's round-half-away, Q4_1/Q5_1's min-max), outliers, zero and constant rows included."""
    W = weights(16, 256, seed=7)
    q, grid = quantize_rtn(W, TYPES[name], search=False)
    ref = gguf.quants.quantize(W.numpy(), GGMLQuantizationType[name])
    assert np.array_equal(pack_grid(q, grid), ref)
    assert torch.equal(fit_grid(W, TYPES[name], search=False).fields["d"], grid.fields["d"])


# sha256 (first 16 hex digits) of llama.cpp's bytes for lcg_weights(6, 512): ggml-quants.c's quantize_q*(...,
# quant_weights=NULL) (the quantize_row_*_ref rules) from ggml-org/ggml at d99724f, built and run outside the repo
LLAMA_CPP_REF = {"Q8_0": "0f305c8b51a11572", "Q5_1": "ebc991b472584b16", "Q5_0": "f1f19755fa7cb24c",
                 "Q4_1": "70569f71ddbef8e0", "Q4_0": "af6ad0d3bbe346da", "Q6_K": "6349ef0e9d7fb327",
                 "Q5_K": "a850d4a8496175d7", "Q4_K": "294e3e727bd861cb", "Q3_K": "050d298e950653a2",
                 "Q2_K": "25bf342f5a7612c9"}


def lcg_weights(rows: int, cols: int) -> np.ndarray:
    """Platform-independent float32 weights (integer LCG, exact float ops) with an outlier, zero and constant rows."""
    i = np.arange(rows * cols, dtype=np.uint64)
    v = (i * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)) >> np.uint64(40)
    u = v.astype(np.float32) / np.float32(1 << 24) - np.float32(0.5)
    W = (u * u * u * np.float32(0.2)).reshape(rows, cols)
    W[0, 7], W[1], W[2], W[3] = 0.5, 0, 0.01, -0.003
    return W


@pytest.mark.parametrize("name", NAMES)
def test_reference_rule_matches_llama_cpp(name: str) -> None:
    """(3b) search=False is ggml's C reference quantizer bit for bit, K-quants included (same float32 operation
    order: sequential sums, correctly rounded divisions and square roots, +0 starting maxima)."""
    import hashlib

    q, grid = quantize_rtn(torch.from_numpy(lcg_weights(6, 512)), TYPES[name], search=False)
    assert hashlib.sha256(pack_grid(q, grid).tobytes()).hexdigest()[:16] == LLAMA_CPP_REF[name]


@pytest.mark.parametrize("name", NAMES)
def test_search_beats_reference_rule(name: str) -> None:
    """(4) the weighted search never has a larger weighted error than ggml's rule on the same W and d, and is
    clearly smaller on average (more so with a heavy-tailed importance, which the rule ignores)."""
    t = TYPES[name]
    ratios = []
    for seed in range(2):
        W = weights(32, 512, seed=10 + seed)
        for d in (None, importance(512, 20 + seed, heavy=False), importance(512, 30 + seed)):
            es = werr(W, dequantize_grid(*quantize_rtn(W, t, d)), d)
            er = werr(W, dequantize_grid(*quantize_rtn(W, t, d, search=False)), d)
            assert es <= er, (seed, d is None, es, er)
            ratios.append(es / er)
    assert np.mean(ratios) < 0.97, ratios
    assert min(ratios[2::3]) < 0.85, ratios  # heavy-tailed d


def test_types_sizes_and_names() -> None:
    """(5) type sizes equal gguf's, storage_bits counts exactly the packed bytes; names are case-insensitive and
    unknown ones fail naming the valid ones."""
    for name, t in TYPES.items():
        qt = GGMLQuantizationType[name]
        assert (t.block, t.type_size) == GGML_QUANT_SIZES[qt] and t.ggml_id == int(qt)
        assert t.bits_per_weight == 8 * t.type_size / t.block and t.maxq == 2**t.bits - 1
        assert t.block % t.group == 0 and t.fits(t.block) and not t.fits(t.block + 16) and not t.fits(0)
        q, grid = quantize_rtn(weights(5, 512, seed=8), t)
        assert pack_grid(q, grid).size * 8 == t.storage_bits(5, 512)
        assert grid.scale_offset()[0].shape == (5, 512 // t.group)
    assert ggml_type("q4_k") is TYPES["Q4_K"] and ggml_type(" Q8_0 ") is TYPES["Q8_0"]
    with pytest.raises(ValueError, match="Q4_K"):
        ggml_type("Q7_Z")
    with pytest.raises(ValueError):
        TYPES["Q6_K"].storage_bits(4, 576)
    with pytest.raises(ValueError, match="multiple of 256"):
        fit_grid(torch.randn(4, 576), TYPES["Q4_K"])
    assert TYPES["Q4_0"].storage_bits(4, 576) == 4 * 18 * 18 * 8


def test_kquant_errors_fall_with_bits() -> None:
    """(6) on the same W and d: Q2_K > Q3_K > Q4_K > Q5_K > Q6_K in weighted error, search and reference rule."""
    W = weights(24, 1024, seed=9)
    d = importance(1024, 10)
    for search in (True, False):
        errs = [werr(W, dequantize_grid(*quantize_rtn(W, TYPES[n], d, search=search)), d) for n in KFAMILY]
        assert all(a > 1.5 * b for a, b in zip(errs, errs[1:])), (search, errs)


@pytest.mark.parametrize("name", NAMES)
def test_codes_round_trip_through_the_grid(name: str) -> None:
    """(7) the nearest codes of the grid's own values are the codes (fitted grids, random codes), and scale_offset
    gives those values to float rounding (what GPTQ's per-column rounding uses)."""
    t = TYPES[name]
    W = torch.randn(8, 512, generator=torch.Generator().manual_seed(11)) * 0.02
    grid = fit_grid(W, t, importance(512, 12))
    a, b = grid.scale_offset()
    assert bool((a != 0).all())
    q = torch.randint(0, t.maxq + 1, W.shape, generator=torch.Generator().manual_seed(13), dtype=torch.int32)
    Q = dequantize_grid(q, grid)
    assert torch.equal(grid_codes(Q, grid), q)
    g = torch.arange(512) // t.group
    assert torch.allclose(a[:, g] * q + b[:, g], Q, rtol=0, atol=1e-6 * float(Q.abs().max()))
    assert torch.equal(grid_codes(W, grid), quantize_rtn(W, t, importance(512, 12))[0])


def test_symmetric_signs_and_zero_groups() -> None:
    """Q4_0's d and the K-quants' sub-scales may be negative (the wider code side goes where the largest weight
    is); a group of zeros has a = 0 and code 0 (GPTQ's convention), and still dequantizes exactly."""
    W = torch.full((2, 256), 0.01)
    W[0, 3] = 1.0  # a large positive weight: ggml's rule puts it at code 0 with d = max / -8 < 0
    W[1, :32] = 0
    q, grid = quantize_rtn(W, TYPES["Q4_0"], search=False)
    assert float(grid.fields["d"][0, 0]) < 0 and int(q[0, 3]) == 0
    grid = fit_grid(W, TYPES["Q4_0"])
    a, _ = grid.scale_offset()
    assert float(a[1, 0]) == 0 and torch.equal(grid_codes(W, grid)[1, :32], torch.zeros(32, dtype=torch.int32))
    for name in ("Q3_K", "Q6_K"):
        q, grid = quantize_rtn(W, TYPES[name])
        assert torch.equal(dequantize_grid(q, grid), gguf_dequant(pack_grid(q, grid), name))
        assert isinstance(grid, GGMLGrid)
