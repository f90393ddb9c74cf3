"""minivar: small, readable vision-language models in plain PyTorch (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL),
with training-free attention methods (VAR, DAMRO, VCD) built into their attention."""
from .errors import MinivarError

from .defaults import DEFAULT_MODEL

__version__ = "0.1.0"        # the one place it is written: pyproject.toml reads it from here
__all__ = ["DEFAULT_MODEL", "MinivarError", "__version__", "load"]


def load(model: str = DEFAULT_MODEL, *, device: str = "auto", dtype="auto", weights_dir=None, image_options=None,
         contrastive: bool = False):
    """Resolve a checkpoint (a local directory, a hub id, or an offline demo: "demo" for LLaVA-1.5,
    "demo-<model_type>" for each other family), load it strictly and return a ready
    minivar.pipeline.Pipeline. device: auto | cpu | cuda; dtype: auto (fp16 on CUDA, bf16 on CPU) | float32 |
    float16 | bfloat16; image_options: the family's image settings (Qwen2-VL: min_pixels, max_pixels); contrastive:
    most calls will run DAMRO or VCD (on a CPU in bf16 the decoder's weights are then packed for their two-row
    steps, models/packed.py). (torch is imported here, on first use, so `import minivar` stays light.)"""
    from .pipeline import load as _load
    return _load(model, device=device, dtype=dtype, weights_dir=weights_dir, image_options=image_options,
                 contrastive=contrastive)
