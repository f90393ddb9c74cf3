"""M-RoPE (multimodal rotary positions) of Qwen2-VL and Qwen2.5-VL: every token has three positions (t, h, w).

Text tokens have the same number on all three axes, counting on from the previous token. An image of
t × h × w merged patches (t = 1 for a still image) starts at s = the next text position: its token at (i, j) gets
(s, s + i, s + j), and the text after it continues at s + max(h, w), i.e. the image's largest position + 1.
So an image of N tokens advances the position by only max(h, w), not by N.

The rotary dimensions are split among the axes by `mrope_section` (sizes in half-dims, summing to head_dim / 2):
half-dim d rotates with the t position for the first section, with h for the second, with w for the third; the
second half of the head dims repeats the first (the rotate-half layout).

Padding (attention_mask 0) is skipped: a padded sample gets the positions it has alone (padding rows get 0).
Decoding continues at max(prompt positions) + 1 + step on all three axes (what transformers' rope_deltas amount to).
"""
from __future__ import annotations

import torch

from ...errors import MinivarError


def rope_index(input_ids: torch.Tensor, grids: list[tuple[int, int, int]], image_token_id: int,
               spatial_merge_size: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions [3, B, T] (long) of a prompt `input_ids` [B, T]. grids: the (t, h, w) patch grid of each image
    (before the merge), in token order across the batch (sample 0's images first); each run of consecutive image
    tokens is one image. attention_mask [B, T] (1 = real token) or None."""
    B, T = input_ids.shape
    positions = torch.zeros(3, B, T, dtype=torch.long)
    ids = input_ids.cpu()
    real = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    if real.shape != (B, T):
        raise MinivarError(f"attention_mask has shape {tuple(real.shape)}, expected {(B, T)}")
    grids = list(grids)
    next_grid = 0
    for b in range(B):
        idx = real[b].nonzero()[:, 0]                          # the sample's real tokens, in order
        is_image = (ids[b, idx] == image_token_id).tolist()
        pos = torch.empty(3, len(idx), dtype=torch.long)
        current, i = 0, 0
        while i < len(idx):
            if not is_image[i]:                                # a text token: one position, the same on each axis
                pos[:, i] = current
                current, i = current + 1, i + 1
                continue
            n = 1                                              # the run of image tokens starting here: one image
            while i + n < len(idx) and is_image[i + n]:
                n += 1
            if next_grid >= len(grids):
                raise MinivarError(f"the prompt has more images (runs of image token id {image_token_id}) than "
                                   f"the {len(grids)} image grid(s) given: pass its `images`, or `positions`")
            pos[:, i:i + n] = image_positions(grids[next_grid], spatial_merge_size, current, n)
            current += max(grids[next_grid][1], grids[next_grid][2]) // spatial_merge_size
            next_grid, i = next_grid + 1, i + n
        positions[:, b, idx] = pos
    if next_grid != len(grids):
        raise MinivarError(f"{len(grids)} image grid(s) given, but the prompt holds {next_grid} image(s)")
    return positions.to(input_ids.device)


def image_positions(grid: tuple[int, int, int], spatial_merge_size: int, start: int, n_tokens: int) -> torch.Tensor:
    """[3, t·h·w/m²] positions of one image's merged tokens (row-major: time, then rows, then columns)."""
    t, h, w = (int(x) for x in grid)
    m = spatial_merge_size
    if h % m or w % m:
        raise MinivarError(f"image grid {tuple(grid)} is not a multiple of the spatial merge size {m}")
    gt, gh, gw = t, h // m, w // m
    if gt * gh * gw != n_tokens:
        raise MinivarError(f"an image of grid {tuple(grid)} gives {gt * gh * gw} tokens, but the prompt holds "
                           f"{n_tokens} image tokens in a row there")
    tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start                           # [3, gt·gh·gw]


def decode_positions(prompt_positions: torch.Tensor, steps: int | range, attention_mask=None) -> torch.Tensor:
    """Positions [3, B, n] of decode steps `steps` (an int n means steps 0 … n−1) after a prompt whose positions
    are prompt_positions [3, B, T]: max(the sample's prompt positions) + 1 + step on every axis. attention_mask
    [B, T] of the prompt: padding positions are left out of the max (they hold 0, so they never raise it)."""
    steps = range(steps) if isinstance(steps, int) else steps
    p = prompt_positions
    if attention_mask is not None:
        p = p.masked_fill(~attention_mask.bool()[None].to(p.device), 0)
    start = p.amax(dim=(0, 2)) + 1                                                    # [B]
    step = torch.arange(steps.start, steps.stop, device=p.device)
    return (start[:, None] + step[None]).expand(3, -1, -1)                            # [3, B, n]


def axis_of_dims(mrope_section: tuple[int, ...], head_dim: int, device=None) -> torch.Tensor:
    """[hd] long: which position axis (0 t, 1 h, 2 w) rotates each head dim."""
    if sum(mrope_section) != head_dim // 2:
        raise MinivarError(f"config.json: mrope_section {list(mrope_section)} sums to {sum(mrope_section)}, "
                           f"expected head_dim / 2 = {head_dim // 2}")
    half = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(mrope_section)])
    return torch.cat([half, half]).to(device)                                         # both rotate-half halves


def mrope_cos_sin(cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor,
                  axis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, hd] of positions [3, B, T] from 1-D tables [L, hd] (llama.rope_table): dim d takes the angle
    of the position on its axis, axis[d] — the same numbers as computing each axis's angles and then splitting."""
    if int(positions.max()) >= cos_table.shape[0] or int(positions.min()) < 0:
        raise MinivarError(f"`positions` range over {int(positions.min())} … {int(positions.max())}, "
                           f"the rotary table holds 0 … {cos_table.shape[0] - 1}")
    _, B, T = positions.shape
    pick = axis.view(1, 1, 1, -1).expand(1, B, T, -1)                                 # [1, B, T, hd]
    cos = cos_table[positions].gather(0, pick)[0]                                     # [3, B, T, hd] → [B, T, hd]
    sin = sin_table[positions].gather(0, pick)[0]
    return cos, sin
