"""The speed paths of the attention: attention.attention's numbers, computed faster where a case allows.

Read attention.py first: each function here gives its numbers (tests/test_attention.py compares them, fp32, in every
case LlamaAttention.attend sends here — that method is the one place that chooses a path):

    fused           the fused SDPA kernel: no probabilities kept, for the rows no hook needs
    split           the rows before the first one a hook needs (hooks.explicit_from) through the fused kernel, the
                    rest through the reference itself (or `written_out` for a single row)
    written_out     the reference's steps with faster products: one query row as keys × query vector (the
                    matrix-vector form CPU kernels stream fastest; on values cached transposed, see llama.KVCache,
                    probs @ v is one too), and a shared prefix (llama.SharedPrefixCache) as a second key segment read
                    once for every sample (`across_samples`) — or one prefix per branch (contrastive decoding: the
                    full prompt's and the contrast prompt's), each read once for its branch's samples

Shapes: B batch, H heads, T query rows, S key positions, hd head dim; k, v here already have H heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attention, causal_mask


def kernel_values(v: torch.Tensor) -> torch.Tensor:
    """v as the fused kernel needs it: each position's values contiguous. Values cached transposed (a single prompt's
    CPU decode layout, llama.KVCache) read by a call of several rows (a later chunk of a long prompt) are copied —
    otherwise SDPA falls back to its math path, which holds the whole [B, H, T, S] score matrix in fp32."""
    return v if v.stride(-1) == 1 else v.contiguous()


def fused(q, k, v, mask) -> torch.Tensor:
    """The fused kernel (SDPA) on attention's arguments, without hooks. mask None = plain causal."""
    T, S = q.shape[2], k.shape[2]
    v = kernel_values(v)
    if mask is None and T == S:          # its own causal mode, the fastest (it aligns the mask top-left: T == S)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mask is None and T == 1:          # the last row sees every key
        return F.scaled_dot_product_attention(q, k, v)
    if mask is None:
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def split(q, k, v, mask, layer: int, rows: range, first: int, hooks) -> torch.Tensor:
    """attention(q, k, v, mask, layer, rows, hooks) for a hook that needs the rows from position `first` on
    (rows.start ≤ first < rows.stop): the rows before it through the fused kernel, the rest written out."""
    T, S = q.shape[2], k.shape[2]
    n = first - rows.start                              # rows the hooks do not need
    early, v_kernel = None, kernel_values(v) if n else v
    if n and mask is None and T == S:    # plain causal from position 0: the kernel's causal mode (top-left aligned)
        early = F.scaled_dot_product_attention(q[:, :, :n], k, v_kernel, is_causal=True)
    elif n:
        mask = causal_mask(T, S, q.device) if mask is None else mask
        early = F.scaled_dot_product_attention(q[:, :, :n], k, v_kernel, attn_mask=mask[:, :, :n])
    # (the early rows get every key, as in `fused` over the whole call: the same numbers, bit for bit, as without
    # the hook)
    late_mask = mask[:, :, n:] if mask is not None else None
    late = (written_out if T - n == 1 else attention)(  # one row: its products as matrix-vector ones
        q[:, :, n:], k, v, late_mask, layer, range(first, rows.stop), hooks)
    return late if early is None else torch.cat([early, late], dim=2)


def written_out(q, k, v, mask, layer: int, rows: range, hooks=None, prefix=None) -> torch.Tensor:
    """attention()'s steps, its two products in faster forms: one query row as k @ qᵀ (then probs @ v on values
    cached transposed is a matrix-vector product too), and with `prefix` — keys/values [G, H, P, hd] of positions
    0 … P−1, prefix g shared by the g-th of G equal groups of samples (G = 1: every sample; G = 2: a contrastive
    call's two branches, branch-major rows); k, v then hold positions P … S−1 — a second key segment read once.
    One query row may come with fewer key/value heads than query heads (grouped-query attention, not repeated):
    query heads g·n … g·n+n−1 use key/value head g (repeat_kv's order), so each is read once for its n heads."""
    B, H, T, hd = q.shape
    groups = k.shape[1]          # key/value heads: H, or fewer (grouped, one query row only)
    if T == 1:                   # one query row: keys times the query vectors, the form CPU kernels stream fastest
        qg = q.reshape(B, groups, H // groups, hd)                                  # [B, H_kv, n, hd]
        scores = (k @ qg.transpose(-2, -1)).transpose(-2, -1).reshape(B, H, 1, -1)  # (the numbers of q @ kᵀ)
    else:
        scores = q @ k.transpose(-2, -1)
    if prefix is not None:       # the shared prefix's keys come first: positions 0 … P−1
        scores = torch.cat([across_samples(q, prefix[0].transpose(-2, -1)), scores], dim=-1)
    scores = (scores * q.shape[-1] ** -0.5).float()                                # [B, H, T, S]
    if mask is None and q.shape[2] > 1:                   # a single last row sees every key: no mask needed
        mask = causal_mask(q.shape[2], scores.shape[-1], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    if hooks is not None:
        scores = hooks.scores(layer, scores, rows)
    probs = torch.softmax(scores, dim=-1)
    if hooks is not None:
        probs = hooks.probs(layer, probs, rows, before=probs)
    probs = probs.to(v.dtype)
    if prefix is None and groups != H:                    # [B, H_kv, n, S] @ [B, H_kv, S, hd] → [B, H, 1, hd]
        return (probs.reshape(B, groups, H // groups, -1) @ v).reshape(B, H, T, hd)
    if prefix is None:
        return probs @ v
    P = prefix[0].shape[2]
    return across_samples(probs[..., :P], prefix[1]) + probs[..., P:] @ v


def across_samples(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, H, T, K] @ b [G, H, K, N] → [B, H, T, N], b[g] shared by the g-th of G equal groups of samples (rows
    g·B/G … (g+1)·B/G − 1): each group's rows in one product per head (b is read once, not copied per sample as a
    broadcasting matmul would)."""
    B, H, T, K = a.shape
    G = b.shape[0]
    if G == 1:                   # one prefix for every sample: one [B·T, K] @ [K, N] product per head
        out = a.transpose(0, 1).reshape(H, B * T, K) @ b[0]                           # [H, B·T, N]
        return out.view(H, B, T, -1).transpose(0, 1)
    n = B // G
    grouped = a.view(G, n, H, T, K).transpose(1, 2).reshape(G, H, n * T, K)            # [G, H, n·T, K]
    out = grouped @ b                                                                  # [G, H, n·T, N]
    return out.view(G, H, n, T, -1).transpose(1, 2).reshape(B, H, T, -1)
