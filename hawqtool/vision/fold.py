"""Fold every BatchNorm2d that directly follows a Conv2d into that conv (inference only).

Conv→BN pairs are found on one dummy forward, not by module names: a forward hook records
each Conv2d's output tensor and a BN is paired with the conv whose output tensor *is* its
input. A pair is folded only when each module ran once, and the conv output was used by no
other operation than that BN (checked with a TorchFunctionMode that sees functional uses as
well, such as a residual add), so folding cannot change another consumer. timm's
BatchNormAct2d keeps its drop and activation: it is replaced by them, not by an identity.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# calls that read a tensor's metadata, not its values
_META = {"dim", "size", "ndim", "shape", "dtype", "device", "is_floating_point", "numel",
         "is_contiguous", "requires_grad", "layout", "is_sparse", "is_quantized", "stride"}


def _is_meta(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name in _META


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple, dict)):
        for o in (obj.values() if isinstance(obj, dict) else obj):
            yield from _tensors(o)


class _UseTracker(TorchFunctionMode):
    """Marks watched tensors (conv outputs) whose values are read outside their BN's forward."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}  # keeps the tensors alive so ids stay unique
        self.foreign: set[int] = set()  # ids used outside their BN
        self.active_bn: list[int] = []  # id(input) of the BN forwards running now

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_meta(func):
            inside = self.active_bn[-1] if self.active_bn else None
            self.foreign.update(id(t) for t in _tensors((args, kwargs)) if id(t) in self.watched and id(t) != inside)
        return func(*args, **kwargs)


def _example_input(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (channels, 64, 64)))[1:]
    p = next(model.parameters(), torch.zeros(()))
    return torch.randn(1, channels, *size, dtype=p.dtype, device=p.device)


def _replacement(bn: nn.BatchNorm2d) -> nn.Module:
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
             if m is not None and not isinstance(m, nn.Identity)]
    return nn.Identity() if not parts else parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _foldable_bn(bn: nn.Module) -> bool:
    if type(bn) is nn.BatchNorm2d:
        return bn.running_mean is not None
    try:
        from timm.layers import BatchNormAct2d
    except Exception:  # noqa: BLE001 - timm absent or broken: only plain BatchNorm2d is known
        return False
    return type(bn) is BatchNormAct2d and bn.running_mean is not None


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    w = conv.weight.detach().double()
    b = (conv.bias.detach().double() if conv.bias is not None
         else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale + (bn.bias.double() if bn.bias is not None else 0.0)
    conv.weight.copy_((w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    conv.bias = nn.Parameter((b * scale + shift).to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example_input: torch.Tensor | None = None) -> int:
    """Fold each BatchNorm2d fed directly and only by a Conv2d into it; returns how many.

    The model is put in eval mode (running statistics are what gets folded). `example_input`
    defaults to one random image of the model's timm input size (or 64×64).
    """
    model.eval()
    x = _example_input(model) if example_input is None else example_input
    names: dict[nn.Module, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(m, []).append(n)
    calls: dict[nn.Module, int] = {}
    producer: dict[int, nn.Conv2d] = {}  # id(conv output) -> conv
    pairs: dict[nn.Module, tuple[nn.Conv2d, int]] = {}  # bn -> (conv, id of its input)
    tracker = _UseTracker()

    def conv_hook(mod, args, out):
        calls[mod] = calls.get(mod, 0) + 1
        if isinstance(out, torch.Tensor):
            producer[id(out)] = mod
            tracker.watched[id(out)] = out

    def bn_pre(mod, args):
        calls[mod] = calls.get(mod, 0) + 1
        i = id(args[0]) if args and isinstance(args[0], torch.Tensor) else -1
        if i in producer:
            pairs[mod] = (producer[i], i)
        tracker.active_bn.append(i)

    def bn_post(mod, args, out):  # must return None: a returned value would replace the output
        tracker.active_bn.pop()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles += [m.register_forward_pre_hook(bn_pre), m.register_forward_hook(bn_post)]
    try:
        with tracker:
            model(x)
    finally:
        for h in handles:
            h.remove()

    folded = 0
    for bn, (conv, i) in pairs.items():
        if (calls.get(bn) != 1 or calls.get(conv) != 1 or i in tracker.foreign or not _foldable_bn(bn)
                or bn.num_features != conv.out_channels or len(names.get(bn, ())) != 1):
            continue
        _fold_into(conv, bn)
        parent_name, _, child = names[bn][0].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[child] = _replacement(bn)
        folded += 1
    return folded
