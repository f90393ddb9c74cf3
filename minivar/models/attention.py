"""Attention, the reference: what every attention call of the decoder computes. Read this first.

The decoder (llama.py: LlamaAttention) gets these numbers (to rounding), often from a faster path (attention_fast.py:
the fused kernel for rows no hook needs, one query row as matrix-vector products, a prefix every sample shares);
tests/test_attention.py holds each of those equal to this function.

Here every row goes through hooks.scores (before the softmax: PAI) and hooks.probs (after it: VAR, the captures); a
speed path may skip the rows before hooks.explicit_from(layer, rows) (they take the fused kernel), so a hook changes
no row before the position it names: the methods and the captures read or change only rows from there on.

Shapes: B batch, H heads, T query rows (this call's tokens), S key positions (cached + new), hd head dim.
"""
from __future__ import annotations

import torch


def attention(q, k, v, mask, layer: int, rows: range, hooks=None) -> torch.Tensor:
    """q [B, H, T, hd] of cache positions `rows`, the last T of the S key positions of k, v [B, H, S, hd];
    mask [B, 1, T, S] bool, True = may attend (None: plain causal); hooks: a methods.hooks.Hook or None.
    Returns [B, H, T, hd]."""
    scores = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).float()        # [B, H, T, S]; fp32 from here, as HF
    if mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)    # a masked key gets exp(min − max) = 0
    if hooks is not None:        # a pre-softmax step (PAI): change the scores, see hooks.py
        scores = hooks.scores(layer, scores, rows)
    probs = torch.softmax(scores, dim=-1)
    if hooks is not None:        # the method step (VAR, captures): read or change the probabilities, see hooks.py
        probs = hooks.probs(layer, probs, rows, before=probs)
    return probs.to(v.dtype) @ v


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """[1, 1, T, S] bool: the T query rows are the last T of S positions; row i sees keys 0 … S−T+i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
