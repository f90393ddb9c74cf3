"""Qwen3-VL's vision tower: Qwen2-VL's ViT (vision positions in merge order, 2-D rotary, attention per image) with
three changes — learned absolute position embeddings resized to each image, LayerNorm blocks with a biased
fc1/fc2 MLP, and DeepStack: the hidden states after the `deepstack_visual_indexes` layers go through mergers of
their own and become extra features the decoder adds to its first layers' image positions (model.py).

pixel_values [N, C·tp·p·p] (all images' 16-px patches, concatenated, merge order) and grid_thw → (features
[N/4, out], deepstack [K, N/4, out]). Parameter names are transformers' (after `model.visual.`): `patch_embed.proj`,
`pos_embed`, `blocks.N.attn.qkv`, `blocks.N.mlp.linear_fc1`, `merger.norm`, `deepstack_merger_list.K.linear_fc1`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..qwen2_vl.vision import (GridTHW, VisionAttention, activation, attend_segments, check_inputs, grid_list,  # noqa: F401
                               vision_positions, vision_rope)
from .config import Qwen3VisionConfig


class PatchEmbed(nn.Module):
    """A Conv3d with kernel = stride = (tp, p, p) and a bias (Qwen2-VL's has none): one Linear map of each patch."""

    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=k, stride=k, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight                                   # [D, C, tp, p, p]
        # the kernel covers each flattened patch exactly once: the convolution is this matmul (see qwen2_vl/vision.py)
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


def bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis: patch `index` of `size` patches read from a table of `side` entries, corners aligned (patch
    0 → entry 0, patch size−1 → entry side−1), as F.interpolate(mode="bilinear", align_corners=True) would.
    → (the two table entries [n, 2], their weights [n, 2] fp32)."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    lo = src.floor()
    taps = (lo.long()[:, None] + torch.arange(2, device=index.device)).clamp(0, side - 1)
    weights = (1 - (src[:, None] - lo[:, None] - torch.arange(2, device=index.device)).abs()).clamp(min=0)
    return taps, weights


def position_embeddings(table: nn.Embedding, grids: GridTHW, merge: int, side: int) -> torch.Tensor:
    """The learned [side × side] position table resized bilinearly to each image's patch grid, in merge order
    (every frame of a video the same): [N, D], summed in fp32 as transformers does, in the table's dtype."""
    out = []
    for rows_cols, (t, h, w) in zip(vision_positions(grids, merge, table.weight.device).split(
            [t * h * w for t, h, w in grids]), grids):
        r_taps, r_w = bilinear_taps(rows_cols[:, 0], h, side)
        c_taps, c_w = bilinear_taps(rows_cols[:, 1], w, side)
        index = (r_taps[:, :, None] * side + c_taps[:, None, :]).flatten(1)          # [n, 4]: (r0c0, r0c1, r1c0, r1c1)
        weight = (r_w[:, :, None] * c_w[:, None, :]).flatten(1)                      # [n, 4] fp32
        out.append((table(index) * weight[:, :, None]).sum(1))
    return torch.cat(out).to(table.weight.dtype)


class VisionMLP(nn.Module):
    """linear_fc2(act(linear_fc1(x))), act = gelu_pytorch_tanh in the released checkpoints."""

    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6 (fixed in transformers' code)."""

    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, rope, lengths):
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """The 4 patches of a 2×2 block concatenated, then Linear → GELU (exact) → Linear to the decoder's width.
    The final merger normalises each patch first (LayerNorm over D); the DeepStack mergers normalise the
    concatenation (over 4·D: transformers' use_postshuffle_norm)."""

    def __init__(self, cfg: Qwen3VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.merged)) if self.postshuffle_norm else self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))      # [N, D] → [N/m², out]


class Qwen3VisionTransformer(nn.Module):
    """forward(pixel_values [N, C·tp·p·p], grid_thw) → (merged features [N/m², out], DeepStack [K, N/m², out])."""

    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size,
                                      _weight=torch.empty(cfg.num_position_embeddings, cfg.hidden_size))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, postshuffle_norm=True)
                                                   for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        grids = grid_list(grid_thw, cfg)
        check_inputs(pixel_values, grids, cfg)
        m = cfg.spatial_merge_size
        x = self.patch_embed(pixel_values)                                       # [N, D]
        x = x + position_embeddings(self.pos_embed, grids, m, cfg.grid_side).to(x.dtype)
        rope = vision_rope(vision_positions(grids, m, x.device), cfg.head_dim, cfg.rope_theta)
        lengths = [h * w for t, h, w in grids for _ in range(t)]                  # each frame its own segment
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, rope, lengths)
            if i in cfg.deepstack_visual_indexes:                                 # DeepStack: this layer's states,
                k = cfg.deepstack_visual_indexes.index(i)                         # merged by a merger of their own
                deepstack.append(self.deepstack_merger_list[k](x))
        merged = self.merger(x)
        return merged, (torch.stack(deepstack) if deepstack else merged.new_zeros(0, *merged.shape))
