"""Models larger than memory: built on the meta device, each repeated block's weights read from the safetensors
shards only while that block runs (`--offload`). Everything outside the blocks (embeddings, final norm, head)
stays resident on the device; activations at block boundaries are kept on the host by the callers.

Reading uses safetensors' lazy `safe_open` (one tensor at a time, memory-mapped) and placing uses accelerate's
`init_empty_weights` / `set_module_tensor_to_device`: no loader of our own."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import UserError
from .memsize import parse_memory  # noqa: F401  (re-exported: the library's name for it)

class WeightSource:
    """Tensors of a model's safetensors files by name, read one at a time on demand."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            names = json.loads(index.read_text())["weight_map"]
            self.where = {k: folder / f for k, f in names.items()}
        else:
            from safetensors import safe_open

            self.where = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as st:
                    self.where.update({k: f for k in st.keys()})
        if not self.where:
            raise UserError(f"{folder} has no safetensors weights; --offload streams them from safetensors files")
        for f in set(self.where.values()):
            if f.is_symlink() or not f.resolve().is_relative_to(folder.resolve()):
                raise UserError(f"{f} points outside {folder}; a model folder's weights must be its own files")
    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor `name` (on the CPU, in its stored dtype), copied out of the file: no mapping of the file
        stays open, so pages read for one block do not stay resident (they would count in RSS until unmapped)."""
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as st:
            return st.get_tensor(name).clone()

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.where.values()))


class Streamer:
    """Loads and drops the repeated blocks of a meta-built model; the rest of it is resident from the start."""

    def __init__(self, model: nn.Module, source: WeightSource, device: torch.device, dtype: torch.dtype,
                 tie: bool = True):
        from .blocks import find_blocks

        self.model, self.source, self.device, self.dtype = model, source, device, dtype
        _return_freed_memory()
        prefix, self.blocks = find_blocks(model)
        self.block_prefix = prefix + "."
        self.prefixes = [f"{prefix}.{i}." for i in range(len(self.blocks))]
        self._file_key = _key_mapper(model, source)
        self.resident_now: set[int] = set()
        outside = [n for n, _ in _tensors(model) if not n.startswith(prefix + ".")]
        self._place(outside)
        if tie and hasattr(model, "tie_weights"):  # tie=False: a checkpoint whose tied head holds packed codes
            model.tie_weights()
        _loaded(m for n, m in model.named_modules() if not n.startswith(prefix + "."))

    def _place(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for n in names:
            key = self._file_key(n)
            if key is None:
                continue  # a tied copy or a buffer computed at construction (rotary inv_freq)
            t = self.source.get(key)  # a copy of its own: stages write to the block's weights
            owner, _, leaf = n.rpartition(".")
            as_is = not t.is_floating_point() or leaf in getattr(self.model.get_submodule(owner), "stored_as_is", ())
            # the dtype named: accelerate would otherwise cast to the placeholder's (a float32 skeleton's)
            set_module_tensor_to_device(self.model, n, self.device, value=t, dtype=t.dtype if as_is else self.dtype)

    def load(self, i: int) -> None:
        """Read block i's weights onto the device."""
        if i not in self.resident_now:
            self._place([n for n, _ in _tensors(self.model) if n.startswith(self.prefixes[i])])
            _loaded(self.blocks[i].modules())
            self.resident_now.add(i)

    def drop(self, i: int) -> None:
        """Return block i's weights to the meta device (freeing them)."""
        if i in self.resident_now:
            self.blocks[i].to_empty(device="meta")
            self.resident_now.discard(i)
            if self.device.type == "cpu":
                _return_freed_memory()

    @contextlib.contextmanager
    def resident(self, i: int) -> Iterator[nn.Module]:
        """Block i with its weights on the device for the duration; dropped again after, even on error."""
        self.load(i)
        try:
            yield self.blocks[i]
        finally:
            self.drop(i)

    @contextlib.contextmanager
    def parked(self, folder: Path) -> Iterator[None]:
        """The parameters outside the blocks (embedding, head, final norm) written to `folder` and left on the meta
        device for the duration, then read back exactly as they were (changed values too: a quantized embedding):
        a block-by-block pass needs none of them, and host memory then holds one block, not also the embedding
        and the head (2 × vocab × hidden floats: 1.2 GB for a 3B Llama in fp32, 8.4 GB for a 70B)."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors.torch import load_file, save_file

        params = {n: p for n, p in self.model.named_parameters(remove_duplicate=False)
                  if not n.startswith(self.block_prefix) and p.device.type != "meta"}
        first: dict[int, str] = {}  # tied parameters (embedding and head) are stored once
        alias = {n: first.setdefault(id(p), n) for n, p in params.items()}
        Path(folder).mkdir(parents=True, exist_ok=True)
        # one file per tensor, each tensor freed as soon as it is on disk: host memory only falls while parking
        files = {n: Path(folder) / f"outside-blocks-{k}.safetensors" for k, n in enumerate(sorted(set(alias.values())))}
        dev = {n: (p.device, p.requires_grad) for n, p in params.items()}
        for n, f in files.items():
            save_file({"t": params[n].detach().cpu().contiguous()}, str(f))
            for m in [m for m in params if alias[m] == n]:
                set_module_tensor_to_device(self.model, m, "meta")
                params[m] = None
            _return_freed_memory()
        try:
            yield
        finally:
            back = {n: torch.nn.Parameter(load_file(str(f))["t"].to(dev[n][0]), requires_grad=dev[n][1])
                    for n, f in files.items()}
            for n in params:
                module, _, leaf = n.rpartition(".")
                setattr(self.model.get_submodule(module) if module else self.model, leaf, back[alias[n]])
            for f in files.values():
                f.unlink()

    def tensor(self, name: str) -> torch.Tensor:
        """One parameter of the model as stored (CPU), whether or not its block is resident."""
        key = self._file_key(name)
        if key is None:
            raise KeyError(name)
        return self.source.get(key)


def _loaded(modules) -> None:
    """Tell the modules that keep state derived from their tensors (runtime's packed layers) that these were read."""
    for m in modules:
        if callable(getattr(m, "read_from_file", None)):
            m.read_from_file()


def _return_freed_memory() -> None:
    """Give the pages of freed tensors back to the OS (glibc's malloc_trim), so that a dropped block's memory leaves RSS:
    glibc raises its mmap threshold after each large free and serves later block-sized tensors from a heap it seldom
    shrinks. Trimming once per dropped block replaces pinning that threshold at 1 MiB, which returned the memory too
    but made every tensor over 1 MiB a fresh mmap: 2/3 of a streamed run's time went to page faults (RESULTS,
    2026-12-07). No-op where the C library is not glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers by state-dict name (tied ones once)."""
    return list(model.state_dict(keep_vars=True).items())


def _key_mapper(model: nn.Module, source: WeightSource):
    """state-dict name -> key in the files: the same name, or with the base model prefix added/removed (HF saves
    some models without it); None for a tied copy the files do not store."""
    base = getattr(model, "base_model_prefix", "") or ""

    def key(name: str) -> str | None:
        for k in (name, f"{base}.{name}", name.removeprefix(base + ".")):
            if source.has(k):
                return k
        return None

    return key


def empty_model(cls, config, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The model's skeleton on the meta device (no memory for its weights), in eval mode."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def weights_bytes(folder: Path, dtype: torch.dtype) -> int | None:
    """Bytes the safetensors weights in `folder` take in `dtype` (from their headers; None if there are none)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    size = torch.empty(0, dtype=dtype, device="cpu").element_size()
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n += int(torch.Size(shape).numel())
    return n * size


def streamer_of(model: nn.Module) -> Streamer | None:
    """The Streamer of a model loaded with offload (models.load_model), None for one held in memory."""
    return getattr(model, "_hawq_streamer", None)


def walk_blocks(model: nn.Module, batches: list[dict], *, start: int = 0, stop: int | None = None,
                hidden: list[torch.Tensor] | None = None, host: bool = False, box: dict | None = None,
                containers: tuple[type, ...] = (nn.ModuleList,), call_kwargs: dict | None = None,
                after: Callable[[int, object], None] | None = None,
                park: Path | None = None, spill=None) -> Iterator[tuple[int, nn.Module, object]]:
    """The one block engine: run `model` over `batches` block by block. Yields (i, block, inputs) with block i
    resident (streamed models: loaded for the step, dropped after); once the caller hands control back (it may
    have changed the block: GPTQ), the block's outputs become block i+1's inputs (the caller's `inputs.outputs`
    where it has computed them already). `hidden`: block `start`'s
    inputs (a resumed run); `host`: keep boundary activations on the CPU between blocks (streamed models always
    do). `inputs.hidden` ends as the outputs of the last block run; `box["inputs"]` holds the inputs object
    (also when no block runs: a resumed run that had finished every block). `containers`, `call_kwargs`: what
    blocks.find_blocks and capture_block_inputs take (timm models: nn.Sequential blocks, no use_cache).
    `after(i, inputs)`: called once block i's outputs are in `inputs.hidden`, before block i+1 starts (where a
    stage commits the block: its resume state needs those outputs). `park` (streamed models): a folder where the
    parameters outside the blocks wait on disk while the blocks run (Streamer.parked). `spill` (spill.Spill): where
    the boundary activations go once they exceed its limit (on disk, mapped back)."""
    from .blocks import capture_block_inputs, find_blocks

    _, blocks = find_blocks(model, containers)
    stop = len(blocks) if stop is None else stop
    streamer = streamer_of(model)
    host = host or streamer is not None
    if spill is None:
        from .spill import Spill

        spill = Spill()  # no limit: in memory
    inputs = capture_block_inputs(model, blocks[0], batches, call_kwargs)
    inputs.hidden = spill.keep(inputs.hidden if hidden is None else hidden, host=host)
    if box is not None:
        box["inputs"] = inputs
    with streamer.parked(park) if streamer is not None and park is not None and start < stop else \
            contextlib.nullcontext():
        yield from _walk(blocks, streamer, inputs, start, stop, host, after, spill)
    return inputs


def _walk(blocks, streamer, inputs, start: int, stop: int, host: bool, after,
          spill) -> Iterator[tuple[int, nn.Module, object]]:
    """walk_blocks' loop over blocks start..stop-1."""
    for i in range(start, stop):
        with streamer.resident(i) if streamer is not None else contextlib.nullcontext(blocks[i]) as block:
            dev = next((p.device for p in block.parameters()), torch.device("cpu"))
            inputs.hidden = [h.to(dev) for h in inputs.hidden]  # no copy when they are there already
            yield i, block, inputs
            out, inputs.outputs = inputs.outputs, None
            if out is None:
                with torch.no_grad():
                    out = [block(inputs.hidden[j], *inputs.args[j], **inputs.kwargs[j]) for j in range(len(inputs.hidden))]
                inputs.tuple_out = bool(out) and isinstance(out[0], (tuple, list))
                out = [o[0] if inputs.tuple_out else o for o in out]
            inputs.hidden = spill.keep(out, host=host)
            if after is not None:
                after(i, inputs)


@contextlib.contextmanager
def replayed_blocks(model: nn.Module, final: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Every repeated block replaced for one forward: the first returns `final` (the last block's output, from
    the block engine), the others pass their input on; `as_tuple` as the real blocks return (the engine's
    `inputs.tuple_out`). The model's own forward then computes what follows its blocks (final norm, head) on
    `final`, whatever the architecture."""
    from .blocks import find_blocks

    _, blocks = find_blocks(model)

    def first(h, *a, **k):
        return (final,) if as_tuple else final

    def rest(h, *a, **k):
        return (h,) if as_tuple else h

    for i, b in enumerate(blocks):
        b.forward = first if i == 0 else rest
    try:
        yield
    finally:
        for b in blocks:
            del b.forward



def final_hidden(model: nn.Module, batches: list[dict]):
    """The block engine run over every block: (inputs object whose `hidden` are the last block's outputs)."""
    box: dict = {}
    for _ in walk_blocks(model, batches, box=box):
        pass
    return box["inputs"]


@contextlib.contextmanager
def tail_of(model: nn.Module, final, j: int, rows: slice = slice(None)) -> Iterator[None]:
    """For one forward of batch j (its `rows`): the blocks replayed from the engine's final outputs `final` (a
    BlockInputs after the last block), so the model computes only what follows them (streamed models' head, final
    norm)."""
    from .blocks import find_blocks
    from .device import model_device

    if final.tuple_out is None:  # no block ran in this process (a resumed run): ask the last block its kind
        st = streamer_of(model)
        last = len(find_blocks(model)[1]) - 1
        with st.resident(last) if st is not None else contextlib.nullcontext(find_blocks(model)[1][last]) as block, \
                torch.no_grad():
            out = block(final.hidden[0].to(model_device(model)), *final.args[0], **final.kwargs[0])
        final.tuple_out = isinstance(out, (tuple, list))
    with replayed_blocks(model, final.hidden[j][rows].to(model_device(model)), final.tuple_out):
        yield


def window_of(batch: dict, w: int, size: int) -> dict:
    """Window (row) w of a batch of `size` windows: every tensor whose first dimension is the batch sliced to [w:w+1]."""
    return {k: v[w:w + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == size else v for k, v in batch.items()}


def streamed_window_outputs(model: nn.Module, batches: list[dict], **call_kwargs) -> Iterator[tuple[int, object]]:
    """model(**batch) for each batch of a streamed model, its blocks run block by block (one resident at a time)
    over all batches, then what follows them one window (row) at a time: (batch index, that window's output), in
    order. A head's logits are then one window's (a 4 × 512-token batch's 49152-wide logits are 0.4 GB)."""
    inputs = final_hidden(model, batches)
    for j, b in enumerate(batches):
        size = len(inputs.hidden[j])
        for w in range(size):
            with tail_of(model, inputs, j, rows=slice(w, w + 1)):
                yield j, model(**window_of(b, w, size), **call_kwargs)


def too_big(source: str, dtype: torch.dtype, dev: torch.device, max_memory: int | None) -> bool:
    """Whether the weights in `dtype` exceed `max_memory`, or (without one) 80% of the device's free memory."""
    need = weights_bytes(Path(source), dtype)
    return need is not None and exceeds(need, dev, max_memory, f"the weights need %.1f GiB in {dtype}")


def exceeds(need: int, dev: torch.device, max_memory: int | None, what: str = "the checkpoint holds %.1f GiB") -> bool:
    """Whether `need` bytes exceed `max_memory`, or (without one) 80% of the device's free memory (logged)."""
    if max_memory is None:
        if dev.type == "cuda":
            max_memory = int(0.8 * torch.cuda.mem_get_info(dev)[0])
        else:
            import psutil

            max_memory = int(0.8 * psutil.virtual_memory().available)
    if need > max_memory:
        logging.getLogger("hawqtool").info(what + ", more than %.1f GiB: streaming them block by block",
                                           need / 2**30, max_memory / 2**30)
        return True
    return False


def streamed_model(cls, config, source: str, dev: torch.device, dtype: torch.dtype, attn_implementation: str,
              trust_remote_code: bool) -> nn.Module:
    """A meta-built model whose blocks are read from `source`'s safetensors while they run (streaming.py)."""
    if trust_remote_code:
        raise UserError("--offload builds the model from its config; models with custom code load in memory only: "
                        "drop --offload/--max-memory")
    model = empty_model(cls, config, dtype, attn_implementation)
    model._hawq_streamer = Streamer(model, WeightSource(Path(source)), dev, dtype)
    return model
