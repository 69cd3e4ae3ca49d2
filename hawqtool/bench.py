"""Stage 5 (bench): latency of a quantized checkpoint against its full-precision model, in one process.

End to end (causal LMs): prefill latency of a prompt and greedy decode tokens/s with the KV
cache, both median of repeats, for the checkpoint (layers on quant_kernels) and for the
source model in fp32. Per layer: each quantized layer's forward at 1 token (decode) and at
the prompt length (prefill) against an fp32 Linear of the same shape. Memory: resident
bytes added by loading each model (psutil RSS delta) and the process's peak RSS.
"""
from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .compiled import compile_model, graph_breaks, static_cache
from .errors import UserError

ATTENTION = "sdpa"  # both models, as transformers picks by default for inference (eager is for Hessians)


@dataclass
class ModelTiming:
    """End-to-end figures of one model."""

    prefill_ms: float  # median, one prompt of `prompt_tokens`
    decode_tokens_per_s: float  # median over repeats of decode_tokens / seconds
    load_rss_bytes: int  # RSS added by loading the model


@dataclass
class LayerTiming:
    """One quantized layer's forward time against an fp32 Linear of the same shape (ms, median)."""

    name: str
    bits: int
    shape: tuple[int, int]  # [out, in]
    decode_ms: float
    decode_fp32_ms: float
    prefill_ms: float
    prefill_fp32_ms: float


@dataclass
class BenchResult:
    """`hawqtool bench CKPT` output."""

    checkpoint: str
    reference: str
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    threads: int
    backend: str
    quantized: ModelTiming
    full_precision: ModelTiming
    layers: list[LayerTiming] = field(default_factory=list)
    peak_rss_bytes: int = 0
    compiled: bool = False  # both models torch.compile'd, static KV cache
    graph_breaks: int = 0  # dynamo graph breaks while compiling both (0: whole graphs)
    device: str = "cpu"
    dtype: str = "float32"  # the models' compute dtype (--dtype)

    @property
    def decode_speedup(self) -> float:
        return self.quantized.decode_tokens_per_s / self.full_precision.decode_tokens_per_s

    @property
    def prefill_speedup(self) -> float:
        return self.full_precision.prefill_ms / self.quantized.prefill_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_speedup": self.decode_speedup, "prefill_speedup": self.prefill_speedup}


def _sync() -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it (no-op without CUDA in use)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms after `warmup` untimed calls (GPU work included: synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _Decoder:
    """Prefill and greedy decode steps of one causal LM, eager (dynamic KV cache) or compiled (static cache)."""

    def __init__(self, model: nn.Module, compiled: bool, max_len: int):
        self.model, self.static, self.max_len = model, compiled, max_len
        self.fwd = compile_model(model) if compiled else model

    def prefill(self, prompt: torch.Tensor):
        """(cache, next token) after one forward over the prompt."""
        if not self.static:
            out = self.fwd(input_ids=prompt, use_cache=True)
            return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        cache = static_cache(self.model, self.max_len)
        out = self.fwd(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(prompt.shape[1], device=prompt.device),
                       use_cache=True)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self, tok: torch.Tensor, cache, pos: int):
        """(cache, next token) after one decode step of `tok` at position `pos`."""
        kw = {"cache_position": torch.tensor([pos], device=tok.device)} if self.static else {}
        out = self.fwd(input_ids=tok, past_key_values=cache, use_cache=True, **kw)
        return (cache if self.static else out.past_key_values), out.logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()  # what a deployment runs under: no autograd bookkeeping on the many small decode ops
def time_models(models: list[nn.Module], prompt: torch.Tensor, decode_tokens: int,
                repeats: int, compiled: bool = False) -> list[tuple[float, float]]:
    """(prefill ms, decode tokens/s) per causal LM: one forward over the prompt, then greedy steps of one
    token each through the KV cache. The models take turns in every repeat, so drift in machine speed
    (shared hosts) hits them alike; medians of `repeats`, after one untimed round (which compiles, with
    `compiled`: every model then runs torch.compile'd with a static cache)."""
    n = prompt.shape[1]
    runs = [_Decoder(m, compiled, n + decode_tokens + 1) for m in models]

    def decode(r: _Decoder) -> float:
        cache, nxt = r.prefill(prompt)
        _sync()
        t0 = time.perf_counter()
        for i in range(decode_tokens):
            cache, nxt = r.step(nxt, cache, n + i)
        _sync()
        return decode_tokens / (time.perf_counter() - t0)

    pre: list[list[float]] = [[] for _ in models]
    tps: list[list[float]] = [[] for _ in models]
    for rep in range(repeats + 1):
        for i, r in enumerate(runs):
            _sync()
            t0 = time.perf_counter()
            r.prefill(prompt)
            _sync()
            p_ms = (time.perf_counter() - t0) * 1e3
            d = decode(r)
            if rep:  # round 0 warms up (and compiles)
                pre[i].append(p_ms)
                tps[i].append(d)
    return [(statistics.median(p), statistics.median(t)) for p, t in zip(pre, tps)]


def time_model(model: nn.Module, prompt: torch.Tensor, decode_tokens: int, repeats: int,
               compiled: bool = False) -> tuple[float, float]:
    """(prefill ms, decode tokens/s) of one causal LM (see time_models)."""
    return time_models([model], prompt, decode_tokens, repeats, compiled)[0]


@torch.inference_mode()
def time_layers(model: nn.Module, prompt_tokens: int, repeats: int,
                dtype: torch.dtype = torch.float32) -> list[LayerTiming]:
    """Every quantized layer (anything with a packed `pw`) against an fp32 Linear of its shape; a quantized
    embedding is a row lookup, not a matmul, and is left out (a head tied to it is timed as a layer)."""
    from .runtime import QuantEmbedding

    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, m in model.named_modules():
        pw = getattr(m, "pw", None)
        if pw is None or isinstance(m, QuantEmbedding):
            continue
        dt = m.bias.dtype if getattr(m, "bias", None) is not None else dtype
        ref = nn.Linear(pw.in_features, pw.out_features, bias=getattr(m, "bias", None) is not None,
                        device=pw.device, dtype=dt)
        x1 = torch.randn(1, pw.in_features, generator=g, device="cpu").to(pw.device, dt)
        xp = torch.randn(prompt_tokens, pw.in_features, generator=g, device="cpu").to(pw.device, dt)
        rows.append(LayerTiming(
            name=name, bits=pw.bits, shape=(pw.out_features, pw.in_features),
            decode_ms=median_ms(lambda: m(x1), repeats), decode_fp32_ms=median_ms(lambda: ref(x1), repeats),
            prefill_ms=median_ms(lambda: m(xp), repeats), prefill_fp32_ms=median_ms(lambda: ref(xp), repeats)))
    return rows


def _rss() -> int:
    """Resident set size after returning freed heap pages to the OS (glibc keeps them otherwise, so a model
    loaded after another would reuse its freed pages and look free)."""
    import ctypes
    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return psutil.Process().memory_info().rss


@torch.inference_mode()
def _rss_after_forward(model: nn.Module, prompt: torch.Tensor) -> int:
    """RSS once a prompt has run: weights read through a memory map count only when touched, and kernel
    layouts are built on first use."""
    model(input_ids=prompt, use_cache=True)
    return _rss()


def bench_checkpoint(checkpoint: str | Path, *, reference: str | None = None, prompt_tokens: int = 128,
                     decode_tokens: int = 32, repeats: int = 5, layers: bool = True, compile: bool = False,
                     progress: Callable[[str], None] | None = None, device: torch.device | None = None,
                     dtype: torch.dtype = torch.float32) -> BenchResult:
    """Time a hawqtool checkpoint and its full-precision model (default: the manifest's source) in this process;
    `compile`: both torch.compile'd (hawqtool.compiled), as a deployment that cuts per-op overhead runs them."""
    from quant_kernels import backend_info

    from .checkpoint import read_manifest
    from .models import load_model
    from .runtime import load_quantized

    say = progress or (lambda _m: None)
    manifest = read_manifest(checkpoint)
    reference = reference or manifest.get("source_model")
    if reference is None:
        raise UserError(f"{checkpoint} does not name its source model; pass --reference MODEL")
    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise UserError("--prompt-tokens, --decode-tokens and --repeats must be positive")
    say("loading the checkpoint")
    device = device or torch.device("cpu")
    qmodel = load_quantized(checkpoint, attn_implementation=ATTENTION, device=device, dtype=dtype)
    vocab = int(getattr(qmodel.config, "vocab_size", 1000))
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator(device="cpu").manual_seed(0),
                           device="cpu").to(device)
    if getattr(qmodel.config, "is_encoder_decoder", False) or not hasattr(qmodel, "generation_config"):
        raise UserError("`hawqtool bench` times decoding of causal LMs; this checkpoint is not one")
    if layers:
        say("timing the checkpoint's layers")
    rows = time_layers(qmodel, prompt_tokens, repeats, dtype) if layers else []
    say("loading the full-precision model")
    fmodel = load_model(reference, attn_implementation=ATTENTION, device=device, dtype=dtype).model
    say("compiling and timing both models, taking turns" if compile else "timing both models, taking turns")
    breaks0 = graph_breaks() if compile else 0
    try:
        (q_pre, q_tps), (f_pre, f_tps) = time_models([qmodel, fmodel], prompt, decode_tokens, repeats, compiled=compile)
    except Exception as e:  # noqa: BLE001 - compilation fails in many ways (no C++ compiler, an unsupported op)
        if not compile:
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"torch.compile failed ({e.__class__.__name__}: {first}); run `hawqtool bench` "
                        "without --compile") from e
    breaks = graph_breaks() - breaks0 if compile else 0
    # memory each model holds: RSS with it minus RSS once it is deleted (library imports, which the first
    # load pays, stay out of both); after a prompt, as memory-mapped weights count only once touched
    _rss_after_forward(qmodel, prompt)
    both = _rss_after_forward(fmodel, prompt)
    del fmodel
    q_only = _rss()
    del qmodel
    q_rss, f_rss = q_only - _rss(), both - q_only
    return BenchResult(checkpoint=str(checkpoint), reference=str(reference), prompt_tokens=prompt_tokens,
                       decode_tokens=decode_tokens, repeats=repeats, threads=torch.get_num_threads(),
                       backend=str(backend_info()),
                       quantized=ModelTiming(q_pre, q_tps, q_rss), full_precision=ModelTiming(f_pre, f_tps, f_rss),
                       layers=rows, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       compiled=compile, graph_breaks=breaks, device=str(device), dtype=str(dtype).replace("torch.", ""))

