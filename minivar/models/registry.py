"""Model families, found by config.json's `model_type`.

A family is everything minivar needs to know about one kind of checkpoint: how to read its config, which module
to build, how its checkpoint names map onto that module's, how an image becomes pixels and tokens, which prompt
templates it speaks, and the sink dims VAR knows for it. Adding a family is one entry here and files of its own
under minivar/models/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import MinivarError


@dataclass(frozen=True)
class Family:
    model_type: str                        # config.json's model_type
    name: str                              # for messages and the README's model table
    config: Callable                       # (config.json dict, name_or_path) → config
    model: Callable                        # config → the nn.Module (built on the meta device by the loader)
    key_rules: tuple                       # (regex, replacement) pairs: checkpoint names → the module's
    unused_key: Callable                   # (normalised key, config) → True for tensors the model never reads
    images: Callable                       # (PIL image, config, image_aspect_ratio) → models.images.ImageInput
    conv_modes: tuple[str, ...]            # prompt templates (processing.py)
    default_conv_mode: str
    image_modes: tuple[str, ...] = ("pad", "crop")
    # massive-activation dims VAR knows: {name: ((hidden, layers, heads, intermediate), dims)}
    known_sink_dims: dict = field(default_factory=dict)
    has_cls: bool = True                   # the vision tower has a CLS token (DAMRO reads its attention)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def family_for(model_type: str, where: str = "") -> Family:
    """The family of a config.json's model_type, or one error naming it and what minivar reads."""
    _load_builtin()
    if model_type not in FAMILIES:
        raise MinivarError(f"config.json of '{where}' has model_type '{model_type}', minivar reads "
                           f"{', '.join(repr(t) for t in sorted(FAMILIES))}")
    return FAMILIES[model_type]


def family_of(cfg) -> Family:
    """The family of a loaded config (each config class names its model_type)."""
    return family_for(cfg.model_type, cfg.name_or_path)


def _load_builtin() -> None:
    # imported on first use: each family module registers itself (and this module stays free of model code)
    from . import llava  # noqa: F401
