"""LLaMA-2 / Vicuna decoder: RMSNorm, rotary embeddings, causal attention (with the hooks step), SwiGLU, KV cache.

Shapes: B batch, T new tokens this call, S all key positions so far (cache + new), H heads, hd head dim.
Parameter names are the HF ones (`model.layers.N.self_attn.q_proj`, ...), so a checkpoint loads by name.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TextConfig
from ..errors import MinivarError


class RMSNorm(nn.Module):
    """x / RMS(x) · weight, without LayerNorm's mean subtraction and bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (the mean of squares overflows/underflows in fp16), cast back to the input dtype,
        # *then* scale by the weight: the order HF uses, so fp16/bf16 results round the same way.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_table(length: int, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [length, hd] for positions 0 … length−1; angles in fp32, cast to the activation dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    angles = torch.arange(length, device=device).float()[:, None] * inv_freq          # [length, hd/2]
    emb = torch.cat([angles, angles], dim=-1)                          # half-split layout: [θ0..θn, θ0..θn]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's weights are permuted for the "rotate half" convention (pairs (i, i + hd/2)), not Meta's interleaved pairs.
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]                   # cos/sin [B, T, hd] broadcast over heads


class KVCache:
    """Preallocated keys/values for every layer, written at the positions each call gives (gpt-fast's input_pos),
    and the RoPE tables for its whole length (computed once per cache, not per step). Keys are stored
    [L, B, H_kv, max_len, hd]. Values are stored the same way, or transposed ([L, B, H_kv, hd, max_len]) with
    `values_transposed`: a single query row's probs @ v is then, per head, hd contiguous dot products of length S —
    the form ATen's own matrix-vector kernel streams fastest, what a single prompt's CPU decode uses (generate.py
    chooses). The cache keeps no fill level: the caller knows which positions it has written."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                 values_transposed: bool = False):
        L, H, hd = cfg.num_hidden_layers, cfg.n_kv_heads, cfg.head_dim
        # uninitialised: a call reads only the positions before its own end, all written by earlier calls
        self.k = torch.empty((L, batch, H, max_len, hd), dtype=dtype, device=device)
        self.values_transposed = values_transposed
        v_shape = (L, batch, H, hd, max_len) if values_transposed else (L, batch, H, max_len, hd)
        self.v = torch.empty(v_shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.cos, self.sin = rope_table(max_len, cfg.head_dim, cfg.rope_theta, dtype, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Store k/v [B, H_kv, T, hd] at positions start … start+T−1; return the keys/values of positions
        0 … start+T−1 [B, H_kv, S, hd] (views of the cache; transposed values as a transposed view)."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        if self.values_transposed:
            self.v[layer, ..., start:end] = v.transpose(-2, -1)
        else:
            self.v[layer, :, :, start:end] = v
        if start == 0:
            return k, v          # the first call: the fresh tensors are the same numbers, and contiguous
        values = self.v[layer, ..., :end].transpose(-2, -1) if self.values_transposed else self.v[layer, :, :, :end]
        return self.k[layer, :, :, :end], values

    def shared_prefix(self, layer: int):
        """Keys and values every sample shares (see SharedPrefixCache); a plain cache has none."""
        return None

    def rope(self, positions: torch.Tensor, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T] of RoPE positions `positions` for a call writing cache positions `rows` (checked here,
        once per call: every layer then writes there)."""
        if rows.stop > self.max_len:
            raise MinivarError(f"KV cache full: position {rows.stop - 1} is past its {self.max_len} positions")
        return self.cos[positions], self.sin[positions]


class SharedPrefixCache(KVCache):
    """A cache for B samples whose first P positions are the same tokens (several questions about one image): the
    prefix's keys and values are stored once, in a batch-of-one cache filled by an earlier call, and only each
    sample's own positions P, P+1, … are stored per sample. The attention reads the prefix as a second key segment."""

    def __init__(self, prefix: KVCache, prefix_len: int, own: KVCache, cfg: TextConfig):
        self.prefix, self.prefix_len, self.own = prefix, prefix_len, own
        self.values_transposed = False
        self.max_len = prefix_len + own.max_len
        self.cos, self.sin = rope_table(self.max_len, cfg.head_dim, cfg.rope_theta, own.k.dtype, own.k.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Store a call's own k/v at positions start … (start ≥ P); return the own positions' keys/values P … end−1."""
        if start < self.prefix_len:
            raise MinivarError(f"a shared-prefix cache writes from position {self.prefix_len} on, not {start}")
        end = start - self.prefix_len + k.shape[2]
        self.own.update(layer, k, v, start - self.prefix_len)
        return self.own.k[layer, :, :, :end], self.own.v[layer, :, :, :end]

    def shared_prefix(self, layer: int):
        """The prefix's keys and values [1, H_kv, P, hd], the same for every sample."""
        P = self.prefix_len
        values = self.prefix.v[layer, ..., :P].transpose(-2, -1) if self.prefix.values_transposed else \
            self.prefix.v[layer, :, :, :P]
        return self.prefix.k[layer, :, :, :P], values


class LlamaAttention(nn.Module):
    """Causal multi-head self-attention with rotary positions; hooks (VAR) act between its softmax and value product.

    Which path runs: the fused SDPA kernel for the rows nobody needs probabilities of; the written-out path for the
    rows a hook needs, and for a single prompt's decode row on transposed cached values (matrix-vector products)."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)

    def forward(self, x, cos, sin, mask, rows: range, cache=None, hooks=None):
        """x [B, T, D] at positions `rows`; mask [B, 1, T, S] bool (True = may attend) or None for plain causal
        attention without padding; hooks: a hooks.Hooks or None."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)       # [B, H_kv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        shared = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, rows.start)                      # [B, H_kv, S, hd]
            shared = cache.shared_prefix(self.layer_idx)       # keys/values every sample shares (or None)
        if self.n_kv != self.n_heads:                                                  # grouped-query attention
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            if shared is not None:
                shared = tuple(t.repeat_interleave(self.n_heads // self.n_kv, dim=1) for t in shared)
        if hooks is not None and hooks.masks_keys:
            mask = hooks.key_mask(self.layer_idx, mask, rows)                          # e.g. sink removal
        first = hooks.explicit_from(self.layer_idx, rows) if hooks is not None else None
        # one row against transposed cached values (a single prompt's CPU decode step, see KVCache): written out,
        # as matrix-vector products, is the faster way there
        gemv = T == 1 and cache is not None and cache.values_transposed
        if shared is not None:             # two key segments: written out (the fused kernel takes one key tensor)
            out = self.attend_explicit(q, k, v, mask, rows, rows.start, hooks, shared)
        elif first is None and not gemv:
            out = attend_fused(q, k, v, mask)
        else:
            out = self.attend_explicit(q, k, v, mask, rows, rows.start if first is None else max(first, rows.start),
                                       hooks)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def attend_explicit(self, q, k, v, mask, rows: range, first: int, hooks=None, shared=None):
        """Attention written out — scores, mask, fp32 softmax, hooks (VAR), @ v — for the rows from position
        `first` on; the rows before it go through the fused kernel. shared: keys/values [1, H, P, hd] of positions
        0 … P−1 that every sample shares (k, v then hold positions P …)."""
        T = q.shape[2]
        S = k.shape[2] + (shared[0].shape[2] if shared is not None else 0)
        n_fused = first - rows.start
        fused = None
        if n_fused and mask is None and T == S:  # the prompt's first rows: the fused kernel's causal mode is right
            fused = F.scaled_dot_product_attention(q[:, :, :n_fused], k, v, is_causal=True)
        if mask is None and T > 1:               # plain causal (a single last row sees every key: no mask)
            mask = causal_mask(T, S, q.device)
        if n_fused and fused is None:
            fused = F.scaled_dot_product_attention(q[:, :, :n_fused], k, v, attn_mask=mask[:, :, :n_fused])
        q, mask = q[:, :, n_fused:], (mask[:, :, n_fused:] if mask is not None else None)
        if q.shape[2] == 1:      # one query row: keys times the query vector, the form CPU kernels stream fastest
            scores = (k @ q.transpose(-2, -1)).transpose(-2, -1)                       # (same numbers as q @ kᵀ)
        else:
            scores = q @ k.transpose(-2, -1)
        if shared is not None:   # the shared prefix's keys come first: positions 0 … P−1
            scores = torch.cat([across_samples(q, shared[0].transpose(-2, -1)), scores], dim=-1)
        scores = (scores * self.head_dim ** -0.5).float()                              # [B, H, R, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)                                          # fp32 softmax, as HF
        if hooks is not None:
            probs = hooks.probs(self.layer_idx, probs, range(first, rows.stop), before=probs)   # VAR (var.py)
        probs = probs.to(v.dtype)
        if shared is None:
            out = probs @ v                                                            # [B, H, R, hd]
        else:
            P = shared[0].shape[2]
            out = across_samples(probs[..., :P], shared[1]) + probs[..., P:] @ v
        return out if fused is None else torch.cat([fused, out], dim=2)


def across_samples(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, H, T, K] @ b [1, H, K, N] → [B, H, T, N], b shared by every sample: the B·T rows in one product per
    head (b is read once, not copied per sample as a broadcasting matmul would)."""
    B, H, T, K = a.shape
    out = a.transpose(0, 1).reshape(H, B * T, K) @ b[0]                               # [H, B·T, N]
    return out.view(H, B, T, -1).transpose(0, 1)


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """[1, 1, T, S] bool: the T query rows are the last T of S positions; row i sees keys 0 … S−T+i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]


def attend_fused(q, k, v, mask):
    """The fused kernel (SDPA): same math as attend_explicit, no probabilities kept. mask None = plain causal."""
    T, S = q.shape[2], k.shape[2]
    if mask is None and T == S:          # its own causal mode, the fastest (it aligns the mask top-left: T == S)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mask is None and T == 1:          # the last row sees every key
        return F.scaled_dot_product_attention(q, k, v)
    if mask is None:
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))            # SwiGLU


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, rows, cache=None, hooks=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, rows, cache, hooks)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings → decoder layers → final norm. Returns the normed hidden states [B, T, D]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        # _weight: skip nn.Embedding's random init; every weight comes from the checkpoint
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, rows: range, mask, cache=None, hooks=None):
        """x: input embeddings [B, T, D] of cache positions `rows`; positions [B, T]: each token's RoPE position
        (its index among the sample's real tokens); mask [B, 1, T, S] bool or None (causal, no padding)."""
        if cache is not None:
            cos, sin = cache.rope(positions, rows)                                     # [B, T, hd]
        else:
            cos, sin = rope_table(int(positions.max()) + 1, self.cfg.head_dim, self.cfg.rope_theta, x.dtype, x.device)
            cos, sin = cos[positions], sin[positions]
        for i, layer in enumerate(self.layers):
            if hooks is not None:
                hooks.residual(i, x, rows)    # VAR reads its sink tokens off each layer's residual input h^ℓ
            x = layer(x, cos, sin, mask, rows, cache, hooks)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Holds the decoder and its lm_head under HF's names; Llava.forward drives them."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied in LLaVA-1.5
