"""Versioned JSON artifacts passed between stages, written atomically.

Each artifact is a dataclass with a `kind`, a `schema_version` and a `fingerprint` of the
inputs that produced it, so `hawqtool run` can skip a stage whose artifact is current.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SCHEMA_VERSION = 1


def tool_version() -> str:
    from . import __version__

    return __version__


def fingerprint(*parts: Any) -> str:
    """Stable sha256 over JSON-serialisable parts (plus the tool version)."""
    blob = json.dumps([tool_version(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def files_digest(paths) -> str:
    """sha256 over file names, sizes and contents (model weights, configs)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name in the same folder, then rename: never a half file. Temporaries of dead
    processes are cleaned first; on failure ours is removed (a full disk is a one-line UserError)."""
    from .outputs import clean_stale, write_error

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (err := write_error(e, path, len(text.encode("utf-8")))) is not e:
            raise err from e
        raise


@dataclass
class LayerSensitivity:
    """One layer's Hessian-trace estimate."""

    name: str
    shape: list[int]  # [out, in]
    n_params: int
    trace: float  # mean Hutchinson estimate of Tr(H_l)
    stderr: float
    probes: int
    samples: list[float] = field(default_factory=list)
    qerror: dict[str, float] = field(default_factory=dict)  # "bits/group/asym|sym" -> ‖Q(W)−W‖²
    top_eigenvalue: float | None = None  # power iteration on the layer's Hessian block (--eigen)
    eigen_iterations: int = 0


def qerror_key(bits: int, group_size: int, symmetric: bool, scale_bits: int = 16) -> str:
    """A sensitivity report's error-table key: "3/64/asym", and "3/64/asym/s6" with 6-bit scale codes."""
    return f"{bits}/{group_size}/{'sym' if symmetric else 'asym'}" + (f"/s{scale_bits}" if scale_bits != 16 else "")


_OMIT_NONE = {"omit_none": True}  # optional fields left out of the JSON when unset: older files stay the same
_NOT_SAVED = {"not_saved": True}  # timings of the run that made it: shown, never written (files older than this
# rule carry them and still load)


@dataclass
class SensitivityReport:
    """Output of the sensitivity stage."""

    model: str
    objective: str
    estimator: str
    settings: dict
    layers: list[LayerSensitivity]
    seconds: float = field(default=0.0, metadata=_NOT_SAVED)  # this run's: not in the file (same inputs, same bytes)
    fingerprint: str = ""
    convergence: dict = field(default_factory=dict)  # stop reason, major-layer rule, unconverged, negative
    kind: str = "sensitivity"
    schema_version: int = SCHEMA_VERSION


@dataclass
class LayerPlan:
    """Bits chosen for one layer and the numbers behind the choice."""

    name: str
    bits: int
    group_size: int
    symmetric: bool
    n_params: int
    storage_bytes: float
    omega: float  # predicted perturbation at the chosen bits
    omega_by_bits: dict[str, float] = field(default_factory=dict)  # by width, or by option label (w4g128a16)
    act_bits: int = 16  # 16: weight-only; 8: W8A8 (dynamic per-token int8 activations)
    ggml_type: str = ""  # a ggml block type (Q4_K, Q4_0, ...) instead of hawqtool's own grid ("")
    scale_bits: int = 16  # 16: fp16 group scales; 4..8: scale codes with one fp16 step per row (scale_codes.py)


def layer_records(layers: list[LayerPlan]) -> list[dict]:
    """Plan layers as fingerprinted by quantize: ggml_type and scale_bits only when set, so the fingerprints of
    plans without them stay as before."""
    return [{k: v for k, v in asdict(lp).items() if (k != "ggml_type" or v) and (k != "scale_bits" or v != 16)}
            for lp in layers]


@dataclass
class EmbeddingPlan:
    """The input embedding as a plan option (`--embed-bits`): b-bit codes with fp16 scales per row (group_size
    -1) or per group along the hidden size. A head tied to it (`tied_head`) is served by the same codes."""

    name: str  # module name of the input embedding, e.g. model.embed_tokens
    bits: int
    group_size: int  # -1: one scale per row (per token)
    symmetric: bool
    shape: list[int]  # [vocab, hidden]
    n_params: int
    storage_bytes: float  # codes + fp16 scales (+ b-bit zeros): the plan's accounting for linear layers too
    tied_head: str | None = None  # output head whose weight is this table (one copy of the codes serves both)
    in_budget: bool = False  # its bytes came out of a --max-bytes budget (--avg-bits is linear layers only)




@dataclass
class Plan:
    """Output of the allocate stage: per-layer bit widths under a budget."""

    model: str
    budget: dict  # {"kind": "avg_bits"|"bytes", "value": float, "max_bytes": float}
    bit_choices: list[int]
    group_size: int
    symmetric: bool
    layers: list[LayerPlan]
    avg_bits: float  # storage bits per weight, scales/zeros included
    total_bytes: float
    predicted_omega: float
    solve_seconds: float = field(default=0.0, metadata=_NOT_SAVED)  # this run's: not in the file
    sensitivity_fingerprint: str = ""
    fingerprint: str = ""
    costs: dict = field(default_factory=dict)  # achieved totals: bytes, bops (per token/image), latency_ms
    options: list = field(default_factory=list)  # option labels when more than one per width (or trace_ucb)
    trace_ucb: float = 0.0  # z of the pessimistic trace max(Tr,0)+z·s.e. used, 0 = the estimate itself
    kind: str = "plan"
    schema_version: int = SCHEMA_VERSION
    embedding: EmbeddingPlan | None = field(default=None, metadata=_OMIT_NONE)  # None: the embedding stays as is
    # predicted whole-file accounting of its checkpoint (sizes.predict_file), when made with the model at hand
    file: dict | None = field(default=None, metadata=_OMIT_NONE)

    def bits_of(self) -> dict[str, int]:
        return {lp.name: lp.bits for lp in self.layers}


_TYPES = {"sensitivity": (SensitivityReport, {"layers": LayerSensitivity}),
          "plan": (Plan, {"layers": LayerPlan})}


def save(obj, path: Path) -> None:
    """Write an artifact dataclass as pretty JSON, atomically."""
    d = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        if f.metadata.get("omit_none") and d.get(f.name) is None or f.metadata.get("not_saved"):
            del d[f.name]
    write_atomic(Path(path), json.dumps(d, indent=1))


def load(path: Path, kind: str):
    """Read an artifact of the given kind; one-line UserError if missing, corrupt or wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{kind} file {path} does not exist; create it with `hawqtool {_STAGE[kind]}`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({e.__class__.__name__}); re-create it with "
                        f"`hawqtool {_STAGE[kind]}`") from e
    if not isinstance(raw, dict) or raw.get("kind") != kind:
        raise UserError(f"{path} is not a {kind} file (kind={raw.get('kind') if isinstance(raw, dict) else None!r}); "
                        f"pass the output of `hawqtool {_STAGE[kind]}`")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path} has schema version {raw.get('schema_version')}, this hawqtool reads "
                        f"{SCHEMA_VERSION}; re-create it with `hawqtool {_STAGE[kind]}`")
    cls, nested = _TYPES[kind]
    try:
        for key, sub in nested.items():
            raw[key] = [sub(**x) for x in raw[key]]
        if kind == "plan" and raw.get("embedding") is not None:
            raw["embedding"] = EmbeddingPlan(**raw["embedding"])
        obj = cls(**raw)
    except (TypeError, KeyError) as e:
        raise UserError(f"{path} is a malformed {kind} file ({e}); re-create it with "
                        f"`hawqtool {_STAGE[kind]}`") from e
    from .artifact_checks import CHECKS

    CHECKS[kind](obj, path)  # values a stage could not use: one line naming the layer and field
    return obj


_STAGE = {"sensitivity": "sensitivity", "plan": "allocate"}
