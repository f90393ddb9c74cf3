"""Tests for minivar.methods.var: Visual Attention Redistribution (design.md §3).

1. The math on hand-made tensors against a loop-level re-statement of design.md §3 written here (plain Python loops
   over batch, head, query row and key; no vectorisation), its invariants and edge cases, config validation,
   presets, sink-dim parsing and the known-model table.
2. Tiny models with planted sinks (minivar.demo.plant_sinks): the offline demo checkpoint, and a tiny model built
   here whose visual sinks depend on the image (bright patches become sinks). Reported sinks equal the planted
   positions, VAR changes the greedy output, p = 0 / VAR off are bit-identical to no VAR and use the fast path,
   cached decoding equals recomputation from scratch, batches with left padding equal single samples, two images
   in a row get their own sinks.
3. The sink-dim finder and resolve_sink_dims.
4. Parity with transformers (when installed): the same tiny weights in LlavaForConditionalGeneration, VAR patched
   into its eager attention with the loop-level reference below, equal greedy tokens with VAR on and off.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import minivar.methods.var
from PIL import Image

import minivar
from conftest import build_model, unused_tensors, write_checkpoint
from minivar import demo
from minivar.models.config import LlavaConfig, TextConfig, VisionConfig
from minivar.errors import MinivarError
from minivar.generate import generate
from minivar.models.llama import KVCache
from minivar.methods.var import (PRESETS, Sinks, VARConfig, VARState, find_sink_dims, known_sink_dims, parse_sink_dims,
                         redistribute, resolve_sink_dims, select_heads, sink_scores, sink_sets)

SEVEN_B = (1415, 2533)
THIRTEEN_B = (2100, 4743)


# =================================================================================================================
# Loop-level reference of design.md §3 (deliberately naive: Python floats and loops, nothing vectorised)

def ref_phi(h: torch.Tensor, dims) -> list[list[float]]:
    """φ_j = max_{d∈D} |h_j[d]| / sqrt(mean_k h_j[k]² + 1e-6), per sample and position."""
    B, T, D = h.shape
    hl = h.double().tolist()
    out = []
    for b in range(B):
        row = []
        for t in range(T):
            sq = 0.0
            for k in range(D):
                sq += hl[b][t][k] * hl[b][t][k]
            rms = math.sqrt(sq / D + 1e-6)
            best = 0.0
            for d in dims:
                best = max(best, abs(hl[b][t][d]) / rms)
            row.append(best)
        out.append(row)
    return out


def ref_sinks(phi, tau, real=None) -> list[list[bool]]:
    """S = {j : φ_j ≥ τ}; left padding (real[b][j] False) is never a sink."""
    return [[v >= tau and (real is None or bool(real[b][j])) for j, v in enumerate(row)] for b, row in enumerate(phi)]


def ref_select(probs: torch.Tensor, image, visual_sink, rows, min_image_attention, rho) -> list:
    """selected[b][h][i]: A = Σ_{j∈I} α_ij ≥ min, r = Σ_{j∈I∖V} α_ij / A ≥ ρ, on allowed rows; I∖V must have mass."""
    B, H, Q, K = probs.shape
    a = probs.double().tolist()
    out = []
    for b in range(B):
        per_head = []
        for h in range(H):
            per_row = []
            for i in range(Q):
                A = 0.0
                nonsink = 0.0
                for j in range(K):
                    if image[b][j]:
                        A += a[b][h][i][j]
                        if not visual_sink[b][j]:
                            nonsink += a[b][h][i][j]
                ok = bool(rows[b][i]) and A > 0 and nonsink > 0 and A >= min_image_attention and nonsink / A >= rho
                per_row.append(ok)
            per_head.append(per_row)
        out.append(per_head)
    return out


def ref_redistribute(probs: torch.Tensor, selected, sink, image, visual_sink, p) -> torch.Tensor:
    """On selected rows: sinks keep (1−p)α; Ω = p·Σ_{S} α goes to I∖V in proportion to α; the rest unchanged."""
    B, H, Q, K = probs.shape
    a = probs.double().tolist()
    out = probs.double().tolist()
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                if not selected[b][h][i]:
                    continue
                omega = 0.0
                nonsink = 0.0
                for j in range(K):
                    if sink[b][j]:
                        omega += p * a[b][h][i][j]
                    if image[b][j] and not visual_sink[b][j]:
                        nonsink += a[b][h][i][j]
                for j in range(K):
                    if sink[b][j]:
                        out[b][h][i][j] = (1 - p) * a[b][h][i][j]
                    elif image[b][j] and not visual_sink[b][j]:
                        out[b][h][i][j] = a[b][h][i][j] + omega * a[b][h][i][j] / nonsink
    return torch.tensor(out, dtype=torch.float64)


def ref_var_layer(probs: torch.Tensor, *, layer: int, n_layers: int, sinks, image, decoding: bool, p: float,
                  rho: float, min_image_attention: float, layers=None):
    """The whole rule for one layer's probs [B, H, Q, K]. sinks / image: [B][T_prompt] lists of bools over the prompt.

    Prefill: query i is prompt position i, touched iff i ≥ (last image position + 1). Decoding: every row.
    Keys past the prompt (generated tokens) are neither image nor sinks. The last layer is never touched; a sample
    without a visual sink in this layer is left alone. Returns (new probs float64, selected[b][h][i]).
    """
    B, H, Q, K = probs.shape
    allowed = (layer < n_layers - 1) if layers is None else (layer in layers and layer < n_layers - 1)
    img, snk, vis, rows = [], [], [], []
    for b in range(B):
        T = len(image[b])
        img.append([j < T and bool(image[b][j]) for j in range(K)])
        snk.append([j < T and bool(sinks[b][j]) for j in range(K)])
        vis.append([img[b][j] and snk[b][j] for j in range(K)])
        positions = [j for j in range(T) if image[b][j]]
        end = positions[-1] + 1 if positions else T
        has_visual_sink = any(vis[b])
        rows.append([allowed and has_visual_sink and (decoding or i >= end) for i in range(Q)])
    selected = ref_select(probs, img, vis, rows, min_image_attention, rho)
    return ref_redistribute(probs, selected, snk, img, vis, p), selected


def count_selected(selected) -> int:
    return sum(1 for per_head in selected for per_row in per_head for s in per_row if s)


# =================================================================================================================
# Hand-made tensors

def random_probs(shape, sink_cols, image_cols, *, seed, causal_from=None, key_valid=None):
    """Softmax rows with a spread of image and sink attention: per row random boosts for image and sink columns.

    sink_cols / image_cols: [B][K] bools; causal_from: query i ↦ key limit (keys > i masked) if given;
    key_valid: [B][K] bools (left padding) or None.
    """
    B, H, Q, K = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    img_boost = torch.rand(B, H, Q, 1, generator=g, dtype=torch.float64) * 5 - 2
    sink_boost = torch.rand(B, H, Q, 1, generator=g, dtype=torch.float64) * 5 - 1
    s = torch.tensor(sink_cols, dtype=torch.bool)[:, None, None, :]
    im = torch.tensor(image_cols, dtype=torch.bool)[:, None, None, :]
    logits = logits + img_boost * im + sink_boost * s
    mask = torch.ones(shape, dtype=torch.bool)
    if causal_from is not None:
        mask &= torch.ones(Q, K, dtype=torch.bool).tril(causal_from)[None, None]
    if key_valid is not None:
        mask &= torch.tensor(key_valid, dtype=torch.bool)[:, None, None, :]
    mask |= ~mask.any(-1, keepdim=True) & (torch.arange(K) == 0)      # a row with no key: let it see key 0
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).float()


def test_sink_scores_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    for B, T, D, dims in [(1, 5, 16, (3,)), (2, 7, 32, (1, 30)), (3, 4, 48, (0, 5, 47))]:
        h = torch.randn(B, T, D, generator=g) * 2
        h[0, 0, dims[0]] = 60.0                 # a massive activation
        h[B - 1, T - 1, dims[-1]] = -45.0       # negative counts too (|h|)
        phi = sink_scores(h, dims)
        assert phi.shape == (B, T) and phi.dtype == torch.float32
        torch.testing.assert_close(phi.double(), torch.tensor(ref_phi(h, dims), dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    # bf16 input is scored in fp32
    h = torch.randn(2, 6, 32, generator=g)
    h[1, 2, 7] = 40
    hb = h.bfloat16()
    assert sink_scores(hb, (7,)).dtype == torch.float32
    torch.testing.assert_close(sink_scores(hb, (7,)).double(), torch.tensor(ref_phi(hb.float(), (7,)), dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    # one massive dim in a hidden of size h caps φ at √h (design.md §3)
    h = torch.zeros(1, 1, 64)
    h[0, 0, 9] = 1e4
    assert sink_scores(h, (9,)).item() == pytest.approx(8.0, rel=1e-4)


def test_sink_sets_threshold_padding_and_image():
    h = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1))
    h[0, 0, 5] = h[0, 3, 5] = h[1, 1, 5] = h[1, 2, 5] = h[1, 4, 5] = 1e4     # φ ≈ √64 = 8 at these tokens
    image = torch.zeros(2, 6, dtype=torch.bool)
    image[:, 2:5] = True
    real = torch.ones(2, 6, dtype=torch.bool)
    real[1, :2] = False                                            # sample 1 is left-padded by two
    phi, sinks, visual = sink_sets(h, (5,), 5.0, image, real)
    torch.testing.assert_close(phi, sink_scores(h, (5,)))
    assert [torch.nonzero(s).flatten().tolist() for s in sinks] == [[0, 3], [2, 4]]   # padding is never a sink
    assert [torch.nonzero(s).flatten().tolist() for s in visual] == [[3], [2, 4]]     # V = S ∩ I
    phi, sinks, _ = sink_sets(h, (5,), 8.5, image)                 # above √64: nothing can be a sink
    assert not sinks.any()
    phi, sinks, visual = sink_sets(h, (), 5.0, image)              # no sink dims: φ = 0, no sinks
    assert not phi.any() and not sinks.any() and not visual.any()


@pytest.mark.parametrize("shape,seed", [((1, 1, 4, 9), 0), ((2, 3, 5, 12), 1), ((3, 4, 2, 20), 2), ((2, 2, 6, 6), 3)])
@pytest.mark.parametrize("rho,p,mia", [(0.8, 0.6, 0.2), (0.5, 1.0, 0.2), (0.0, 0.3, 0.1), (0.9, 0.6, 0.0)])
def test_select_heads_and_redistribute_match_loop_reference(shape, seed, rho, p, mia):
    B, H, Q, K = shape
    g = torch.Generator().manual_seed(100 + seed)
    image = (torch.rand(B, K, generator=g) < 0.5)
    image[:, 1] = True
    visual = image & (torch.rand(B, K, generator=g) < 0.3)
    visual[:, 1] = True                                           # at least one visual sink per sample
    sink = visual | (~image & (torch.rand(B, K, generator=g) < 0.3))
    sink[:, 0] = True; image[:, 0] = False; visual[:, 0] = False  # a text sink (BOS) at key 0
    rows = torch.rand(B, Q, generator=g) < 0.7
    probs = random_probs(shape, sink.tolist(), image.tolist(), seed=seed)

    sel = select_heads(probs, image, visual, rows, mia, rho)
    want_sel = ref_select(probs, image.tolist(), visual.tolist(), rows.tolist(), mia, rho)
    assert sel.shape == (B, H, Q) and sel.dtype == torch.bool
    assert sel.tolist() == want_sel

    new = redistribute(probs, sel, sink, image, visual, p)
    want = ref_redistribute(probs, want_sel, sink.tolist(), image.tolist(), visual.tolist(), p)
    torch.testing.assert_close(new.double(), want, rtol=0, atol=2e-6)
    # invariants
    torch.testing.assert_close(new.sum(-1), torch.ones(B, H, Q), rtol=0, atol=2e-6)
    assert torch.equal(new[~sel], probs[~sel])                                   # unselected rows untouched
    other = ~(sink | image)                                                       # neither sink nor image
    assert torch.equal(new.masked_select(other[:, None, None, :].expand_as(new)),
                       probs.masked_select(other[:, None, None, :].expand_as(new)))
    assert not torch.isnan(new).any()


def test_random_cases_exercise_both_branches():
    """The parametrised cases above are only meaningful if some rows are selected and some are not."""
    B, H, Q, K = 2, 3, 5, 12
    image = torch.zeros(B, K, dtype=torch.bool); image[:, 2:8] = True
    visual = torch.zeros(B, K, dtype=torch.bool); visual[:, 3] = True
    sink = visual.clone(); sink[:, 0] = True
    probs = random_probs((B, H, Q, K), sink.tolist(), image.tolist(), seed=7)
    sel = ref_select(probs, image.tolist(), visual.tolist(), torch.ones(B, Q, dtype=torch.bool).tolist(), 0.2, 0.8)
    n = count_selected(sel)
    assert 0 < n < B * H * Q


def test_redistribute_p0_identical_and_p1_empties_sinks():
    B, H, Q, K = 2, 2, 4, 10
    image = torch.zeros(B, K, dtype=torch.bool); image[0, 2:7] = True; image[1, 4:9] = True
    visual = torch.zeros(B, K, dtype=torch.bool); visual[0, 3] = True; visual[1, 8] = True
    sink = visual.clone(); sink[:, 0] = True; sink[0, 8] = True                 # BOS + a text delimiter sink
    probs = random_probs((B, H, Q, K), sink.tolist(), image.tolist(), seed=11)
    everything = torch.ones(B, H, Q, dtype=torch.bool)
    assert torch.equal(redistribute(probs, everything, sink, image, visual, 0.0), probs)
    new = redistribute(probs, everything, sink, image, visual, 1.0)
    assert torch.equal(new * sink[:, None, None, :], torch.zeros_like(new))     # every sink emptied, text ones too
    target = image & ~visual
    torch.testing.assert_close((new * target[:, None, None, :]).sum(-1),
                               (probs * (target | sink)[:, None, None, :]).sum(-1), rtol=0, atol=2e-6)
    torch.testing.assert_close(new.sum(-1), torch.ones(B, H, Q), rtol=0, atol=2e-6)


def test_all_image_tokens_sinks_never_selected_and_no_nan():
    B, H, Q, K = 1, 2, 3, 8
    image = torch.zeros(B, K, dtype=torch.bool); image[:, 1:5] = True
    visual = image.clone()                                                      # I∖V is empty
    sink = visual.clone(); sink[:, 0] = True
    probs = random_probs((B, H, Q, K), sink.tolist(), image.tolist(), seed=5)
    for rho in (0.0, 0.5):
        sel = select_heads(probs, image, visual, torch.ones(B, Q, dtype=torch.bool), 0.0, rho)
        assert not sel.any()
        new = redistribute(probs, sel, sink, image, visual, 0.6)
        assert torch.equal(new, probs) and not torch.isnan(new).any()
        # even when forced on every row: nowhere to move the budget must not produce NaN/inf
        forced = redistribute(probs, torch.ones(B, H, Q, dtype=torch.bool), sink, image, visual, 0.6)
        assert torch.isfinite(forced).all()


def _row(image_mass, sink_share_of_image, bos_mass=0.5, K=10):
    """One probability row over keys [BOS, img1(sink), img2..img5, text6..text9]."""
    row = [0.0] * K
    row[0] = bos_mass
    row[1] = image_mass * sink_share_of_image
    for j in range(2, 6):
        row[j] = image_mass * (1 - sink_share_of_image) / 4
    rest = 1.0 - bos_mass - image_mass
    for j in range(6, K):
        row[j] = rest / (K - 6)
    return row


@pytest.mark.parametrize("image_mass,expected", [(0.2 - 1e-4, False), (0.2 + 1e-4, True), (0.19, False), (0.3, True)])
def test_min_image_attention_threshold(image_mass, expected):
    K = 10
    probs = torch.tensor([[[_row(image_mass, 0.05)]]], dtype=torch.float32)      # [1, 1, 1, K]
    image = torch.zeros(1, K, dtype=torch.bool); image[0, 1:6] = True
    visual = torch.zeros(1, K, dtype=torch.bool); visual[0, 1] = True
    sink = visual.clone(); sink[0, 0] = True
    sel = select_heads(probs, image, visual, torch.ones(1, 1, dtype=torch.bool), 0.2, 0.8)
    assert sel.item() is expected
    assert ref_select(probs, image.tolist(), visual.tolist(), [[True]], 0.2, 0.8)[0][0][0] is expected
    new = redistribute(probs, sel, sink, image, visual, 0.6)
    assert torch.equal(new, probs) is (not expected)


@pytest.mark.parametrize("share,rho,expected", [(0.2 + 1e-3, 0.8, False), (0.2 - 1e-3, 0.8, True), (0.5 + 1e-3, 0.5, False),
                                                (0.5 - 1e-3, 0.5, True), (0.99, 0.0, True), (0.0, 1.0, True),
                                                (1e-3, 1.0, False)])
def test_rho_threshold(share, rho, expected):
    """r = non-sink share of the image attention ≥ ρ (ρ is a non-sink floor, the paper's convention)."""
    K = 10
    probs = torch.tensor([[[_row(0.4, share)]]], dtype=torch.float32)
    image = torch.zeros(1, K, dtype=torch.bool); image[0, 1:6] = True
    visual = torch.zeros(1, K, dtype=torch.bool); visual[0, 1] = True
    sel = select_heads(probs, image, visual, torch.ones(1, 1, dtype=torch.bool), 0.2, rho)
    assert sel.item() is expected


# ---- VARState end to end on hand-made residuals and probabilities ------------------------------------------------

D_HAND, DIMS_HAND, TAU_HAND, L_HAND, H_HAND = 32, (3, 17), 4.0, 4, 3
# three left-padded prompts of length 16 with different image spans: (pad, image start, image end)
SPANS = [(0, 2, 8), (3, 5, 10), (1, 2, 13)]
T_HAND = 16
# planted sinks per layer and sample: (text sink positions, visual sink positions)
PLANTED = {
    0: [([0], [3, 6]), ([3], [7]), ([1], list(range(2, 13)))],        # sample 2: every image token a sink
    1: [([0, 10], [2]), ([3], []), ([1, 14], [4, 12])],               # sample 1: no visual sink; text sinks 10, 14
    2: [([0], []), ([3], []), ([1], [])],                             # no visual sink anywhere: layer untouched
    3: [([0], [5]), ([3], [6]), ([1], [9])],                          # last layer: never touched
}


UNTOUCHED = {0: (2,), 1: (1,)}     # (layer: samples VAR must leave alone) besides layers 2 and 3


def hand_image_mask():
    image = torch.zeros(len(SPANS), T_HAND, dtype=torch.bool)
    for b, (_, s, e) in enumerate(SPANS):
        image[b, s:e] = True
    return image


def hand_residuals(seed=0):
    """h^ℓ [B, T, D] per layer with massive values at the planted positions (φ ≥ τ there, < τ elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    hs = []
    for layer in range(L_HAND):
        h = torch.randn(len(SPANS), T_HAND, D_HAND, generator=g)
        h[..., list(DIMS_HAND)] *= 0.3
        for b, (text, visual) in enumerate(PLANTED[layer]):
            for t in text:
                h[b, t, DIMS_HAND[0]] = 25.0
            for t in visual:
                h[b, t, DIMS_HAND[1]] = -30.0 if t % 2 else 30.0
        h[1, 1, DIMS_HAND[0]] = 25.0          # sample 1's left padding: massive, but padding is never a sink
        hs.append(h)
    return hs


def hand_key_valid(K):
    return [[j >= pad for j in range(K)] for pad, _, _ in SPANS]


def hand_attention_mask():
    return torch.tensor(hand_key_valid(T_HAND))


def var_hook(cfg, dims, n_layers, image, attention_mask=None, **kw):
    """A VAR hook for one call: its sink sets and its state."""
    return VARState(cfg, Sinks(dims, cfg.tau, n_layers, image, attention_mask), **kw)


def make_state(cfg):
    return var_hook(cfg, DIMS_HAND, L_HAND, hand_image_mask(), hand_attention_mask())


def prefill(state, layer, probs, first=0):
    """VAR on the prefill rows first … T−1 of one layer (what the attention hands over)."""
    rows = range(first, first + probs.shape[2])
    return state.probs(layer, probs, rows, before=probs)


@pytest.mark.parametrize("cfg", [VARConfig(tau=TAU_HAND), VARConfig(tau=TAU_HAND, rho=0.5, p=1.0),
                                 VARConfig(tau=TAU_HAND, rho=0.0, p=0.3, min_image_attention=0.1),
                                 VARConfig(tau=TAU_HAND, rho=0.9, p=0.6, layers=(1,))])
def test_varstate_matches_loop_reference_prefill_and_decode(cfg):
    hs = hand_residuals()
    image = hand_image_mask()
    state = make_state(cfg)
    B, T = image.shape
    # ---- prefill
    for layer in range(L_HAND):
        state.residual(layer, hs[layer], range(T))
    ref_sink_sets = []
    for layer in range(L_HAND):
        phi = ref_phi(hs[layer], DIMS_HAND)
        torch.testing.assert_close(state.sinks.phi[layer].double(), torch.tensor(phi, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        sinks = ref_sinks(phi, cfg.tau, hand_key_valid(T))
        assert state.sinks.sinks[layer].tolist() == sinks
        assert phi[1][1] >= cfg.tau and not sinks[1][1]           # the planted padding position
        assert state.sinks.visual_sinks[layer].tolist() == [[s and i for s, i in zip(sr, ir)] for sr, ir in zip(sinks, image.tolist())]
        # the planted sets are what we meant to build
        for b, (text, visual) in enumerate(PLANTED[layer]):
            assert [t for t in range(T) if sinks[b][t]] == sorted(text + visual)
        ref_sink_sets.append(sinks)

    total_selected, text_sink_moved = 0, False
    for layer in range(L_HAND):
        sinks = ref_sink_sets[layer]
        probs = random_probs((B, H_HAND, T, T), sinks, image.tolist(), seed=20 + layer, causal_from=0,
                             key_valid=hand_key_valid(T))
        got = prefill(state, layer, probs.clone())
        want, selected = ref_var_layer(probs, layer=layer, n_layers=L_HAND, sinks=sinks, image=image.tolist(),
                                       decoding=False, p=cfg.p, rho=cfg.rho, min_image_attention=cfg.min_image_attention,
                                       layers=cfg.layers)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
        total_selected += count_selected(selected)
        text_sink_moved |= check_invariants(got, probs, sinks, image, selected, decoding=False, p=cfg.p)
        # the attention may hand over only the rows from `first` on (the rows before go through the fused kernel)
        for first in sorted({1, state.first_position, 9}):
            counts = state.counts["prefill"].clone()
            part = prefill(state, layer, probs[:, :, first:].clone(), first)
            state.counts["prefill"].copy_(counts)
            torch.testing.assert_close(part.double(), want[:, :, first:], rtol=0, atol=2e-6)
        if layer in (2, L_HAND - 1) or (cfg.layers is not None and layer not in cfg.layers):
            assert torch.equal(got, probs)                   # no visual sink / last layer / not a VAR layer
        for b in UNTOUCHED.get(layer, ()):
            assert torch.equal(got[b], probs[b])             # this sample has no visual sink / only sinks in I
        assert state.counts["prefill"][:, layer].tolist() == [sum(1 for h in selected[b] for r in h if r) for b in range(B)]
    assert total_selected > 0

    # ---- decoding: sinks stay those of the prefill; generated tokens (keys ≥ T) are never sinks
    for layer in range(L_HAND):
        h_new = torch.zeros(B, 1, D_HAND)
        h_new[..., DIMS_HAND[0]] = 100.0                       # would be a sink if it were scored
        state.residual(layer, h_new, range(T, T + 1))
        assert state.sinks.sinks[layer].tolist() == ref_sink_sets[layer]
    total_selected = 0
    for step, Q in ((1, 1), (3, 2)):       # Q = 2: two new tokens in one call; every decoding row may be touched
        K = T + step
        for layer in range(L_HAND):
            sinks = ref_sink_sets[layer]
            padded_sinks = [row + [False] * step for row in sinks]
            # give the generated keys a big share so moving them would show
            probs = random_probs((B, 2 * H_HAND, Q, K), [r[:-1] + [True] for r in padded_sinks],
                                 [r + [False] * step for r in image.tolist()], seed=40 + 10 * step + layer,
                                 key_valid=hand_key_valid(K))
            got = state.probs(layer, probs.clone(), range(K - Q, K), before=probs)
            want, selected = ref_var_layer(probs, layer=layer, n_layers=L_HAND, sinks=sinks, image=image.tolist(),
                                           decoding=True, p=cfg.p, rho=cfg.rho,
                                           min_image_attention=cfg.min_image_attention, layers=cfg.layers)
            torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
            text_sink_moved |= check_invariants(got, probs, sinks, image, selected, decoding=True, p=cfg.p)
            assert torch.equal(got[..., T:], probs[..., T:])     # generated-token keys untouched (never sinks)
            total_selected += count_selected(selected)
    assert total_selected > 0
    assert text_sink_moved                  # the text sinks (BOS, delimiters) were scaled by (1−p) on some row


def check_invariants(got, probs, sinks, image, selected, *, decoding, p):
    B, H, Q, K = probs.shape
    T = image.shape[1]
    sel = torch.tensor(selected, dtype=torch.bool)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.sum(-1), probs.sum(-1), rtol=0, atol=2e-6)          # rows still sum to 1
    assert torch.equal(got[~sel], probs[~sel])                                           # unselected rows untouched
    sink_t = torch.zeros(B, K, dtype=torch.bool); sink_t[:, :T] = torch.tensor(sinks)
    image_t = torch.zeros(B, K, dtype=torch.bool); image_t[:, :T] = image
    other = ~(sink_t | image_t)[:, None, None, :].expand_as(got)
    assert torch.equal(got[other], probs[other])                                         # non-image non-sink keys
    if not decoding:
        for b in range(B):
            end = int(torch.nonzero(image[b]).max()) + 1
            assert torch.equal(got[b, :, :end], probs[b, :, :end])                       # rows up to the image end
    # on selected rows every sink, text sinks included, keeps (1−p)α; visual non-sinks only gain
    on_sel = sel[..., None].expand_as(got)
    sink_sel = on_sel & sink_t[:, None, None, :].expand_as(got)
    torch.testing.assert_close(got[sink_sel], (1 - p) * probs[sink_sel], rtol=1e-6, atol=1e-7)
    target_sel = on_sel & (image_t & ~sink_t)[:, None, None, :].expand_as(got)
    assert (got[target_sel] >= probs[target_sel]).all()
    text_sinks = torch.zeros(B, K, dtype=torch.bool); text_sinks[:, :T] = torch.tensor(sinks) & ~image
    return bool((on_sel & text_sinks[:, None, None, :].expand_as(got) & (probs > 0)).any())


def test_varstate_p0_identical_and_inactive():
    state = make_state(VARConfig(tau=TAU_HAND, p=0.0))
    for layer, h in enumerate(hand_residuals()):
        state.residual(layer, h, range(T_HAND))
    probs = random_probs((3, H_HAND, T_HAND, T_HAND), [[True] * T_HAND] * 3, hand_image_mask().tolist(), seed=3,
                         causal_from=0)
    for layer in range(L_HAND):
        assert not state.active(layer) and state.explicit_from(layer, range(T_HAND)) is None
        assert torch.equal(prefill(state, layer, probs), probs)


def test_varstate_active_layers():
    state = make_state(VARConfig(tau=TAU_HAND))
    for layer, h in enumerate(hand_residuals()):
        state.residual(layer, h, range(T_HAND))
    # active ⇔ a VAR layer (not the last) where some sample has a visual sink
    assert [state.active(layer) for layer in range(L_HAND)] == [True, True, False, False]
    assert sorted(state.layers) == [0, 1, 2]
    rep = state.report(1)                                   # positions in sample 1's own prompt (3 pads removed)
    assert rep["image_span"] == [2, 7]
    assert rep["sinks"]["0"] == [0, 4] and rep["visual_sinks"]["0"] == [4] and rep["visual_sinks"]["1"] == []
    assert state.report(0)["image_span"] == [2, 8] and state.report(2)["sinks"]["1"] == [0, 3, 11, 13]
    assert json.loads(json.dumps(rep)) == rep


def test_varstate_sample_without_image():
    """A prompt without image tokens: no prefill rows, no visual sinks, nothing changes (and no crash)."""
    image = torch.zeros(2, 6, dtype=torch.bool); image[0, 1:3] = True
    state = var_hook(VARConfig(tau=2.0), (0,), 2, image)
    h = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    h[:, 0, 0] = 10.0; h[0, 1, 0] = 10.0
    state.residual(0, h, range(6))
    probs = random_probs((2, 2, 6, 6), [[True] + [False] * 5] * 2, image.tolist(), seed=9, causal_from=0)
    got = prefill(state, 0, probs)
    assert torch.equal(got[1], probs[1])
    assert state.report(1)["image_span"] == [6, 6]


# ---- config, presets, sink dims -----------------------------------------------------------------------------------

def test_defaults_and_presets():
    c = VARConfig()
    assert (c.tau, c.p, c.min_image_attention, c.rho, c.layers, c.sink_dims) == (20.0, 0.6, 0.2, 0.8, None, None)
    assert PRESETS == {"general": 0.8, "hallucination": 0.5, "vision": 0.9}
    for name, rho in [("general", 0.8), ("hallucination", 0.5), ("vision", 0.9)]:
        c = VARConfig.preset(name)
        assert (c.rho, c.tau, c.p, c.min_image_attention) == (rho, 20.0, 0.6, 0.2)
    assert VARConfig.preset() == VARConfig()
    c = VARConfig.preset("vision", p=0.3, tau=None)
    assert (c.rho, c.p, c.tau) == (0.9, 0.3, 20.0)
    with pytest.raises(MinivarError):
        VARConfig.preset("pope")


@pytest.mark.parametrize("kwargs", [dict(p=-0.01), dict(p=1.5), dict(rho=-0.1), dict(rho=1.01), dict(tau=0.0),
                                    dict(tau=-3.0), dict(min_image_attention=1.2), dict(sink_dims=(64,)),
                                    dict(sink_dims=(3, -1)), dict(layers=(0, 4)), dict(layers=(-1,)),
                                    dict(rule="code"), dict(heads="some")])
def test_config_validation_errors(kwargs):
    with pytest.raises(MinivarError):
        VARConfig(**kwargs).validate(hidden_size=64, n_layers=4)     # (rule and heads fail already at construction)


def test_config_validation_accepts_edges():
    for kwargs in [dict(p=0.0), dict(p=1.0), dict(rho=0.0), dict(rho=1.0), dict(tau=1e-3), dict(sink_dims=(0, 63)),
                   dict(layers=(0, 1, 2)), dict(layers=()), dict(find_sink_dims=True),
                   dict(layers=(3,)), dict(rule="official", layers=(0, 3)), dict(heads="all")]:   # the last layer when named
        c = VARConfig(**kwargs)
        assert c.validate(hidden_size=64, n_layers=4) is c


def test_parse_sink_dims():
    assert parse_sink_dims("1415,2533") == (1415, 2533)
    assert parse_sink_dims(" 2533 , 1415 ") == (1415, 2533)
    assert parse_sink_dims("7") == (7,)
    assert parse_sink_dims("auto") == "auto"
    for bad in ["", "1415,", ",2533", "a,b", "1.5", "-3", "1415;2533", "1415 2533", "AUTO?", "[1415, 2533]"]:
        with pytest.raises(MinivarError):
            parse_sink_dims(bad)


def _llava_cfg(hidden, layers, heads, inter, vocab=32064, name=""):
    return LlavaConfig(vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14),
                       text=TextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                       intermediate_size=inter, vocab_size=vocab), name_or_path=name)


def test_known_sink_dims():
    assert known_sink_dims(_llava_cfg(4096, 32, 32, 11008, name="llava-hf/llava-1.5-7b-hf")) == ("llava-1.5-7b", SEVEN_B)
    assert known_sink_dims(_llava_cfg(4096, 32, 32, 11008, name="/some/local/dir")) == ("llava-1.5-7b", SEVEN_B)
    assert known_sink_dims(_llava_cfg(5120, 40, 40, 13824, name="llava-hf/llava-1.5-13b-hf")) == ("llava-1.5-13b", THIRTEEN_B)
    assert known_sink_dims(_llava_cfg(5120, 40, 40, 13824, name="/x")) == ("llava-1.5-13b", THIRTEEN_B)
    # the name alone never gives another model's dims (the official code ran 13B with the 7B dims)
    assert known_sink_dims(_llava_cfg(5120, 40, 40, 13824, name="my-llava-1.5-7b-finetune")) == ("llava-1.5-13b", THIRTEEN_B)
    assert known_sink_dims(_llava_cfg(64, 3, 4, 128, vocab=32064, name="llava-hf/llava-1.5-7b-hf")) is None
    assert known_sink_dims(demo.demo_config()) is None
    assert known_sink_dims(sink_test_config()) is None


# =================================================================================================================
# Tiny model with planted sinks whose visual sinks depend on the image

GRID = 8                         # 8×8 patches of 14 px → 64 image tokens
TINY_DIMS = (11, 70)             # (text sink dim, visual sink dim)
TINY_COMMON = 3
TINY_TAU = 5.0                   # hidden 128: one massive dim caps φ at √128 ≈ 11.3, so τ = 20 cannot be reached
IMG = 259
PAD = 260


def sink_test_config(name="tiny-var") -> LlavaConfig:
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=14 * GRID, patch_size=14)
    text = TextConfig(vocab_size=261, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
    return LlavaConfig(vision=vision, text=text, image_token_index=IMG, pad_token_id=PAD, name_or_path=name)


def sink_test_state(cfg, seed=0, dims=TINY_DIMS, common=TINY_COMMON):
    """Random weights + planted sinks. Visual sinks come from the pixels: CLIP dim 0 of a patch is the sum of its
    channel-0 pixels, so a bright patch (normalised ≈ 1.9) marks it (≈ 30) and the planted projector turns that into
    a massive value in the visual sink dim; a background at ≈ 0 marks nothing."""
    state = demo.random_state_dict(cfg, seed)
    for k in state:                  # make attention matter for the output, so VAR shows in the greedy tokens
        if k.endswith("o_proj.weight"):
            state[k] *= 10
        if k.endswith("multi_modal_projector.linear_2.weight"):
            state[k] *= 5
    demo.plant_sinks(state, cfg, text_dim=dims[0], visual_dim=dims[1], common_dim=common, patches=())
    state["language_model.lm_head.weight"] *= 10      # wider logit gaps; greedy argmax unchanged
    w = state["vision_tower.embeddings.patch_embedding.weight"]
    w[0].zero_()
    w[0, 0] = 0.08
    return state


def tiny_pixels(patches, seed=0) -> torch.Tensor:
    """[1, 3, 112, 112]: channel 0 at 0 (no sinks) except bright planted patches; other channels noise."""
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(1, 3, 14 * GRID, 14 * GRID, generator=g) * 0.5
    px[0, 0] = 0.0
    for patch in patches:
        r, c = divmod(patch, GRID)
        px[0, 0, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = 1.9
    return px


def tiny_pil(patches, seed=0) -> Image.Image:
    """The same as a PIL image for the pipeline: R = 123 (≈ mean, normalises to ≈ 0) except R = 255 patches."""
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (14 * GRID, 14 * GRID, 3), generator=g, dtype=torch.uint8)
    arr[..., 0] = 123
    for patch in patches:
        r, c = divmod(patch, GRID)
        arr[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14, 0] = 255
    return Image.fromarray(arr.numpy())


N_IMG = GRID * GRID
PROMPT_A = [1, 30, 40, 50] + [IMG] * N_IMG + [60, 70, 80, 90, 100, 110]     # image at [4, 68)
PROMPT_B = [1, 33] + [IMG] * N_IMG + [61, 71, 81]                           # image at [2, 66)
PATCHES_1 = (5,)
PATCHES_2 = (2, 40)


@pytest.fixture(scope="module")
def tiny():
    cfg = sink_test_config()
    state = sink_test_state(cfg)
    return cfg, state, build_model(cfg, state)


def tiny_var(image_mask, **kw):
    """Fresh VAR state for the tiny model (τ = 5 unless given)."""
    kw.setdefault("tau", TINY_TAU)
    return var_hook(VARConfig(**kw), TINY_DIMS, 3, image_mask)


def ids_of(*prompts):
    return torch.tensor([list(p) for p in prompts])


def test_tiny_sinks_are_the_planted_positions(tiny):
    cfg, _, model = tiny
    ids = ids_of(PROMPT_A)
    for patches in (PATCHES_1, PATCHES_2, ()):
        state = tiny_var(image_mask=ids == IMG)
        with torch.inference_mode():
            model(ids, tiny_pixels(patches), hooks=state)
        rep = state.report(0)
        assert rep["image_span"] == [4, 4 + N_IMG]
        for layer in range(3):
            assert rep["visual_sinks"][str(layer)] == [4 + p for p in patches]
            assert rep["sinks"][str(layer)] == [0] + [4 + p for p in patches]


def test_var_in_the_last_layer_when_named(tiny):
    """VAR configured into the last layer (an ablation the paper's rule never makes): generation (lm_head on the
    last row only) gives the greedy token of the full forward, VAR applied the same, and VAR did act there."""
    _, _, model = tiny
    ids = ids_of(PROMPT_A)
    px = tiny_pixels(PATCHES_1)
    with torch.inference_mode():
        full = model(ids, px, hooks=tiny_var(ids == IMG, layers=(2,)))
        plain = model(ids, px)
        state = tiny_var(ids == IMG, layers=(2,))
        gen = generate(model, ids, px, max_new_tokens=1, eos_token_id=None, hooks=state)
    assert gen.output_ids[0] == [int(full[0, -1].argmax())]
    assert not torch.allclose(full[:, -1], plain[:, -1])                  # VAR did act in layer 2
    assert state.report(0)["redistributed"]["prefill"][2] > 0


def test_tiny_var_changes_greedy_and_only_where_it_should(tiny):
    cfg, _, model = tiny
    ids = ids_of(PROMPT_A)
    for patches in (PATCHES_1, PATCHES_2):
        px = tiny_pixels(patches)
        off = generate(model, ids, px, max_new_tokens=16, eos_token_id=None).output_ids
        state = tiny_var(image_mask=ids == IMG)
        on = generate(model, ids, px, max_new_tokens=16, eos_token_id=None, hooks=state).output_ids
        assert on != off
        rep = state.report(0)
        assert rep["redistributed"]["prefill"][2] == 0 and rep["redistributed"]["decode"][2] == 0   # the last layer
        assert min(rep["redistributed"]["prefill"][:2]) > 0 and min(rep["redistributed"]["decode"][:2]) > 0


def test_var_off_is_bit_identical(tiny):
    """Every way of switching VAR off gives plain LLaVA's numbers bit for bit (VAR then asks for no probabilities,
    so the fused kernel runs everywhere), in a forward and in a generation."""
    cfg, _, model = tiny
    ids = ids_of(PROMPT_A)
    px = tiny_pixels(PATCHES_2)
    with torch.inference_mode():
        ref = model(ids, px)
        ref_gen = generate(model, ids, px, max_new_tokens=8, eos_token_id=None).output_ids
        off_states = {
            "p=0": tiny_var(image_mask=ids == IMG, p=0.0),
            "no layers": tiny_var(image_mask=ids == IMG, layers=()),
            "no sink dims": var_hook(VARConfig(tau=TINY_TAU), (), 3, ids == IMG),
            "tau too high": tiny_var(image_mask=ids == IMG, tau=50.0),
        }
        for name, state in off_states.items():
            assert torch.equal(model(ids, px, hooks=state), ref), name
            assert all(state.explicit_from(layer, range(ids.shape[1])) is None for layer in range(3)), name
        # an image without bright patches has no visual sinks: VAR has nothing to do
        px0 = tiny_pixels(())
        assert torch.equal(model(ids, px0, hooks=tiny_var(image_mask=ids == IMG)), model(ids, px0))
        state = tiny_var(image_mask=ids == IMG, p=0.0)
        gen = generate(model, ids, px, max_new_tokens=8, eos_token_id=None, hooks=state)
        assert gen.output_ids == ref_gen
        assert sum(state.report(0)["redistributed"]["decode"]) == 0
        on = model(ids, px, hooks=tiny_var(image_mask=ids == IMG))
        image_end = 4 + N_IMG
        assert torch.equal(on[:, :image_end], ref[:, :image_end]) and not torch.equal(on, ref)


def test_fused_kernel_is_used_where_nothing_needs_probabilities(tiny, monkeypatch):
    """The one test of which path runs: with VAR on, only the layers VAR touches (not the last) write attention
    out, and only for the rows after the image; everything else stays on the fused kernel."""
    import minivar.models.llama as llama
    _, _, model = tiny
    ids = ids_of(PROMPT_A)
    px = tiny_pixels(PATCHES_2)
    explicit_rows = []
    real = llama.LlamaAttention.attend_explicit

    def spy(self, q, k, v, mask, rows, first, hooks=None):
        explicit_rows.append((self.layer_idx, first, rows.stop))
        return real(self, q, k, v, mask, rows, first, hooks)

    monkeypatch.setattr(llama.LlamaAttention, "attend_explicit", spy)
    with torch.inference_mode():
        model(ids, px)
        assert explicit_rows == []
        model(ids, px, hooks=tiny_var(image_mask=ids == IMG))
    assert explicit_rows == [(0, 4 + N_IMG, ids.shape[1]), (1, 4 + N_IMG, ids.shape[1])]


@pytest.mark.parametrize("rho", [0.8, 0.95])
def test_cached_decoding_equals_recompute_with_var(tiny, rho):
    cfg, _, model = tiny
    ids = ids_of(PROMPT_A)
    px = tiny_pixels(PATCHES_2)
    T, steps = ids.shape[1], 12
    with torch.inference_mode():
        # cached: prefill, then one token at a time (what generate() does)
        state = tiny_var(image_mask=ids == IMG, rho=rho)
        cache = KVCache(cfg.text, 1, T + steps, torch.float32, "cpu")
        logits = model(ids, px, cache=cache, hooks=state)
        cached_tokens, cached_logits = [], []
        for step in range(steps):
            cached_logits.append(logits[0, -1])
            nxt = logits[0, -1].argmax()
            cached_tokens.append(int(nxt))
            logits = model(nxt.view(1, 1), cache=cache, input_pos=T + step, hooks=state)
        gen = generate(model, ids, px, max_new_tokens=steps, eos_token_id=None,
                       hooks=tiny_var(image_mask=ids == IMG, rho=rho))
        assert gen.output_ids[0] == cached_tokens
        # from scratch: the whole sequence every step, a fresh VAR state each time (its sink sets cover the prompt:
        # rows past it are generated tokens, never sinks, and every one of them may be touched)
        seq = ids
        for step in range(steps):
            fresh = tiny_var(ids == IMG, rho=rho)
            full = model(seq, px, hooks=fresh)[0, -1]
            torch.testing.assert_close(full, cached_logits[step], rtol=0, atol=1e-4)
            assert int(full.argmax()) == cached_tokens[step]
            seq = torch.cat([seq, torch.tensor([[cached_tokens[step]]])], dim=1)
        assert fresh.report(0)["sinks"] == state.report(0)["sinks"]
        assert sum(state.report(0)["redistributed"]["decode"]) > 0


def test_left_padded_batch_equals_single_samples(tiny):
    """Two prompts with different image spans (left padding) in one batch: each gets its own sinks and rows."""
    cfg, _, model = tiny
    pad = len(PROMPT_A) - len(PROMPT_B)
    ids = ids_of(PROMPT_A, [PAD] * pad + PROMPT_B)
    attn = ids_of([1] * len(PROMPT_A), [0] * pad + [1] * len(PROMPT_B))
    px = torch.cat([tiny_pixels(PATCHES_1), tiny_pixels(PATCHES_2, seed=1)])
    state = var_hook(VARConfig(tau=TINY_TAU), TINY_DIMS, 3, ids == IMG, attn)
    batch = generate(model, ids, px, attention_mask=attn, max_new_tokens=10, eos_token_id=None, hooks=state)
    assert state.sinks.visual_sinks[1][0].nonzero().flatten().tolist() == [4 + p for p in PATCHES_1]
    assert state.sinks.visual_sinks[1][1].nonzero().flatten().tolist() == [pad + 2 + p for p in PATCHES_2]
    assert not state.sinks.sinks[0][1, :pad].any()
    assert state.report(1)["image_span"] == [2, 2 + N_IMG]           # in the sample's own (unpadded) positions
    for b, (prompt, patches, seed) in enumerate([(PROMPT_A, PATCHES_1, 0), (PROMPT_B, PATCHES_2, 1)]):
        one = ids_of(prompt)
        single_state = tiny_var(image_mask=one == IMG)
        single = generate(model, one, tiny_pixels(patches, seed), max_new_tokens=10, eos_token_id=None, hooks=single_state)
        assert batch.output_ids[b] == single.output_ids[0]
        assert state.report(b) == single_state.report(0)


# ---- through the pipeline (checkpoint directory with tokenizer) ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    cfg, state, _ = tiny
    # minivar's own names are transformers 5.x save_pretrained names; like a real checkpoint it also carries what
    # LLaVA never runs (CLIP's last layer, post_layernorm), so transformers loads it with nothing missing
    return write_checkpoint(tmp_path_factory.mktemp("tiny_var") / "ckpt", state | unused_tensors(cfg), cfg,
                            tokenizer=True)


def test_two_images_in_a_row_get_their_own_sinks(tiny_dir, recwarn):
    pipe = minivar.load(str(tiny_dir), device="cpu", dtype="float32")
    var = VARConfig(tau=TINY_TAU)
    reports = []
    for patches in (PATCHES_1, PATCHES_2, PATCHES_1, ()):
        r = pipe.generate(tiny_pil(patches), "What is in the image?", max_new_tokens=3, var=var)
        s = r.var["image_span"][0]
        assert r.var["image_span"][1] - s == N_IMG
        assert r.prompt_ids[s:s + N_IMG] == [IMG] * N_IMG
        for layer in range(3):
            assert r.var["visual_sinks"][str(layer)] == [s + p for p in patches]
            assert r.var["sinks"][str(layer)] == [0] + [s + p for p in patches]
        assert r.var["sink_dims"] == list(TINY_DIMS) and r.var["sink_dims_source"] == "finder"
        reports.append(r.var)
    assert reports[0] == reports[2]
    # a library note is a Python warning (the command lines print it as a status line)
    assert any("not recognised" in str(w.message) for w in recwarn)


# =================================================================================================================
# The demo checkpoint (τ = 20 sinks at dims 37 / 301, visual sinks at patches 27, 100, 290, 455)

EXAMPLE_JPG = Path(__file__).resolve().parents[1] / "assets" / "example.jpg"


@pytest.fixture(scope="module")
def demo_runs(demo_pipe):
    """Greedy on the demo with VAR off, on (default config: sink dims from the finder) and on with p = 0.
    The image: the example photo turned upright (a natural image: random noise can add accidental visual sinks
    through the random CLIP weights; with this one VAR flips the second greedy token, 49 → 23)."""
    img, prompt, n = Image.open(EXAMPLE_JPG).rotate(90, expand=True), "What is in the image?", 4
    return {"off": demo_pipe.generate(img, prompt, max_new_tokens=n),
            "on": demo_pipe.generate(img, prompt, max_new_tokens=n, var=VARConfig()),
            "p0": demo_pipe.generate(img, prompt, max_new_tokens=n, var=VARConfig(sink_dims=demo.DEMO_SINK_DIMS, p=0.0))}


def test_demo_sinks_are_planted_positions(demo_pipe, demo_runs):
    r = demo_runs["on"]
    rep = r.var
    s, e = rep["image_span"]
    assert e - s == 576 and r.prompt_ids[s:e] == [259] * 576 and r.prompt_ids[0] == 1
    assert rep["sink_dims"] == list(demo.DEMO_SINK_DIMS) and rep["sink_dims_source"] == "finder"
    planted = [s + p for p in demo.DEMO_SINK_PATCHES]
    n_layers = demo_pipe.config.text.num_hidden_layers
    for layer in range(n_layers):
        assert rep["visual_sinks"][str(layer)] == planted
        assert rep["sinks"][str(layer)] == [0] + planted          # BOS + the planted patches
    assert rep["layers"] == list(range(n_layers - 1))
    assert rep["redistributed"]["prefill"][-1] == 0 and rep["redistributed"]["decode"][-1] == 0
    assert min(rep["redistributed"]["prefill"][:-1]) > 0 and min(rep["redistributed"]["decode"][:-1]) > 0


def test_demo_var_changes_output_and_p0_does_not(demo_runs):
    assert demo_runs["off"].var is None and demo_runs["p0"].var["sink_dims_source"] == "user"
    assert demo_runs["on"].output_ids != demo_runs["off"].output_ids
    assert demo_runs["p0"].output_ids == demo_runs["off"].output_ids
    assert demo_runs["p0"].var["redistributed"]["prefill"] == [0] * 4


# =================================================================================================================
# The sink-dim finder

def test_finder_recovers_planted_dims_demo(demo_pipe):
    ids = demo_pipe.prompt_ids("Describe the image.")
    dims, info = find_sink_dims(demo_pipe.model, ids)
    assert dims == demo.DEMO_SINK_DIMS


@pytest.mark.parametrize("dims,seed", [(TINY_DIMS, 0), ((23, 99), 3), ((0, 127), 5)])
def test_finder_recovers_planted_dims_tiny(dims, seed):
    cfg = sink_test_config()
    common = 3 if 3 not in dims else 4
    model = build_model(cfg, sink_test_state(cfg, seed=seed, dims=dims, common=common))
    found, _ = find_sink_dims(model, ids_of(PROMPT_A))
    assert found == tuple(sorted(dims))


def test_resolve_sink_dims(tiny):
    cfg, _, model = tiny
    ids = ids_of(PROMPT_A)
    warnings = []
    dims, source = resolve_sink_dims(cfg, VARConfig(), model, ids, warn=warnings.append)
    assert (dims, source) == (TINY_DIMS, "finder") and dims != SEVEN_B
    assert len(warnings) == 1 and "not recognised" in warnings[0] and "[11, 70]" in warnings[0]
    warnings.clear()
    assert resolve_sink_dims(cfg, VARConfig(find_sink_dims=True), model, ids, warn=warnings.append) == (TINY_DIMS, "finder")
    assert len(warnings) == 1
    warnings.clear()
    assert resolve_sink_dims(cfg, VARConfig(sink_dims=(5, 6)), warn=warnings.append) == ((5, 6), "user") and not warnings
    # recognised models never run the finder
    seven = _llava_cfg(4096, 32, 32, 11008, name="llava-hf/llava-1.5-7b-hf")
    assert resolve_sink_dims(seven, VARConfig(), warn=warnings.append) == (SEVEN_B, "known:llava-1.5-7b")
    thirteen = _llava_cfg(5120, 40, 40, 13824, name="llava-hf/llava-1.5-13b-hf")
    assert resolve_sink_dims(thirteen, VARConfig(), warn=warnings.append) == (THIRTEEN_B, "known:llava-1.5-13b")
    assert not warnings
    with pytest.raises(MinivarError):
        resolve_sink_dims(cfg, VARConfig(), warn=warnings.append)       # unknown model and nothing to run
    # one meaning per field: dims are a tuple or None, finding them is its own switch
    assert VARConfig.preset("general", sink_dims="auto") == VARConfig(find_sink_dims=True)
    for bad in (dict(sink_dims="auto"), dict(sink_dims=(1,), find_sink_dims=True)):
        with pytest.raises(MinivarError):
            VARConfig(**bad)


def test_resolve_warns_when_nothing_found():
    cfg = sink_test_config()
    state = demo.random_state_dict(cfg, 0)                                     # no planted sinks
    model = build_model(cfg, state)
    warnings = []
    dims, source = resolve_sink_dims(cfg, VARConfig(), model, ids_of(PROMPT_A), warn=warnings.append)
    assert dims == () and source == "finder"
    assert any("no sink dims" in w for w in warnings)


# =================================================================================================================
# Parity with transformers: the same weights, VAR patched into its eager attention with the loop reference above

class HFVar:
    """VAR for transformers' Llava, from design.md §3: sinks from each decoder layer's residual input in the
    prefill (forward pre-hooks), the loop-level reference applied to the eager attention probabilities."""

    def __init__(self, cfg: VARConfig | None, dims, n_layers, image_mask: torch.Tensor):
        self.cfg, self.dims, self.n_layers = cfg, dims, n_layers
        self.image = image_mask.tolist()
        self.sinks: dict[int, list] = {}
        self.decoding = False
        self.selected = 0

    def pre_hook(self, layer):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if self.cfg is not None and not self.decoding:
                self.sinks[layer] = ref_sinks(ref_phi(h.detach(), self.dims), self.cfg.tau)
        return hook

    def apply(self, layer, weights):
        if self.cfg is None:
            return weights
        new, selected = ref_var_layer(weights, layer=layer, n_layers=self.n_layers, sinks=self.sinks[layer],
                                      image=self.image, decoding=self.decoding, p=self.cfg.p, rho=self.cfg.rho,
                                      min_image_attention=self.cfg.min_image_attention, layers=self.cfg.layers)
        self.selected += count_selected(selected)
        return new.to(weights.dtype)


def hf_greedy(model, ids, px, var: HFVar, steps):
    import transformers.models.llama.modeling_llama as ml
    from torch import nn

    def eager_with_var(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = ml.repeat_kv(key, module.num_key_value_groups)
        value_states = ml.repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
        attn_weights = var.apply(module.layer_idx, attn_weights)
        attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
        return attn_output, attn_weights

    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(var.pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    real = ml.eager_attention_forward
    ml.eager_attention_forward = eager_with_var
    try:
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, use_cache=True)
            var.decoding = True
            tokens, first_logits = [], out.logits[0, -1].float()
            for step in range(steps):
                nxt = out.logits[:, -1].argmax(-1)
                tokens.append(int(nxt))
                if step + 1 < steps:
                    out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    finally:
        ml.eager_attention_forward = real
        for h in handles:
            h.remove()
    return tokens, first_logits


def test_transformers_parity_with_var(tiny, tiny_dir):
    pytest.importorskip("transformers")
    from transformers import LlavaForConditionalGeneration
    cfg, _, model = tiny
    hf, info = LlavaForConditionalGeneration.from_pretrained(str(tiny_dir), attn_implementation="eager",
                                                             dtype=torch.float32, output_loading_info=True)
    hf.eval()
    assert not any(info.values()), info                                      # minivar's names load cleanly
    ids = ids_of(PROMPT_A)
    steps = 16
    tokens = []
    for patches, var_cfg in [(PATCHES_2, None), (PATCHES_2, VARConfig(tau=TINY_TAU)),
                             (PATCHES_2, VARConfig(tau=TINY_TAU, rho=0.95)),
                             (PATCHES_1, VARConfig(tau=TINY_TAU, rho=0.5, p=0.9))]:
        px = tiny_pixels(patches)
        hv = HFVar(var_cfg, TINY_DIMS, 3, ids == IMG)
        hf_tokens, hf_logits = hf_greedy(hf, ids, px, hv, steps)
        state = var_hook(var_cfg, TINY_DIMS, 3, ids == IMG) if var_cfg is not None else None
        with torch.inference_mode():
            fresh = var_hook(var_cfg, TINY_DIMS, 3, ids == IMG) if var_cfg is not None else None
            mv_logits = model(ids, px, hooks=fresh)[0, -1]
        ours = generate(model, ids, px, max_new_tokens=steps, eos_token_id=None, hooks=state).output_ids[0]
        torch.testing.assert_close(mv_logits, hf_logits, rtol=0, atol=1e-4)
        assert ours == hf_tokens, (patches, var_cfg)
        tokens.append(ours)
        if var_cfg is not None:
            rep = state.report(0)
            assert hv.selected == sum(rep["redistributed"]["prefill"]) + sum(rep["redistributed"]["decode"]) > 0
            assert hv.sinks[1] == state.sinks.sinks[1].tolist()
    assert tokens[1] != tokens[0] and tokens[2] != tokens[0]          # VAR changed the greedy tokens (both sides)
