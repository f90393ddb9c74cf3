"""Interleaved M-RoPE (Qwen3-VL): each token still has three positions (t, h, w), given exactly as Qwen2-VL gives
them (qwen2_vl/rope.py: rope_index, decode_positions), but the head dims are shared out among the axes differently.

Qwen2-VL rotates the first mrope_section[0] frequency pairs with t, the next mrope_section[1] with h, then w: in
blocks, so the h and w axes get only the lower (faster) or only the higher frequencies. Qwen3-VL interleaves them:
frequency d turns with h when d ≡ 1 (mod 3) and d < 3·section[1], with w when d ≡ 2 (mod 3) and d < 3·section[2],
else with t — t, h, w, t, h, w, …, and the tail t — so every axis spans the whole frequency range. (transformers'
Qwen3VLTextRotaryEmbedding always interleaves; config.json's `mrope_interleaved` flag is not read, as there.)
"""
from __future__ import annotations

import torch

from ...errors import MinivarError


def interleaved_axis_of_dims(mrope_section: tuple[int, ...], head_dim: int, device=None) -> torch.Tensor:
    """[hd] long: the position axis (0 t, 1 h, 2 w) that rotates each head dim (both rotate-half halves alike);
    what qwen2_vl/rope.mrope_cos_sin reads."""
    if len(mrope_section) != 3:
        raise MinivarError(f"config.json: mrope_section {list(mrope_section)} must give 3 sizes (t, h, w)")
    half = head_dim // 2
    d = torch.arange(half)
    axis = torch.zeros(half, dtype=torch.long)                            # t by default
    axis[(d % 3 == 1) & (d < 3 * mrope_section[1])] = 1                   # h
    axis[(d % 3 == 2) & (d < 3 * mrope_section[2])] = 2                   # w
    return torch.cat([axis, axis]).to(device)
