"""Qwen2-VL's vision tower: a ViT over 14-px patches of images of any (multiple-of-28) size, no padding tokens.

pixel_values [N, C·tp·p·p] (all images' patches, concatenated; the processor's flattening) and grid_thw [n, 3]
(each image's (t, h, w) in patches) → patch embedding → `depth` pre-LN blocks, each patch attending only to the
patches of its own image (and frame), with 2-D rotary positions (row, column) → the 2×2 PatchMerger → [N/4, out].

Patches arrive in "merge order": the four patches of each 2×2 block are consecutive (row-major inside the block,
blocks row-major over the image), so the merger simply concatenates every 4 consecutive rows. The rotary positions
follow the same order. Parameter names are transformers' (after the checkpoint's `visual.` prefix), e.g.
`blocks.0.attn.qkv.weight`, `merger.mlp.0.weight`.

The pieces both towers share (patch embedding, rotary positions, attention per segment) are defined here and reused
by vision_2_5.py.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import MinivarError
from .config import Qwen2VisionConfig, Qwen25VisionConfig

GridTHW = Sequence[tuple[int, int, int]]


def activation(name: str):
    """transformers' ACT2FN for the names the towers' configs use."""
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)   # the sigmoid approximation the ViT was trained with
    if name == "gelu":
        return F.gelu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    raise MinivarError(f"vision hidden_act '{name}' is not supported")


def grid_list(grid_thw, cfg: Qwen2VisionConfig | Qwen25VisionConfig) -> list[tuple[int, int, int]]:
    """grid_thw as a tensor [n, 3] or a list of (t, h, w) → a checked list of int triples."""
    if isinstance(grid_thw, torch.Tensor):
        grid_thw = grid_thw.tolist()
    grids = [tuple(int(v) for v in g) for g in grid_thw]
    m = cfg.spatial_merge_size
    for i, g in enumerate(grids):
        if len(g) != 3 or min(g) < 1 or g[1] % m or g[2] % m:
            raise MinivarError(f"`grid_thw` row {i} is {g}: it must be (t, h, w) with h and w multiples of {m}")
    return grids


class PatchEmbed(nn.Module):
    """A Conv3d with kernel = stride = (tp, p, p) and no bias, i.e. one linear map of each flattened patch."""

    def __init__(self, cfg: Qwen2VisionConfig | Qwen25VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=k, stride=k, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight                                   # [D, C, tp, p, p]
        # The kernel covers each patch exactly once, so the convolution is a matmul with the flattened weight
        # ([D, C·tp·p·p], the same C-major order the processor flattens patches in) — and much faster than Conv3d.
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1))   # [N, C·tp·p·p] → [N, D]


def vision_positions(grids: GridTHW, merge: int, device=None) -> torch.Tensor:
    """(row, column) of every patch in merge order → [N, 2] int64, frames of a video repeating the same grid."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h, device=device).view(h, 1).expand(h, w)
        cols = torch.arange(w, device=device).view(1, w).expand(h, w)
        # [h, w] → [h/m, m, w/m, m] → [h/m, w/m, m, m]: the patches of one 2×2 block become consecutive.
        rows, cols = (a.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten() for a in (rows, cols))
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def vision_rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary cos/sin [N, head_dim] (fp32): the first quarter of the frequencies turns with the row, the second
    with the column, both with the same head_dim/4 frequencies; then repeated for rotate_half's two halves."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half))
    angles = positions.float()[:, :, None] * inv_freq                    # [N, 2, head_dim/4]
    angles = angles.flatten(1)                                           # [N, head_dim/2]: rows' then columns'
    angles = torch.cat([angles, angles], dim=-1)                         # [N, head_dim]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, hd]; the rotation is done in fp32 (as transformers) and cast back."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Bidirectional attention inside each segment of consecutive rows (an image, a frame or a window), none across.

    q, k, v [N, H, hd] → [N, H, hd]. Segments of equal length are stacked into one batch, so the many equal windows
    of Qwen2.5-VL cost one fused call rather than a Python loop, and no [N, N] mask is ever built.
    """
    out = torch.empty_like(q)
    starts = [0, *itertools.accumulate(lengths)][:-1]
    by_length: dict[int, list[int]] = {}
    for s, n in zip(starts, lengths):
        if n:
            by_length.setdefault(n, []).append(s)
    for n, group in by_length.items():
        if group == list(range(group[0], group[0] + len(group) * n, n)):
            rows = slice(group[0], group[0] + len(group) * n)     # back-to-back segments (one image): no gather copy
        else:
            rows = (torch.tensor(group, device=q.device)[:, None] + torch.arange(n, device=q.device)).flatten()
        # [S·n, H, hd] → [S, n, H, hd] → [S, H, n, hd]
        qs, ks, vs = (t[rows].view(len(group), n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        # Nothing needs the probabilities here, so the fused kernel is used (scale defaults to head_dim^-0.5).
        o = F.scaled_dot_product_attention(qs, ks, vs)                   # [S, H, n, hd]
        out[rows] = o.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


class VisionAttention(nn.Module):
    """Multi-head attention with one fused qkv Linear (biases), 2-D rotary q/k, per segment; `proj` back."""

    def __init__(self, cfg: Qwen2VisionConfig | Qwen25VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: Sequence[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.n_heads, self.head_dim).unbind(1)   # each [N, H, hd]
        q, k = apply_vision_rope(q, *rope), apply_vision_rope(k, *rope)
        return self.proj(attend_segments(q, k, v, lengths).reshape(N, -1))


class VisionMLP(nn.Module):
    """fc2(act(fc1(x))), act = quick_gelu in the released checkpoints."""

    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.embed_dim)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VisionBlock(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6 (fixed in transformers' code)."""

    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, rope, lengths):
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, concatenate the 4 patches of a 2×2 block, then Linear → GELU (exact) → Linear."""

    def __init__(self, width: int, out_dim: int, merge: int, norm: nn.Module):
        super().__init__()
        self.merged = width * merge * merge
        self.ln_q = norm
        # nn.Sequential keeps transformers' names: mlp.0 and mlp.2 (mlp.1 is the parameter-free GELU).
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(), nn.Linear(self.merged, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged))     # [N, D] → [N/m², m²·D] → [N/m², out_dim]


def check_inputs(pixel_values: torch.Tensor, grids: GridTHW, cfg) -> None:
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    n = sum(t * h * w for t, h, w in grids)
    if pixel_values.dim() != 2 or pixel_values.shape != (n, patch_dim):
        raise MinivarError(f"`pixel_values` has shape {tuple(pixel_values.shape)}, `grid_thw` {list(grids)} needs "
                           f"({n}, {patch_dim})")


class Qwen2VisionTransformer(nn.Module):
    """Qwen2-VL's ViT: forward(pixel_values [N, C·tp·p·p], grid_thw [n, 3]) → merged features [N/m², out_dim]."""

    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Qwen2VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg.embed_dim, cfg.hidden_size, cfg.spatial_merge_size,
                                  nn.LayerNorm(cfg.embed_dim, eps=1e-6))

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        cfg = self.config
        grids = grid_list(grid_thw, cfg)
        check_inputs(pixel_values, grids, cfg)
        x = self.patch_embed(pixel_values)                                       # [N, D]
        rope = vision_rope(vision_positions(grids, cfg.spatial_merge_size, x.device), cfg.head_dim, cfg.rope_theta)
        # Each frame of each image is its own attention segment (transformers' cu_seqlens: h·w, repeated t times).
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, rope, lengths)
        return self.merger(x)
