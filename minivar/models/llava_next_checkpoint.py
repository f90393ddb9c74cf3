"""Loading LLaVA-NeXT checkpoints: llava-hf's hub layout and transformers 5.x's, through checkpoint.py's readers.

Layouts met (each normalised onto LlavaNext's names): the hub's `language_model.model.*`,
`language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`; 5.x
in memory `model.language_model.*`, `lm_head.weight`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
`model.image_newline`; 5.x save_pretrained: the hub's names with `vision_tower.*` lacking `vision_model.`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint
from ..errors import MinivarError
from .llava_next import LlavaNext, LlavaNextConfig

# LLaVA-1.5's rules cover every prefix but the newline's
KEY_RULES = [(r"^model\.image_newline$", "image_newline")] + checkpoint.KEY_RULES


def normalise_key(key: str) -> str:
    return checkpoint.normalise_key(key, KEY_RULES)


def is_unused_key(key: str, cfg: LlavaNextConfig) -> bool:
    """What a llava-hf NeXT checkpoint carries that the model never reads: the same tensors as LLaVA-1.5's."""
    return checkpoint.is_unused_key(key, cfg)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinivarError(f"'{path}' is not valid JSON ({e})") from None


def read_llava_next_config(directory) -> LlavaNextConfig:
    """config.json, with the image settings of preprocessor_config.json when the directory has one."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise MinivarError(f"'{path}' not found: a checkpoint directory needs config.json")
    pre_path = directory / "preprocessor_config.json"
    pre = _read_json(pre_path) if pre_path.is_file() else None
    return LlavaNextConfig.from_hf(_read_json(path), name_or_path=str(directory), preprocessor=pre)


def load_llava_next(directory, dtype: torch.dtype = torch.float32, device="cpu",
                    cfg: LlavaNextConfig | None = None) -> LlavaNext:
    """The model, strictly: every tensor used once, none missing (image_newline included), shapes as the config."""
    directory = Path(directory)
    cfg = cfg or read_llava_next_config(directory)
    return checkpoint.load_model(directory, dtype, device, cfg, model_class=LlavaNext, rules=KEY_RULES,
                                 unused=is_unused_key)
