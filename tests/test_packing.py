"""quant_kernels.packing and PackedWeight: layout, round trips, rejection of bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from quant_kernels import PackedWeight, n_words, pack, unpack
from quant_kernels.packing import _unpack_aligned, _unpack_general

SIZES = [1, 3, 31, 33, 576, 1000]


def _spec_words(values: list[int], bits: int) -> list[int]:
    """The packed row written straight from the documented layout, as unsigned 32-bit words."""
    stream = 0
    for j, v in enumerate(values):
        stream |= v << (j * bits)
    return [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(n_words(len(values), bits))]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_random(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(1000 * bits + n)
    q = torch.randint(0, 2**bits, (3, n), generator=g, dtype=torch.int32)
    p = pack(q, bits)
    assert p.dtype == torch.int32 and p.shape == (3, (n * bits + 31) // 32)
    assert torch.equal(unpack(p, bits, n), q)
    assert torch.equal(_unpack_general(p, bits, n), q)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_matches_documented_bit_stream(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (1, 5, 13, 37):
        q = torch.randint(0, 2**bits, (n,), generator=g)
        words = [w & 0xFFFFFFFF for w in pack(q, bits).tolist()]
        assert words == _spec_words(q.tolist(), bits)


def test_known_word_with_bit31_set() -> None:
    p = pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), 4)
    assert p.tolist() == [0x87654321 - 2**32]
    assert unpack(p, 4, 8).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_all_max_values_set_bit31(bits: int) -> None:
    n = 64
    q = torch.full((2, n), 2**bits - 1)
    p = pack(q, bits)
    assert bool((p < 0).any()), "bit 31 should be set and read back negative"
    assert torch.equal(unpack(p, bits, n), q.int())


def test_straddling_three_bit_value() -> None:
    # value 10 (codes 0..9 are zero) starts at stream bit 30: bits 30,31 of word 0 and bit 0 of word 1
    q = torch.zeros(11, dtype=torch.int64)
    q[10] = 0b111
    assert [w & 0xFFFFFFFF for w in pack(q, 3).tolist()] == [0xC0000000, 0x1]


def test_unpack_general_equals_aligned() -> None:
    for bits in (1, 2, 4, 8):
        q = torch.randint(0, 2**bits, (4, 77))
        p = pack(q, bits)
        assert torch.equal(_unpack_general(p, bits, 77), _unpack_aligned(p, bits, 77))


def test_leading_dims_and_empty() -> None:
    q = torch.randint(0, 8, (2, 3, 17))
    p = pack(q, 3)
    assert p.shape == (2, 3, 2)
    assert torch.equal(unpack(p, 3, 17), q.int())
    for bits in (3, 4):
        assert pack(torch.zeros(4, 0, dtype=torch.int32), bits).shape == (4, 0)
        assert unpack(torch.zeros(4, 0, dtype=torch.int32), bits, 0).shape == (4, 0)
        assert unpack(pack(torch.zeros(0, 5, dtype=torch.int32), bits), bits, 5).shape == (0, 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_out_of_range_rejected(bits: int) -> None:
    with pytest.raises(ValueError, match="codes must lie"):
        pack(torch.tensor([0, 2**bits]), bits)
    with pytest.raises(ValueError, match="codes must lie"):
        pack(torch.tensor([-1, 0]), bits)


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack(torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.tensor([0, 1]), 9)
    with pytest.raises(ValueError, match="integer"):
        pack(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="words per row"):
        unpack(torch.zeros(2, 3, dtype=torch.int32), 4, 8)


# ---- PackedWeight ---------------------------------------------------------------------

def _make(symmetric: bool = False, bits: int = 3, out_f: int = 6, in_f: int = 40, gs: int = 16,
          g_idx: torch.Tensor | None = None) -> PackedWeight:
    """A small valid PackedWeight."""
    n_g = 1 if gs == -1 else -(-in_f // gs)
    q = torch.randint(0, 2**bits, (out_f, in_f))
    z = torch.full((out_f, n_g), 2 ** (bits - 1)) if symmetric else torch.randint(0, 2**bits, (out_f, n_g))
    return PackedWeight.from_codes(q, torch.rand(out_f, n_g) + 0.1, z, bits=bits, group_size=gs,
                                   symmetric=symmetric, g_idx=g_idx)


def test_from_codes_shapes() -> None:
    pw = _make(in_f=576, gs=128, bits=3)
    assert pw.n_groups == 5
    assert pw.qweight.shape == (6, 54) and pw.qweight.dtype == torch.int32
    assert pw.scales.shape == (6, 5) and pw.scales.dtype == torch.float16
    assert pw.qzeros is not None and pw.qzeros.shape == (6, 1)
    sym = _make(symmetric=True, gs=-1)
    assert sym.qzeros is None and sym.n_groups == 1
    PackedWeight.from_codes(torch.zeros(2, 8, dtype=torch.int32), torch.ones(2, 1), None, bits=4,
                            group_size=-1, symmetric=True).validate()


@pytest.mark.parametrize("change, msg", [
    (dict(qweight=torch.zeros(6, 5, dtype=torch.int32)), "qweight must have shape"),
    (dict(qweight=torch.zeros(6, 4, dtype=torch.int64)), "qweight must have dtype"),
    (dict(scales=torch.ones(6, 3, dtype=torch.float32)), "scales must have dtype"),
    (dict(scales=torch.ones(6, 2, dtype=torch.float16)), "scales must have shape"),
    (dict(scales=torch.full((6, 3), float("nan"), dtype=torch.float16)), "inf or NaN"),
    (dict(qzeros=None), "need a qzeros"),
    (dict(qzeros=torch.zeros(6, 2, dtype=torch.int32)), "qzeros must have shape"),
    (dict(qzeros=torch.zeros(6, 1, dtype=torch.float32)), "qzeros must have dtype"),
    (dict(bits=9), "bits"),
    (dict(bits=4), "qweight must have shape"),
    (dict(group_size=0), "group_size"),
    (dict(in_features=0), "in_features"),
    (dict(out_features=7), "shape"),
    (dict(g_idx=torch.zeros(39, dtype=torch.int32)), "g_idx must have shape"),
    (dict(g_idx=torch.zeros(40, dtype=torch.int64)), "g_idx must have dtype"),
    (dict(g_idx=torch.full((40,), 3, dtype=torch.int32)), "g_idx values"),
])
def test_validate_rejects(change: dict, msg: str) -> None:
    pw = dataclasses.replace(_make(), **change)
    with pytest.raises(ValueError, match=msg):
        pw.validate()


def test_symmetric_validate_rules() -> None:
    sym = _make(symmetric=True)
    bad = dataclasses.replace(sym, qzeros=torch.zeros(6, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="qzeros=None"):
        bad.validate()
    with pytest.raises(ValueError, match="implicit zero"):
        PackedWeight.from_codes(torch.zeros(2, 8, dtype=torch.int32), torch.ones(2, 1),
                                torch.zeros(2, 1, dtype=torch.int32), bits=4, group_size=-1, symmetric=True)
    with pytest.raises(ValueError, match="need zeros"):
        PackedWeight.from_codes(torch.zeros(2, 8, dtype=torch.int32), torch.ones(2, 1), None,
                                bits=4, group_size=-1, symmetric=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_in_row_slices_equals_whole(monkeypatch, bits):
    """pack and unpack work PACK_ROWS rows at a time (bounded int64 temporaries): the same words and codes as all
    rows at once, and out-of-range codes in a later slice are still refused."""
    from quant_kernels import packing

    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (3, 7, 37), generator=g, dtype=torch.int32)
    whole = packing.pack(q, bits)
    monkeypatch.setattr(packing, "PACK_ROWS", 4)
    assert torch.equal(packing.pack(q, bits), whole)
    assert torch.equal(packing.unpack(whole, bits, 37), q)
    q[2, 6, 0] = 2**bits
    with pytest.raises(ValueError, match="codes must lie in"):
        packing.pack(q, bits)
