"""Which sink dims VAR reads: the user's list, the dims a family knows for its checkpoints (LLaVA-1.5-7B/13B), or
the massive-activation dims found on the model itself (Sun et al. 2024, "Massive Activations in Large Language
Models") for a model whose dims are unknown.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import MinivarError
from .hooks import Hook


def known_sink_dims(cfg) -> tuple[str, tuple[int, ...]] | None:
    """Recognise a model whose sink dims its family knows (LLaVA-1.5-7B/13B) by name or by exact decoder shape;
    None for anything else."""
    from ..models.registry import family_of
    t = cfg.text
    shape = (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size)
    name = cfg.name_or_path.lower()
    for key, (known_shape, dims) in family_of(cfg).known_sink_dims.items():
        if shape == known_shape and (key in name or t.vocab_size in (32000, 32064)):
            return key, dims
    return None


@torch.inference_mode()
def find_sink_dims(model, input_ids: torch.Tensor, ratio: float = 100.0) -> tuple[tuple[int, ...], dict]:
    """Massive-activation dims (Sun et al. 2024): dims where the first token's residual stream is ≥ `ratio` × its
    median magnitude in at least half of the middle layers. Runs the decoder on the text tokens of `input_ids`."""
    text_ids = input_ids[:1][~model.image_positions(input_ids[:1])][None]             # [1, T_text]
    n_layers = model.config.text.num_hidden_layers
    lo = max(1, n_layers // 4) if n_layers > 1 else 0
    hi = max(lo + 1, (3 * n_layers) // 4)
    middle = range(lo, min(hi, n_layers))
    recorder = _ResidualRecorder(set(middle))
    model(text_ids, hooks=recorder, output="hidden")
    votes: dict[int, int] = {}
    for layer in middle:
        first = recorder.residuals[layer][0, 0].float().abs()                            # BOS  [D]
        massive = torch.nonzero(first >= ratio * first.median().clamp_min(1e-12)).flatten().tolist()
        for d in massive:
            votes[d] = votes.get(d, 0) + 1
    dims = tuple(sorted(d for d, v in votes.items() if v * 2 >= len(middle)))
    return dims, {"middle_layers": [middle.start, middle.stop], "votes": votes}


class _ResidualRecorder(Hook):
    """A minimal hook that keeps the residual input of some layers (the finder's only need)."""

    def __init__(self, layers: set[int]):
        self.layers, self.residuals = layers, {}

    def residual(self, layer, h, rows):
        if layer in self.layers:
            self.residuals[layer] = h.detach()


def resolve_sink_dims(model_cfg, var_cfg: "VARConfig", model=None, input_ids=None, warn=None):
    """Which sink dims to use, and where they came from: the user's list, the known table, or the finder.
    warn(message): where the finder's notes go (the command lines print them; default: a Python warning)."""
    warn = warn or (lambda msg: warnings.warn(msg.removeprefix("minivar: "), stacklevel=4))
    if var_cfg.sink_dims is not None:
        return var_cfg.sink_dims, "user"
    if not var_cfg.find_sink_dims:
        known = known_sink_dims(model_cfg)
        if known is not None:
            return known[1], f"known:{known[0]}"
    if model is None or input_ids is None:
        raise MinivarError("sink dims are unknown for this model; pass --sink-dims d1,d2 or --sink-dims auto")
    dims, _ = find_sink_dims(model, input_ids)
    if not var_cfg.find_sink_dims:
        from ..models.registry import family_of
        known = ", ".join(family_of(model_cfg).known_sink_dims) or f"none for {family_of(model_cfg).name}"
        again = f" (--sink-dims {','.join(map(str, dims))} passes them without the finder)" if dims else ""
        warn(f"minivar: model not recognised as one whose sink dims are known ({known}); sink-dim finder found "
             f"dims {list(dims)}{again}")
    else:
        warn(f"minivar: sink-dim finder found dims {list(dims)}")
    if not dims:
        warn("minivar: no sink dims found, so no token counts as a visual sink")
    return dims, "finder"
