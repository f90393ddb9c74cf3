"""VAR as the authors' released code computes it (MICV-yonsei/VisAttnSink, commit 98e62d6), beside the paper's rule.

minivar's VAR (var_paper.py) follows the paper's text. The published numbers were produced by the released code, which
differs from the text in small ways that can move results. This module restates that code's arithmetic as plain
tensor functions with var_paper.py's shapes and conventions, so the two rules can be run on the same questions:

    probs        [B, H, Q, K]  post-softmax attention, one row per query, one column per key
    key masks    [B, K]        image (I), sinks (S), visual sinks (V = S ∩ I)
    rows         [B, Q]        the query rows VAR may touch

Where the two rules differ (each function's docstring gives the code lines it restates, as file:function):

    what                       paper rule (var_paper.py)              released code (this module)
    sink test                  φ ≥ τ                                  φ > τ
    layers scanned for sinks   every layer                            2 .. L−1  (layers 0 and 1: no sinks, no VAR)
    last layer                 never modified                         modified (its "except last layer" switch never fires)
    head selection             r = Σ_{I∖V}α / Σ_I α ≥ ρ               portion = Σ_V α / Σ_{j∈I}(α_j + 1e-6) ≤ rho
    p                          fraction of sink attention moved       fraction kept
    no non-sink image mass     row not selected                       row may be selected and turns the image span NaN
    prompt ids                 BOS + one tokenization of the prompt   five segments, no BOS, 29871 kept only once

The conventions map one to one (the authors confirmed it in the repository's issue #5): code rho = 1 − ρ,
code p = 1 − p. The released defaults (A_exps/lv1.5_7b.yml) are τ 20, rho 0.5, p 0.6, summ 0.2, i.e. the paper's
ρ 0.5 and p 0.4 (40% of the sinks' attention moved).

Not restated, on purpose (bugs of the released scripts, documented in docs/official-rule.md): the sink sets and the
step counter are never reset after the first sample, the model is loaded in 8 bits by a positional-argument slip,
and a batch of more than one sample merges all samples' sinks.
"""
from __future__ import annotations

import torch

from ..errors import MinivarError
from . import var_paper
from .var_paper import sink_scores

# The released configuration A_exps/lv1.5_7b.yml, in the code's own conventions (rho: visual-sink share ceiling,
# p: fraction kept, summ: minimum image attention).
OFFICIAL_DEFAULTS = {"tau": 20.0, "rho": 0.5, "p": 0.6, "summ": 0.2}

# src/logic/logic.py:LogicEngine.set_sink_select_layers: `range(num_hidden_layers)[2:]`.
FIRST_SINK_LAYER = 2



def paper_equivalent(rho: float, p: float) -> tuple[float, float]:
    """The code's (rho, p) in the paper's conventions: (ρ, p) = (1 − rho, 1 − p). The map is its own inverse, so
    it also turns the paper's values into the code's. Rounded to 12 digits so 1 − 0.8 reads 0.2, not 0.19999…"""
    return round(1.0 - rho, 12), round(1.0 - p, 12)


def official_layer_sets(n_layers: int) -> tuple[frozenset[int], frozenset[int]]:
    """(layers whose residual input is scanned for sinks, layers VAR can modify) under the released code.

    Sinks are found on layers 2..L−1 only (logic.py:LogicEngine.set_sink_select_layers, line 52, `range(L)[2:]`;
    the scan in llava.py:TunedLlamaModel.forward, lines 313-316). The
    redistribution runs in every layer (llava.py:TunedLlamaAttention.forward), but a layer without visual sinks is
    left alone (logic.py:HeadFork.run_logic), so layers 0 and 1 never change: both sets are 2..L−1. The last layer
    *is* in it: VARProcessor's class default `except_last_layer = False` shadows the value LogicEngine.activate
    stores, so the test in logic.py:VARProcessor.attn_redist (line 169) never fires (had it fired, it would have raised:
    `cls.current_decoder_layer` does not exist)."""
    layers = frozenset(range(min(FIRST_SINK_LAYER, n_layers), n_layers))
    return layers, layers


# ---------------------------------------------------------------------------------------------------------------
# The math, as plain tensor functions

def sink_sets_official(h: torch.Tensor, dims: tuple[int, ...], tau: float, image: torch.Tensor,
                       real: torch.Tensor | None = None, *, strict: bool = True):
    """φ [B, T], sinks S [B, T] and visual sinks V = S ∩ I [B, T] of one layer's residual input h [B, T, D].

    Restates logic.py:DimProspector.run_logic (lines 98-110): φ_j = max_{d∈D} |h_j[d]| · rsqrt(mean_k h_j[k]² + 1e-6) in fp32 —
    the same φ as var_paper.sink_scores (which divides by the square root instead of multiplying by its reciprocal; the
    two can differ in the last bit) — and sinks where φ **>** τ (strict; `strict=False` gives the paper's ≥).
    `real` [B, T] masks out left padding, which the released code (batch 1) never has. Which layers are scanned is
    official_layer_sets's business, not this function's.
    """
    phi = sink_scores(h, dims) if dims else torch.zeros(h.shape[:2], device=h.device)
    sinks = phi > tau if strict else phi >= tau
    if real is not None:
        sinks = sinks & real
    return phi, sinks, sinks & image


def select_heads_official(probs: torch.Tensor, image: torch.Tensor, visual_sink: torch.Tensor, rows: torch.Tensor,
                          rho: float, summ: float, *, eps: float = 1e-6) -> torch.Tensor:
    """The (head, row) pairs [B, H, Q] the released code redistributes, of probs [B, H, Q, K].

    Restates logic.py:HeadFork.run_logic (lines 115-145; portion and summation at 129-136) and the row filter of
    VARProcessor.attn_redist (line 179):
        portion   = Σ_{j∈V} α_ij / Σ_{j∈I} (α_ij + 1e-6)      (the 1e-6 is added once per image key)
        summation = Σ_{j∈I} α_ij
        selected iff portion ≤ rho and summation ≥ summ, in a sample with at least one visual sink in this layer,
    on the query rows `rows` [B, Q] (prefill: rows after the image; decoding: every row — the caller's choice, as
    in var_paper.select_heads). `rho` is a ceiling on the visual-sink share and `summ` the paper's minimum image attention;
    `eps=0` drops the 1e-6. With eps=0, rho = 1 − ρ and summ = min_image_attention this selects what
    var_paper.select_heads selects (up to rounding exactly at the threshold), except where a row's image attention is all
    on visual sinks: portion = 1 there, so the code selects it when rho = 1 (and redistribute_official then turns
    its image span NaN), where the paper's rule never does.
    """
    portion, summation = portion_and_summation(probs, image, visual_sink, eps=eps)
    has_visual_sink = visual_sink.any(-1)[:, None, None]                   # `if len(vis_sink_inds) > 0`
    return (portion <= rho) & (summation >= summ) & has_visual_sink & rows[:, None, :]


def portion_and_summation(probs: torch.Tensor, image: torch.Tensor, visual_sink: torch.Tensor, *,
                          eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The two numbers select_heads_official compares, [B, H, Q] each: portion = Σ_V α / Σ_{j∈I}(α_j + eps) and
    summation = Σ_I α (the capture keeps them, so the explorer's sliders select what this rule selects)."""
    in_image = image[:, None, None, :]
    summation = (probs * in_image).sum(-1)                                                   # Σ_I α
    # torch.sum(image_attn + 1e-6): the constant goes on every image key before summing, so it weighs N · 1e-6.
    portion = (probs * visual_sink[:, None, None, :]).sum(-1) / ((probs + eps) * in_image).sum(-1)
    return portion, summation


def redistribute_official(probs: torch.Tensor, selected: torch.Tensor, sink: torch.Tensor, image: torch.Tensor,
                          visual_sink: torch.Tensor, p: float) -> torch.Tensor:
    """The released code's redistribution on the selected (head, row) pairs [B, H, Q]; p is the fraction *kept*.

    Restates logic.py:VARProcessor.attn_redist (lines 163-212; the arithmetic at 195-210), on each selected row:
        every sink column (visual V and text S∖V) is multiplied by p;
        budget  = (1 − p) · Σ_{j∈V} α_ij + (1 − p) · Σ_{j∈S∖V} α_ij       (summed from the original row)
        α'_ij   = α_ij + budget · α_ij / Σ_{k∈I∖V} α_ik   for j ∈ I∖V     (visual sinks get no share)
    Text sinks lose attention like visual ones, and all of it goes to the image. With p = 1 − p_paper this is
    var_paper.redistribute. Faithfully, nothing guards the division: a selected row with no non-sink image attention
    gets 0/0 = NaN on its whole image span (the code adds budget · NaN to columns im:im+pa). sink [B, K] holds
    every sink, text and visual.
    """
    sink_k, vis_k = sink[:, None, None, :], visual_sink[:, None, None, :]
    text_k = sink_k & ~vis_k
    kept = torch.where(sink_k, probs * p, probs)                                    # selected_attn_map[:, sinks] *= p
    budget = ((probs * vis_k).sum(-1, keepdim=True) * (1 - p)                       # weight_budget_vis
              + (probs * text_k).sum(-1, keepdim=True) * (1 - p))                   # + weight_budget_text
    non_sink_image = probs * (image & ~visual_sink)[:, None, None, :]              # copied[:, vis] *= 0, image cols
    ratios = non_sink_image / non_sink_image.sum(-1, keepdim=True)                  # ratios_vis (0/0 = NaN kept)
    new = kept + torch.where(image[:, None, None, :], budget * ratios, 0.0)        # [:, im:im+pa] += budget · ratio
    return torch.where(selected[..., None], new, probs)


# ---------------------------------------------------------------------------------------------------------------
# The rule as one object (var_paper.Rule): VARConfig(rule="official") finds it here

class OfficialRule(var_paper.Rule):
    """The released code's rule: its conventions (rho a visual-sink ceiling, p the fraction kept), its layers, its
    strict sink test, its head selection and redistribution."""
    name = "official"
    default_rho = OFFICIAL_DEFAULTS["rho"]

    def paper_values(self, rho, p):
        return paper_equivalent(rho, p)

    def preset_rho(self, paper_rho):
        return paper_equivalent(paper_rho, 0.0)[0]            # rho = 1 − ρ

    def moved(self, p):
        return 1.0 - p

    def sink_layers(self, n_layers):
        return official_layer_sets(n_layers)[0]

    def layer_set(self, n_layers):
        return official_layer_sets(n_layers)[1]

    def sink_sets(self, h, dims, tau, image, real):
        return sink_sets_official(h, dims, tau, image, real)

    def select_heads(self, probs, image, visual_sink, rows, cfg):
        return select_heads_official(probs, image, visual_sink, rows, cfg.rho, cfg.min_image_attention)

    def redistribute(self, probs, selected, sink, image, visual_sink, p):
        return redistribute_official(probs, selected, sink, image, visual_sink, p)


var_paper.RULES["official"] = OfficialRule()
