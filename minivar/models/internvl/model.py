"""InternVL: InternViT features of each tile (vision.py) → the CLS dropped → pixel shuffle (2×2 patches → one token
of 4× the width: 1,024 patches → 256 tokens) → projector (LayerNorm, Linear, GELU, Linear) → spliced into the Qwen2
(InternVL3) or Qwen3 (InternVL3.5) decoder's embeddings at the `<IMG_CONTEXT>` tokens → logits.

Module names equal the hub checkpoint's after the loader's key rules — LLaVA's layout (`vision_tower.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`). The decoder is llama.py's with the
Qwen blocks of qwen2_vl/decoder.py and plain 1-D RoPE, so generation, chunked prefill, the shared-prefix cache and
the methods' hooks are LLaVA's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import MinivarError
from ...methods.hooks import as_hooks
from ..images import ImageInput
from ..llama import KVCache, LlamaModel
from ..llava import positions_and_mask
from ..qwen2_vl.decoder import qwen2_layer, qwen3_layer
from .config import InternVLConfig
from .processing import panels_of
from .vision import InternVisionModel


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """[B, g, g, C] patch features (row-major grid) → [B, (g/s)², s²·C]: token (i, j) holds the s×s patches of rows
    s·i … s·i+s−1 and columns s·j … s·j+s−1, channels ordered (row in block, column in block, channel) — the order
    transformers' pixel_shuffle produces. So token (i, j) of a tile sees the 28×28 px square at (28·i, 28·j)."""
    B, g, _, C = x.shape
    x = x.reshape(B, g // s, s, g // s, s, C).permute(0, 1, 3, 2, 4, 5)       # [B, g/s, g/s, s, s, C]
    return x.reshape(B, (g // s) ** 2, s * s * C)


class InternVLMultiModalProjector(nn.Module):
    """LayerNorm → Linear → GELU (exact) → Linear, from s²·D_vision to the decoder's width."""

    def __init__(self, cfg: InternVLConfig):
        super().__init__()
        n_in = cfg.vision.hidden_size * cfg.shuffle ** 2
        self.layer_norm = nn.LayerNorm(n_in)                   # eps 1e-5: torch's default, as transformers
        self.linear_1 = nn.Linear(n_in, cfg.text.hidden_size)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.layer_norm(x))))


class QwenForCausalLM(nn.Module):
    """The decoder and its lm_head under the hub's names (`language_model.model.*`, `language_model.lm_head`)."""

    def __init__(self, cfg: InternVLConfig):
        super().__init__()
        self.model = LlamaModel(cfg.text, layer=qwen3_layer if cfg.text.model_type == "qwen3" else qwen2_layer)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)


class InternVL(nn.Module):
    """The whole model: vision tower, projector, decoder with its lm_head."""

    def __init__(self, cfg: InternVLConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = InternVisionModel(cfg.vision, cfg.vision_layers_used)
        self.multi_modal_projector = InternVLMultiModalProjector(cfg)
        self.language_model = QwenForCausalLM(cfg)

    def image_inputs(self, pixel_values: torch.Tensor) -> list[ImageInput]:
        """Tiles [B, 3, t, t] → one ImageInput per tile (an image of one tile each)."""
        side = self.config.vision.grid // self.config.shuffle
        return [ImageInput(px[None], side * side, panels_of(1, 1, side), {"grid": (1, 1)}) for px in pixel_values]

    def patch_features(self, pixel_values: torch.Tensor, keep=()) -> tuple[torch.Tensor, list]:
        """Tiles [n, 3, t, t] → the feature layer's patch features [n, N, D_vision] (CLS dropped), and the hidden
        states at the indices in `keep` as well (DAMRO reads a layer's input)."""
        cfg = self.config
        k = cfg.feature_index
        hidden_states = self.vision_tower(pixel_values, keep=(k, *keep))
        x = hidden_states[k]
        if cfg.vision_feature_layer == -1 and hasattr(self.vision_tower, "layernorm"):
            x = self.vision_tower.layernorm(x)       # transformers' last_hidden_state: after the final norm
        return x[:, 1:], hidden_states

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch features [n, g², D_vision] of n tiles → their tokens [n, (g/s)², D_text]."""
        n, N, D = patches.shape
        g = int(N ** 0.5)
        x = pixel_shuffle(patches.reshape(n, g, g, D), self.config.shuffle)
        proj = self.multi_modal_projector
        return proj(x.to(proj.linear_1.weight.dtype))

    def image_features(self, images) -> list[torch.Tensor]:
        """Images (a list of ImageInput, or tiles [B, 3, t, t]) → projected features, one [tiles·256, D_text] per
        image, tiles in order (the thumbnail last). All tiles of all images go through the tower as one batch."""
        images = self.image_inputs(images) if isinstance(images, torch.Tensor) else images
        if not images:
            return []
        pixel_values = torch.cat([im.pixel_values for im in images]).to(self.multi_modal_projector.linear_1.weight.device)
        tokens = self.project(self.patch_features(pixel_values)[0])                     # [Σ tiles, 256, D]
        counts = [im.pixel_values.shape[0] for im in images]
        return [t.reshape(-1, t.shape[-1]) for t in tokens.split(counts)]

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: the `<IMG_CONTEXT>` tokens (VAR's image span I; `<img>` and `</img>` are text)."""
        return input_ids == self.config.image_token_id

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the image-token rows replaced, in order, by image_features [N, D]."""
        embed_tokens = self.language_model.model.embed_tokens
        if image_features is None:
            return embed_tokens(input_ids)
        is_image = self.image_positions(input_ids)
        x = embed_tokens(input_ids.masked_fill(is_image, 0))
        n_slots, n_feats = int(is_image.sum()), image_features.shape[0]
        if n_slots != n_feats:
            raise MinivarError(f"the prompt has {n_slots} image tokens but the image(s) give {n_feats} features")
        return x.masked_scatter(is_image[..., None], image_features.to(x.dtype))

    def forward(self, input_ids, images=None, *, image_features=None, positions=None, cache: KVCache | None = None,
                input_pos: int = 0, attention_mask=None, hooks=None, output: str = "logits") -> torch.Tensor:
        """Logits [B, T, V] fp32 for `input_ids` [B, T] at cache positions input_pos … input_pos+T−1; output="last":
        the last row's, [B, V]; "hidden": the final-normed hidden states. As Llava.forward: images (ImageInputs or
        tiles [B, 3, t, t]) or their feature rows `image_features` [N, D] for this call's image tokens; positions
        [B, T] (None: each token's index among its sample's real tokens); attention_mask [B, input_pos+T]."""
        hooks = as_hooks(hooks)
        B, T = input_ids.shape
        rows = range(input_pos, input_pos + T)
        if images is not None and image_features is None:
            feats = self.image_features(images)
            image_features = torch.cat(feats) if feats else None
        x = self.embed(input_ids, image_features)
        positions, mask = positions_and_mask(B, T, input_pos, attention_mask, positions, hooks, x.device)
        h = self.language_model.model(x, positions, rows, mask, cache, hooks)
        head = self.language_model.lm_head
        if output == "hidden":
            return h
        if output == "last":
            return head(h[:, -1]).float()
        if output != "logits":
            raise ValueError(f"output must be 'logits', 'last' or 'hidden', got {output!r}")
        return head(h).float()
