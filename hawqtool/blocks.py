"""Read a model's block structure so one driver serves every architecture.

The repeated blocks are the largest nn.ModuleList whose children share one class (decoder
layers of Llama/OPT/GPT-2/..., encoder layers of BERT). Block inputs are captured by a
pre-hook on block 0 that records (args, kwargs) and stops the forward, so whatever the
model computes before its blocks (embeddings, rotary cos/sin, masks) is reused as is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


# a block's cache arguments, never replayed (transformers >= 5.25 names the cache `cache`)
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache")


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, one tensor per calibration batch, plus the kwargs."""

    hidden: list[torch.Tensor]
    args: list[tuple]  # positional args after the hidden state
    kwargs: list[dict]
    tuple_out: bool | None = None  # the blocks return (hidden, ...), not the hidden state (None: not run yet)
    # the block's outputs on `hidden`, already computed by the stage with the block as it will be left (block
    # tuning's last loss): the block engine takes them as the next inputs instead of running the block again
    outputs: list[torch.Tensor] | None = None


def find_blocks(model: nn.Module, containers: tuple[type, ...] = (nn.ModuleList,)) -> tuple[str, nn.Module]:
    """The model's repeated blocks (name, container): the `containers` instance of one child class holding
    the most parameters (timm ViTs keep theirs in an nn.Sequential); ValueError if there are none."""
    best, best_n = None, -1
    for name, m in model.named_modules():
        if isinstance(m, containers) and len(m) > 0 and len({type(c) for c in m}) == 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = (name, m), n
    if best is None:
        kinds = " or ".join(f"nn.{c.__name__}" for c in containers)
        raise ValueError(f"model has no repeated blocks (an {kinds} of one layer class)")
    return best


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[dict],
                         call_kwargs: dict | None = None) -> BlockInputs:
    """Run the model on each batch until `block`, recording what the block receives. `call_kwargs` go to
    every model call (default use_cache=False, for HF models; timm models take none)."""
    call_kwargs = {"use_cache": False} if call_kwargs is None else call_kwargs
    hidden, args, kwargs = [], [], []

    def pre_hook(_mod, a, kw):
        hidden.append(a[0].detach())
        args.append(tuple(a[1:]))
        kwargs.append({k: v for k, v in kw.items() if k not in _CACHE_KWARGS})
        raise _Stop

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    model(**b, **call_kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return BlockInputs(hidden, args, kwargs)


def run_block(block: nn.Module, inputs: BlockInputs, j: int) -> torch.Tensor:
    """Forward batch j through one block; returns its hidden-state output."""
    out = block(inputs.hidden[j], *inputs.args[j], **inputs.kwargs[j])
    return out[0] if isinstance(out, (tuple, list)) else out


def sequential_groups(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> list[list[str]]:
    """Layers of a block grouped by shared input, in execution order (q/k/v, o, gate/up, down).

    Layers that read the same tensor are quantized together; later groups then see inputs
    produced by the already-quantized earlier groups (GPTQ's "true sequential").
    """
    order: list[tuple[str, torch.Tensor]] = []  # holding the tensors keeps their identity unique
    handles = []
    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(
            lambda _m, a, name=name: order.append((name, a[0]))))
    try:
        with torch.no_grad():
            run_block(block, inputs, 0)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    group_inputs: list[torch.Tensor] = []
    for name, x in order:
        if any(name in g for g in groups):
            continue
        for g, gx in zip(groups, group_inputs):
            if gx is x:
                g.append(name)
                break
        else:
            groups.append([name])
            group_inputs.append(x)
    missing = [n for n in layers if not any(n in g for g in groups)]
    return groups + ([missing] if missing else [])


def stop_after(layers: list[nn.Module]):
    """Context: forward hooks that end the block's forward once all `layers` have run."""
    pending = {id(m) for m in layers}
    handles = []

    def hook(m, _a, _o):
        pending.discard(id(m))
        if not pending:
            raise _Stop

    class _Ctx:
        def __enter__(self):
            pending.clear()
            pending.update(id(m) for m in layers)
            for m in layers:
                handles.append(m.register_forward_hook(hook))
            return self

        def reset(self):
            pending.clear()
            pending.update(id(m) for m in layers)

        def __exit__(self, *exc):
            for h in handles:
                h.remove()
            handles.clear()
            return False

    return _Ctx()
