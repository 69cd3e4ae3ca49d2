"""Orchestration of GPTQ/RTN over a whole model, block by block (the math is in gptq.py).

Inputs of block i are the outputs of the already-quantized blocks 0..i-1; inside a block
layers are quantized in groups that share an input (true-sequential). Peak memory is one
block plus the calibration hidden states. After every block the finished layers and the
next block's inputs go to `state_dir` (hashed, see resume_state.py), so a killed run resumes at
the next block; a damaged saved block is recomputed, never used.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..blocks import BlockInputs, find_blocks, run_block, sequential_groups
from ..device import model_device, model_dtype
from ..distributed import broadcast_from, gather_list, my_share, owners, world
from ..errors import UserError
from ..options import QuantizeOptions
from ..spill import Spill, default_limit
from ..streaming import streamer_of, walk_blocks
from ..models import quantizable_layers, set_weight_matrix, weight_matrix
from .conv import gptq_conv
from .gptq import GPTQError, gptq_quantize
from .float_chain import retarget, tune_results, uses_float_chain
from .hessians import collect_hessians, is_conv
from .output_error import conv_output_error, output_error

from . import quantizer
from .quantizer import QuantizedWeight, QuantSpec, rtn
from .resume_state import BlockState
from .saved_blocks import dequantize_packed, load_blocks, save_block, saved_layers
from .tune import DTYPES, LOSSES

if TYPE_CHECKING:
    from ..checkpoint import PackedLayer

log = logging.getLogger("hawqtool")


def first_token_weight_for(loaded) -> float:
    """The first-token weight a model gets by default: QuantizeOptions' for causal LMs (the attention
    sink), 1 for everything else."""
    return QuantizeOptions().first_token_weight if getattr(loaded, "task", None) == "causal-lm" else 1.0


def nsamples_for(loaded, method: str = QuantizeOptions.method) -> int:
    """The calibration windows a model gets when no count is given: QuantizeOptions.encoder_nsamples for an encoder
    under GPTQ (where it was measured: the pooled embedding gains from more windows), QuantizeOptions.nsamples for
    everything else."""
    encoder = getattr(loaded, "task", None) == "encoder"
    return QuantizeOptions.encoder_nsamples if encoder and method == "gptq" else QuantizeOptions.nsamples


@dataclass
class LayerResult:
    """What quantizing one layer produced and cost."""

    name: str
    weight: QuantizedWeight | PackedLayer  # PackedLayer: kept as the checkpoint stores it (streamed models, `_finish`)
    method: str
    error: float  # mean over calibration tokens of ‖(W−Q)x‖²
    rtn_error: float  # the same for round-to-nearest at the same spec (reference point)
    damp: float = 0.0
    retries: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    spec: QuantSpec | None = None  # the weight's (set from it when it is a QuantizedWeight)
    updated: torch.Tensor | None = None  # GPTQ's error-compensated weights (opts.tune_iters: block tuning's start)

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = self.weight.spec

    def summary(self) -> dict:
        """What the checkpoint's manifest records of the layer (no timing: the same run gives the same bytes)."""
        s = self.spec
        return dict(bits=s.bits, group_size=s.group_size, symmetric=s.symmetric, method=self.method,
                    error=self.error, rtn_error=self.rtn_error, damp=self.damp, retries=self.retries,
                    notes=self.notes, act_order=self.weight.g_idx is not None, **({"ggml_type": s.fmt} if s.fmt else {}))


def quantize_conv(name: str, conv: nn.Module, H: torch.Tensor, spec: QuantSpec, opts: QuantizeOptions) -> LayerResult:
    """Quantize a Conv1d/Conv2d (flattened [out, in/groups·k]) with GPTQ per conv group, or RTN."""
    t0 = time.perf_counter()
    if spec.fmt:
        raise UserError(f"layer {name} is a convolution; ggml types ({spec.fmt}) are for Linear layers only")
    W = weight_matrix(conv).float()
    search = opts.grid == "search"
    base = rtn(W, spec, search=search, d=H[0].diagonal() if H.shape[0] == 1 else None)
    rtn_err = conv_output_error(W, base.dequantize(), H)
    if opts.method == "rtn":
        return LayerResult(name, base, "rtn", rtn_err, rtn_err, seconds=time.perf_counter() - t0)
    try:
        res = gptq_conv(conv, H, spec, blocksize=opts.blocksize, percdamp=opts.percdamp, act_order=opts.act_order,
                        static_groups=opts.static_groups or conv.groups > 1, search=search)
    except (GPTQError, ValueError) as e:
        raise GPTQError(f"GPTQ failed on layer {name}: {e}") from e
    notes = [n for r in res.groups for n in r.notes]
    for note in notes:
        log.warning("%s: %s", name, note)
    err = conv_output_error(W, res.weight.dequantize(), H)
    return LayerResult(name, res.weight, "gptq", err, rtn_err, damp=max(r.damp for r in res.groups),
                       retries=sum(r.retries for r in res.groups), notes=notes, seconds=time.perf_counter() - t0)


def quantize_layer(name: str, W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec,
                   opts: QuantizeOptions) -> LayerResult:
    """Quantize one [out, in] weight with GPTQ (needs H) or RTN, in slices of quantizer.ROW_SLICE rows: the result is
    the same (rows are independent given H), the peak memory that of one slice (GPTQ holds several copies of its
    rows, the error sums a float64 one)."""
    rows = quantizer.ROW_SLICE
    if W.shape[0] <= rows or spec.fmt:
        return _quantize_rows(name, W, H, spec, opts)
    first, q, scales, zeros, err, rtn_err, secs = None, None, None, None, 0.0, 0.0, 0.0
    for r in range(0, W.shape[0], rows):  # each slice's result copied out and dropped: one slice's copies at a time
        part = _quantize_rows(name, W[r:r + rows], H, spec, opts)
        pw = part.weight
        if first is None:
            first = part
            q = torch.empty(W.shape, dtype=pw.q.dtype, device=pw.q.device)
            scales = torch.empty((W.shape[0], pw.scales.shape[1]), dtype=pw.scales.dtype, device=pw.scales.device)
            zeros = torch.empty((W.shape[0], pw.zeros.shape[1]), dtype=pw.zeros.dtype, device=pw.zeros.device)
            step = None if pw.scale_step is None else torch.empty(W.shape[0], dtype=pw.scale_step.dtype,
                                                                  device=pw.scale_step.device)
        q[r:r + rows], scales[r:r + rows], zeros[r:r + rows] = pw.q, pw.scales, pw.zeros
        if step is not None:
            step[r:r + rows] = pw.scale_step
        if part.updated is not None:
            if r == 0:
                updated = torch.empty(W.shape, dtype=part.updated.dtype, device=part.updated.device)
            updated[r:r + rows] = part.updated
        err, rtn_err, secs = err + part.error, rtn_err + part.rtn_error, secs + part.seconds
        del part, pw
    return LayerResult(name, QuantizedWeight(q, scales, zeros, spec, first.weight.g_idx, scale_step=step), first.method,
                       err, rtn_err,
                       damp=first.damp, retries=first.retries, notes=first.notes, seconds=secs,
                       updated=updated if first.updated is not None else None)


def _quantize_rows(name: str, W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec,
                   opts: QuantizeOptions) -> LayerResult:
    """quantize_layer on all of W's rows at once."""
    t0 = time.perf_counter()
    search = opts.grid == "search"
    base = rtn(W, spec, search=search, d=H.diagonal() if H is not None else None)
    rtn_err = output_error(W, base.dequantize(), H) if H is not None else float("nan")
    if opts.method == "rtn":
        return LayerResult(name, base, "rtn", rtn_err, rtn_err, seconds=time.perf_counter() - t0)
    try:
        res = gptq_quantize(W, H, spec, blocksize=opts.blocksize, percdamp=opts.percdamp,
                            act_order=opts.act_order, static_groups=opts.static_groups, search=search,
                            keep_updated=opts.tune_iters > 0)
    except GPTQError as e:
        raise GPTQError(f"GPTQ failed on layer {name}: {e}") from e
    for note in res.notes:
        log.warning("%s: %s", name, note)
    err = output_error(W, res.dequantized, H)
    return LayerResult(name, res.weight, "gptq", err, rtn_err, damp=res.damp, retries=res.retries,
                       notes=list(res.notes), seconds=time.perf_counter() - t0, updated=res.updated)


def _quantize_one(name: str, layer: nn.Module, H: torch.Tensor, spec: QuantSpec, opts: QuantizeOptions) -> LayerResult:
    """quantize_conv for convolutions, quantize_layer for the rest."""
    if is_conv(layer):
        return quantize_conv(name, layer, H, spec, opts)
    return quantize_layer(name, weight_matrix(layer).float(), H, spec, opts)


def _batches(ids: torch.Tensor, bs: int, device: torch.device | None = None, model: nn.Module | None = None) -> list[dict]:
    """Token windows go in as input_ids, image batches (float) as timm's x, in `model`'s dtype (a bf16 conv refuses
    fp32 inputs); on `device` (default: where ids are)."""
    key = "x" if ids.is_floating_point() else "input_ids"
    if key == "x" and model is not None:
        ids = ids.to(model_dtype(model))
    return [{key: ids[i:i + bs].to(device or ids.device)} for i in range(0, len(ids), bs)]


def quantize_model(model: nn.Module, specs: dict[str, QuantSpec], calib_ids: torch.Tensor,
                   opts: QuantizeOptions, *, state_dir: Path | None = None, state_key: str = "",
                   progress: Callable[[str], None] | None = None, spill: Spill | None = None) -> dict[str, LayerResult]:
    """Quantize every layer in `specs` in place (weights become their dequantized values) and return the per-layer
    results. Layers outside the repeated blocks go last. `spill`: the block activations past a memory limit (default:
    spill.default_limit, to `state_dir`)."""
    for key, allowed in (("grid", ("search", "minmax")), ("tune_loss", LOSSES), ("tune_dtype", tuple(DTYPES))):
        if getattr(opts, key) not in allowed:
            raise ValueError(f"QuantizeOptions.{key} must be one of {', '.join(allowed)}, got {getattr(opts, key)!r}")
    layers = quantizable_layers(model)
    try:
        _, blocks = find_blocks(model)
    except ValueError:  # no repeated ModuleList (e.g. timm CNNs): every layer is quantized in one pass below
        blocks = nn.ModuleList()
    rank, size = world()
    every = _batches(calib_ids, opts.batch_size, model_device(model), model)
    batches = my_share(every, rank, size)  # data parallel: this rank's strided share (all of them on one)
    if size > len(every):
        raise UserError(f"{size} ranks need at least {size} calibration batches of {opts.batch_size} windows; give "
                        f"--nsamples {size * opts.batch_size} or more, or fewer ranks")
    if size > 1:
        log.info("data parallel: rank %d of %d runs %d of the %d calibration batches", rank, size, len(batches),
                 len(every))
    if opts.float_target and size > 1:
        raise UserError("--float-target runs in one process; launch `hawqtool quantize` without torchrun")
    results: dict[str, LayerResult] = {}
    state = BlockState(state_dir, state_key) if state_dir is not None and len(blocks) else None
    done_blocks, hidden, fp = _resume(state, blocks, layers, results)
    streamed = streamer_of(model) is not None
    dropped: set[str] = set()  # streamed: finished blocks' results, saved in the state and read back at the end
    if streamed and state is not None and size == 1:
        for n in results:  # the resumed blocks': on disk already
            results[n].weight = None
        dropped.update(results)
    chain = {"fp": None if fp is None else my_share(fp, rank, size)}  # the float chain's inputs (this rank's)
    if hidden is not None:
        hidden = my_share(hidden, rank, size)
    prefixes = [_prefix_of(model, b) for b in blocks]
    # blocks after the last one with planned layers need not run (the rest is calibrated on the whole model)
    last = max((i for i, p in enumerate(prefixes) if any(n.startswith(p) for n in specs)), default=-1)
    # a streamed model's layers outside the blocks (an untied head) are calibrated on the last block's outputs
    outside = streamed and any(not any(n.startswith(p) for p in prefixes) for n in specs)
    stop = len(blocks) if outside else last + 1
    box: dict = {}

    def commit(i: int, inp) -> None:  # rank 0 keeps the state, with every rank's next inputs in global order
        every_hidden = gather_list([h.cpu() for h in inp.hidden], len(every)) if size > 1 else inp.hidden
        floats = chain["fp"] if uses_float_chain(opts) else None
        if floats is not None and size > 1:
            floats = gather_list([h.cpu() for h in floats], len(every))
        if rank == 0:
            mine = {n: results[n] for n in results if n.startswith(prefixes[i])}
            _save_block(state, i, mine, every_hidden, floats)
            if streamed and size == 1:  # host memory then holds no finished block's codes while the rest run
                for r in mine.values():
                    r.weight = None
                dropped.update(mine)

    with contextlib.ExitStack() as stack:
        # a streamed model's embedding and head wait on disk while the blocks run
        park = (state_dir if state_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))) \
            if streamed else None
        spill = stack.enter_context(Spill(state_dir, default_limit())) if spill is None else spill
        engine = walk_blocks(model, batches, start=done_blocks, stop=stop, hidden=hidden, box=box,
                             after=commit if state is not None else None, park=park, spill=spill) \
            if stop > done_blocks or outside else ()
        _quantize_blocks(engine, layers, specs, prefixes, opts, results, streamed, progress, chain, len(every), spill)
    rest = {n: layers[n] for n in specs if n not in results}
    if rest:
        Hs = collect_hessians(model, rest, None, early_stop=False, batches=batches, first_weight=opts.first_token_weight,
                              final=box.get("inputs") if streamed else None, n_total=len(every))
        _solve(list(rest), layers, Hs, specs, opts, results, streamed, progress)
        for n in rest:  # outside the blocks nothing is tuned: GPTQ's compensated weights are not kept
            results[n].updated = None
    if dropped:
        _read_back(state, layers, results, dropped)
    return results


def _quantize_blocks(engine, layers: dict, specs: dict, prefixes: list[str], opts: QuantizeOptions,
                     results: dict, streamed: bool, progress, chain: dict, n_total: int, spill: Spill) -> None:
    """The block loop of quantize_model: each block's layers in true-sequential groups (H collected, the float
    target applied when asked, solved). chain["fp"]: the float chain's inputs of the block (float_target), updated
    before the block is committed (kept as `spill` keeps the engine's)."""
    for i, block, inputs in engine:
        in_block = {n: layers[n] for n in layers if n.startswith(prefixes[i]) and n in specs}
        if not in_block:
            groups = []
        elif opts.true_sequential and opts.method == "gptq":
            groups = sequential_groups(block, in_block, inputs)
        else:  # RTN needs H only to report each layer's error: one pass per block
            groups = [list(in_block)]
        floats = None
        if uses_float_chain(opts):  # the float chain: this block before quantization, on the float model's inputs
            floats = (copy.deepcopy(block), BlockInputs([h.to(inputs.hidden[0].device) for h in (chain["fp"] or inputs.hidden)],
                                                        inputs.args, inputs.kwargs))
        tune = bool(opts.tune_iters) and opts.method == "gptq" and bool(in_block)
        for group in groups:
            # H is collected for RTN too: it gives the per-layer output error in the manifest.
            Hs = collect_hessians(block, {n: in_block[n] for n in group}, inputs, early_stop=True,
                                  first_weight=opts.first_token_weight, n_total=n_total)
            if opts.float_target:
                retarget({n: in_block[n] for n in group}, Hs, block, inputs, floats, opts)
            _solve(group, layers, Hs, specs, opts, results, streamed and not tune, progress)
        if floats is not None:
            with torch.no_grad():
                fp = [run_block(floats[0], floats[1], j) for j in range(len(floats[1].hidden))]
            del floats
            if tune:  # the tuned weights into the block and the results (packed now for streamed models)
                inputs.outputs = tune_results(block, in_block, results, inputs, fp, opts, i, n_total)
                for n in in_block:
                    results[n] = _finish(n, in_block[n], results[n], streamed, put=False)
            chain["fp"] = spill.keep(fp, host=streamed)


def _solve(group: list[str], layers: dict[str, nn.Module], Hs: dict, specs: dict[str, QuantSpec],
           opts: QuantizeOptions, results: dict[str, LayerResult], compact: bool, progress) -> None:
    """Quantize the layers of one group (their H collected). Data parallel: each layer on its owner rank (sizes
    balanced), then every result broadcast, so all ranks continue with the same weights."""
    rank, size = world()
    own = owners({n: weight_matrix(layers[n]).numel() for n in group}, size) if size > 1 else dict.fromkeys(group, 0)
    Hf = {}  # each accumulator's H once (q/k/v share one); its float64 sum is released (537 MB at 8192 inputs)
    for n in group:
        acc = Hs[n]
        if id(acc) not in Hf:
            Hf[id(acc)] = acc.H
            acc.release()
    mine = {n: _on_cpu(_quantize_one(n, layers[n], Hf[id(Hs[n])], specs[n], opts)) for n in group if own[n] == rank}
    for n in group:
        res = broadcast_from(own[n], lambda n=n: mine[n]) if size > 1 else mine[n]
        results[n] = _finish(n, layers[n], res, compact)
        if progress:
            progress(n)


def _on_cpu(res: LayerResult) -> LayerResult:
    res.weight = res.weight.to("cpu")
    return res


def _finish(name: str, layer: nn.Module, res: LayerResult, compact: bool = False, put: bool = True) -> LayerResult:
    """Put the layer's dequantized weight in place (on its device) and keep the result's tensors on the CPU:
    device memory then holds one layer's quantizer state at a time, and the checkpoint is written from the host.
    `compact` (streamed models): kept packed, as the checkpoint stores it (int32 codes of a 3B model are 12 GB).
    put=False: the layer already holds it (block tuning leaves each layer with the weight it returns)."""
    if put:
        set_weight_matrix(layer, res.weight.dequantize().to(layer.weight.dtype))
    res.weight = res.weight.to("cpu")
    if compact and res.weight.grid is None:
        from ..checkpoint import stored_layer

        res.weight = stored_layer(name, res.weight)
    return res


def _prefix_of(model: nn.Module, block: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is block:
            return name + "."
    raise ValueError("block not found in model")


# ---- resume state (saved_blocks.py, resume_state.py: hashed, verified): one record per finished block ----

def _save_block(state: BlockState, i: int, res: dict[str, LayerResult], hidden: list[torch.Tensor],
                floats: list[torch.Tensor] | None = None) -> None:
    save_block(state, i, {n: (r.weight, {**r.summary(), "seconds": r.seconds, "spec": r.spec.to_dict()})
                          for n, r in res.items()}, hidden, floats)


def _result_of(n: str, qw, spec: QuantSpec, m: dict) -> LayerResult:
    return LayerResult(n, qw, m["method"], m["error"], m["rtn_error"], m["damp"], m["retries"], m["notes"],
                       m["seconds"], spec=spec)


def _resume(state: BlockState | None, blocks, layers, results) -> tuple[int, list | None, list | None]:
    """Re-apply the verified finished blocks of this run; returns (next block, its inputs, its float-chain inputs)."""
    if state is None:
        return 0, None, None
    done, hidden = load_blocks(state, layers)
    if not done:
        return 0, None, None
    for n, qw, spec, m in (layer for block in done for layer in block):
        results[n] = _result_of(n, qw, spec, m)
        if layers[n].weight.device.type != "meta":  # a streamed block is re-read when it runs again
            set_weight_matrix(layers[n], (qw.dequantize() if isinstance(qw, QuantizedWeight) else
                                          dequantize_packed(qw)).to(layers[n].weight.dtype))
    log.info("resuming quantization at block %d of %d", len(done), len(blocks))
    n = sum(k.startswith("h") for k in hidden)
    floats = [hidden[f"f{j}"] for j in range(n)] if "f0" in hidden else None
    return len(done), [hidden[f"h{j}"] for j in range(n)], floats


def _read_back(state: BlockState, layers: dict, results: dict, dropped: set[str]) -> None:
    """The results of finished blocks that were dropped from memory once saved (streamed models): their packed
    layers as PackedLayers of LazyTensors, which the checkpoint writer reads from the saved blocks one at a time."""
    got = saved_layers(state, layers) or {}
    missing = sorted(dropped - got.keys())
    if missing:
        raise UserError(f"the finished blocks saved in {state.folder} were damaged during the run ({missing[0]} "
                        "cannot be read back); run the same command again: it recomputes them")
    for n in dropped:
        results[n] = _result_of(*got[n])
