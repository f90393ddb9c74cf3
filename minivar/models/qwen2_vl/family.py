"""Qwen2-VL and Qwen2.5-VL in the model-family registry (models/registry.py): config, model, key rules, images,
the `qwen` template. One entry per config.json model_type; both share everything but the vision tower."""
from __future__ import annotations

from ...errors import MinivarError
from ..family import Family
from .demo import build_demo
from .model import Qwen2VL, Qwen2VLConfig
from .processing import AspectRatioError, preprocess_image
from .template import QwenTokenizer

# Checkpoint names → the model's (the hub's), applied in order; each is (pattern, replacement).
KEY_RULES = (
    (r"^model\.language_model\.", "model."),        # transformers 5.x in-memory: model.language_model.layers...
    (r"^model\.visual\.", "visual."),                # transformers 5.x in-memory
)
IMAGE_MODES = ("smart_resize",)                     # the one way these models see an image
# config.json's model_type → the family's name (Qwen3-VL's family uses qwen_image too)
NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE"}


def is_unused_key(key: str, cfg: Qwen2VLConfig) -> bool:
    """Tensors a checkpoint may carry that the model never reads: rotary inverse-frequency buffers."""
    return key.endswith("inv_freq")


def qwen_image(img, cfg: Qwen2VLConfig, image_aspect_ratio: str | None = "smart_resize"):
    """A PIL image → ImageInput: smart_resize within the checkpoint's min/max pixels, flattened patches."""
    if image_aspect_ratio not in (None, *IMAGE_MODES):
        raise MinivarError(f"`image_aspect_ratio` '{image_aspect_ratio}' is not one of {NAMES[cfg.model_type]}'s "
                           f"image modes ({', '.join(IMAGE_MODES)})")
    try:
        return preprocess_image(img, cfg.image)
    except AspectRatioError as e:            # smart_resize's refusal, said for the family at hand
        raise AspectRatioError(e.width, e.height, f"{NAMES[cfg.model_type]} takes") from None


def qwen_view(img, cfg: Qwen2VLConfig, image_aspect_ratio, image_input) -> tuple:
    """Family.view: the smart_resized image the merged-patch grid covers (one merged token = 28×28 px)."""
    from .processing import model_image
    return (model_image(img, cfg.image),)


def with_pixels(cfg: Qwen2VLConfig, min_pixels: int | None = None, max_pixels: int | None = None) -> Qwen2VLConfig:
    """The config with the user's pixel bounds (--min-pixels / --max-pixels), checked."""
    from dataclasses import replace
    return replace(cfg, image=cfg.image.with_pixels(min_pixels, max_pixels))


# one entry per config.json model_type; the two share everything but the vision tower (the config picks it)
FAMILIES = tuple(Family(
    model_type=model_type, name=name, config=Qwen2VLConfig.from_hf, model=Qwen2VL, key_rules=KEY_RULES,
    unused_key=is_unused_key, images=qwen_image, conv_modes=("qwen",), default_conv_mode="qwen",
    image_modes=IMAGE_MODES, has_cls=False, tokenizer=QwenTokenizer, image_options=with_pixels,
    tied=("lm_head.weight", "model.embed_tokens.weight"), view=qwen_view,
    vision_module="visual", decoder_modules=("model.layers", "lm_head"), demo=build_demo)
    for model_type, name in NAMES.items())
