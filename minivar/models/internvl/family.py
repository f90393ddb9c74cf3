"""InternVL3 / InternVL3.5 (transformers' `internvl`) in the model-family registry (models/registry.py), and the
one-line refusal of the original remote-code checkpoints (`internvl_chat`)."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ...errors import MinivarError
from ..family import Family
from ..llava import KEY_RULES
from .config import InternVLConfig
from .demo import build_demo
from .model import InternVL
from .processing import preprocess_image, views
from .template import CONV_MODES, InternVLTokenizer

IMAGE_MODES = ("tiles",)            # the one way InternVL sees an image: dynamic tiles + thumbnail

# the transformers-format repos (the -hf / -HF suffix is each repo's own spelling)
CHECKPOINTS = ("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-2B-hf", "OpenGVLab/InternVL3-8B-hf",
               "OpenGVLab/InternVL3-14B-hf", "OpenGVLab/InternVL3_5-1B-HF", "OpenGVLab/InternVL3_5-2B-HF",
               "OpenGVLab/InternVL3_5-4B-HF", "OpenGVLab/InternVL3_5-8B-HF")


def is_unused_key(key: str, cfg: InternVLConfig) -> bool:
    """Tensors a checkpoint carries that the model never reads: vision layers past the feature layer, rotary
    buffers."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    m = re.match(r"vision_tower\.encoder\.layer\.(\d+)\.", key)
    return bool(m) and cfg.vision_layers_used <= int(m.group(1)) < cfg.vision.num_hidden_layers


def internvl_image(img, cfg: InternVLConfig, image_aspect_ratio: str | None = "tiles"):
    """A PIL image → ImageInput: the tiles (and thumbnail) of the checkpoint's tiling, 256 tokens each."""
    if image_aspect_ratio not in (None, *IMAGE_MODES):
        raise MinivarError(f"`image_aspect_ratio` '{image_aspect_ratio}' is not one of InternVL's image modes "
                           f"({', '.join(IMAGE_MODES)})")
    return preprocess_image(img, cfg.image, cfg.vision.grid // cfg.shuffle)


def internvl_view(img, cfg: InternVLConfig, image_aspect_ratio, image_input) -> tuple:
    """Family.view: each tile's 448×448 pixels, then the thumbnail's (one 16×16 token panel each)."""
    return tuple(views(img, cfg.image))


def with_patches(cfg: InternVLConfig, max_patches: int | None = None) -> InternVLConfig:
    """The config with the user's tile cap (--max-patches), checked; a cap below the file's min_patches lowers it."""
    if max_patches is None:
        return cfg
    if isinstance(max_patches, bool) or not isinstance(max_patches, int) or max_patches < 1:
        raise MinivarError(f"`max_patches` must be a positive integer, got {max_patches!r}")
    return replace(cfg, image=cfg.image.with_patches(max_patches, min(cfg.image.min_patches, max_patches)))


def remote_code_message(d: dict, where: str) -> str:
    """The refusal of an original InternVL checkpoint (model_type internvl_chat, remote code): which -hf repo to use."""
    source = Path(where) / ".hub-id"
    name = (source.read_text().strip() if source.is_file() else str(where)).rstrip("/").split("/")[-1]
    m = re.match(r"(?i)internvl(\d(?:[._]\d)?)-(\d+B)", name)
    version, size = (m.group(1).replace(".", "_"), m.group(2).upper()) if m else ("", "")
    if version == "3" and f"OpenGVLab/InternVL3-{size}-hf" in CHECKPOINTS:
        use = f"OpenGVLab/InternVL3-{size}-hf"
    elif version == "3_5" and f"OpenGVLab/InternVL3_5-{size}-HF" in CHECKPOINTS:
        use = f"OpenGVLab/InternVL3_5-{size}-HF"
    else:       # InternVL2 / 2.5 and other sizes have no transformers-format repo minivar knows: the nearest current
        use = f"OpenGVLab/InternVL3-{size}-hf" if f"OpenGVLab/InternVL3-{size}-hf" in CHECKPOINTS else \
            "OpenGVLab/InternVL3-8B-hf"
    return (f"'{where}' is an original InternVL checkpoint (model_type 'internvl_chat', remote code); minivar reads "
            f"transformers' format: use {use}")


FAMILY = Family(
    model_type="internvl", name="InternVL", config=InternVLConfig.from_hf, model=InternVL, key_rules=KEY_RULES,
    unused_key=is_unused_key, images=internvl_image, conv_modes=CONV_MODES, default_conv_mode="internvl",
    image_modes=IMAGE_MODES, has_cls=True, tokenizer=InternVLTokenizer, image_options=with_patches,
    view=internvl_view, demo=build_demo)
