"""The mixture-of-experts MLP of Qwen3-VL-MoE (30B-A3B, 235B-A22B): each token goes to k of E experts.

    p        = softmax(x · gateᵀ)                      (fp32; E router logits per token)
    w, e     = top-k of p                              (k experts per token, the largest first)
    w        = w / Σ w                                 (renormalised over the k chosen: they sum to 1)
    y        = Σ_k w_k · expert_{e_k}(x)               (each expert a SwiGLU: down(silu(gate(x)) · up(x)))

The experts' weights are one 3-D tensor per layer and kind, each expert's a Linear weight [out, in] as every
Linear in minivar: `experts.gate_up_proj` [E, 2·I, D] (the gate's I rows, then the up's) and `experts.down_proj`
[E, D, I] — transformers 5.x's layout, in which it also saves them. The hub's checkpoints store them transposed
([E, D, 2·I], [E, I, D], for x @ W); the loader turns those round (family.py: convert_tensor). This layout, not the
hub's, because a decode step's products are matrix-vector ones, and F.linear on [out, in] rows streams them 1.6–3.5×
faster on a CPU in bf16 than x @ W on [in, out] (measured at 30B-A3B's expert size). `gate.weight` [E, D] is the
router.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Qwen3TextConfig


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] → (experts [N, k] long, weights [N, k] in the logits' dtype): transformers' rule."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)                    # [N, E]
    weights, experts = torch.topk(probs, k, dim=-1)                               # [N, k], largest first
    weights = weights / weights.sum(dim=-1, keepdim=True)                         # renormalised over the k
    return experts, weights.to(logits.dtype)


class Experts(nn.Module):
    """E SwiGLU experts (Linear weights [out, in]); forward runs each chosen expert on just its tokens."""

    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D]; experts, weights [N, k] from `route` → [N, D]."""
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():                        # the experts some token chose, in order
            token, slot = (experts == e).nonzero(as_tuple=True)     # which tokens, and as which of their k
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out.index_add_(0, token, y * weights[token, slot, None])
        return out


class SparseMoeBlock(nn.Module):
    """The MLP of a sparse layer: `gate` (the router, [E, D]) and `experts`, under transformers' names."""

    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        experts, weights = route(self.gate(flat), self.top_k)
        return self.experts(flat, experts, weights).view(B, T, D)
