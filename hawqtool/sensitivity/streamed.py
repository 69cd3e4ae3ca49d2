"""Sensitivity of a streamed model (--offload): one block resident at a time.

A Fisher probe runs the blocks forward storing each block's input on the host, computes the head's sampled-label
loss on the last block's output (streaming.replayed_blocks), then walks the blocks in reverse: each is loaded,
its forward recomputed from its stored input with gradients, and backpropagated with the gradient arriving from
the block above; its layers' squared gradient norms are the probe's samples. The result equals fisher.py's
in-memory probe (same seed, same labels) up to float summation order.

A Hutchinson probe with the exact Gauss-Newton product (ggn.py; self-kl / output-mse) walks the same way: forward,
each block's jvp carries the tangent J·v (v Rademacher on the block's layers, drawn in the in-memory probe's
order), the head turns it into u = H_out·J·v, and the reverse walk backpropagates u, so each layer's (Hv)_l = Jᵀu
meets its v_l again (re-drawn from the generator state saved at the block): v_l·(Hv)_l, hutchinson.py's sample."""
from __future__ import annotations

import torch
from torch import nn

from ..blocks import capture_block_inputs
from ..streaming import replayed_blocks, streamer_of, tail_of, walk_blocks, window_of
from .distributed import probe_seed, round_robin, world
from .fisher import SUPPORTED, sampled_loss, scored_output, squared_norm
from .ggn import GGN_OBJECTIVES, math_attention, output_hessian_product, position_mask
from .hutchinson import LayerTrace, adaptive_probes, check_probe_args, rademacher
from .objectives import Batch, model_logits, upcast


def streamed_fisher_probe(model: nn.Module, names: list[str], batch: Batch, objective: str,
                          gen: torch.Generator) -> list[float]:
    """One sampled-label Fisher probe of a streamed model: per layer in `names`, N·‖g_l‖² (fisher_probe's value)."""
    st = streamer_of(model)
    inputs = capture_block_inputs(model, st.blocks[0], [batch])
    h, stored, as_tuple = inputs.hidden[0], [], False
    with torch.no_grad():
        for i in range(len(st.blocks)):
            with st.resident(i) as block:
                stored.append(h.cpu())
                out = block(h, *inputs.args[0], **inputs.kwargs[0])
                as_tuple = isinstance(out, (tuple, list))
                h = out[0] if as_tuple else out
    values = dict.fromkeys(names, 0.0)
    outside = [nm for nm in names if not any(nm.startswith(p) for p in st.prefixes)]  # resident: an untied head
    heads = [model.get_submodule(nm).weight for nm in outside]
    n, g, gh = _head_gradients(model, batch, h.detach(), as_tuple, objective, gen, heads)
    for nm, gw in zip(outside, gh):
        values[nm] = 0.0 if gw is None else n * squared_norm(gw)

    def sample(i: int, nm: str, gw: torch.Tensor) -> None:
        values[nm] = n * squared_norm(gw)

    _backward(model, names, stored, inputs, g, as_tuple, sample)
    return [values[nm] for nm in names]


def _head_gradients(model: nn.Module, batch: Batch, final: torch.Tensor, as_tuple: bool, objective: str,
                    gen: torch.Generator, heads: list[torch.Tensor]):
    """The sampled loss on what follows the blocks, from their output `final`: (N, ∂/∂final, ∂/∂ each head weight).
    self-kl runs it one window at a time (a batch of 8 × 256 positions' 49152 logits, their log-softmax and its
    gradient are ~1.2 GB; one window's are an eighth): the labels are the same draws (sampled_loss draws row by row
    from `gen`), each window's loss is scaled by its share of the positions, so the sums equal the whole-batch ones
    up to float summation order. Other objectives' outputs are small: the whole batch at once."""
    size = final.shape[0]
    whole = objective != "self-kl" or size == 1
    windows = [(batch, final)] if whole else [(window_of(batch, w, size), final[w:w + 1]) for w in range(size)]
    parts, g, gh = [], [], [None] * len(heads)
    for sub, rows in windows:
        x = rows.detach().requires_grad_(True)
        with torch.enable_grad():
            with replayed_blocks(model, x, as_tuple):
                z = upcast(model_logits(model, sub))
            z, mask = scored_output(objective, z, sub)
            parts.append(float(mask.sum()))
            # allow_unused: a layer after the blocks that the scored output does not use (BERT's pooler) gets none
            gx, *gw = torch.autograd.grad(sampled_loss(objective, z, mask, gen) * mask.sum().clamp_min(1),
                                          [x] + heads, allow_unused=True)
        g.append(gx)
        gh = [a if b is None else b if a is None else a + b for a, b in zip(gh, gw)]
    n = max(sum(parts), 1.0)
    return n, torch.cat(g) / n, [None if t is None else t / n for t in gh]


def _backward(model: nn.Module, names: list[str], stored: list[torch.Tensor], inputs, g: torch.Tensor,
              as_tuple: bool, per_layer) -> None:
    """The reverse walk: block i loaded, its forward recomputed from stored[i] with gradients, the gradient `g`
    arriving at its output backpropagated; per_layer(i, name, ∂/∂W) for each of its layers in `names`."""
    st = streamer_of(model)
    for i in reversed(range(len(st.blocks))):
        with st.resident(i) as block:
            mine = [nm for nm in names if nm.startswith(st.prefixes[i])]
            ws = [model.get_submodule(nm).weight for nm in mine]
            for p in block.parameters():
                p.requires_grad_(False)
            for w in ws:
                w.requires_grad_(True)
            x = stored[i].to(g.device).requires_grad_(i > 0)
            with torch.enable_grad():
                out = block(x, *inputs.args[0], **inputs.kwargs[0])
                out = out[0] if as_tuple else out
                grads = torch.autograd.grad(out, ws + ([x] if i > 0 else []), grad_outputs=g, allow_unused=True)
            for nm, gw in zip(mine, grads[:len(ws)]):
                if gw is not None:
                    per_layer(i, nm, gw)
            if i > 0:
                g = grads[-1].detach()


def streamed_ggn_probe(model: nn.Module, names: list[str], batch: Batch, objective: str,
                       gen: torch.Generator) -> list[float]:
    """One Hutchinson probe of a streamed model with the Gauss-Newton product: per layer v_l·(Hv)_l, as
    hutchinson_traces(hvp="ggn") computes in memory (same generator, same draws)."""
    from torch.func import functional_call, jvp

    st = streamer_of(model)
    outside = [nm for nm in names if not any(nm.startswith(p) for p in st.prefixes)]  # resident: an untied head
    inputs = capture_block_inputs(model, st.blocks[0], [batch])
    h, stored, states, as_tuple = inputs.hidden[0], [], [], False
    dh = torch.zeros_like(h)

    def tail(x, ws):  # what follows the blocks (final norm, head) on x, with the outside layers' weights ws
        with replayed_blocks(model, x, as_tuple):
            return upcast(model_logits(lambda **kw: functional_call(model, ws, (), kw, strict=False), batch))

    heads = {nm + ".weight": model.get_submodule(nm).weight for nm in outside}
    with torch.no_grad(), math_attention():
        for i in range(len(st.blocks)):
            with st.resident(i) as block:
                stored.append(h.cpu())
                states.append(gen.get_state())  # the reverse walk re-draws this block's v from here
                local = {nm[len(st.prefixes[i]):] + ".weight": model.get_submodule(nm).weight
                         for nm in names if nm.startswith(st.prefixes[i])}
                vs = {k: rademacher(w, gen) for k, w in local.items()}

                def f(x, ws, block=block):
                    nonlocal as_tuple
                    out = functional_call(block, ws, (x, *inputs.args[0]), inputs.kwargs[0], strict=False)
                    as_tuple = isinstance(out, (tuple, list))
                    return out[0] if as_tuple else out

                h, dh = jvp(f, (h, {k: w.detach() for k, w in local.items()}), (dh, vs))
        v_out = {k: rademacher(w, gen) for k, w in heads.items()}  # drawn last, as in memory
        z, Jv = jvp(tail, (h, {k: w.detach() for k, w in heads.items()}), (dh, v_out))
        u = output_hessian_product(objective, z, Jv, position_mask(batch, z))
    final = h.detach().requires_grad_(True)
    ws = {k: w.detach().requires_grad_(True) for k, w in heads.items()}
    with torch.enable_grad(), math_attention():
        g, *gh = torch.autograd.grad(tail(final, ws), [final] + list(ws.values()), grad_outputs=u.to(z.dtype),
                                     allow_unused=True)  # an unused layer after the blocks (BERT's pooler): 0
    values = dict.fromkeys(names, 0.0)
    for nm, hv in zip(outside, gh):
        values[nm] = 0.0 if hv is None else float((v_out[nm + ".weight"].double() * hv.double()).sum())
    redrawn: dict[int, dict[str, torch.Tensor]] = {}

    def sample(i: int, nm: str, hv: torch.Tensor) -> None:
        if i not in redrawn:  # this block's v, drawn again in the forward walk's order
            gi = torch.Generator(device="cpu")
            gi.set_state(states[i])
            redrawn.clear()
            redrawn[i] = {m: rademacher(model.get_submodule(m).weight, gi)
                          for m in names if m.startswith(st.prefixes[i])}
        values[nm] = float((redrawn[i][nm].double() * hv.double()).sum())

    with math_attention():
        _backward(model, names, stored, inputs, g, as_tuple, sample)
    return [values[nm] for nm in names]


def streamed_traces(model: nn.Module, params: dict[str, torch.Tensor], batches: list[Batch], objective: str,
                    estimator: str = "fisher", *, seed: int = 0, **adaptive) -> dict[str, LayerTrace]:
    """fisher_traces (estimator "fisher": one label draw per probe) or hutchinson_traces(hvp="ggn") (estimator
    "hutchinson": the same Rademacher draws) for a streamed model; probe k reads batch k mod len(batches)."""
    if objective not in SUPPORTED:
        raise ValueError(f"a streamed model's sensitivity needs objective {' or '.join(SUPPORTED)}, not {objective!r}")
    if estimator == "hutchinson" and objective not in GGN_OBJECTIVES:
        raise ValueError(f"a streamed model's Hutchinson probe needs objective {' or '.join(GGN_OBJECTIVES)}, not "
                         f"{objective!r}; use estimator fisher")
    probe_of = {"fisher": streamed_fisher_probe, "hutchinson": streamed_ggn_probe}[estimator]
    check_probe_args(params, batches, adaptive["max_probes"])
    names = list(params)

    def probe(k: int) -> list[float]:
        gen = torch.Generator(device="cpu").manual_seed(probe_seed(seed, k))
        return probe_of(model, names, batches[k % len(batches)], objective, gen)

    return adaptive_probes(params, round_robin(probe, *world()), **adaptive)


def streamed_importance(model: nn.Module, layers: dict[str, nn.Module], batches: list[Batch],
                        first_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """importance.input_importance for a streamed model: the same hooks, on each block while it is resident, then
    on what follows the blocks (an untied head) run once per batch on the last block's outputs."""
    from ..quantize.importance import ImportanceSums, weighted_layers

    acc, st = ImportanceSums(first_weight), streamer_of(model)
    layers = weighted_layers(layers)
    handles: list = []
    box: dict = {}
    for i, _block, _inputs in walk_blocks(model, batches, box=box):
        for h in handles:
            h.remove()
        handles = [m.register_forward_pre_hook(acc.hook(n)) for n, m in layers.items() if n.startswith(st.prefixes[i])]
    for h in handles:
        h.remove()
    outside = {n: m for n, m in layers.items() if not any(n.startswith(p) for p in st.prefixes)}
    if outside:
        handles = [m.register_forward_pre_hook(acc.hook(n)) for n, m in outside.items()]
        try:
            with torch.no_grad():
                for j, b in enumerate(batches):
                    with tail_of(model, box["inputs"], j):
                        model(**b, **({"use_cache": False} if "input_ids" in b else {}))
        finally:
            for h in handles:
                h.remove()
    return acc.result()


def stored_weight(model: nn.Module, name: str) -> torch.Tensor:
    """A streamed model's layer weight as [out, in] float32, read from its file (HF Conv1D stores [in, out])."""
    from transformers.pytorch_utils import Conv1D

    W = streamer_of(model).tensor(f"{name}.weight").float()
    return W.t() if isinstance(model.get_submodule(name), Conv1D) else W
