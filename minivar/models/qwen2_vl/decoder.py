"""The Qwen2 decoder of Qwen2-VL / Qwen2.5-VL: LLaMA's blocks (llama.py) with three differences —
q/k/v projections with biases and an o_proj without, grouped-query attention, and M-RoPE (rope.py): the cos/sin of
each token come from its three positions (t, h, w) instead of one.

Parameter names are the hub's (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, `model.norm`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...errors import MinivarError
from ..config import TextConfig
from ..llama import LlamaAttention, LlamaDecoderLayer, LlamaModel, rope_table
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
    attention_bias: bool = True          # q/k/v only: o_proj has no bias (Qwen2Attention)
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    mrope_section: tuple[int, ...] = (16, 24, 24)   # half-dims rotated by the t, h, w positions
    use_sliding_window: bool = False


class Qwen2Attention(LlamaAttention):
    """LLaMA's attention (hooks included) with Qwen2's biases: q/k/v have one, o_proj has none."""

    def __init__(self, cfg: Qwen2TextConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)           # cfg.attention_bias: biases on q/k/v (and o, replaced here)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)


class Qwen2DecoderLayer(LlamaDecoderLayer):
    """LLaMA's pre-norm block around Qwen2Attention."""

    def __init__(self, cfg: Qwen2TextConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.self_attn = Qwen2Attention(cfg, layer_idx)


class Qwen2Model(LlamaModel):
    """Embeddings → Qwen2 layers → final norm, rotated by M-RoPE. Returns the normed hidden states [B, T, D]."""

    def __init__(self, cfg: Qwen2TextConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))

    def forward(self, x, positions, rows: range, mask, cache=None, hooks=None):
        """x: input embeddings [B, T, D] of cache positions `rows`; positions [3, B, T]: each token's (t, h, w)
        M-RoPE positions; mask [B, 1, T, S] bool or None (causal, no padding)."""
        cfg = self.cfg
        if cache is not None:
            if rows.stop > cache.max_len:
                raise MinivarError(f"KV cache full: position {rows.stop - 1} is past its {cache.max_len} positions")
            cos_table, sin_table = cache.cos, cache.sin
        else:
            cos_table, sin_table = rope_table(int(positions.max()) + 1, cfg.head_dim, cfg.rope_theta, x.dtype,
                                              x.device)
        axis = axis_of_dims(cfg.mrope_section, cfg.head_dim, x.device)
        cos, sin = mrope_cos_sin(cos_table, sin_table, positions, axis)                # [B, T, hd]
        for i, layer in enumerate(self.layers):
            if hooks is not None:
                hooks.residual(i, x, rows)    # VAR reads its sink tokens off each layer's residual input h^ℓ
            x = layer(x, cos, sin, mask, rows, cache, hooks)
        return self.norm(x)
