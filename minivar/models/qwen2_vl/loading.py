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

from ...checkpoint import normalise_key as _normalise
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
    """Build the model on the meta device and assign the checkpoint's tensors into it, strictly (checkpoint.load_model
    with the family's key rules and tied head: every tensor used once, nothing missing, shapes as config.json says)."""
    from ...checkpoint import load_model
    return load_model(Path(directory), dtype, device, cfg or read_qwen2_vl_config(directory))
