"""minivar: LLaVA-1.5 in plain PyTorch, with Visual Attention Redistribution (VAR) built into its attention."""
from .errors import MinivarError

__all__ = ["MinivarError", "load"]


def load(*args, **kwargs):
    """See minivar.pipeline.load: resolve a checkpoint (local dir, hub id or "demo") and return a ready Pipeline."""
    from .pipeline import load as _load
    return _load(*args, **kwargs)
