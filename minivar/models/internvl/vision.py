"""InternViT (InternVL's vision tower) under transformers' names (`vision_tower.embeddings.*`,
`vision_tower.encoder.layer.N.*`): a ViT with a CLS token, one tile of 448 px = 32×32 patches of 14 px per image.

Differences from CLIP's ViT (clip.py): no pre-norm after the embeddings; each block scales its two branches by learned
per-channel factors (layer scale: lambda_1, lambda_2); its norms are LayerNorm or RMSNorm (`norm_type`); InternViT-6B
RMS-normalises q and k over the full width before the head split (`use_qk_norm`); the MLP is exact GELU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..llama import RMSNorm
from .config import InternVisionConfig


def norm(cfg: InternVisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.layer_norm_eps) if cfg.norm_type == "rms_norm" else nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


class PatchEmbeddings(nn.Module):
    """A Conv2d with kernel = stride = patch (with a bias): one linear map of each 14×14 patch."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                    stride=cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.projection.weight
        return self.projection(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)     # [B, N, D]


class InternVisionEmbeddings(nn.Module):
    """CLS token + patch embeddings + absolute position embeddings (1 + 32² of them); a tile of another size gets
    the patch positions resized (bicubic) to its grid, the CLS position as is."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.empty(1, cfg.grid ** 2 + 1, cfg.hidden_size))
        self.patch_size = cfg.patch_size

    def positions(self, height: int, width: int) -> torch.Tensor:
        """[1, 1 + (height/p)·(width/p), D]: the stored table, or its patch part interpolated to that grid."""
        table = self.position_embeddings
        side = int((table.shape[1] - 1) ** 0.5)
        gh, gw = height // self.patch_size, width // self.patch_size
        if (gh, gw) == (side, side):
            return table
        D = table.shape[-1]
        grid = table[:, 1:].reshape(1, side, side, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(pixel_values)                                        # [B, N, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)           # CLS first
        return x + self.positions(*pixel_values.shape[-2:])


class InternVisionAttention(nn.Module):
    """Bidirectional multi-head attention over a tile's 1 + N tokens; `projection_layer` back."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, D, bias=cfg.attention_bias)
        self.projection_layer = nn.Linear(D, D)
        if cfg.use_qk_norm:                       # over the full width, before the head split (eps fixed at 1e-6)
            self.q_norm = RMSNorm(D, 1e-6)
            self.k_norm = RMSNorm(D, 1e-6)
        self.qk_norm = cfg.use_qk_norm

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, T, D] of the normed input x, q/k-normed where the config says (DAMRO reads them whole)."""
        q, k = self.q_proj(x), self.k_proj(x)
        return (self.q_norm(q), self.k_norm(k)) if self.qk_norm else (q, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k = self.qk(x)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, self.v_proj(x)))
        # Nothing needs the probabilities here: the fused kernel (scale head_dim^-0.5, no mask).
        out = F.scaled_dot_product_attention(q, k, v)
        return self.projection_layer(out.transpose(1, 2).reshape(B, T, D))


class InternVisionMLP(nn.Module):
    """fc2(gelu(fc1(x))), exact (erf) GELU."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionLayer(nn.Module):
    """Pre-norm block with layer scale: x + λ1·attn(norm(x)), then x + λ2·mlp(norm(x))."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.attention = InternVisionAttention(cfg)
        self.mlp = InternVisionMLP(cfg)
        self.layernorm_before = norm(cfg, cfg.hidden_size)
        self.layernorm_after = norm(cfg, cfg.hidden_size)
        self.lambda_1 = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lambda_2 = nn.Parameter(torch.empty(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class InternVisionEncoder(nn.Module):
    """The list of layers, under transformers' name `encoder.layer`."""

    def __init__(self, cfg: InternVisionConfig, n_layers: int):
        super().__init__()
        self.layer = nn.ModuleList(InternVisionLayer(cfg) for _ in range(n_layers))


class InternVisionModel(nn.Module):
    """Holds only the layers the feature layer needs (all of them for InternVL's −1). forward(pixel_values
    [tiles, 3, t, t], keep) → the hidden states [embeddings, after layer 0, …], each [tiles, 1 + N, D]; with
    `keep` (indices into that list) the others are None. `layernorm` (a final LayerNorm) exists only where the
    config has use_mean_pooling false; it applies to the last layer's output alone (model.py)."""

    def __init__(self, cfg: InternVisionConfig, n_layers: int):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg, n_layers)
        if not cfg.use_mean_pooling:
            self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, keep=None) -> list[torch.Tensor | None]:
        x = self.embeddings(pixel_values)
        hidden_states = [x if keep is None or 0 in keep else None]
        for i, layer in enumerate(self.encoder.layer, start=1):
            x = layer(x)
            hidden_states.append(x if keep is None or i in keep else None)
        return hidden_states
