"""LLaVA-1.5: CLIP features → 2-layer GELU projector → spliced into the LLaMA input embeddings → logits.

Module names equal the HF checkpoint names after the loader's normalisation (`vision_tower.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clip import CLIPVisionTower
from .config import LlavaConfig
from .images import ImageInput, square_image
from ..errors import MinivarError
from ..methods.hooks import as_hooks
from .llama import KVCache, LlamaForCausalLM, causal_mask
from .demo import build_llava
from .family import Family


class LlavaMultiModalProjector(nn.Module):
    """Maps CLIP features into the decoder's embedding space: linear → GELU → linear."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        n_in = cfg.vision.hidden_size * (len(cfg.vision_feature_layer) if isinstance(cfg.vision_feature_layer, tuple) else 1)
        self.linear_1 = nn.Linear(n_in, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))   # exact (erf) GELU, "gelu" in the config


class Llava(nn.Module):
    """The whole model: vision tower, projector, decoder with its lm_head."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.vision_layers_used)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.language_model = LlamaForCausalLM(cfg.text)

    def image_inputs(self, pixel_values: torch.Tensor) -> list[ImageInput]:
        """Square pixel values [B, 3, S, S] (processing.preprocess) → one ImageInput per image."""
        cfg = self.config
        grid = cfg.vision.image_size // cfg.vision.patch_size
        return [square_image(px, grid, cls=cfg.vision_feature_select_strategy == "full") for px in pixel_values]

    def image_features(self, images) -> list[torch.Tensor]:
        """Images (a list of ImageInput, or pixels [B, 3, S, S]) → projected features, one [N, D_text] per image
        (N = 576 patches for CLIP-L/14 at 336 px). LLaVA-1.5's images all have one size: one tower call for all."""
        images = self.image_inputs(images) if isinstance(images, torch.Tensor) else images
        pixel_values = torch.stack([im.pixel_values for im in images])
        indices = self.config.feature_indices          # hidden_states[-2] in HF terms, as an index into ours
        hidden_states = self.vision_tower(pixel_values, keep=indices)
        picked = [hidden_states[k] for k in indices]
        if self.config.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]   # drop CLS: LLaVA feeds only the 576 patch tokens
        feats = picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
        return list(self.multi_modal_projector(feats.to(self.multi_modal_projector.linear_1.weight.dtype)))

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: where the image tokens sit (VAR's image span I, the pictures' patches)."""
        return input_ids == self.config.image_token_index

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the image-token positions replaced, in order, by the feature rows
        `image_features` [N, D] (exactly as many rows as this call has image tokens)."""
        cfg = self.config
        if image_features is None:
            # no image in this call (a decode step): every id is an ordinary row, even 32000 if the model emits it
            return self.language_model.model.embed_tokens(input_ids)
        is_image = self.image_positions(input_ids)
        # image ids (32000) lie inside the 32064-row table, but a model with a smaller vocab must not index with them
        x = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_slots, n_feats = int(is_image.sum()), image_features.shape[0]
        if n_slots != n_feats:
            raise MinivarError(f"the prompt has {n_slots} image tokens but the image(s) give {n_feats} features")
        return x.masked_scatter(is_image[..., None], image_features.to(x.dtype))

    def forward(self, input_ids, images=None, *, image_features=None, positions=None, cache: KVCache | None = None,
                input_pos: int = 0, attention_mask=None, hooks=None, output: str = "logits") -> torch.Tensor:
        """Logits [B, T, V] fp32 for the tokens `input_ids` [B, T] at cache positions input_pos … input_pos+T−1;
        output="last": the last row's logits only, [B, V] fp32 (what generation needs); "hidden": the final-normed
        hidden states [B, T, D].

        images (a list of ImageInput, or pixels [B_img, 3, S, S]) or their projected `image_features` (rows [N, D] in
        token order, for a call that holds only some of the image tokens: a chunk of a prompt) are needed only on a
        call that contains image tokens. positions [B, T]: each token's RoPE position (None: its index among the
        sample's real tokens, from attention_mask).
        attention_mask [B, input_pos+T] (1 = real token, 0 = padding) covers cached + new positions; None = none.
        hooks: a hooks.Hook, a list of them, or None (see hooks.py).
        """
        hooks = as_hooks(hooks)
        B, T = input_ids.shape
        rows = range(input_pos, input_pos + T)
        if images is not None:
            image_features = torch.cat(self.image_features(images))
        elif image_features is not None and image_features.dim() == 3:      # [B_img, N, D]: the rows in order
            image_features = image_features.reshape(-1, image_features.shape[-1])
        x = self.embed(input_ids, image_features)
        positions, mask = positions_and_mask(B, T, input_pos, attention_mask, positions, hooks, x.device)
        h = self.language_model.model(x, positions, rows, mask, cache, hooks)
        if output == "hidden":
            return h
        if output == "last":
            # h[:, -1] is [B, D], one matrix product with the weight (a [B, 1, D] slice of a longer sequence would
            # make linear broadcast the weight over the batch: a copy of lm_head per sample)
            return self.language_model.lm_head(h[:, -1]).float()
        if output != "logits":
            raise ValueError(f"output must be 'logits', 'last' or 'hidden', got {output!r}")
        return self.language_model.lm_head(h).float()


def positions_and_mask(B: int, T: int, input_pos: int, attention_mask, positions, hooks, device):
    """RoPE positions [B, T] and the attention mask [B, 1, T, S] (None = plain causal) of a call at cache positions
    input_pos … input_pos+T−1 (LLaVA-1.5's and LLaVA-NeXT's forward). Without padding (and no hook removing keys)
    positions are 0, 1, 2, … and the mask None: the fused kernel keeps its faster causal mode."""
    if attention_mask is None and not (hooks is not None and hooks.masks_keys):
        if positions is None:
            positions = torch.arange(input_pos, input_pos + T, device=device).expand(B, T)
        return positions, None       # no padding: the fused kernel keeps its causal mode
    S = input_pos + T
    if attention_mask is None:
        attention_mask = torch.ones(B, S, dtype=torch.bool, device=device)
    if attention_mask.shape != (B, S):
        raise MinivarError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} "
                           f"(cached + new positions)")
    attention_mask = attention_mask.bool().to(device)
    if positions is None:   # real tokens only, so a padded sample gets the positions it has when run alone
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, input_pos:]
    mask = causal_mask(T, S, device) & attention_mask[:, None, None, :]
    # a padding row would see no key at all (softmax of nothing): let it see itself; its output is unused
    diagonal = torch.arange(S, device=device)[None, :] == torch.arange(input_pos, S, device=device)[:, None]
    return positions, mask | diagonal[None, None]


# ---------------------------------------------------------------------------------------------------------------
# The family: checkpoint names, images, templates (models/registry.py)

# Key layouts → minivar's names. Applied in order; each is (pattern, replacement).
KEY_RULES = (
    (r"^model\.language_model\.", "language_model.model."),   # 5.x in-memory: model.language_model.layers...
    (r"^model\.(vision_tower|multi_modal_projector)\.", r"\1."),  # 5.x in-memory
    (r"^lm_head\.", "language_model.lm_head."),                 # 5.x in-memory
    (r"^vision_tower\.vision_model\.", "vision_tower."),         # llava-hf hub layout (4.x)
    (r"^language_model\.(model\.)+", "language_model.model."),  # duplicated .model.model in some 5.x saves
)


def is_unused_key(key: str, cfg: LlavaConfig) -> bool:
    """Tensors a llava-hf checkpoint carries that LLaVA never reads."""
    if key.startswith("vision_tower.post_layernorm.") or key.endswith("rotary_emb.inv_freq"):
        return True
    if key == "vision_tower.embeddings.position_ids":
        return True
    m = re.match(r"vision_tower\.encoder\.layers\.(\d+)\.", key)
    return bool(m) and cfg.vision_layers_used <= int(m.group(1)) < cfg.vision.num_hidden_layers


def llava_image(img, cfg: LlavaConfig, image_aspect_ratio: str = "pad") -> ImageInput:
    """A PIL image → LLaVA-1.5's one square image (pad: the original evaluation's; crop: llava-hf's processor)."""
    from ..processing import preprocess
    grid = cfg.vision.image_size // cfg.vision.patch_size
    return square_image(preprocess(img, cfg.vision.image_size, image_aspect_ratio), grid,
                        cls=cfg.vision_feature_select_strategy == "full")


def llava_view(img, cfg: LlavaConfig, image_aspect_ratio: str, image_input: ImageInput) -> tuple:
    """Family.view: the padded/cropped S×S image the grid covers (processing.model_image); no view for a CLS panel."""
    from ..processing import model_image
    view = model_image(img, cfg.vision.image_size, image_aspect_ratio)
    return tuple(None if p.name == "CLS" else view for p in image_input.panels)


# LLaVA-1.5's base LLMs' massive-activation dims (the VAR paper), keyed by the decoder shape that identifies them:
# (hidden, layers, heads, intermediate).
KNOWN_SINK_DIMS = {
    "llava-1.5-7b": ((4096, 32, 32, 11008), (1415, 2533)),
    "llava-1.5-13b": ((5120, 40, 40, 13824), (2100, 4743)),
}

FAMILY = Family(
    model_type="llava", name="LLaVA-1.5", config=LlavaConfig.from_hf, model=Llava, key_rules=KEY_RULES,
    unused_key=is_unused_key, images=llava_image, conv_modes=("vicuna_v1", "llava_hf", "llava_v1"),
    default_conv_mode="vicuna_v1", known_sink_dims=KNOWN_SINK_DIMS, view=llava_view, demo=build_llava)
