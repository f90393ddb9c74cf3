"""LLaMA-2 / Vicuna decoder: RMSNorm, rotary embeddings, causal attention (with the VAR step), SwiGLU, KV cache.

Shapes: B batch, T new tokens this call, S all key positions so far (cache + new), H heads, hd head dim.
Parameter names are the HF ones (`model.layers.N.self_attn.q_proj`, ...), so a checkpoint loads by name.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TextConfig


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


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, T, hd] for integer positions [B, T]; angles in fp32, cast to the activation dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq                  # [B, T, hd/2]
    emb = torch.cat([angles, angles], dim=-1)                          # half-split layout: [θ0..θn, θ0..θn]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's weights are permuted for the "rotate half" convention (pairs (i, i + hd/2)), not Meta's interleaved pairs.
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]                   # cos/sin broadcast over heads


@contextlib.contextmanager
def without_onednn(active: bool = True):
    """Switch oneDNN (a CPU backend; GPUs ignore the switch) off for the products inside, when active. For a matrix
    times a single vector (a decode step: each weight matrix times one row; each head's keys and values times one
    query row) ATen's own kernels are 1.5-4x faster than oneDNN's here; oneDNN shines on matrix-matrix products
    (the prefill, batched projections)."""
    before = torch.backends.mkldnn.enabled
    if active:
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


class KVCache:
    """Preallocated keys/values for every layer, filled left to right. Keys are stored [L, B, H_kv, max_len, hd];
    values transposed, [L, B, H_kv, hd, max_len]. A decode step's probs @ v is then, per head, hd contiguous dot
    products of length S (one per output element), the form CPU matrix-vector kernels stream fastest: 5-8x faster
    here than summing S scaled rows of the [max_len, hd] layout."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        L, H, hd = cfg.num_hidden_layers, cfg.n_kv_heads, cfg.head_dim
        # uninitialised: only the filled positions (the first `length` along the max_len axis) are ever read
        self.k = torch.empty((L, batch, H, max_len, hd), dtype=dtype, device=device)
        self.v_t = torch.empty((L, batch, H, hd, max_len), dtype=dtype, device=device)
        self.length = 0   # positions already stored (the same for every sample: padding is on the left)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this call's k/v [B, H_kv, T, hd] after the cached ones; return all keys/values so far [B, H_kv, S, hd]
        (values as a transposed view of the cache)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v_t[layer, ..., start:end] = v.transpose(-2, -1)
        if start == 0:
            return k, v          # the prefill: the fresh tensors are the same numbers, and contiguous
        return self.k[layer, :, :, :end], self.v_t[layer, ..., :end].transpose(-2, -1)


class Probe:
    """What the decoder calls on a `probe` object (passed per call, never stored on the model). These defaults do
    nothing; subclasses override what they need (probe.Capture records and masks, var.find_sink_dims records)."""

    # True when key_mask may remove key columns. Only then does the model build an explicit causal mask for a call
    # without padding; otherwise the fused kernel keeps its faster causal mode even while a probe records.
    masks_keys = False

    def record_residual(self, layer: int, h: torch.Tensor) -> None:
        """Called with each layer's residual input h [B, T, D], before the layer runs."""

    def key_mask(self, layer: int, mask: torch.Tensor) -> torch.Tensor:
        """May remove key columns from the attention mask [B, 1, T, S] (True = may attend); called where masks_keys."""
        return mask

    def wants(self, layer: int) -> bool:
        """True makes this layer compute explicit probabilities and call record_attention."""
        return False

    def first_row(self) -> int:
        """The first query row of this call whose probabilities record_attention needs (the rows from there on, at
        least, are passed to it); the rows before it may go through the fused kernel."""
        return 0

    def record_attention(self, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """fp32 probabilities [B, H, T', S] before and after VAR, of the call's last T' ≥ T − first_row() query rows."""


class LlamaAttention(nn.Module):
    """Causal multi-head self-attention with rotary positions; VAR acts between its softmax and value product.

    Which path runs: the fused SDPA kernel when nobody needs the probabilities and there are several query rows
    (the prefill); the written-out path when VAR or a probe needs probabilities, and for a single query row
    (a decode step), where it is also the faster one."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)

    def forward(self, x, cos, sin, mask, cache=None, var=None, probe=None, last_only=False):
        """x [B, T, D]; mask [B, 1, T, S] bool (True = may attend) or None for plain causal attention without
        padding; var: per-call VAR state or None; probe: capture/masking; last_only: only the last row's output is
        wanted (keys and values still come from every row)."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # [B, H_kv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        if last_only and T > 1:                       # queries: only the last row
            x, cos, sin = x[:, -1:], cos[:, -1:], sin[:, -1:]
            mask = mask[:, :, -1:] if mask is not None else None
        Tq = x.shape[1]
        q = self.q_proj(x).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, Tq, hd]
        q = apply_rope(q, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                                  # [B, H_kv, S, hd]
        if self.n_kv != self.n_heads:                                                  # grouped-query attention
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        if probe is not None and probe.masks_keys:
            mask = probe.key_mask(self.layer_idx, mask)                                # optional column masking

        var_here = var is not None and var.active(self.layer_idx)
        probe_here = probe is not None and probe.wants(self.layer_idx)
        if var_here or probe_here or Tq == 1:
            out = self.attend_explicit(q, k, v, mask, var if var_here else None, probe if probe_here else None)
        else:
            out = attend_fused(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, Tq, -1))

    def attend_explicit(self, q, k, v, mask, var=None, probe=None):
        """Attention written out — scores, mask, fp32 softmax, [VAR], @ v — for the query rows that need it."""
        T, S = q.shape[2], k.shape[2]
        # Only the query rows VAR may touch or the probe reads need explicit probabilities (in the prefill: the rows
        # after the image for VAR); the rows before them go through the fused kernel.
        firsts = [x.first_row() for x in (var, probe) if x is not None]
        first = min(firsts) if firsts else 0
        head = None
        if first and mask is None and T == S:    # the prompt's first rows: the fused kernel's causal mode is right
            head = F.scaled_dot_product_attention(q[:, :, :first], k, v, is_causal=True)
        if mask is None and T > 1:               # plain causal (a single last row sees every key: no mask)
            mask = causal_mask(T, S, q.device)
        if first and head is None:
            head = F.scaled_dot_product_attention(q[:, :, :first], k, v, attn_mask=mask[:, :, :first])
        q, mask = q[:, :, first:], (mask[:, :, first:] if mask is not None else None)
        one_row = q.shape[2] == 1                # a decode step: matrix-vector products, at any batch size
        with without_onednn(one_row):
            scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5                 # [B, H, T', S]
        scores = scores.float()
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)                                          # fp32 softmax, as HF
        before = probs
        if var is not None:
            probs = var.redistribute(self.layer_idx, probs, first)                     # VAR (see var.py)
        if probe is not None:
            probe.record_attention(self.layer_idx, before, probs)
        with without_onednn(one_row):
            out = probs.to(v.dtype) @ v                                                # [B, H, T', hd]
        return out if head is None else torch.cat([head, out], dim=2)


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """[1, 1, T, S] bool: the T query rows are the last T of S positions; row i sees keys 0 … S−T+i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]


def attend_fused(q, k, v, mask):
    """The fused kernel (SDPA): same math as attend_explicit, no probabilities kept. mask None = plain causal."""
    T, S = q.shape[2], k.shape[2]
    if mask is None and T == S:          # its own causal mode, the fastest (it aligns the mask top-left: T == S)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
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

    def forward(self, x, cos, sin, mask, cache=None, var=None, probe=None, last_only=False):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, var, probe, last_only)
        x = (x[:, -1:] if last_only else x) + a
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

    def forward(self, x, positions, mask, cache=None, var=None, probe=None, last_only=False):
        """x: input embeddings [B, T, D]; positions [B, T]; mask [B, 1, T, S] bool or None (causal, no padding).
        last_only: return only the last position ([B, 1, D]) — then the last layer computes only that row after
        its keys and values (a prefill for generation needs nothing else)."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if var is not None:
                var.observe(i, x)             # VAR: sink tokens are read off each layer's residual input h^ℓ
            if probe is not None:
                probe.record_residual(i, x)
            # (not where VAR or the probe reads this layer's rows: they count rows from the call's first one)
            reads_rows = (var is not None and var.active(i)) or (probe is not None and probe.wants(i))
            trim = last_only and i == last and not reads_rows
            x = layer(x, cos, sin, mask, cache, var, probe, trim)
        if cache is not None:
            cache.length += positions.shape[1]    # every layer has stored this call's keys and values
        return self.norm(x[:, -1:] if last_only else x)


class LlamaForCausalLM(nn.Module):
    """Holds the decoder and its lm_head under HF's names; Llava.forward drives them."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied in LLaVA-1.5
