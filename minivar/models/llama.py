"""LLaMA-2 / Vicuna decoder: RMSNorm, rotary embeddings, causal attention (with the hooks step), SwiGLU, KV cache.

The attention's math is attention.py's ten lines (read it first); LlamaAttention.attend picks among the faster
paths of attention_fast.py that give the same numbers. The caches keep one contract (Cache), and one DecoderCall
carries a forward call's rows, RoPE tables, mask, cache and hooks through the layers.

Shapes: B batch, T new tokens this call, S all key positions so far (cache + new), H heads, hd head dim.
Parameter names are the HF ones (`model.layers.N.self_attn.q_proj`, ...), so a checkpoint loads by name.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention_fast as fast
from .attention import causal_mask  # noqa: F401  (llava.py builds its padding masks with it)
from .attention_fast import across_samples  # noqa: F401  (the shared prefix's product; README names it here)
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


class KV(NamedTuple):
    """What a cache hands the attention for one layer of one call: every key/value position the call may attend to."""
    k: torch.Tensor                   # [B, H_kv, S', hd]: positions S−S' … S−1 (S' = S unless `prefix` holds the first)
    v: torch.Tensor                   # [B, H_kv, S', hd] (a transposed view where values_transposed)
    prefix: tuple | None = None       # keys, values [G, H_kv, P, hd] of positions 0 … P−1: prefix g shared by the
                                      # g-th of G equal groups of samples (G = 1: every sample)
    values_transposed: bool = False   # v is stored [.., hd, S']: one query row is fastest as matrix-vector products


class Cache(abc.ABC):
    """The contract of a KV cache: what the decoder asks of one (KVCache and SharedPrefixCache keep it).

        max_len                             how many positions it holds
        rope(positions, rows) -> cos, sin   RoPE tables [B, T, hd] at RoPE positions `positions` [B, T] for a call
                                            writing cache positions `rows`, from a table computed once per cache;
                                            a MinivarError if `rows` run past max_len (checked once per call)
        update(layer, k, v, start) -> KV    store k, v [B, H_kv, T, hd] at positions start … start+T−1 of `layer`;
                                            return what the attention reads: positions 0 … start+T−1 (a KV)

    A cache keeps no fill level: each call says where it writes (gpt-fast's input_pos)."""

    def __init__(self, cfg: TextConfig, max_len: int, dtype: torch.dtype, device: torch.device | str):
        self.max_len = max_len
        self.cos, self.sin = rope_table(max_len, cfg.head_dim, cfg.rope_theta, dtype, device)

    def check(self, rows: range):
        """A MinivarError if a call writing cache positions `rows` does not fit."""
        if rows.stop > self.max_len:
            raise MinivarError(f"KV cache full: position {rows.stop - 1} is past its {self.max_len} positions")

    def rope(self, positions: torch.Tensor, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T, hd] of LLaMA's RoPE at `positions` [B, T], for a call writing `rows`."""
        self.check(rows)
        return self.cos[positions], self.sin[positions]

    @abc.abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> KV:
        """Store a call's keys/values of `layer` from position `start` on; return all it may attend to."""


class KVCache(Cache):
    """Preallocated keys/values for every layer, written at the positions each call gives. Keys are stored
    [L, B, H_kv, max_len, hd]. Values are stored the same way, or transposed ([L, B, H_kv, hd, max_len]) with
    `values_transposed`: a single query row's probs @ v is then, per head, hd contiguous dot products of length S —
    the form ATen's own matrix-vector kernel streams fastest, what a single prompt's CPU decode uses (generate.py
    chooses; attention_fast.written_out computes it)."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                 values_transposed: bool = False):
        super().__init__(cfg, max_len, dtype, device)
        L, H, hd = cfg.num_hidden_layers, cfg.n_kv_heads, cfg.head_dim
        # uninitialised: a call reads only the positions before its own end, all written by earlier calls
        self.k = torch.empty((L, batch, H, max_len, hd), dtype=dtype, device=device)
        self.values_transposed = values_transposed
        v_shape = (L, batch, H, hd, max_len) if values_transposed else (L, batch, H, max_len, hd)
        self.v = torch.empty(v_shape, dtype=dtype, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> KV:
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        if self.values_transposed:
            self.v[layer, ..., start:end] = v.transpose(-2, -1)
        else:
            self.v[layer, :, :, start:end] = v
        if start == 0:
            return KV(k, v)      # the first call: the fresh tensors are the same numbers, and contiguous
        return self.read(layer, end)

    def rows(self, first: int, stop: int) -> "CacheRows":
        """Rows first … stop−1 of this cache as a cache of their own (the same storage): a call may write just them."""
        return CacheRows(self, first, stop)

    def read(self, layer: int, end: int) -> KV:
        """Positions 0 … end−1 of `layer` as stored (views of the cache; transposed values as a transposed view)."""
        if self.values_transposed:
            return KV(self.k[layer, :, :, :end], self.v[layer, ..., :end].transpose(-2, -1), values_transposed=True)
        return KV(self.k[layer, :, :, :end], self.v[layer, :, :, :end])


class CacheRows(Cache):
    """Rows first … stop−1 of a KVCache, written and read through the same storage: contrastive decoding's contrast
    branch prefilled alone, at its own (shorter) length, into the rows the joint decode steps then read."""

    def __init__(self, cache: KVCache, first: int, stop: int):
        if cache.values_transposed:
            raise MinivarError("rows of a cache with transposed values (a single prompt's) are not addressable")
        self.cache, self.first, self.stop = cache, first, stop
        self.max_len, self.cos, self.sin = cache.max_len, cache.cos, cache.sin

    def clear(self, end: int) -> None:
        """Zero positions 0 … end−1 of these rows (padding no call writes: masked, but it must not hold NaNs)."""
        self.cache.k[:, self.first:self.stop, :, :end] = 0
        self.cache.v[:, self.first:self.stop, :, :end] = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> KV:
        end = start + k.shape[2]
        c, rows = self.cache, slice(self.first, self.stop)
        c.k[layer, rows, :, start:end] = k
        c.v[layer, rows, :, start:end] = v
        return KV(c.k[layer, rows, :, :end], c.v[layer, rows, :, :end])


class SharedPrefixCache(Cache):
    """A cache for B samples whose first P positions are the same tokens (several questions about one image): the
    prefix's keys and values are stored once, in a batch-of-one KVCache filled by an earlier call, and only each
    sample's own positions P, P+1, … are stored per sample, in a KVCache of batch B whose position 0 is position P.
    update returns the prefix as KV.prefix: the attention reads it as a second key segment.

    A prefix cache of batch G > 1 holds G prefixes, prefix g shared by the g-th of G equal groups of the B samples
    (rows g·B/G … (g+1)·B/G − 1): contrastive decoding's two branches, each with its own prompt prefix (DAMRO: k
    image tokens, VCD: the noised image). Prefixes of different lengths are left-padded to P in their cache; the
    attention mask hides the padding, as it hides any row's."""

    def __init__(self, prefix: KVCache, prefix_len: int, own: KVCache, cfg: TextConfig):
        super().__init__(cfg, prefix_len + own.max_len, own.k.dtype, own.k.device)
        G, B = prefix.k.shape[1], own.k.shape[1]
        if B % G:
            raise MinivarError(f"a shared-prefix cache of {G} prefixes needs a multiple of {G} samples, got {B}")
        self.prefix, self.prefix_len, self.own = prefix, prefix_len, own

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> KV:
        """A call's own k/v at positions start … (start ≥ P) go to `own`; KV.k/v: positions P … end−1."""
        P = self.prefix_len
        if start < P:
            raise MinivarError(f"a shared-prefix cache writes from position {P} on, not {start}")
        own = self.own.update(layer, k, v, start - P)
        if P == 0:
            return own
        prefix = self.prefix.read(layer, P)
        return own._replace(prefix=(prefix.k, prefix.v))


@dataclass(frozen=True)
class DecoderCall:
    """One forward call of the decoder as every layer sees it: made once per call, passed down, never stored."""
    rows: range                       # cache positions of the call's T tokens
    cos: torch.Tensor                 # [B, T, hd] RoPE tables at the tokens' positions (the caller's rotary scheme)
    sin: torch.Tensor
    mask: torch.Tensor | None = None  # [B, 1, T, S] bool, True = may attend; None = plain causal, no padding
    cache: Cache | None = None
    hooks: object | None = None       # a methods.hooks.Hooks, or None


class LlamaAttention(nn.Module):
    """Causal multi-head self-attention with rotary positions; hooks (VAR) act between its softmax and value product.

    The numbers are attention.attention's (read that first: scores, mask, fp32 softmax, hooks, @ v); `attend`
    picks the fastest path of attention_fast.py that gives them. A family with other biases (Qwen2: q/k/v only)
    passes qkv_bias / o_bias; qk_norm (Qwen3) RMS-normalises each head's query and key before the rotary (q_norm,
    k_norm: one weight of head_dim, shared by the heads); cos/sin come with the DecoderCall, so its rotary positions
    are its own."""

    def __init__(self, cfg: TextConfig, layer_idx: int, *, qkv_bias: bool | None = None, o_bias: bool | None = None,
                 qk_norm: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        qkv_bias = cfg.attention_bias if qkv_bias is None else qkv_bias
        o_bias = cfg.attention_bias if o_bias is None else o_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, call: DecoderCall) -> torch.Tensor:
        """x [B, T, D] at cache positions call.rows → [B, T, D]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:                                  # per head, over head_dim (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)        # [B, H, T, hd], [B, H_kv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, call.cos, call.sin), apply_rope(k, call.cos, call.sin)
        kv = call.cache.update(self.layer_idx, k, v, call.rows.start) if call.cache is not None else KV(k, v)
        mask, hooks = call.mask, call.hooks
        if hooks is not None and hooks.masks_keys:
            mask = hooks.key_mask(self.layer_idx, mask, call.rows)                     # e.g. sink removal
        out = self.attend(q, kv, mask, call.rows, hooks)      # [B, H, T, hd]: attention.attention's numbers
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q: torch.Tensor, kv: KV, mask, rows: range, hooks=None) -> torch.Tensor:
        """attention.attention(q, k, v, mask, layer, rows, hooks) with k, v all of kv's positions, by the fastest
        path that gives its numbers (attention_fast.py): the one place that chooses. kv has the key/value heads:
        under grouped-query attention (each key/value head serving a group of query heads) they are repeated per
        query head here, except for a CPU decode row (one query row per sample, any batch), whose products are
        written out (attention_fast.written_out) and read each key/value head once for its whole group — repeating
        would copy the whole cache every step, and SDPA's fused kernel is 4–5× slower than the written-out products
        for a single query row on a CPU (a contrastive step's two rows: 9.5 vs 1.8 ms per layer)."""
        one_row = q.shape[2] == 1 and kv.prefix is None and (kv.values_transposed or q.device.type == "cpu")
        if kv.k.shape[1] != q.shape[1] and not one_row:
            kv = repeat_kv(kv, q.shape[1] // kv.k.shape[1])
        if kv.prefix is not None:         # two key segments: written out (the fused kernel takes one key tensor)
            return fast.written_out(q, kv.k, kv.v, mask, self.layer_idx, rows, hooks, kv.prefix)
        first = hooks.explicit_from(self.layer_idx, rows) if hooks is not None else None
        if first is not None and first < rows.stop:       # a hook needs the probabilities from position `first` on
            return self.attend_explicit(q, kv.k, kv.v, mask, rows, max(first, rows.start), hooks)
        if one_row:                                       # a CPU decode row: its products written out
            return fast.written_out(q, kv.k, kv.v, mask, self.layer_idx, rows, hooks)
        return fast.fused(q, kv.k, kv.v, mask)

    def attend_explicit(self, q, k, v, mask, rows: range, first: int, hooks=None) -> torch.Tensor:
        """The rows from position `first` on written out, where the hooks see their probabilities; the rows before
        it through the fused kernel (attention_fast.split)."""
        return fast.split(q, k, v, mask, self.layer_idx, rows, first, hooks)


def repeat_kv(kv: KV, n: int) -> KV:
    """Each key/value head repeated n times, next to itself ([B, H_kv, S, hd] → [B, H_kv·n, S, hd]), as HF."""
    prefix = tuple(t.repeat_interleave(n, dim=1) for t in kv.prefix) if kv.prefix is not None else None
    return kv._replace(k=kv.k.repeat_interleave(n, dim=1), v=kv.v.repeat_interleave(n, dim=1), prefix=prefix)


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
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). qkv_bias / o_bias / qk_norm: see LlamaAttention."""

    def __init__(self, cfg: TextConfig, layer_idx: int, *, qkv_bias: bool | None = None, o_bias: bool | None = None,
                 qk_norm: bool = False):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, call: DecoderCall) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), call)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings → decoder layers → final norm. Returns the normed hidden states [B, T, D].

    layer(cfg, i) makes layer i (another family's block, e.g. LlamaDecoderLayer with other biases); a family with
    other rotary positions overrides `rotary`, or makes its DecoderCall itself and calls `run`."""

    def __init__(self, cfg: TextConfig, layer=LlamaDecoderLayer):
        super().__init__()
        self.cfg = cfg
        # _weight: skip nn.Embedding's random init; every weight comes from the checkpoint
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, rows: range, mask, cache: Cache | None = None, hooks=None) -> torch.Tensor:
        """x: input embeddings [B, T, D] of cache positions `rows`; positions [B, T]: each token's RoPE position
        (its index among the sample's real tokens); mask [B, 1, T, S] bool or None (causal, no padding)."""
        cos, sin = self.rotary(positions, rows, cache, x.dtype)
        return self.run(x, DecoderCall(rows, cos, sin, mask, cache, hooks))

    def rotary(self, positions: torch.Tensor, rows: range, cache: Cache | None, dtype: torch.dtype):
        """cos/sin [B, T, hd] of LLaMA's RoPE at `positions` [B, T] (the cache's table, computed once per cache)."""
        if cache is not None:
            return cache.rope(positions, rows)
        cos, sin = rope_table(int(positions.max()) + 1, self.cfg.head_dim, self.cfg.rope_theta, dtype,
                              positions.device)
        return cos[positions], sin[positions]

    def run(self, x: torch.Tensor, call: DecoderCall) -> torch.Tensor:
        """The layers and the final norm on input embeddings x [B, T, D], for a call whose cos/sin the caller made
        (a family with its own rotary positions calls this directly)."""
        for i, layer in enumerate(self.layers):
            if call.hooks is not None:
                call.hooks.residual(i, x, call.rows)  # VAR reads its sink tokens off each layer's residual input h^ℓ
            x = layer(x, call)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Holds the decoder and its lm_head under HF's names; Llava.forward drives them."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied in LLaVA-1.5
