"""Qwen3-VL and Qwen3-VL-MoE in the model-family registry (models/registry.py): config, model, key rules, the
experts' layout, images (Qwen2-VL's processor with 16-px patches: factor 32), the checkpoint's chat template."""
from __future__ import annotations

import torch

from ..family import Family
from ..qwen2_vl.family import qwen_image, qwen_view, with_pixels
from .demo import build_demo
from .model import Qwen3VL, Qwen3VLConfig
from .template import CONV_MODES, Qwen3Tokenizer

# Checkpoint names → the model's, in order. The hub's files and transformers 5.x's saves both name tensors
# model.language_model.* / model.visual.* / lm_head.*; files of an older layout (visual.*, model.layers.*) need none.
KEY_RULES = (
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
)


def is_unused_key(key: str, cfg: Qwen3VLConfig) -> bool:
    """Tensors a checkpoint may carry that the model never reads: rotary inverse-frequency buffers."""
    return key.endswith("inv_freq")


def convert_tensor(key: str, tensor: torch.Tensor, cfg: Qwen3VLConfig) -> torch.Tensor:
    """The MoE experts as moe.py keeps them ([E, 2·I, D], [E, D, I]): the hub's files store them transposed. As
    transformers decides (its check_dims): a tensor of the module's shape is taken as it is, one of the transposed
    shape is turned round."""
    if ".mlp.experts." not in key:
        return tensor
    t = cfg.text
    E, D, I = t.num_experts, t.hidden_size, t.moe_intermediate_size
    ours = (E, 2 * I, D) if key.endswith("gate_up_proj") else (E, D, I)
    hub = (E, ours[2], ours[1])
    if tuple(tensor.shape) != ours and tuple(tensor.shape) == hub:      # (a square one is taken as ours)
        return tensor.transpose(1, 2).contiguous()
    return tensor


FAMILIES = tuple(Family(
    model_type=model_type, name=name, config=Qwen3VLConfig.from_hf, model=Qwen3VL, key_rules=KEY_RULES,
    unused_key=is_unused_key, images=qwen_image, conv_modes=CONV_MODES, default_conv_mode="qwen3",
    image_modes=("smart_resize",), has_cls=False, tokenizer=Qwen3Tokenizer, image_options=with_pixels,
    tied=("lm_head.weight", "model.embed_tokens.weight"), view=qwen_view, convert=convert_tensor,
    vision_module="visual", decoder_modules=("model.layers", "lm_head"), demo=build_demo)
    for model_type, name in (("qwen3_vl", "Qwen3-VL"), ("qwen3_vl_moe", "Qwen3-VL-MoE")))
