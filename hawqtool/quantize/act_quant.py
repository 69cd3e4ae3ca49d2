"""Activation fake-quantizers for weight/activation bit pairs (WxAy), applied to layer inputs.

"static": one scale/zero per tensor, calibrated with `observe` then `finalize(method)`
(minmax | percentile | mse). "dynamic": one scale per token (last dim) computed on the fly;
symmetric dynamic is exactly `quant_kernels.activation.fake_quant_per_token` (the W8A8 A side).
Symmetric codes lie in ±(2^(b−1)−1), x̂ = s·q; asymmetric codes in [0, 2^b−1] with an integer
zero z, x̂ = s·(q − z); rounding is round-half-even. Calibration memory is bounded: exact
running min/max plus a uniform reservoir of ≤ `reservoir_size` values (random keys, smallest
kept), which percentile and mse use (it is the whole stream while the stream is smaller).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from quant_kernels.activation import fake_quant_per_token, quantize_per_token

MODES = ("static", "dynamic")
METHODS = ("minmax", "percentile", "mse")


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Inclusive integer code range: ±(2^(b−1)−1) or [0, 2^b−1]."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def _qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (scale, zero) from a clipping range; the range always contains 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = _qrange(bits, symmetric)
    s = max(-lo, hi) / qmax if symmetric else (hi - lo) / qmax
    s = s if s > 0 else 1.0
    z = 0.0 if symmetric else float(min(max(round(-lo / s), 0), qmax))
    return torch.tensor(s, device="cpu"), torch.tensor(z, device="cpu")


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Float-valued integer codes clamp(round(x/s) + z) of float32 x (round half to even)."""
    lo, hi = _qrange(bits, symmetric)
    return torch.clamp(torch.round(x / scale.to(x.device)) + zero.to(x.device), lo, hi)


@dataclass
class ActQuantizer:
    """Fake-quantizer of one layer's input: static per-tensor (calibrated) or dynamic per-token."""

    bits: int = 8
    mode: str = "static"
    symmetric: bool = True
    scale: torch.Tensor | None = None  # static: 0-d float32
    zero: torch.Tensor | None = None  # static: 0-d float32 integer value (0 when symmetric)
    method: str = "minmax"  # calibration method used by finalize() when none is given
    percentile: float = 99.99
    mse_min_ratio: float = 0.5
    mse_steps: int = 101
    reservoir_size: int = 1 << 18
    seed: int = 0
    _min: float = field(default=float("inf"), init=False, repr=False)
    _max: float = field(default=float("-inf"), init=False, repr=False)
    _values: torch.Tensor | None = field(default=None, init=False, repr=False)
    _keys: torch.Tensor | None = field(default=None, init=False, repr=False)
    _gen: torch.Generator | None = field(default=None, init=False, repr=False)
    n_observed: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"activation bits must be in 2..8, got {self.bits}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def qrange(self) -> tuple[int, int]:
        """Inclusive integer code range."""
        return _qrange(self.bits, self.symmetric)

    # ---- calibration (static) ----
    def observe(self, x: torch.Tensor) -> None:
        """Record a batch of activations: exact min/max plus a bounded uniform sample."""
        v = x.detach().float().reshape(-1)
        if v.numel() == 0:
            return
        self._min = min(self._min, float(v.min()))
        self._max = max(self._max, float(v.max()))
        self.n_observed += v.numel()
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        keys = torch.rand(v.numel(), generator=self._gen, device="cpu").to(v.device)
        R = self.reservoir_size
        if v.numel() > R:  # only the R smallest new keys can enter the reservoir
            keys, idx = torch.topk(keys, R, largest=False)
            v = v[idx]
        v, keys = v.cpu(), keys.cpu()
        if self._values is not None:
            v, keys = torch.cat([self._values, v]), torch.cat([self._keys, keys])
        if v.numel() > R:
            keys, idx = torch.topk(keys, R, largest=False)
            v = v[idx]
        self._values, self._keys = v, keys

    def reset_observations(self) -> None:
        """Drop the calibration statistics (frees the reservoir); the scale is kept."""
        self._min, self._max, self.n_observed = float("inf"), float("-inf"), 0
        self._values = self._keys = self._gen = None

    def samples(self) -> torch.Tensor:
        """The reservoir sample of observed values (all of them while the stream is small)."""
        if self._values is None:
            raise RuntimeError("no activations observed; call observe() first")
        return self._values

    def finalize(self, method: str | None = None) -> "ActQuantizer":
        """Set scale/zero from the observations with `method` (minmax | percentile | mse)."""
        method = method or self.method
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if self.mode == "dynamic":
            return self
        v = self.samples()
        if method == "minmax":
            lo, hi = self._min, self._max
        elif method == "percentile":
            p = self.percentile / 100.0
            if self.symmetric:
                lo, hi = 0.0, float(torch.quantile(v.abs().double(), p))
            else:
                lo, hi = float(torch.quantile(v.double(), 1 - p)), float(torch.quantile(v.double(), p))
        else:
            lo, hi = self._mse_range(v)
        self.scale, self.zero = _qparams(lo, hi, self.bits, self.symmetric)
        self.method = method
        return self

    def _mse_range(self, v: torch.Tensor) -> tuple[float, float]:
        """Clipping range r·[min, max], r on a grid in [mse_min_ratio, 1], minimising mean (Q(x)−x)²."""
        best, best_range = float("inf"), (self._min, self._max)
        for r in torch.linspace(1.0, self.mse_min_ratio, self.mse_steps, device="cpu").tolist():  # ties keep the wider range
            lo, hi = r * self._min, r * self._max
            s, z = _qparams(lo, hi, self.bits, self.symmetric)
            err = float(((_codes(v, s, z, self.bits, self.symmetric) - z) * s - v).pow(2).mean())
            if err < best:
                best, best_range = err, (lo, hi)
        return best_range

    # ---- application ----
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int32 codes, scale, zero); static: 0-d scale/zero, dynamic: per-token [..., 1]."""
        xf = x.detach().float()
        if self.mode == "dynamic":
            if self.symmetric:
                q, s = quantize_per_token(xf, self.bits)
                return q.to(torch.int32), s, torch.zeros_like(s)
            lo = torch.clamp(xf.amin(dim=-1, keepdim=True), max=0)
            hi = torch.clamp(xf.amax(dim=-1, keepdim=True), min=0)
            s = (hi - lo) / (2 ** self.bits - 1)
            s = torch.where(s > 0, s, torch.ones_like(s))
            z = torch.clamp(torch.round(-lo / s), 0, 2 ** self.bits - 1)
        else:
            if self.scale is None or self.zero is None:
                raise RuntimeError("static ActQuantizer used before finalize()")
            s, z = self.scale.to(xf.device), self.zero.to(xf.device)
        return _codes(xf, s, z, self.bits, self.symmetric).to(torch.int32), s, z

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized x, s·(q − z), in x's dtype."""
        if self.mode == "dynamic" and self.symmetric:
            return fake_quant_per_token(x, self.bits)
        q, s, z = self.quantize(x)
        return ((q.float() - z) * s).to(x.dtype)


def _run(model: nn.Module, batch: Any) -> None:
    """Forward one calibration batch: kwargs dict, positional tuple/list, or a tensor."""
    if isinstance(batch, dict):
        kw = dict(batch)
        if "use_cache" not in kw and "use_cache" in inspect.signature(model.forward).parameters:
            kw["use_cache"] = False
        model(**kw)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Named submodules, with a clear error for unknown names."""
    table = dict(model.named_modules())
    missing = [n for n in names if n not in table]
    if missing:
        raise KeyError(f"modules not found in model: {missing}")
    return {n: table[n] for n in names}


def _first_input(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor]:
    """Where a layer's input tensor is: position 0 or the `input` keyword."""
    if args:
        return 0, args[0]
    if "input" in kwargs:
        return "input", kwargs["input"]
    raise RuntimeError("layer called without a positional or `input=` tensor")


def calibrate_activation_quantizers(model: nn.Module, layer_names: Iterable[str], batches: Iterable[Any],
                                    bits: int = 8, method: str = "minmax", *, mode: str = "static",
                                    symmetric: bool = True, **quantizer_kw: Any) -> dict[str, ActQuantizer]:
    """One ActQuantizer per named layer, calibrated on the layers' inputs over `batches`.

    Observes the inputs exactly as the model currently computes them (call model.eval() first;
    quantize weights first to calibrate on the quantized network). Dynamic mode runs nothing.
    """
    names = list(layer_names)
    mods = _modules(model, names)
    qs = {n: ActQuantizer(bits=bits, mode=mode, symmetric=symmetric, method=method, **quantizer_kw) for n in names}
    if mode == "dynamic":
        return qs

    def hook(_m: nn.Module, args: tuple, kwargs: dict, n: str) -> None:
        qs[n].observe(_first_input(args, kwargs)[1])

    handles = [m.register_forward_pre_hook(lambda m, a, k, n=n: hook(m, a, k, n), with_kwargs=True)
               for n, m in mods.items()]
    try:
        with torch.no_grad():
            for b in batches:
                _run(model, b)
    finally:
        for h in handles:
            h.remove()
    if unseen := [n for n in names if qs[n].n_observed == 0]:
        raise RuntimeError(f"layers never received an input during calibration: {unseen}")
    for q in qs.values():
        q.finalize(method)
        q.reset_observations()
    return qs


class ActQuantHooks:
    """Forward pre-hooks that fake-quantize layer inputs; a context manager that detaches on exit."""

    def __init__(self, model: nn.Module, quantizers: dict[str, ActQuantizer]) -> None:
        self.handles: list[Any] = []
        for n, m in _modules(model, quantizers).items():
            q = quantizers[n]
            if q.mode == "static" and q.scale is None:
                raise RuntimeError(f"quantizer for {n} is static but not finalized")
            self.handles.append(m.register_forward_pre_hook(self._hook(q), with_kwargs=True))

    @staticmethod
    def _hook(q: ActQuantizer):
        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            where, x = _first_input(args, kwargs)
            return ((q(x),) + tuple(args[1:]), kwargs) if where == 0 else (args, {**kwargs, "input": q(x)})
        return pre_hook

    def detach(self) -> None:
        """Remove the hooks (idempotent): the model computes exactly as before attach."""
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "ActQuantHooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def attach(model: nn.Module, quantizers: dict[str, ActQuantizer]) -> ActQuantHooks:
    """Apply the quantizers to their layers' inputs; use `with attach(...):` or `.detach()`."""
    return ActQuantHooks(model, quantizers)


def detach(hooks: ActQuantHooks) -> None:
    """Remove hooks returned by `attach` (same as `hooks.detach()`)."""
    hooks.detach()
