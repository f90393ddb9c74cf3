"""The Qwen2 decoder of Qwen2-VL / Qwen2.5-VL: LLaMA's blocks and attention (llama.py, hooks included) with two
differences — q/k/v projections with biases and an o_proj without, and M-RoPE (rope.py): the cos/sin of each token
come from its three positions (t, h, w) instead of one. Grouped-query attention is LLaMA's.

Parameter names are the hub's (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, `model.norm`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TextConfig
from ..llama import LlamaDecoderLayer, LlamaModel, rope_table
from .rope import axis_of_dims, mrope_cos_sin


@dataclass(frozen=True)
class Qwen2TextConfig(TextConfig):
    """Qwen2 decoder. Defaults are transformers' `Qwen2VLTextConfig`'s (a 72B); head_dim is always
    hidden_size / num_attention_heads (transformers' Qwen2-VL attention ignores a `head_dim` key)."""
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    mrope_section: tuple[int, ...] = (16, 24, 24)   # half-dims rotated by the t, h, w positions
    use_sliding_window: bool = False


def qwen2_layer(cfg: Qwen2TextConfig, layer_idx: int) -> LlamaDecoderLayer:
    """LLaMA's pre-norm block with Qwen2's biases: q/k/v have one, o_proj has none."""
    return LlamaDecoderLayer(cfg, layer_idx, qkv_bias=True, o_bias=False)


def qwen3_layer(cfg: TextConfig, layer_idx: int) -> LlamaDecoderLayer:
    """Qwen3's block: LLaMA's, with `attention_bias` on all four projections (False in the released models) and
    q/k RMSNorm per head before the rotary (LlamaAttention's qk_norm)."""
    return LlamaDecoderLayer(cfg, layer_idx, qk_norm=True)


class Qwen2Model(LlamaModel):
    """Embeddings → Qwen2 layers → final norm, rotated by M-RoPE. Returns the normed hidden states [B, T, D].
    forward(x, positions [3, B, T], rows, mask, cache, hooks) is LLaMA's; only `rotary` differs."""

    def __init__(self, cfg: Qwen2TextConfig):
        super().__init__(cfg, layer=qwen2_layer)

    def rotary(self, positions: torch.Tensor, rows: range, cache, dtype: torch.dtype):
        """cos/sin [B, T, hd] of M-RoPE at positions [3, B, T]: each head dim rotates with its axis's position
        (rope.py), from the cache's 1-D table (computed once per cache) or a fresh one."""
        cfg = self.cfg
        if cache is not None:
            cache.check(rows)
            cos_table, sin_table = cache.cos, cache.sin
        else:
            cos_table, sin_table = rope_table(int(positions.max()) + 1, cfg.head_dim, cfg.rope_theta, dtype,
                                              positions.device)
        axis = axis_of_dims(cfg.mrope_section, cfg.head_dim, positions.device)
        return mrope_cos_sin(cos_table, sin_table, positions, axis)                     # [B, T, hd] each
