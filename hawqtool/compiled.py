"""torch.compile for decoding: a causal LM (quantized or not) compiled into whole graphs, run with a
static KV cache.

Eager decoding of a small model is dominated by per-op overhead: SmolLM2-135M spends ~21 ms per token
in the ~1,500 small ops between its linears, 1.5 ms once compiled. quant_kernels' ops are registered
torch operators, so a hawqtool checkpoint compiles with no graph breaks. Guards on module state are
skipped (they cost ~5 ms per call at 211 layers): a compiled model must not be modified afterwards.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn


def _prepare_quantized_layers(model: nn.Module) -> None:
    """Kernel layouts are built (and cached) before tracing, not traced into the graph."""
    for m in model.modules():
        if callable(getattr(m, "prepare", None)) and getattr(m, "pw", None) is not None:
            m.prepare()


class _Compiled(nn.Module):
    """The compiled root. Each compile_model call makes its own subclass: the type guard on the root is the one
    module guard kept, so two models never share compiled code (their forwards share one code object)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _keep_root_type_guard(entries) -> list[bool]:
    """Drop every guard on module state (~5 ms per call at 211 layers) except the root's type."""
    return [not e.orig_guard.source.is_unspecialized_nn_module()
            or (e.guard_type == "TYPE_MATCH" and e.name.isidentifier()) for e in entries]


_IDS = itertools.count(1)


def compile_model(model: nn.Module, fullgraph: bool = False) -> nn.Module:
    """torch.compile(model) for inference with fixed shapes (one graph for the prompt, one per decode step);
    `fullgraph`: a graph break is an error."""
    _prepare_quantized_layers(model)
    root = type(f"_Compiled{next(_IDS)}", (_Compiled,), {})(model)
    filtered = hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe")  # guard filters: torch >= 2.8
    options = {"guard_filter_fn": _keep_root_type_guard} if filtered else None
    return torch.compile(root, dynamic=False, fullgraph=fullgraph, options=options)


def graph_breaks() -> int:
    """Graph breaks dynamo has recorded in this process (0 means every compiled call is one graph)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def static_cache(model: nn.Module, max_len: int):
    """A transformers StaticCache for `max_len` positions (fixed shapes, which compiled decoding needs)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)
