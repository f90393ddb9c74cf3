"""Qwen3-VL / Qwen3-VL-MoE: vision tower (patches → merged 2×2 tokens, plus DeepStack features) → spliced into the
Qwen3 decoder's input embeddings at the `<|image_pad|>` tokens → interleaved-M-RoPE decoder, the DeepStack features
added at those tokens after its first layers → logits.

The model is Qwen2-VL's (qwen2_vl/model.py: positions, rope deltas kept in the cache, padding, forward) with the
Qwen3 pieces: so everything that runs Qwen2-VL (generation, batches, shared prefixes, the methods) runs this.
An image's features are [N, 1 + K, D] here: row 0 of each token is its input embedding (the merger's output), rows
1 … K its DeepStack features for decoder layers 0 … K−1 — carried together wherever features travel (a chunk of a
prompt, a contrast branch, a shared prefix), so a token's DeepStack always comes with it.

Module names are Qwen2-VL's (`visual.*`, `model.*`, `lm_head`); the key rules (family.py) map the checkpoints'
`model.visual.*` and `model.language_model.*` onto them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...errors import MinivarError
from ..config import _fill
from ..qwen2_vl.model import Qwen2VL, Qwen2VLConfig, read_image_config
from ..qwen2_vl.processing import QwenImageConfig
from .config import Qwen3TextConfig, Qwen3VisionConfig
from .decoder import Qwen3Model
from .vision import Qwen3VisionTransformer

MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
# transformers' Qwen3VLMoeTextConfig defaults (where they differ from the dense Qwen3VLTextConfig's)
MOE_TEXT_DEFAULTS = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "num_key_value_heads": 16, "head_dim": None, "num_experts": 60, "num_experts_per_tok": 4,
                     "moe_intermediate_size": 1408}
# The Qwen3-VL checkpoints' preprocessor_config.json (16-px patches, mean/std 0.5, 256² … 4096² pixels): what an
# image becomes when a checkpoint directory carries none (transformers would have no processor at all).
QWEN3_IMAGE = QwenImageConfig(min_pixels=65536, max_pixels=16777216, patch_size=16, image_mean=(0.5, 0.5, 0.5),
                              image_std=(0.5, 0.5, 0.5))


@dataclass(frozen=True)
class Qwen3VLConfig(Qwen2VLConfig):
    """Qwen2VLConfig's fields with the Qwen3 tower and decoder configs (vision: Qwen3VisionConfig, text:
    Qwen3TextConfig; num_experts > 0 for the MoE)."""

    @property
    def is_moe(self) -> bool:
        return self.text.num_experts > 0

    @staticmethod
    def from_hf(d: dict, name_or_path: str = "") -> "Qwen3VLConfig":
        """config.json → config: the hub's files (rope_scaling + rope_theta in text_config, `num_experts`) and
        transformers 5.x's (rope_parameters, `num_local_experts`), filled as transformers fills them. Tying is
        the top level's `tie_word_embeddings` (default false), as transformers 5.x decides it. The directory's
        preprocessor_config.json (if any) gives `image`."""
        where = f"config.json of '{name_or_path}'"
        if not isinstance(d, dict):
            raise MinivarError(f"{where} is not a JSON object")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise MinivarError(f"{where} has model_type '{model_type}', expected one of {', '.join(MODEL_TYPES)}")
        for key in ("vision_config", "text_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise MinivarError(f"{where}: {key} is not a JSON object")
        text_d = dict(MOE_TEXT_DEFAULTS if model_type == "qwen3_vl_moe" else {}) | dict(d.get("text_config") or {})
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise MinivarError(f"{where}: rope_parameters / rope_scaling is not a JSON object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise MinivarError(f"{where}: rope type '{rope_type}' is not supported (Qwen3-VL uses 'default')")
        if "rope_theta" in rope:
            text_d["rope_theta"] = rope["rope_theta"]
        text_d["mrope_section"] = tuple(int(n) for n in rope.get("mrope_section", (24, 20, 20)))
        if "num_local_experts" in text_d:                       # transformers 5.x writes num_experts under this name
            text_d["num_experts"] = text_d.pop("num_local_experts")
        if model_type == "qwen3_vl":
            text_d["num_experts"] = 0                            # the dense model has no experts, whatever it says
        text_d["mlp_only_layers"] = tuple(int(i) for i in text_d.get("mlp_only_layers") or ())
        eos = text_d.get("eos_token_id")
        if isinstance(eos, list):
            text_d["eos_token_id"] = tuple(eos)
        text_d["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False))
        text_d["head_dim_"] = text_d.pop("head_dim", None)
        if text_d["head_dim_"] is None and model_type == "qwen3_vl":
            text_d.pop("head_dim_")                              # the dense default: 128
        text = _fill(Qwen3TextConfig, text_d, {})
        check_text(text, where)
        vision = Qwen3VisionConfig.from_hf(d.get("vision_config"), name_or_path)
        if vision.out_dim != text.hidden_size:
            raise MinivarError(f"{where}: the vision merger's output width {vision.out_dim} is not the decoder's "
                               f"hidden_size {text.hidden_size}")
        image = read_image_config(name_or_path, QWEN3_IMAGE)
        for ours, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                             ("temporal_patch_size", "temporal_patch_size")):
            if getattr(image, ours) != getattr(vision, theirs):
                raise MinivarError(f"preprocessor_config.json of '{name_or_path}': {ours} {getattr(image, ours)} is "
                                   f"not the vision tower's {theirs} {getattr(vision, theirs)}")
        ids = {k: int(d[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id") if d.get(k) is not None}
        return Qwen3VLConfig(model_type=model_type, vision=vision, text=text, **ids,
                             torch_dtype=d.get("dtype") or d.get("torch_dtype") or text_d.get("dtype"),
                             name_or_path=name_or_path, image=image)


def check_text(text: Qwen3TextConfig, where: str) -> None:
    if text.hidden_act != "silu":
        raise MinivarError(f"{where}: text hidden_act '{text.hidden_act}' is not supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "n_kv_heads", "head_dim", "vocab_size"):
        if not isinstance(getattr(text, key), int) or getattr(text, key) < 1:
            raise MinivarError(f"{where}: text_config {key} must be a positive integer, got {getattr(text, key)!r}")
    if text.num_attention_heads % text.n_kv_heads:
        raise MinivarError(f"{where}: num_attention_heads {text.num_attention_heads} is not a multiple of "
                           f"num_key_value_heads {text.n_kv_heads}")
    if text.head_dim % 2:
        raise MinivarError(f"{where}: head_dim {text.head_dim} must be even (rotate-half rotary)")
    if text.num_experts:
        if not 1 <= text.num_experts_per_tok <= text.num_experts:
            raise MinivarError(f"{where}: num_experts_per_tok {text.num_experts_per_tok} must be in 1 … "
                               f"num_experts {text.num_experts}")
        if text.moe_intermediate_size < 1 or text.decoder_sparse_step < 1:
            raise MinivarError(f"{where}: moe_intermediate_size and decoder_sparse_step must be positive")


class Qwen3VL(Qwen2VL):
    """The whole model: Qwen3-VL's ViT with DeepStack, the Qwen3 (or Qwen3-MoE) decoder, lm_head (tied to the
    embedding where config.json says so: the 2B/4B)."""

    def __init__(self, cfg: Qwen3VLConfig, vision: bool = True):
        nn.Module.__init__(self)            # Qwen2VL's attributes, built of the Qwen3 parts
        self.config = cfg
        if vision:   # vision=False: the decoder alone, for callers that bring their own image features
            self.visual = Qwen3VisionTransformer(cfg.vision)
        self.model = Qwen3Model(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def image_features(self, images) -> list[torch.Tensor]:
        """ImageInputs → one [N_i, 1 + K, D_text] tensor per image: each merged token's input embedding (row 0) and
        its K DeepStack features (rows 1 … K, for decoder layers 0 … K−1)."""
        if not images:
            return []
        pixels = torch.cat([im.pixel_values for im in images]).to(self.lm_head.weight.device)
        grids = [tuple(int(x) for x in im.meta["grid_thw"]) for im in images]
        merged, deepstack = self.visual(pixels, grids)                     # [ΣN, D], [K, ΣN, D]
        rows = torch.cat([merged[:, None], deepstack.transpose(0, 1)], dim=1)
        m2 = self.config.spatial_merge_size ** 2
        return list(rows.split([t * h * w // m2 for t, h, w in grids]))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the image-token rows replaced, in order, by row 0 of image_features."""
        if image_features is not None:
            image_features = stacked(image_features)[:, 0]
        return super().embed(input_ids, image_features)

    def decoder_inputs(self, input_ids: torch.Tensor, image_features) -> dict:
        """DeepStack: the call's image-token mask and their features [K, N, D] (the decoder adds them)."""
        if image_features is None:
            return {}
        deepstack = stacked(image_features)[:, 1:].transpose(0, 1)
        return {"deepstack": (self.image_positions(input_ids), deepstack)} if deepstack.shape[0] else {}


def stacked(image_features: torch.Tensor) -> torch.Tensor:
    """Image feature rows as Qwen3VL.image_features gives them, [N, 1 + K, D]; anything else is one error."""
    if image_features.dim() != 3:
        raise MinivarError(f"Qwen3-VL image features are [N, 1 + DeepStack levels, D] (model.image_features), got "
                           f"shape {tuple(image_features.shape)}")
    return image_features
