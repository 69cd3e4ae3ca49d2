"""The sensitivity report's settings, fingerprint, convergence summary and measured ‖Q(W)−W‖²: what
`compute_sensitivity` records and `hawqtool run` recomputes to decide whether the stage is current."""
from __future__ import annotations

import torch

from ..artifacts import LayerSensitivity, fingerprint, qerror_key
from ..quantize.quantizer import QuantSpec
from .ggn import GGN_OBJECTIVES


def convergence_summary(info: dict, layers: list[LayerSensitivity]) -> dict:
    """Why probing stopped, the major layers that did not reach the target, and the layers whose
    trace estimate is negative (a PSD objective's true trace is ≥ 0: noise), with 95% intervals."""
    negative = {ls.name: [ls.trace - 1.96 * ls.stderr, ls.trace + 1.96 * ls.stderr]
                for ls in layers if ls.trace < 0}
    return {**info, "negative": negative}


def sensitivity_settings(*, objective: str, batch_size: int, qerror_bits, qerror_groups, n_samples: int,
                         seqlen: int, target_rel_se: float, min_probes: int, max_probes: int, seed: int,
                         estimator: str = "hutchinson", first_token_weight: float = 1.0,
                         qerror_sym: tuple[bool, ...] = (False, True), qerror_formats: tuple[str, ...] = (),
                         qerror_scale_bits: int = 16) -> dict:
    """The options a sensitivity report depends on (recorded in it and fingerprinted)."""
    settings = dict(objective=objective, batch_size=batch_size, qerror_bits=list(qerror_bits),
                    qerror_groups=list(qerror_groups), n_samples=n_samples, seqlen=seqlen,
                    target_rel_se=target_rel_se, min_probes=min_probes, max_probes=max_probes, seed=seed,
                    qerror={"grid": "search", "weights": "input second moments",
                            "first_token_weight": first_token_weight})
    if tuple(qerror_sym) != (False, True):  # only then: both kinds is what `hawqtool sensitivity` records
        settings["qerror_sym"] = list(qerror_sym)
    if qerror_formats:  # ggml types measured too (allocate --formats); absent otherwise, as before
        settings["qerror_formats"] = list(qerror_formats)
    if qerror_scale_bits != 16:  # scale codes measured too; absent otherwise, as before
        settings["qerror_scale_bits"] = qerror_scale_bits
    if estimator != "hutchinson":  # only then, so existing hutchinson fingerprints stay valid
        settings["estimator"] = estimator
    return settings


def options_settings(opts, *, n_samples: int, seqlen: int, seed: int) -> dict:
    """sensitivity_settings of a SensitivityOptions (options.py) run on n_samples × seqlen tokens."""
    return sensitivity_settings(objective=opts.objective, batch_size=opts.batch_size, qerror_bits=opts.bits,
                                qerror_groups=opts.groups(), n_samples=n_samples, seqlen=seqlen,
                                target_rel_se=opts.target_rel_se, min_probes=opts.min_probes,
                                max_probes=opts.max_probes, seed=seed, estimator=opts.resolved_estimator(),
                                first_token_weight=opts.first_token_weight, qerror_sym=tuple(opts.sym),
                                qerror_formats=tuple(opts.formats),
                                # per-channel layers have one scale per row: no codes to record
                                qerror_scale_bits=opts.scale_bits if any(g > 0 for g in opts.groups()) else 16)


def sensitivity_fingerprint(model_fp: str, data_key: str, settings: dict) -> str:
    """Fingerprint of a sensitivity report: what `hawqtool run` compares to skip the stage."""
    return fingerprint("sensitivity", model_fp, data_key, settings)


ESTIMATORS = ("hutchinson", "fisher")


def _qerrors(W: torch.Tensor, bits: tuple[int, ...], groups: tuple[int, ...],
             d: torch.Tensor | None = None, syms: tuple[bool, ...] = (False, True),
             formats: tuple[str, ...] = (), scale_bits: int = 16) -> dict[str, float]:
    """Importance-weighted ‖Q(W)−W‖² (quantize/importance.py) of the searched grid, per option; for ggml types
    (`formats`) on the type's own grid, where its blocks tile W's rows. `scale_bits` 4..8: also each grouped
    option with scale codes (where they save bytes), priced as its fp16 error times what the codes add
    (scale_codes.added_error), so `allocate` needs no model for them."""
    from ..quantize.importance import weighted_quant_error
    from ..quantize.scale_codes import added_error

    out = {}
    for b in bits:
        for g in groups:
            for sym in syms:
                out[qerror_key(b, g, sym)] = fp16 = weighted_quant_error(W, QuantSpec(b, g, sym), d)
                coded = QuantSpec(b, g, sym, scale_bits=scale_bits if g != -1 else 16).for_rows(W.shape[1])
                if coded.scale_bits != 16:
                    out[coded.key] = fp16 * added_error(W, coded)
    for f in formats:
        spec = QuantSpec.for_ggml(f)
        if spec.ggml.fits(W.shape[1]):
            out[spec.key] = weighted_quant_error(W, spec, d)
    return out


def hvp_for(objective: str) -> str:
    """Exact Gauss-Newton products where the objective is measured at the model's own point
    (self-kl, output-mse: identical to the Hessian there, 1.6× cheaper on SmolLM2), autograd otherwise."""
    return "ggn" if objective in GGN_OBJECTIVES else "autograd"
