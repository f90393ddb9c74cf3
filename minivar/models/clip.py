"""CLIP ViT vision tower, as LLaVA uses it.

pixels [B, 3, 336, 336] → 14-px patches (a 24×24 grid) → 577 tokens (CLS + 24·24) → pre-LN transformer layers.
LLaVA reads the hidden states of the second-to-last layer (vision_feature_layer = −2), so the last layer is never
run here, and `post_layernorm` (CLIP's pooled-output norm) is never applied. Parameter names are the HF ones,
including CLIP's `pre_layrnorm` typo, so checkpoints load by name.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # CLIP was trained with this sigmoid approximation of GELU; the exact erf GELU gives different features.
    return x * torch.sigmoid(1.702 * x)


class CLIPEmbeddings(nn.Module):
    """Patchify with a stride-14 conv (no bias), prepend the class token, add learned position embeddings."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        n = cfg.num_patches + 1   # _weight: skip the random init, the checkpoint provides the weights
        self.position_embedding = nn.Embedding(n, cfg.hidden_size, _weight=torch.empty(n, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype))      # [B, D, 24, 24]
        patches = patches.flatten(2).transpose(1, 2)                   # [B, 576, D], row-major over the patch grid
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)     # [B, 1, D]
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # [B, 577, D]


class CLIPAttention(nn.Module):
    """Bidirectional multi-head attention with biases (every patch sees every patch)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, D] → [B, H, T, hd]
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # Nothing needs the probabilities here, so the fused kernel is used (scale defaults to head_dim^-0.5).
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))


class CLIPMLP(nn.Module):
    """fc2(quick_gelu(fc1(x)))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The list of layers, under HF's name `encoder.layers`."""

    def __init__(self, cfg: VisionConfig, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(n_layers))


class CLIPVisionTower(nn.Module):
    """Holds only the layers LLaVA reads: `n_layers` = how many layers the feature layer needs (23 of 24 for LLaVA-1.5)."""

    def __init__(self, cfg: VisionConfig, n_layers: int):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's name
        self.encoder = CLIPEncoder(cfg, n_layers)

    def forward(self, pixel_values: torch.Tensor, keep=None) -> list[torch.Tensor | None]:
        """Returns the hidden states [embeddings, after layer 0, after layer 1, ...], each [B, 577, D]; with `keep`
        (indices into that list) the others are None, so a batch of many crops (LLaVA-NeXT: 5 per image) does not
        hold every layer's states in memory when only the feature layer's are read."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        hidden_states = [x if keep is None or 0 in keep else None]
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            hidden_states.append(x if keep is None or i in keep else None)
        return hidden_states
