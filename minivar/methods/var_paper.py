"""VAR's rule as the paper states it: Visual Attention Redistribution, Kang et al., ICLR 2025, "See What You Are
Told: Visual Attention Sink in Large Multimodal Models". Its three steps, as plain functions of tensors.

Notation: layers ℓ = 0..L−1; image tokens occupy prompt positions I = [s, s+N); h^ℓ is the residual input of layer
ℓ; α the post-softmax attention probabilities (fp32), one row per query i, one column per key j.

  1. visual sinks       sink dims D: massive-activation dims of the base LLM (7B: 1415, 2533; 13B: 2100, 4743), or
                        found (sink_finder.py).  φ_j = max_{d∈D} |h_j[d]| / sqrt(mean_k h_j[k]² + 1e-6);
                        sinks S^ℓ = {j : φ_j ≥ τ}, visual sinks V^ℓ = S^ℓ ∩ I.  Computed once per sample in the
                        prefill, reused while decoding.
  2. image-centric      rows touched: layers 0..L−2 only; prefill rows after the image (i ≥ s+N) and every decoding
     heads              row; a layer (of a sample) without visual sinks is left alone.
                        A = Σ_{j∈I} α_ij,  r = Σ_{j∈I∖V} α_ij / A;  (head, row) selected iff A ≥ 0.2 and r ≥ ρ.
  3. redistribution     every sink j ∈ S^ℓ keeps (1−p)·α_ij; Ω = p·Σ_{j∈S^ℓ} α_ij goes to I∖V in proportion:
                        α'_ij = α_ij + Ω·α_ij / Σ_{k∈I∖V} α_ik.  Rows still sum to 1.

The rest of VAR reads these functions and never restates them: var_state.py holds one call's sink sets and head
selections as hooks (hooks.py), sink_finder.py finds sink dims for a model whose dims are unknown, var.py holds the
settings (VARConfig) and the method object. var_official.py is the released code's arithmetic, registered here as
a second `Rule`; this module never imports it.
"""
from __future__ import annotations

import torch

PRESETS = {"general": 0.8, "hallucination": 0.5, "vision": 0.9}   # ρ per task family, from the paper


# ---------------------------------------------------------------------------------------------------------------
# Step 1. Visual sinks: tokens with a massive activation in the sink dims, among the image tokens

def sink_scores(h: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """φ [B, T] for residual states h [B, T, D]: the largest |h[d]| over sink dims, relative to the token's RMS."""
    h = h.float()
    rms = torch.sqrt(h.pow(2).mean(-1) + 1e-6)                      # [B, T]
    return h[..., list(dims)].abs().amax(-1) / rms


def sink_sets(h: torch.Tensor, dims: tuple[int, ...], tau: float, image: torch.Tensor, real: torch.Tensor | None = None):
    """One layer's φ [B, T] and sink sets from its residual input h [B, T, D]: S = {φ ≥ τ} (only among `real` [B, T]
    tokens where given: padding is never a sink) and the visual sinks V = S ∩ I, with I = `image` [B, T]."""
    phi = sink_scores(h, dims) if dims else torch.zeros(h.shape[:2], device=h.device)
    sinks = phi >= tau
    if real is not None:
        sinks = sinks & real
    return phi, sinks, sinks & image


# ---------------------------------------------------------------------------------------------------------------
# Step 2. Image-centric heads: on the rows after the image, the (head, row) pairs that look at the image and
# mostly at its non-sink tokens

def image_span(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, end) of each sample's image tokens ([B] each) from image masks [B, T]; (T, T) for a sample without."""
    T = image.shape[-1]
    positions = torch.arange(T, device=image.device)
    start = torch.where(image, positions, T).amin(-1)
    end = torch.where(image.any(-1), torch.where(image, positions + 1, 0).amax(-1), T)
    return start, end


def after_image(positions: torch.Tensor, image_end: torch.Tensor) -> torch.Tensor:
    """The rows VAR reads and changes: positions [R] at or after each sample's image end ([B]) → [B, R] bool
    (prompt rows after the image, and every generated row). The capture's rows="after_image" is the same rule."""
    return positions[None, :] >= image_end[:, None]


def first_after_image(image_end: torch.Tensor) -> int:
    """The first position any sample's after_image rows start at (one host read per call)."""
    return int(image_end.min())


def select_heads(probs: torch.Tensor, image: torch.Tensor, visual_sink: torch.Tensor, rows: torch.Tensor,
                 min_image_attention: float, rho: float) -> torch.Tensor:
    """Image-centric (head, row) pairs [B, H, Q] of probs [B, H, Q, K].

    image / visual_sink: [B, K] key masks (I and V); rows: [B, Q] query rows VAR may touch.
    A = Σ_{j∈I} α_ij;  r = Σ_{j∈I∖V} α_ij / A;  selected iff A ≥ min_image_attention, r ≥ ρ (and I∖V has mass).
    """
    image_attn, nonsink_attn = image_sums(probs, image, visual_sink)
    return image_centric(image_attn, nonsink_attn, min_image_attention, rho) & rows[:, None, :]


def image_sums(probs: torch.Tensor, image: torch.Tensor, visual_sink: torch.Tensor):
    """A = Σ_{j∈I} α_ij and Σ_{j∈I∖V} α_ij, each [B, H, Q], of probs [B, H, Q, K]; image / visual_sink: [B, K]."""
    image_attn = (probs * image[:, None, None, :]).sum(-1)                          # A
    nonsink_attn = (probs * (image & ~visual_sink)[:, None, None, :]).sum(-1)       # Σ over I∖V
    return image_attn, nonsink_attn


def image_centric(image_attn: torch.Tensor, nonsink_attn: torch.Tensor, min_image_attention: float,
                  rho: float) -> torch.Tensor:
    """The head-selection rule on A = Σ_{j∈I} α_ij and Σ_{j∈I∖V} α_ij: A ≥ min_image_attention and r ≥ ρ."""
    ratio = nonsink_attn / image_attn.clamp_min(1e-30)                              # r
    return (image_attn >= min_image_attention) & (ratio >= rho) & (nonsink_attn > 0)


# ---------------------------------------------------------------------------------------------------------------
# Step 3. Redistribution: part of the sinks' attention goes to the image's non-sink tokens, on the selected pairs

def redistribute(probs: torch.Tensor, selected: torch.Tensor, sink: torch.Tensor, image: torch.Tensor,
                 visual_sink: torch.Tensor, p: float) -> torch.Tensor:
    """Move a fraction p of the sinks' attention to the visual non-sink tokens, on the selected rows only.

    sink: [B, K] all sinks S^ℓ (text and visual). α'_ij = (1−p)α_ij on sinks;
    α'_ij = α_ij + Ω·α_ij / Σ_{k∈I∖V} α_ik on I∖V with Ω = p·Σ_{j∈S} α_ij; every other entry unchanged.
    """
    sink_k = sink[:, None, None, :]
    target = (image & ~visual_sink)[:, None, None, :]
    omega = p * (probs * sink_k).sum(-1, keepdim=True)                              # Ω  [B, H, Q, 1]
    to_target = probs * target
    share = to_target / to_target.sum(-1, keepdim=True).clamp_min(1e-30)            # α_ij / Σ_{I∖V} α_ik
    new = probs - p * probs * sink_k + omega * share
    return torch.where(selected[..., None], new, probs)


# ---------------------------------------------------------------------------------------------------------------
# The rule as one object, so VAR's hooks can run either rule (VARConfig.rule names one)

class Rule:
    """A VAR rule: its conventions, its layers and its three steps (sink sets, head selection, redistribution).
    The paper's rule is this class; the released code's is var_official.OfficialRule. VARConfig.rule names one."""
    name = "paper"
    default_rho = PRESETS["general"]

    def paper_values(self, rho: float, p: float) -> tuple[float, float]:
        """(ρ, p) in the paper's conventions."""
        return rho, p

    def preset_rho(self, paper_rho: float) -> float:
        """A preset's ρ (paper convention) in this rule's convention."""
        return paper_rho

    def moved(self, p: float) -> float:
        """The fraction of the sinks' attention moved to the image."""
        return p

    def sink_layers(self, n_layers: int) -> frozenset[int] | None:
        """The layers whose residual input is scanned for sinks (None: every one)."""
        return None

    def layer_set(self, n_layers: int) -> frozenset[int]:
        """The layers VAR may modify: every layer but the last."""
        return frozenset(range(n_layers - 1))

    def sink_sets(self, h, dims, tau, image, real):
        return sink_sets(h, dims, tau, image, real)

    def select_heads(self, probs, image, visual_sink, rows, cfg):
        return select_heads(probs, image, visual_sink, rows, cfg.min_image_attention, cfg.rho)

    def redistribute(self, probs, selected, sink, image, visual_sink, p):
        return redistribute(probs, selected, sink, image, visual_sink, p)


# "paper": the rule as the paper writes it (this module); "official": as the authors' released code computes it
# (var_official.py registers it; docs/official-rule.md lists the differences).
RULES: dict[str, Rule] = {"paper": Rule()}
