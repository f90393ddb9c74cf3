"""The Qwen3 decoder of Qwen3-VL: LLaMA's blocks and attention (llama.py, hooks included) with three differences —
an RMSNorm on each head's queries and keys before the rotary (`q_norm`, `k_norm`), `head_dim` from the config (not
hidden / heads: 128 in every checkpoint), and interleaved M-RoPE (rope.py) — plus DeepStack: after decoder layer k
(k < K) the k-th DeepStack feature of each image token is added to the hidden state at that token's position.
No biases anywhere (unless config.json's attention_bias says so, for q/k/v/o). Grouped-query attention is LLaMA's.
The MoE variant swaps the MLP of its sparse layers for moe.py's block.

Parameter names are the hub's after `model.language_model.`: `embed_tokens`, `layers.N.self_attn.q_norm`, `norm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TextConfig
from ..llama import DecoderCall, LlamaDecoderLayer, LlamaModel, rope_table
from ..qwen2_vl.rope import mrope_cos_sin
from .rope import interleaved_axis_of_dims


@dataclass(frozen=True)
class Qwen3TextConfig(TextConfig):
    """Qwen3 decoder; defaults are transformers' `Qwen3VLTextConfig`'s (the MoE's differ: model.py fills them).
    num_experts 0: the dense model; otherwise the MoE fields say which layers are sparse and how they route."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    head_dim_: int | None = 128
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    mrope_section: tuple[int, ...] = (24, 20, 20)     # frequency pairs turned by h and w: rope.py
    num_experts: int = 0                              # MoE (moe.py): experts per sparse layer
    num_experts_per_tok: int = 0                      # top-k
    moe_intermediate_size: int = 0                    # each expert's SwiGLU width
    decoder_sparse_step: int = 1                      # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()             # ... and i is not listed here

    def is_sparse(self, layer: int) -> bool:
        """Does layer `layer` route its tokens to experts (transformers' Qwen3MoeDecoderLayer rule)?"""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)


def qwen3_layer(cfg: Qwen3TextConfig, layer_idx: int) -> LlamaDecoderLayer:
    """LLaMA's pre-norm block with q/k RMSNorm; a sparse layer's MLP is the mixture of experts."""
    layer = LlamaDecoderLayer(cfg, layer_idx, qk_norm=True)
    if cfg.is_sparse(layer_idx):
        from .moe import SparseMoeBlock
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
            if deepstack is not None and i < len(deepstack[1]):
                image_mask, features = deepstack
                x = x.clone()
                x[image_mask] += features[i].to(x.dtype)                  # DeepStack: the i-th visual level
        return self.norm(x)
