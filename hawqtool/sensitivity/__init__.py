"""Per-layer sensitivity: Hutchinson (Hessian-vector) or sampled-label Fisher estimates of
Hessian diagonal-block traces."""
from .fisher import fisher_traces
from .hutchinson import LayerTrace, autograd_hvp, hutchinson_traces, mean_stderr
from .objectives import OBJECTIVES, Objective, get_objective, model_logits

__all__ = ["LayerTrace", "OBJECTIVES", "Objective", "autograd_hvp", "fisher_traces", "get_objective",
           "hutchinson_traces", "mean_stderr", "model_logits"]
