"""QuantLinear's activation handling for every weight/activation pair the allocator can choose."""
from __future__ import annotations

import pytest
import torch

from hawqtool.checkpoint import pack_layer
from hawqtool.quantize.quantizer import QuantSpec, rtn
from hawqtool.runtime import QuantLinear, _act_bits
from hawqtool.errors import UserError
from quant_kernels import matmul_reference
from quant_kernels.activation import fake_quant_per_token


@pytest.mark.parametrize("bits, act_bits", [(4, 16), (4, 8), (4, 4), (3, 3), (8, 8)])
def test_quant_linear_quantizes_activations_per_token(bits, act_bits):
    g = torch.Generator().manual_seed(bits * 10 + act_bits)
    W, x = torch.randn(24, 64, generator=g), torch.randn(5, 64, generator=g)
    pw = pack_layer(rtn(W, QuantSpec(bits, -1 if (bits, act_bits) == (8, 8) else 32, (bits, act_bits) == (8, 8))))
    y = QuantLinear(pw, None, act_bits=act_bits)(x)
    xq = x if act_bits == 16 else fake_quant_per_token(x, act_bits)
    ref = matmul_reference(xq, pw)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_checkpoint_act_bits_must_be_a_supported_width():
    assert _act_bits({"act_bits": 4}, "l") == 4 and _act_bits({}, "l") == 16
    for bad in (1, 9, 12, "8", True):
        with pytest.raises(UserError, match="expected 2..8 or 16"):
            _act_bits({"act_bits": bad}, "l")
