"""Per-layer sensitivity: Hutchinson estimates of Hessian diagonal-block traces."""
from .hutchinson import LayerTrace, autograd_hvp, hutchinson_traces, mean_stderr
from .objectives import OBJECTIVES, Objective, get_objective, model_logits

__all__ = ["LayerTrace", "OBJECTIVES", "Objective", "autograd_hvp", "get_objective", "hutchinson_traces",
           "mean_stderr", "model_logits"]
