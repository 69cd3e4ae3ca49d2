"""Every group of a layer at once (quantize/groups.py) against the one-group-at-a-time loop it replaced: the same
scales, zeros and snapped codes to the bit, ragged last groups, row chunks and groups whose importances are all 0."""
import pytest
import torch

from hawqtool.quantize import groups
from hawqtool.quantize.quantizer import QuantSpec, qparams, rtn
from hawqtool.quantize.scale_codes import row_steps, snap


def _loop(W, spec, d, search):
    """The reference: qparams on each group's columns in turn, then (codes) each group snapped on its row's step."""
    gw = spec.group_width(W.shape[1])
    starts = range(0, W.shape[1], gw)
    params = [qparams(W[:, c:c + gw], spec, search=search, d=None if d is None else d[c:c + gw]) for c in starts]
    step = None
    if spec.scale_bits != 16:
        step = row_steps(torch.stack([s for s, _ in params], 1), spec.scale_bits)
        params = [snap(W[:, c:c + gw], None if d is None else d[c:c + gw], s, z, step, spec.scale_bits, spec.maxq,
                       spec.symmetric) for c, (s, z) in zip(starts, params)]
    return torch.stack([s for s, _ in params], 1), torch.stack([z for _, z in params], 1), step


@pytest.mark.parametrize("in_f,gs", [(96, 32), (100, 32), (70, 128), (64, -1)])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("scale_bits", [16, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_batched_groups_equal_the_loop_bitwise(monkeypatch, in_f, gs, sym, scale_bits, weighted):
    monkeypatch.setattr(groups, "CHUNK", 3 * in_f)  # 3 rows per batched call: the row chunks are exercised too
    g = torch.Generator().manual_seed(in_f + gs)
    W = torch.randn(11, in_f, generator=g) * torch.rand(11, 1, generator=g)
    W[4] = 0  # an all-zero row
    d = torch.rand(in_f, generator=g) + 0.01 if weighted else None
    spec = QuantSpec(3, gs, sym, scale_bits=scale_bits if gs > 0 else 16)
    want_s, want_z, want_step = _loop(W, spec, d, search=True)
    q = rtn(W, spec, search=True, d=d)
    assert torch.equal(q.scales, want_s) and torch.equal(q.zeros, want_z.to(torch.int32))
    assert (q.scale_step is None) == (want_step is None)
    if want_step is not None:
        assert torch.equal(q.scale_step, want_step)
    gw = spec.group_width(in_f)
    cols = torch.arange(in_f) // gw
    codes = torch.clamp(torch.round(W / want_s[:, cols]) + want_z[:, cols], 0, spec.maxq)
    assert torch.equal(q.q, codes.to(torch.int32))
    assert q.q.shape == (11, in_f) and q.scales.shape == (11, -(-in_f // gw))


def test_a_group_without_importance_is_searched_with_equal_weights():
    """A group whose importances are all 0 (dead inputs) gets the equal-weight search, as it did alone, while the
    other groups of the same batch keep theirs."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 64, generator=g)
    d = torch.rand(64, generator=g) + 0.1
    d[32:] = 0
    spec = QuantSpec(2, 32, False)
    s, z = groups.group_qparams(W, spec, search=True, d=d)
    s_eq, z_eq = qparams(W[:, 32:], spec, search=True, d=None)
    s_w, z_w = qparams(W[:, :32], spec, search=True, d=d[:32])
    assert torch.equal(s[:, 1], s_eq) and torch.equal(z[:, 1], z_eq)
    assert torch.equal(s[:, 0], s_w) and torch.equal(z[:, 0], z_w)
    assert not torch.equal(s_w, qparams(W[:, :32], spec, search=True, d=None)[0])  # the weights did matter


def test_column_params_spreads_each_group_over_its_columns():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert groups.column_params(x, 2, 5).tolist() == [[1.0, 1.0, 2.0, 2.0, 3.0]]
