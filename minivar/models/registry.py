"""Model families, found by config.json's `model_type`.

A family (models/family.py) is everything minivar needs to know about one kind of checkpoint: how to read its
config, which module to build, how its checkpoint names map onto that module's, how an image becomes pixels and
tokens, which prompt templates it speaks, and the sink dims VAR knows for it. Adding a family is files of its own
under minivar/models/ and one entry in the list below.
"""
from __future__ import annotations

from ..errors import MinivarError
from . import llava, llava_next
from .family import Family
from .internvl import family as internvl
from .qwen2_vl import family as qwen2_vl
from .qwen3_vl import family as qwen3_vl

FAMILIES: dict[str, Family] = {f.model_type: f for f in (llava.FAMILY, llava_next.FAMILY, *qwen2_vl.FAMILIES,
                                                         *qwen3_vl.FAMILIES, internvl.FAMILY)}
# model_types minivar refuses with a message of their own: (config.json dict, where) → the message
REFUSED = {"internvl_chat": internvl.remote_code_message}


def family_for(model_type: str, where: str = "", config: dict | None = None) -> Family:
    """The family of a config.json's model_type, or one error naming it and what minivar reads."""
    if model_type in REFUSED:
        raise MinivarError(REFUSED[model_type](config or {}, where))
    if model_type not in FAMILIES:
        raise MinivarError(f"config.json of '{where}' has model_type '{model_type}', minivar reads "
                           f"{', '.join(repr(t) for t in sorted(FAMILIES))}")
    return FAMILIES[model_type]


def family_of(cfg) -> Family:
    """The family of a loaded config (each config class names its model_type)."""
    return family_for(cfg.model_type, cfg.name_or_path)
