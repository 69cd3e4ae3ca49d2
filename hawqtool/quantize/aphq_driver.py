"""Orchestration of APHQ over a model's repeated blocks (the math is in aphq.py).

Two chains of hidden states run side by side: the float chain (original blocks; its block outputs
are the reconstruction targets) and the quantized chain (inputs of each block as the already
quantized blocks before it compute them). Per block:
  1. float pass: targets z, and (mlp_relu) the MLP's fc1 input, GELU output and fc2 output;
  2. APH map ĥ at the block output: two perturbed backward passes of the float model's tail;
  3. (mlp_relu) GELU → ReLU clamped at a percentile of the positive GELU outputs, fc1/fc2 refit in
     float on the float-chain data under the APH-weighted MLP output error (ĥ of the block output:
     exact where the MLP output enters the block output through the residual sum, as in timm's ViT;
     BERT's post-LayerNorm Jacobian is ignored);
  4. initial codes (RTN or GPTQ) and static input ranges (act_init) on the quantized chain;
  5. AdaRound + LSQ on the quantized-chain inputs (QDrop mixes in the float chain's) against the targets.
Only the inputs of quantized Linear layers are activation-quantized (as the runtime does): the
attention matmul inputs (q·kᵀ, softmax·v) and the softmax/LayerNorm stay in float.
Layers of `specs` outside the blocks (a ViT's patch_embed and head, BERT's pooler) get RTN weights
and a static act_init input range, without reconstruction: those before the blocks on the float
inputs, those after on the inputs of the quantized model.
Resume: after each block its codes, activation ranges, ReLU clamps, refit fc1/fc2 and the next
block's two chains of inputs go to `state_dir` (hashed, see resume_state.py); a rerun with the same key
continues at the next block, and a damaged saved block is recomputed, never used.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..blocks import capture_block_inputs, find_blocks
from ..streaming import walk_blocks
from ..models import quantizable_layers, set_weight_matrix, weight_matrix
from .act_quant import ActQuantizer
from .aphq import APHQOptions, BlockData, aph_importance, native_weight, reconstruct_block, run_block
from .aphq_mlp import refit_relu_mlp, relu_clamp
from .gptq import HessianAccumulator, gptq_quantize
from .quantizer import QuantizedWeight, QuantSpec, rtn
from .resume_state import BlockState

__all__ = ["APHQOptions", "APHQResult", "aphq_quantize_model", "find_repeated_blocks", "find_mlp"]

log = logging.getLogger("hawqtool")


@dataclass
class APHQResult:
    """What APHQ produced: hard codes, static input ranges, ReLU clamps and a record per block."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    act: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> static (scale, zero) (int8_ops.ActSpec)
    act_fn: dict[str, float] = field(default_factory=dict)  # replaced GELU -> clamp max (nn.Hardtanh(0, max))
    blocks: list[dict] = field(default_factory=list)


def find_repeated_blocks(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, container) of the ModuleList/Sequential of one module class holding the most parameters."""
    return find_blocks(model, (nn.ModuleList, nn.Sequential))


def _capture(model: nn.Module, block: nn.Module, batches: list[dict]) -> BlockData:
    """Run the model on each batch up to `block`, keeping its hidden input, other args and kwargs."""
    got = capture_block_inputs(model, block, batches, call_kwargs={})
    return BlockData(got.hidden, got.args, got.kwargs, [], [])


def _while_hooked(hooks: dict[nn.Module, Callable], run: Callable[[], Any]) -> None:
    """run() without grad while each module's forward pre-hook is attached; the hooks are removed after."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in hooks.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def find_mlp(block: nn.Module, run: Callable[[], Any]) -> tuple[str, str, str] | None:
    """(fc1, act, fc2) names in the block: the GELU-type module executed between two Linear layers."""
    mods = {n: m for n, m in block.named_modules() if n and not list(m.children())}
    order: list[str] = []
    _while_hooked({m: (lambda _m, _a, n=n: order.append(n)) for n, m in mods.items()}, run)
    for k, n in enumerate(order):
        if "gelu" in type(mods[n]).__name__.lower():
            before = [a for a in order[:k] if isinstance(mods[a], nn.Linear)]
            after = [a for a in order[k + 1:] if isinstance(mods[a], nn.Linear)]
            if before and after and mods[before[-1]].out_features == mods[after[0]].in_features:
                return before[-1], n, after[0]
    return None


def _float_pass(block: nn.Module, data: BlockData, mlp: tuple[str, str, str] | None) -> tuple[list, dict | None]:
    """Block outputs on the float chain, plus the MLP's fc1 inputs, (a sample of) GELU outputs and fc2 outputs
    when fc2 reads exactly the GELU output of exactly fc1's output (else the MLP is left as is: None)."""
    z, rec = [], {"u": [], "a": [], "y": [], "ok": mlp is not None}
    handles = []
    if mlp is not None:
        fc1, act, fc2 = (block.get_submodule(n) for n in mlp)
        seen: dict[str, torch.Tensor] = {}

        def fc1_hook(_m, a, o):
            rec["u"].append(a[0].detach())
            seen["fc1"] = o

        def act_hook(_m, a, o):
            rec["ok"] &= _same(a[0], seen.get("fc1"))
            rec["a"].append(o.detach().reshape(-1)[::max(1, o.numel() >> 20)])  # ≤ 2^20 values per batch
            seen["act"] = o

        def fc2_hook(_m, a, o):
            rec["ok"] &= _same(a[0], seen.get("act"))
            rec["y"].append(o.detach())

        handles = [fc1.register_forward_hook(fc1_hook), act.register_forward_hook(act_hook),
                   fc2.register_forward_hook(fc2_hook)]
    try:
        with torch.no_grad():
            z = [run_block(block, data, j).detach() for j in range(len(data.x))]
    finally:
        for h in handles:
            h.remove()
    return z, (rec if rec["ok"] else None)


def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and (a is b or (a.shape == b.shape and torch.equal(a, b)))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _relu_mlp(block: nn.Module, prefix: str, mlp: tuple[str, str, str], mr: dict, h: torch.Tensor | None,
              masks: list, opts: APHQOptions, gen: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    """Replace the MLP's GELU by ReLU clamped at a percentile and refit fc1/fc2 in float under the APH-weighted
    error of the MLP output; returns the record and the refit fc1/fc2 parameters by full name."""
    fc1, fc2 = block.get_submodule(mlp[0]), block.get_submodule(mlp[2])
    c = relu_clamp(mr["a"], opts.relu_clip_percentile, gen)
    hm = h if h is not None and tuple(h.shape[1:]) == tuple(mr["y"][0].shape[2:]) else None
    swap, refit = refit_relu_mlp(fc1, fc2, mr["u"], mr["y"], c, hm, masks, iters=opts.refit_iters, lr=opts.refit_lr,
                                 batch_size=opts.batch_size, gen=gen)
    _set_module(block, mlp[1], nn.Hardtanh(0.0, c))
    floats = {f"{prefix}{n}.{p}": t.detach().clone() for n in (mlp[0], mlp[2])
              for p, t in block.get_submodule(n).named_parameters()}
    return dict(fc1=mlp[0], act=mlp[1], fc2=mlp[2], clamp=c, swap_error=swap, refit_error=refit), floats


def _init_codes(block: nn.Module, specs: dict[str, QuantSpec], data: BlockData,
                init: str) -> dict[str, QuantizedWeight]:
    """Initial codes per layer: RTN, or GPTQ with H = 2/n Σ xxᵀ of the quantized-chain inputs (Linear only)."""
    mods = dict(block.named_modules())
    out = {n: rtn(weight_matrix(mods[n]).float(), s) for n, s in specs.items()}
    if init != "gptq":
        return out
    lin = [n for n in specs if isinstance(mods[n], nn.Linear)]
    acc = {n: HessianAccumulator(mods[n].in_features) for n in lin}
    handles = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: acc[n].add_batch(a[0])) for n in lin]
    try:
        with torch.no_grad():
            for j in range(len(data.x)):
                run_block(block, data, j)
    finally:
        for h in handles:
            h.remove()
    for n in lin:
        out[n] = gptq_quantize(weight_matrix(mods[n]).float(), acc[n].H, specs[n]).weight
    return out


def _observe_ranges(root: nn.Module, bits: dict[str, int], run: Callable[[], None], method: str) -> dict[str, tuple]:
    """Static asymmetric input range (bits, scale, zero) per named module, calibrated while `run` runs."""
    mods = dict(root.named_modules())
    qs = {n: ActQuantizer(bits=b, mode="static", symmetric=False, method=method, mse_min_ratio=0.05)
          for n, b in bits.items()}
    _while_hooked({mods[n]: (lambda _m, a, n=n: qs[n].observe(a[0])) for n in qs}, run)
    out = {}
    for n, q in qs.items():
        if q.n_observed == 0:
            log.warning("APHQ: layer %s never received an input; its activations stay in float", n)
            continue
        q.finalize(method)
        out[n] = (q.bits, float(q.scale), float(q.zero))
    return out


def _attach(module: nn.Module, bits: int, scale: float, zero: float) -> Any:
    """Fake-quantize the module's input as the runtime will (static per-tensor, asymmetric)."""
    q = ActQuantizer(bits=bits, mode="static", symmetric=False, scale=torch.tensor(scale, device="cpu"),
                     zero=torch.tensor(zero, device="cpu"))
    return module.register_forward_pre_hook(lambda _m, a: (q(a[0]), *a[1:]))


def _outside(model: nn.Module, names: list[str], first_block: nn.Module, batch: dict) -> tuple[list[str], list[str]]:
    """Split layers outside the blocks into those run before the first block and the rest."""
    mods = dict(model.named_modules())
    order: list[str] = []
    handles = [mods[n].register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n in names]
    handles.append(first_block.register_forward_pre_hook(lambda _m, _a: order.append("")))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    pre = set(order[:order.index("")]) if "" in order else set()
    return [n for n in names if n in pre], [n for n in names if n not in pre]


def _quantize_outside(model: nn.Module, names: list[str], specs: dict[str, QuantSpec], act_bits: dict[str, int],
                      batches: list[dict], method: str, result: APHQResult, hooks: dict) -> None:
    """RTN weights and static input ranges (calibrated on the model as it now computes) for `names`."""
    if not names:
        return
    mods = dict(model.named_modules())
    log.info("APHQ: %s outside the repeated blocks: RTN weights and static %s input ranges, no reconstruction",
             ", ".join(names), method)
    for n in names:
        if n in specs:
            result.weights[n] = rtn(weight_matrix(mods[n]).float(), specs[n])
            set_weight_matrix(mods[n], result.weights[n].dequantize().to(mods[n].weight.dtype))
    bits = {n: act_bits[n] for n in names if act_bits.get(n, 16) < 16}
    for n, (b, s, z) in _observe_ranges(model, bits, lambda: [model(**x) for x in batches], method).items():
        result.act[n] = (s, z)
        hooks[n] = _attach(mods[n], b, s, z)


def aphq_quantize_model(model: nn.Module, specs: dict[str, QuantSpec], act_bits: dict[str, int],
                        batches: list[dict], output_fn: Callable[[Any], torch.Tensor], opts: APHQOptions, *,
                        loss: str = "kl", state_dir: Path | None = None, state_key: str = "",
                        progress: Callable[[str], None] | None = None) -> APHQResult:
    """Quantize `model` in place with APHQ block reconstruction: quantized layers end up holding their
    dequantized weights, replaced GELUs are nn.Hardtanh(0, clamp), refit fc1/fc2 keep their new biases.
    Each optimisation step draws opts.batch_size rows from one batch: give batches of ≥ batch_size samples."""
    if opts.init not in ("rtn", "gptq"):
        raise ValueError(f"init must be 'rtn' or 'gptq', got {opts.init!r}")
    model.eval()
    say = progress or (lambda _s: None)
    layers = quantizable_layers(model)
    block_name, blocks = find_repeated_blocks(model)
    prefixes = [f"{block_name}.{c}." for c, _ in blocks.named_children()]
    touched = sorted(set(specs) | {n for n, a in act_bits.items() if a < 16})
    if missing := [n for n in touched if n not in layers]:
        raise KeyError(f"not quantizable layers of the model: {missing}")
    masks = [b.get("attention_mask") if isinstance(b.get("attention_mask"), torch.Tensor) else None for b in batches]
    with torch.no_grad():
        targets = [output_fn(model(**b)).detach() for b in batches]
    pre, post = _outside(model, [n for n in touched if not n.startswith(tuple(prefixes))], blocks[0], batches[0])
    result, hooks = APHQResult(), {}
    try:
        fdata = _capture(model, blocks[0], batches)
        _quantize_outside(model, pre, specs, act_bits, batches, opts.act_init, result, hooks)
        xf = fdata.x
        state = BlockState(Path(state_dir), state_key) if state_dir is not None else None
        done, hidden = _resume(state, model, layers, result, hooks, act_bits)
        if hidden is not None:
            xf = hidden[1]
        # the block engine carries the quantized chain (each block's outputs once it is quantized); the float
        # chain is this loop's own: a block's float outputs are its reconstruction targets z
        finished: dict = {}  # block i's commit: saved (with the engine's outputs of it, the next inputs) and said

        def commit(i: int, inputs) -> None:
            if state is not None:
                _save_block(state, i, result, finished["prefix"], finished["floats"], inputs.hidden, xf)
            say(finished["line"])

        engine = walk_blocks(model, batches, start=done, hidden=None if hidden is None else hidden[0],
                             containers=(nn.ModuleList, nn.Sequential), call_kwargs={}, after=commit)
        for i, block, inputs in engine:
            xq = inputs.hidden
            t0 = time.perf_counter()
            prefix = prefixes[i]
            gen = torch.Generator(device="cpu").manual_seed(opts.seed * 1_000_003 + i)
            fd = BlockData(xf, fdata.args, fdata.kwargs, [], masks)
            mlp = find_mlp(block, lambda: run_block(block, fd, 0)) if opts.mlp_relu else None
            z, mr = _float_pass(block, fd, mlp)
            h = None  # aph_probe "none": plain MSE
            if opts.aph_probe != "none":
                h = aph_importance(model, block, batches, output_fn, targets, z, loss, delta=opts.aph_delta,
                                   temperature=opts.temperature, masks=masks, probe=opts.aph_probe, gen=gen)
                h = (1 - opts.aph_mix) * h / h.mean() + opts.aph_mix if float(h.mean()) > 0 else None
            record: dict = dict(name=prefix[:-1], aph_seconds=round(time.perf_counter() - t0, 3))
            floats: dict[str, torch.Tensor] = {}
            if mlp is not None and mr is None:
                log.warning("APHQ: %s's MLP (%s) is not fc2(act(fc1(x))); GELU kept", prefix[:-1], ", ".join(mlp))
            elif mr is not None:
                record["mlp"], floats = _relu_mlp(block, prefix, mlp, mr, h, masks, opts, gen)
                result.act_fn[prefix + mlp[1]] = record["mlp"]["clamp"]
            qd = BlockData(xq, fdata.args, fdata.kwargs, z, masks, xf)
            rel = len(prefix)
            wspecs = {n[rel:]: specs[n] for n in specs if n.startswith(prefix)}
            init = _init_codes(block, wspecs, qd, opts.init)
            params = {f"{n}.weight": native_weight(block.get_submodule(n), q.dequantize()) for n, q in init.items()}
            abits = {n[rel:]: act_bits[n] for n in touched if n.startswith(prefix) and act_bits.get(n, 16) < 16}
            acts = _observe_ranges(block, abits, lambda: [run_block(block, qd, j, params=params)
                                                          for j in range(len(xq))], opts.act_init)
            out = reconstruct_block(block, init, acts, qd, h, opts, gen=gen, progress=say, tag=prefix[:-1])
            for n, q in out["weights"].items():
                result.weights[prefix + n] = q
                set_weight_matrix(block.get_submodule(n), q.dequantize().to(block.get_submodule(n).weight.dtype))
            for n, (s, zero) in out["act"].items():
                result.act[prefix + n] = (s, zero)
                hooks[prefix + n] = _attach(block.get_submodule(n), acts[n][0], s, zero)
            xf = z
            record.update({k: out[k] for k in ("loss_before", "loss_after", "loss_soft", "undecided", "kept", "iters")},
                          seconds=round(time.perf_counter() - t0, 3))
            result.blocks.append(record)
            finished.update(prefix=prefix, floats=floats, line=f"{prefix[:-1]}: loss {out['loss_before']:.4g} -> "
                                                                  f"{out['loss_after']:.4g} ({record['seconds']:.1f}s)")
        _quantize_outside(model, post, specs, act_bits, batches, opts.act_init, result, hooks)
    finally:
        for hd in hooks.values():
            hd.remove()
    return result


# ---- resume state (resume_state.py: hashed, verified): per finished block + the next inputs (both chains) ----

def _save_block(state: BlockState, i: int, result: APHQResult, prefix: str, floats: dict[str, torch.Tensor],
                xq: list[torch.Tensor], xf: list[torch.Tensor]) -> None:
    """Commit block i's results and the next block's inputs."""
    mine = lambda d: {n: v for n, v in d.items() if n.startswith(prefix)}  # noqa: E731
    tensors = {f"float.{n}": t for n, t in floats.items()}
    for n, w in mine(result.weights).items():
        tensors.update({f"{n}.q": w.q.to(torch.uint8), f"{n}.scales": w.scales, f"{n}.zeros": w.zeros.to(torch.uint8)})
    meta = dict(specs={n: w.spec.to_dict() for n, w in mine(result.weights).items()},
                act={n: list(v) for n, v in mine(result.act).items()}, act_fn=mine(result.act_fn),
                record=result.blocks[-1])
    state.save(i, tensors, {**{f"q{j}": x for j, x in enumerate(xq)}, **{f"f{j}": x for j, x in enumerate(xf)}},
               meta)


def _resume(state: BlockState | None, model: nn.Module, layers: dict[str, nn.Module], result: APHQResult,
            hooks: dict, act_bits: dict[str, int]) -> tuple[int, tuple[list, list] | None]:
    """Re-apply the verified blocks finished under the same key; returns (next block, its (quantized, float)
    inputs)."""
    if state is None:
        return 0, None
    done, h = state.resume()
    if not done:
        return 0, None
    for meta, t in done:
        with torch.no_grad():
            for n, v in t.items():
                if n.startswith("float."):
                    model.get_parameter(n[len("float."):]).copy_(v)
        for n, c in meta["act_fn"].items():
            _set_module(model, n, nn.Hardtanh(0.0, c))
            result.act_fn[n] = c
        for n, spec in meta["specs"].items():
            qw = QuantizedWeight(t[f"{n}.q"].to(torch.int32), t[f"{n}.scales"], t[f"{n}.zeros"].to(torch.int32),
                                 QuantSpec(**spec))
            result.weights[n] = qw
            set_weight_matrix(layers[n], qw.dequantize().to(layers[n].weight.dtype))
        for n, (s, z) in meta["act"].items():
            result.act[n] = (s, z)
            hooks[n] = _attach(layers[n], act_bits[n], s, z)
        result.blocks.append(meta["record"])
    n = sum(1 for k in h if k.startswith("q"))
    log.info("APHQ: resuming at block %d (%d finished blocks in %s)", len(done), len(done), state.folder)
    return len(done), ([h[f"q{j}"] for j in range(n)], [h[f"f{j}"] for j in range(n)])
