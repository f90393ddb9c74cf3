"""The Qwen3 decoder of Qwen3-VL: LLaMA's blocks and attention (llama.py, hooks included) with three differences —
an RMSNorm on each head's queries and keys before the rotary (`q_norm`, `k_norm`), `head_dim` from the config (not
hidden / heads: 128 in every checkpoint), and interleaved M-RoPE (rope.py) — plus DeepStack: after decoder layer k
(k < K) the k-th DeepStack feature of each image token is added to the hidden state at that token's position.
No biases anywhere (unless config.json's attention_bias says so, for q/k/v/o). Grouped-query attention is LLaMA's.
The MoE variant swaps the MLP of its sparse layers for moe.py's block.

Parameter names are the hub's after `model.language_model.`: `embed_tokens`, `layers.N.self_attn.q_norm`, `norm`.
"""
from __future__ import annotations

import torch

from ..llama import DecoderCall, LlamaDecoderLayer, LlamaModel, rope_table
from ..qwen2_vl.rope import mrope_cos_sin
from .config import Qwen3TextConfig
from .moe import SparseMoeBlock
from .rope import interleaved_axis_of_dims


def qwen3_layer(cfg: Qwen3TextConfig, layer_idx: int) -> LlamaDecoderLayer:
    """LLaMA's pre-norm block with q/k RMSNorm; a sparse layer's MLP is the mixture of experts."""
    layer = LlamaDecoderLayer(cfg, layer_idx, qk_norm=True)
    if cfg.is_sparse(layer_idx):
        layer.mlp = SparseMoeBlock(cfg)
    return layer


class Qwen3Model(LlamaModel):
    """Embeddings → Qwen3 layers (DeepStack added after the first K) → final norm; returns the normed hidden
    states [B, T, D]. forward(x, positions [3, B, T], rows, mask, cache, hooks, deepstack)."""

    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__(cfg, layer=qwen3_layer)

    def forward(self, x, positions, rows: range, mask, cache=None, hooks=None, deepstack=None) -> torch.Tensor:
        """deepstack: None, or (image_mask [B, T] bool, features [K, N, D]): N = the image tokens of this call."""
        cos, sin = self.rotary(positions, rows, cache, x.dtype)
        return self.run(x, DecoderCall(rows, cos, sin, mask, cache, hooks), deepstack)

    def rotary(self, positions: torch.Tensor, rows: range, cache, dtype: torch.dtype):
        """cos/sin [B, T, hd] of interleaved M-RoPE at positions [3, B, T], from the cache's 1-D table (once per cache)."""
        cfg = self.cfg
        if cache is not None:
            cache.check(rows)
            cos_table, sin_table = cache.cos, cache.sin
        else:
            cos_table, sin_table = rope_table(int(positions.max()) + 1, cfg.head_dim, cfg.rope_theta, dtype,
                                              positions.device)
        axis = interleaved_axis_of_dims(cfg.mrope_section, cfg.head_dim, positions.device)
        return mrope_cos_sin(cos_table, sin_table, positions, axis)

    def run(self, x: torch.Tensor, call: DecoderCall, deepstack=None) -> torch.Tensor:
        """LLaMA's loop (llama.LlamaModel.run) with DeepStack: layer k's output gains features[k] at the image
        positions, so layer k+1 (and the hooks' residual h^(k+1)) reads the sum."""
        for i, layer in enumerate(self.layers):
            if call.hooks is not None:
                call.hooks.residual(i, x, call.rows)
            x = layer(x, call)
            if deepstack is not None and i < len(deepstack[1]):            # DeepStack: the i-th visual level,
                image_mask, features = deepstack                            # added at the image positions
                x = x.index_put((image_mask,), features[i].to(x.dtype), accumulate=True)
        return self.norm(x)
