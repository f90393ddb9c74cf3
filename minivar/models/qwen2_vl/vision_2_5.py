"""Qwen2.5-VL's vision tower: Qwen2-VL's ViT with RMSNorm, a SwiGLU MLP and window attention.

Most blocks attend inside windows of `window_size` px (112 px = 4×4 merged tokens = 8×8 patches), tiled from each
image's top-left corner (the last row/column of windows may be smaller); the blocks in `fullatt_block_indexes` attend
over the whole image, as Qwen2-VL does everywhere. To make each window a run of consecutive rows, the patches are
permuted once after the patch embedding — whole 2×2 merge blocks move together, window by window — and the merged
features are put back in image order at the end (the inverse permutation), so the output order is Qwen2-VL's.
Shared pieces (patch embedding, 2-D rotary, attention per segment, merger) come from vision.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..llama import RMSNorm
from .config import Qwen25VisionConfig
from .vision import (GridTHW, PatchEmbed, PatchMerger, Qwen2VisionTransformer, VisionAttention, activation,
                     check_inputs, grid_list, vision_positions, vision_rope)


def window_index(grids: GridTHW, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The window order of the merged tokens of all images, and each window's length in patches.

    Returns (index [N/m²] int64: position k of the window order holds merged token index[k] of the image order,
    lengths: patches per window, in order). Windows are `window` merged tokens a side, per frame, row-major.
    """
    index, lengths, offset = [], [], 0
    for t, h, w in grids:
        lh, lw = h // merge, w // merge                                  # the merged-token grid
        nh, nw = -(-lh // window), -(-lw // window)                      # windows per column / row (ceil)
        ids = torch.arange(t * lh * lw).view(t, lh, lw)
        # Pad to whole windows with -1, then [t, nh·win, nw·win] → [t, nh, win, nw, win] → [t, nh, nw, win, win].
        ids = F.pad(ids, (0, nw * window - lw, 0, nh * window - lh), value=-1)
        ids = ids.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, window * window)
        real = ids >= 0
        index.append(ids[real] + offset)                                 # the padding drops out
        lengths.extend((real.sum(1) * merge * merge).tolist())
        offset += t * lh * lw
    return torch.cat(index), lengths


class SwiGLUMLP(nn.Module):
    """down(act(gate(x)) · up(x)), with biases (unlike the decoder's)."""

    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen25VisionBlock(nn.Module):
    """Pre-norm block with RMSNorm (eps 1e-6, fixed in transformers' code): x + attn(norm1(x)), x + mlp(norm2(x))."""

    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = SwiGLUMLP(cfg)

    def forward(self, x, rope, lengths):
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class Qwen25VisionTransformer(nn.Module):
    """Qwen2.5-VL's ViT: forward(pixel_values [N, C·tp·p·p], grid_thw [n, 3]) → features [N/m², out_dim]."""

    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Qwen25VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg.hidden_size, cfg.out_hidden_size, cfg.spatial_merge_size,
                                  RMSNorm(cfg.hidden_size, eps=1e-6))

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        cfg = self.config
        grids = grid_list(grid_thw, cfg)
        check_inputs(pixel_values, grids, cfg)
        unit = cfg.spatial_merge_size ** 2
        order, window_lengths = window_index(grids, cfg.spatial_merge_size, cfg.window_tokens)
        order = order.to(pixel_values.device)

        def to_windows(a: torch.Tensor) -> torch.Tensor:
            # [N, ...] → [N/m², m², ...]: move whole merge blocks, so each block's patches stay consecutive.
            return a.view(-1, unit, *a.shape[1:])[order].flatten(0, 1)

        x = to_windows(self.patch_embed(pixel_values))                          # [N, D], window order
        positions = vision_positions(grids, cfg.spatial_merge_size, x.device)   # [N, 2], image order
        rope = tuple(to_windows(a) for a in vision_rope(positions, cfg.head_dim, cfg.rope_theta))
        # The permutation never leaves a frame, so whole-frame segments are still consecutive rows.
        frame_lengths = [h * w for t, h, w in grids for _ in range(t)]
        for i, block in enumerate(self.blocks):
            x = block(x, rope, frame_lengths if i in cfg.fullatt_block_indexes else window_lengths)
        merged = self.merger(x)                                                 # [N/m², out_dim], window order
        return merged[torch.argsort(order)]                                     # back to image order


def build_vision_tower(cfg) -> Qwen2VisionTransformer | Qwen25VisionTransformer:
    """The tower a vision config describes (either family), freshly initialised (the loader overwrites every weight)."""
    return Qwen25VisionTransformer(cfg) if isinstance(cfg, Qwen25VisionConfig) else Qwen2VisionTransformer(cfg)
