"""Read and strictly load Qwen2-VL / Qwen2.5-VL safetensors checkpoints (checkpoint.py's readers, Qwen's key rules).

Layouts met: the hub's (`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `visual.*`, `lm_head.weight`;
also what transformers 5.x's save_pretrained writes) and transformers 5.x's in-memory names
(`model.language_model.*`, `model.visual.*`, `lm_head.weight`). The 2B/3B checkpoints tie lm_head to the embedding
and store no `lm_head.weight`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...checkpoint import normalise_key as _normalise, read_state_dict
from ...errors import MinivarError
from . import family  # noqa: F401  (registers the two families: read_state_dict finds their key rules there)
from .family import KEY_RULES
from .model import Qwen2VL, Qwen2VLConfig


def normalise_key(key: str) -> str:
    """A checkpoint's tensor name → the model's (the hub's names), by KEY_RULES."""
    return _normalise(key, KEY_RULES)


def read_qwen2_vl_config(directory: Path) -> Qwen2VLConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MinivarError(f"'{path}' not found: a checkpoint directory needs config.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinivarError(f"'{path}' is not valid JSON ({e})") from None
    return Qwen2VLConfig.from_hf(d, name_or_path=str(directory))


def load_qwen2_vl(directory: Path, dtype: torch.dtype = torch.float32, device="cpu",
                  cfg: Qwen2VLConfig | None = None) -> Qwen2VL:
    """Build the model on the meta device and assign the checkpoint's tensors into it, strictly: every tensor
    used once, nothing missing, every shape as config.json implies."""
    directory = Path(directory)
    cfg = cfg or read_qwen2_vl_config(directory)
    with torch.device("meta"):
        model = Qwen2VL(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = read_state_dict(directory, cfg, dtype, device)       # by the family's KEY_RULES (family.py)
    if "lm_head.weight" not in state and cfg.text.tie_word_embeddings:
        # a tied checkpoint stores the shared matrix once, as the embedding (Qwen2-VL-2B, Qwen2.5-VL-3B)
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    for key in state:
        if key not in expected:
            raise MinivarError(f"unexpected tensor '{key}' in '{directory}' (not part of a {cfg.model_type} model "
                               f"with this config)")
    for key, shape in expected.items():
        if state.get(key) is None:
            raise MinivarError(f"tensor '{key}' is missing from the checkpoint in '{directory}'")
        if state[key].shape != shape:
            raise MinivarError(f"tensor '{key}' in '{directory}' has shape {tuple(state[key].shape)}, "
                               f"config.json implies {tuple(shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
