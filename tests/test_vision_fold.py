"""BatchNorm folding (hawqtool.vision.fold): outputs are preserved, only conv-fed BNs are folded."""
from __future__ import annotations

import hawqtool  # noqa: F401 - declares torchvision's missing ops before timm imports it
import pytest

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from timm.layers import BatchNormAct2d  # noqa: E402
from torch import nn  # noqa: E402

from hawqtool.vision.fold import fold_batchnorm  # noqa: E402


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)


class SmallNet(nn.Module):
    """Three foldable conv→BN pairs and two BNs that must stay (fan-out, BN after an activation)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)  # depthwise
        self.bn_dw = BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout)
        self.conv_g = nn.Conv2d(8, 16, 1, groups=2, bias=True)  # grouped
        self.bn_g = nn.BatchNorm2d(16)
        self.conv_res = nn.Conv2d(16, 16, 1)
        self.bn_res = nn.BatchNorm2d(16)  # its conv's output is also added back: not foldable
        self.conv_act = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.bn_after_act = nn.BatchNorm2d(16)  # input is relu(conv), not a conv output
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.bn_dw(self.conv_dw(x))
        x = self.bn_g(self.conv_g(x))
        y = self.conv_res(x)
        x = self.bn_res(y) + y
        x = self.bn_after_act(self.act(self.conv_act(x)))
        return self.head(x.mean((2, 3)))


def _assert_close(y0: torch.Tensor, y1: torch.Tensor, rel: float) -> None:
    err = (y1 - y0).abs().max().item()
    assert err <= rel * y0.abs().max().item(), f"max abs diff {err} vs max |y| {y0.abs().max().item()}"


def test_small_net_fold_preserves_outputs():
    torch.manual_seed(0)
    net = SmallNet()
    _randomize_bn(net)
    net.train()  # fold_batchnorm switches to eval itself
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        y0 = net.eval()(x)
    assert fold_batchnorm(net, torch.randn(1, 3, 16, 16)) == 3
    with torch.no_grad():
        y1 = net(x)
    _assert_close(y0, y1, 1e-5)
    assert isinstance(net.stem[1], nn.Identity)
    assert isinstance(net.bn_g, nn.Identity)
    # BatchNormAct2d keeps its dropout and activation
    assert isinstance(net.bn_dw, nn.Sequential) and isinstance(net.bn_dw[1], nn.SiLU)
    assert net.stem[0].bias is not None  # a bias-free conv gained the BN shift
    assert isinstance(net.bn_res, nn.BatchNorm2d) and isinstance(net.bn_after_act, nn.BatchNorm2d)
    assert fold_batchnorm(net, torch.randn(1, 3, 16, 16)) == 0  # nothing left to fold


def test_shared_bn_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    net = Shared()
    _randomize_bn(net)
    assert fold_batchnorm(net, torch.randn(1, 4, 5, 5)) == 0


def test_efficientnet_lite0_fold():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    _randomize_bn(model, seed=1)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y0 = model(x)
    assert fold_batchnorm(model, torch.randn(1, 3, 64, 64)) == n_bn == 49
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.bn1, nn.ReLU6)  # stem BN+ReLU6 became the ReLU6 alone
    with torch.no_grad():
        y1 = model(x)
    _assert_close(y0, y1, 1e-4)
