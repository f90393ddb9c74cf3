"""Tests for minivar.methods.var_official: VAR as the released code (MICV-yonsei/VisAttnSink @ 98e62d6) computes it.

1. Each function against a loop-level restatement of the released code written here: DimProspector.run_logic,
   HeadFork.run_logic and VARProcessor.attn_redist (per sample: a list of sink positions and an image span
   [im, im+pa), the code's per-head loop over selected coordinates, Python floats), on hand-made probabilities with
   text and visual sinks, several heads and rows, prefill and decode.
2. The equivalences that pin it to the paper's rule (var.py): with ≥ instead of >, no 1e-6, rho = 1 − ρ, p = 1 − p
   and summ = min_image_attention, the official functions give var.py's output; and each difference alone changes
   the result on a case built to show it.
3. The prompt ids against a loop-level restatement of MetadataStation.segment_prompt on the real LLaMA tokenizer,
   and how they differ from minivar's llava tokenization (no BOS, the 29871s).
4. VARConfig(rule="official") in the hook-based VARState on a 4-layer planted-sink model, end to end: greedy tokens
   and per-layer sink sets equal a hook built from the loop-level restatement above; the same hook with the
   differences removed equals the paper rule; the last layer is modified; heads="all" touches every head.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import minivar
from conftest import build_model, write_checkpoint
from minivar.models.config import LlavaConfig, TextConfig, VisionConfig
from minivar.errors import MinivarError
from minivar.generate import generate
from minivar.methods.hooks import Hook
from minivar.processing import official_prompt_ids
from minivar.methods.var_official import (OFFICIAL_DEFAULTS, official_layer_sets, paper_equivalent,
                              redistribute_official, select_heads_official, sink_sets_official)
from minivar.processing import VICUNA_SYSTEM, Tokenizer
from minivar.methods.var import VARConfig, VARState, Sinks, redistribute, select_heads, sink_scores, sink_sets
from test_prompt_ids import LLAMA_SPECIALS, sentencepiece_encoder, slow_tokenize
from test_var import GRID, IMG, PROMPT_A, TINY_DIMS, TINY_TAU, sink_test_state, tiny_pil, tiny_pixels

IMAGE_ID = 32000


# =================================================================================================================
# Loop-level restatement of the released code (src/logic/logic.py), one sample at a time: the code runs batch 1,
# with `indices` = the sink positions of a layer and the image at [im, im+pa).

def ref_dim_prospector(h: torch.Tensor, dims, tau) -> list[list[int]]:
    """Per sample, the positions t with max_{d∈D} |h_t[d] · rsqrt(mean_k h_t[k]² + 1e-6)| > τ."""
    B, T, D = h.shape
    hl = h.double().tolist()
    out = []
    for b in range(B):
        found = []
        for t in range(T):
            var = sum(x * x for x in hl[b][t]) / D
            scale = 1.0 / math.sqrt(var + 1e-6)
            best = max(abs(hl[b][t][d] * scale) for d in dims)
            if best > tau:
                found.append(t)
        out.append(found)
    return out


def ref_head_fork(attn: torch.Tensor, sinks, im, pa, rho, summ) -> list[tuple[int, int, int]]:
    """HeadFork.run_logic: the (b, head, query) coordinates with portion ≤ rho and summation ≥ summ, every row."""
    B, H, Q, K = attn.shape
    a = attn.double().tolist()
    coords = []
    for b in range(B):
        vis = [i for i in sinks[b] if im[b] <= i < im[b] + pa[b]]
        if not vis:
            continue                                  # forked_head[layer] = []
        for h in range(H):
            for q in range(Q):
                image_attn = a[b][h][q][im[b]:im[b] + pa[b]]
                portion = sum(a[b][h][q][v] for v in vis) / sum(x + 1e-6 for x in image_attn)
                summation = sum(image_attn)
                if portion <= rho and summation >= summ:
                    coords.append((b, h, q))
    return coords


def ref_attn_redist(attn: torch.Tensor, coords, sinks, im, pa, p, *, prefill: bool) -> torch.Tensor:
    """VARProcessor.attn_redist: for each head, its selected query rows (prefill: only rows ≥ im+pa); sinks × p;
    the budget (1 − p)·(Σ visual sinks + Σ text sinks) to the image columns in proportion to the non-visual-sink
    image attention (0/0 → NaN, as in the code)."""
    B, H, Q, K = attn.shape
    out = attn.double().tolist()
    for b in range(B):
        vis = [i for i in sinks[b] if im[b] <= i < im[b] + pa[b]]
        text = [i for i in sinks[b] if i not in vis]
        for h in range(H):
            rows = [q for (bb, hh, q) in coords if bb == b and hh == h]
            if prefill:
                rows = [q for q in rows if im[b] + pa[b] <= q]
            for q in rows:
                row = out[b][h][q]
                copied = list(row)
                for j in text:
                    row[j] *= p
                for j in vis:
                    row[j] *= p
                budget_vis = sum(copied[j] for j in vis) * (1 - p)
                budget_text = sum(copied[j] for j in text) * (1 - p)
                for j in vis:
                    copied[j] *= 0
                denom = sum(copied[im[b]:im[b] + pa[b]])
                for j in range(im[b], im[b] + pa[b]):
                    ratio = copied[j] / denom if denom != 0 else float("nan")
                    row[j] += (budget_vis + budget_text) * ratio
    return torch.tensor(out, dtype=torch.float64)


# =================================================================================================================
# Hand-made cases

def masks(K, im, pa, sinks):
    """[B, K] image and sink masks from per-sample spans and sink position lists."""
    B = len(im)
    image = torch.zeros(B, K, dtype=torch.bool)
    sink = torch.zeros(B, K, dtype=torch.bool)
    for b in range(B):
        image[b, im[b]:im[b] + pa[b]] = True
        sink[b, sinks[b]] = True
    return image, sink, sink & image


def make_probs(shape, image, sink, *, seed, causal: bool, dtype=torch.float64):
    """Softmax rows with a spread of image, visual-sink and text-sink attention (row-wise random boosts)."""
    B, H, Q, K = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    logits += (torch.rand(B, H, Q, 1, generator=g, dtype=torch.float64) * 5 - 2) * image[:, None, None, :]
    logits += (torch.rand(B, H, Q, 1, generator=g, dtype=torch.float64) * 6 - 2) * sink[:, None, None, :]
    if causal:                                          # prefill: query i is position i (+ K − Q)
        allowed = torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, -1).to(dtype)


# Two samples, 24 keys: sample 0 has its image at 4..13 with visual sinks 6 and 11 and text sinks 0 (BOS-like) and
# 17 (after the image); sample 1 has its image at 2..15, one visual sink 9 and text sink 0.
K = 24
IM, PA = [4, 2], [10, 14]
SINKS = [[0, 6, 11, 17], [0, 9]]


def official_rows(Q, prefill):
    """The rows the released code touches: prefill, query i ≥ im+pa; decoding, every row."""
    B = len(IM)
    if not prefill:
        return torch.ones(B, Q, dtype=torch.bool)
    positions = torch.arange(K - Q, K)
    return positions[None, :] >= torch.tensor([i + n for i, n in zip(IM, PA)])[:, None]


def run_official(probs, image, sink, vis, rows, rho, summ, p, **kw):
    selected = select_heads_official(probs, image, vis, rows, rho, summ, **kw)
    return redistribute_official(probs, selected, sink, image, vis, p), selected


def as_coords(selected: torch.Tensor) -> list[tuple[int, int, int]]:
    return sorted(tuple(x) for x in torch.nonzero(selected).tolist())


# =================================================================================================================
# 1. Against the loop-level restatement

def test_sink_sets_official_match_dim_prospector():
    g = torch.Generator().manual_seed(0)
    for B, T, D, dims, tau in [(1, 6, 64, (3,), 4.0), (2, 9, 128, (5, 100), 6.0), (3, 5, 256, (0, 7, 255), 10.0)]:
        h = torch.randn(B, T, D, generator=g)
        for b in range(B):                               # plant massive values of several sizes
            for t, size in [(0, 40.0), (T // 2, 12.0), (T - 1, 3.0)]:
                h[b, t, dims[(b + t) % len(dims)]] = size * (1 if t % 2 else -1)
        image = torch.zeros(B, T, dtype=torch.bool)
        image[:, 1:T - 1] = True
        phi, sinks, vis = sink_sets_official(h, dims, tau, image)
        want = ref_dim_prospector(h, dims, tau)
        assert [torch.nonzero(s).flatten().tolist() for s in sinks] == want
        assert any(want) and not all(len(w) == T for w in want)
        assert torch.equal(vis, sinks & image)
        torch.testing.assert_close(phi, sink_scores(h, dims))
    # padding is never a sink
    h = torch.zeros(1, 3, 64)
    h[0, :, 3] = 50.0
    real = torch.tensor([[False, True, True]])
    _, sinks, _ = sink_sets_official(h, (3,), 5.0, torch.zeros(1, 3, dtype=torch.bool), real)
    assert sinks.tolist() == [[False, True, True]]


@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("seed,H,rho,summ,p", [(0, 4, 0.5, 0.2, 0.6), (1, 3, 0.2, 0.2, 0.4), (2, 5, 0.7, 0.1, 0.0),
                                               (3, 2, 0.35, 0.3, 0.9)])
def test_official_rule_matches_loop_reference(prefill, seed, H, rho, summ, p):
    Q = K if prefill else 3
    image, sink, vis = masks(K, IM, PA, SINKS)
    probs = make_probs((2, H, Q, K), image, sink, seed=seed, causal=prefill)
    rows = official_rows(Q, prefill)
    got, selected = run_official(probs, image, sink, vis, rows, rho, summ, p)

    coords = ref_head_fork(probs, SINKS, IM, PA, rho, summ)
    want = ref_attn_redist(probs, coords, SINKS, IM, PA, p, prefill=prefill)
    offset = K - Q                                      # query row q of probs is position offset + q
    if prefill:
        coords = [(b, h, q) for (b, h, q) in coords if IM[b] + PA[b] <= q + offset]
    assert as_coords(selected) == sorted(coords)
    assert 0 < len(coords) < selected.numel()           # both branches exercised
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.allclose(got.sum(-1), torch.ones(2, H, Q, dtype=torch.float64), atol=1e-12)   # rows still sum to 1
    # float32, the dtype minivar's attention hands over: the same selection, the same numbers to fp32 rounding
    got32, selected32 = run_official(probs.float(), image, sink, vis, rows, rho, summ, p)
    assert torch.equal(selected32, selected)
    torch.testing.assert_close(got32, want.float(), rtol=1e-5, atol=1e-6)


def test_prefill_rows_before_the_image_end_are_never_touched():
    image, sink, vis = masks(K, IM, PA, SINKS)
    probs = make_probs((2, 4, K, K), image, sink, seed=5, causal=True)
    rows = official_rows(K, True)
    got, selected = run_official(probs, image, sink, vis, rows, 0.9, 0.0, 0.5)
    everywhere, _ = run_official(probs, image, sink, vis, torch.ones_like(rows), 0.9, 0.0, 0.5)
    for b in range(2):
        end = IM[b] + PA[b]
        assert torch.equal(got[b, :, :end], probs[b, :, :end])
        assert not torch.equal(got[b, :, end:], probs[b, :, end:])
        assert not torch.equal(everywhere[b, :, IM[b] + 1:end], probs[b, :, IM[b] + 1:end])   # the filter matters


# =================================================================================================================
# 2. The paper's rule, and each difference

def paper_case(seed, H=4, prefill=True):
    Q = K if prefill else 3
    image, sink, vis = masks(K, IM, PA, SINKS)
    probs = make_probs((2, H, Q, K), image, sink, seed=seed, causal=prefill, dtype=torch.float32)
    return probs, image, sink, vis, official_rows(Q, prefill)


@pytest.mark.parametrize("seed,rho_paper,p_paper,mia", [(0, 0.8, 0.5, 0.2), (1, 0.5, 0.25, 0.2), (2, 0.9, 0.75, 0.1),
                                                        (3, 0.6, 0.6, 0.3)])
def test_official_equals_paper_rule_with_the_differences_removed(seed, rho_paper, p_paper, mia):
    probs, image, sink, vis, rows = paper_case(seed)
    rho, p = paper_equivalent(rho_paper, p_paper)
    official_sel = select_heads_official(probs, image, vis, rows, rho, mia, eps=0.0)
    paper_sel = select_heads(probs, image, vis, rows, mia, rho_paper)
    # equal unless a pair sits on the threshold to fp32 rounding (r and 1 − portion are summed separately)
    r = (probs * (image & ~vis)[:, None, None, :]).sum(-1) / (probs * image[:, None, None, :]).sum(-1)
    on_edge = (r - rho_paper).abs() < 1e-6
    assert not on_edge.any()
    assert torch.equal(official_sel, paper_sel)
    assert 0 < int(paper_sel.sum()) < paper_sel.numel() // 2
    official_out = redistribute_official(probs, official_sel, sink, image, vis, p)
    paper_out = redistribute(probs, paper_sel, sink, image, vis, p_paper)
    torch.testing.assert_close(official_out, paper_out, rtol=0, atol=3e-7)
    assert not torch.equal(paper_out, probs)
    # sinks: exactly equal (α·p and α − p_paper·α round alike for these dyadic or matched p)
    h = torch.randn(2, K, 64, generator=torch.Generator().manual_seed(seed))
    h[:, [0, 6, 9], 7] = torch.tensor([60.0, 30.0, 12.0])
    for tau in (5.0, 10.0, 20.0):
        a, b = sink_sets_official(h, (7,), tau, image, strict=False), sink_sets(h, (7,), tau, image)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_strict_threshold_alone_changes_the_sinks():
    h = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    h[0, 2, 5] = 30.0
    tau = float(sink_scores(h, (5,))[0, 2])              # a token exactly on the threshold
    image = torch.ones(1, 6, dtype=torch.bool)
    _, strict, _ = sink_sets_official(h, (5,), tau, image)
    _, paper, _ = sink_sets(h, (5,), tau, image)
    assert not strict[0, 2] and paper[0, 2]
    assert torch.equal(sink_sets_official(h, (5,), tau, image, strict=False)[1], paper)


def one_row(values, K_=None):
    """probs [1, 1, 1, K] of one hand-written row (normalised) and its masks: keys 0 text sink, 1..8 image with
    visual sink at 1, 9 a plain text token."""
    row = torch.tensor(values, dtype=torch.float64)
    image = torch.zeros(1, 10, dtype=torch.bool)
    image[0, 1:9] = True
    sink = torch.zeros(1, 10, dtype=torch.bool)
    sink[0, [0, 1]] = True
    return row.view(1, 1, 1, -1), image, sink, sink & image


def test_the_1e6_alone_changes_the_selection():
    # Σ_I = 0.2 over 8 image keys, Σ_V = 0.100002: portion 0.50001 without the 1e-6, 0.50001 · 0.2 / 0.200008 with
    # it (≈ 0.49999): the 8 · 1e-6 in the denominator tips it under rho 0.5.
    rest = (0.2 - 0.100002) / 7
    probs, image, sink, vis = one_row([0.5, 0.100002] + [rest] * 7 + [0.3])
    rows = torch.ones(1, 1, dtype=torch.bool)
    assert select_heads_official(probs, image, vis, rows, 0.5, 0.2).item()
    assert not select_heads_official(probs, image, vis, rows, 0.5, 0.2, eps=0.0).item()
    assert not select_heads(probs, image, vis, rows, 0.2, 0.5).item()       # the paper's ρ = 1 − 0.5


def test_rho_and_p_conventions_alone_change_the_result():
    # visual-sink share of the image attention 0.3: the paper's ρ 0.8 wants a non-sink share ≥ 0.8 (no), the code's
    # rho 0.2 = 1 − 0.8 a sink share ≤ 0.2 (no), but the code's rho read as 0.8 selects it.
    probs, image, sink, vis = one_row([0.3, 0.12] + [0.04] * 7 + [0.3])
    rows = torch.ones(1, 1, dtype=torch.bool)
    assert not select_heads(probs, image, vis, rows, 0.2, 0.8).item()
    assert not select_heads_official(probs, image, vis, rows, 0.2, 0.2, eps=0.0).item()
    assert select_heads_official(probs, image, vis, rows, 0.8, 0.2, eps=0.0).item()
    # p: the code keeps p, the paper moves p; the same number means different things unless it is 0.5
    selected = torch.ones(1, 1, 1, dtype=torch.bool)
    kept_06 = redistribute_official(probs, selected, sink, image, vis, 0.6)
    torch.testing.assert_close(kept_06, redistribute(probs, selected, sink, image, vis, 0.4), rtol=0, atol=1e-15)
    assert not torch.allclose(kept_06, redistribute(probs, selected, sink, image, vis, 0.6))
    assert kept_06[0, 0, 0, 0].item() == pytest.approx(0.3 * 0.6)          # the text sink keeps 60%


def test_text_sinks_are_scaled_and_feed_the_budget():
    probs, image, sink, vis = one_row([0.4, 0.1] + [0.05] * 7 + [0.15])
    selected = torch.ones(1, 1, 1, dtype=torch.bool)
    got = redistribute_official(probs, selected, sink, image, vis, 0.5)[0, 0, 0]
    assert got[0].item() == pytest.approx(0.2) and got[1].item() == pytest.approx(0.05)   # both sinks × p
    assert got[9].item() == 0.15                                                          # plain text: untouched
    budget = 0.5 * (0.4 + 0.1)
    assert got[2:9].tolist() == pytest.approx([0.05 + budget / 7] * 7)
    # leaving the text sink alone (visual sinks only) is a different result
    visual_only = redistribute_official(probs, selected, vis, image, vis, 0.5)[0, 0, 0]
    assert visual_only[0].item() == 0.4 and visual_only[2].item() == pytest.approx(0.05 + 0.05 / 7)


def test_no_non_sink_image_attention_nan_under_official_never_selected_under_paper():
    # all image attention on the visual sink (the rest of the image exactly 0)
    probs, image, sink, vis = one_row([0.5, 0.3] + [0.0] * 7 + [0.2])
    rows = torch.ones(1, 1, dtype=torch.bool)
    selected = select_heads_official(probs, image, vis, rows, 1.0, 0.2, eps=0.0)   # portion = 1 ≤ 1
    assert selected.item()
    got = redistribute_official(probs, selected, sink, image, vis, 0.6)[0, 0, 0]
    assert torch.isnan(got[1:9]).all() and not torch.isnan(got[[0, 9]]).any()
    assert not select_heads(probs, image, vis, rows, 0.2, 0.0).item()                # paper ρ = 1 − 1.0 = 0


def test_no_visual_sink_no_selection():
    probs, image, sink, vis = one_row([0.3, 0.1] + [0.05] * 7 + [0.25])
    rows = torch.ones(1, 1, dtype=torch.bool)
    no_vis = torch.zeros_like(vis)
    assert select_heads_official(probs, image, vis, rows, 0.5, 0.2).item()
    assert not select_heads_official(probs, image, no_vis, rows, 0.5, 0.2).item()    # portion 0 ≤ rho, yet no


def test_layer_sets_and_last_layer():
    for L in (1, 2, 3, 4, 32):
        detect, modify = official_layer_sets(L)
        assert detect == modify == frozenset(range(2, L))
    detect, modify = official_layer_sets(32)
    assert 31 in modify and 31 not in VARConfig().layer_set(32)                    # the last layer: code yes, paper no
    assert {0, 1} <= VARConfig().layer_set(32) and not {0, 1} & modify             # layers 0, 1: paper yes, code no


def test_paper_equivalent_and_defaults():
    assert paper_equivalent(0.2, 0.4) == (0.8, 0.6)
    assert paper_equivalent(OFFICIAL_DEFAULTS["rho"], OFFICIAL_DEFAULTS["p"]) == (0.5, 0.4)
    assert paper_equivalent(*paper_equivalent(0.3, 0.7)) == (0.3, 0.7)
    assert OFFICIAL_DEFAULTS == {"tau": 20.0, "rho": 0.5, "p": 0.6, "summ": 0.2}


# =================================================================================================================
# 3. Prompt ids: a loop-level restatement of MetadataStation.segment_prompt (src/stash.py)

def ref_segment_prompt(sentencepiece, question: str, n_image: int) -> list[int]:
    """conv_vicuna_v1.get_prompt() with "<image>\\n" + question, cut as segment_prompt cuts it, each segment
    tokenized without special tokens by the code's slow tokenizer (test_prompt_ids.slow_tokenize: a typed </s> is
    id 2), 29871 kept once, the image placeholder expanded."""
    prompt = VICUNA_SYSTEM + " " + "USER" + ": " + "<image>\n" + question + " " + "ASSISTANT" + ":"
    parts = prompt.split("USER", 1)
    system = parts[0]
    user_and_assistant = "USER" + parts[1]
    parts = user_and_assistant.split("ASSISTANT", 1)
    if len(parts) == 2:
        user_text, role_1 = parts[0], "ASSISTANT" + parts[1]
    else:
        user_text, role_1 = user_and_assistant, ""
    before_img, after_img = user_text.split("<image>", 1)
    first_found = False
    ids = []
    for text in (system, before_img, None, after_img, role_1):
        if text is None:
            ids.extend([IMAGE_ID] * n_image)
            continue
        for token in slow_tokenize(sentencepiece, text, LLAMA_SPECIALS):
            if token != 29871:
                ids.append(token)
            elif not first_found:
                ids.append(token)
                first_found = True
    return ids


QUESTIONS = [
    "What is the content of this image?",
    "Is there a dog in the image?\nAnswer the question using a single word or phrase.",
    "How many cats: 2, 3 or 10?! (Count carefully; don't guess.)",
    "Qu'est-ce que c'est ? Café, naïve, Straße, 日本語, emoji 🙂",
    "Line one\n\nline two\n  indented 42",
]
TRICKY = [
    "  leading and trailing spaces  ",
    "Is the ASSISTANT: visible? Ask the USER.",
    "What does <image> mean in </s> text?",
    "tabs\tand  double  spaces",
]


@pytest.fixture(scope="module")
def raw_tok(llama_tokenizer_path):
    """The `tokenizers` library on the real tokenizer, its added tokens never matched in text."""
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(str(llama_tokenizer_path))
    tok.encode_special_tokens = True
    return tok


@pytest.fixture(scope="module")
def sentencepiece(llama_tokenizer_path):
    return sentencepiece_encoder(llama_tokenizer_path)


@pytest.fixture(scope="module")
def tok(llama_tokenizer_path):
    return Tokenizer(llama_tokenizer_path, image_token_id=IMAGE_ID)


@pytest.mark.parametrize("question", QUESTIONS + TRICKY)
@pytest.mark.parametrize("n_image", [1, 576])
def test_prompt_ids_match_segment_prompt(tok, raw_tok, sentencepiece, question, n_image):
    got = official_prompt_ids(tok, question, n_image, IMAGE_ID)
    assert got == ref_segment_prompt(sentencepiece, question, n_image)
    assert got.count(IMAGE_ID) == n_image and got.count(29871) == 1 and got[0] != tok.bos_id
    assert official_prompt_ids(raw_tok, question, n_image, IMAGE_ID) == got           # a bare tokenizers object


@pytest.mark.parametrize("question", QUESTIONS)
def test_prompt_ids_differ_from_llava_only_by_bos_and_29871(tok, question):
    llava = tok.encode_prompt(question, "vicuna_v1", num_image_tokens=4)
    official = official_prompt_ids(tok, question, 4, IMAGE_ID)
    assert llava[0] == tok.bos_id and official[0] != tok.bos_id
    assert llava.count(29871) >= 2                                  # the "▁" on both sides of the image
    # the released code: no BOS, no 29871 but one, which ends the system segment ("questions. " → ".", "▁")
    n_system = len(tok._tok.encode(VICUNA_SYSTEM, add_special_tokens=False).ids)
    without = [t for t in llava[1:] if t != 29871]
    assert official == without[:n_system] + [29871] + without[n_system:]


def test_prompt_ids_drop_spaces_inside_the_question(tok):
    # the tokenizer writes " 2" as "▁", "2" and " 日" as "▁", "日": the released code drops those "▁" too
    llava = tok.encode_prompt("Count 2 日本", "vicuna_v1", num_image_tokens=1)
    official = official_prompt_ids(tok, "Count 2 日本", 1, IMAGE_ID)
    tail = llava[llava.index(IMAGE_ID) + 1:]
    assert tail.count(29871) == 3                                   # after the image, before 2, before 日
    assert official[official.index(IMAGE_ID) + 1:] == [t for t in tail if t != 29871]


def test_prompt_ids_errors(tok):
    with pytest.raises(MinivarError, match="num_image_tokens"):
        official_prompt_ids(tok, "What?", 0, IMAGE_ID)
    with pytest.raises(MinivarError, match="empty prompt"):
        official_prompt_ids(tok, "   ", 576, IMAGE_ID)


def test_prompt_ids_on_the_demo_tokenizer():
    # a byte-level tokenizer has no 29871: the released rule then only drops BOS
    from minivar import demo
    raw = demo.make_tokenizer()
    raw.encode_special_tokens = True
    official = official_prompt_ids(raw, "Is it red?", 3, 259)
    whole = raw.encode(VICUNA_SYSTEM + " USER: ", add_special_tokens=False).ids + [259] * 3 + \
        raw.encode("\nIs it red? ASSISTANT:", add_special_tokens=False).ids
    assert official == whole


# =================================================================================================================
# 4. End to end on a planted-sink model (test_var's planted model, with 4 decoder layers so that the released code's
#    layers 2..L−1 are two layers, one of them the last)

L4 = 4
N_IMG = GRID * GRID
IM_A, PA_A = 4, N_IMG                     # PROMPT_A: the image at [4, 68), 6 text rows after it


def planted_config() -> LlavaConfig:
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=14 * GRID, patch_size=14)
    text = TextConfig(vocab_size=261, hidden_size=128, intermediate_size=256, num_hidden_layers=L4,
                      num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
    return LlavaConfig(vision=vision, text=text, image_token_index=IMG, pad_token_id=260, name_or_path="tiny-official")


@pytest.fixture(scope="module")
def planted():
    cfg = planted_config()
    state = sink_test_state(cfg, seed=1)          # seed 1: both rules change this model's greedy tokens
    return cfg, state, build_model(cfg, state)


class RefReleased(Hook):
    """The released code as a hook, from the loop-level functions above: DimProspector on the prefill's residual
    input of the `detect` layers, HeadFork on every row of every layer, VARProcessor.attn_redist on the rows after
    the image (prefill) or every row (decoding). Batch 1. The switches remove the differences to the paper's rule."""

    def __init__(self, *, tau, rho, summ, p, prompt_len, detect, modify=None, strict=True, eps=1e-6):
        self.tau, self.rho, self.summ, self.p, self.prompt_len = tau, rho, summ, p, prompt_len
        self.detect, self.modify, self.strict, self.eps = detect, modify, strict, eps
        self.indices: dict[int, list[int]] = {}

    def residual(self, layer, h, rows):
        if rows.start == 0 and layer in self.detect:             # the prefill (the code: output_token_count < 0)
            if self.strict:
                self.indices[layer] = ref_dim_prospector(h, TINY_DIMS, self.tau)[0]
            else:                                                 # ≥ instead of >
                self.indices[layer] = ref_dim_prospector(h, TINY_DIMS, self.tau * (1 - 1e-12))[0]

    def explicit_from(self, layer, rows):
        return 0                                                  # HeadFork reads every row

    def probs(self, layer, probs, rows, before):
        if self.modify is not None and layer not in self.modify:
            return probs
        sinks = [self.indices.get(layer, [])]
        coords = ref_head_fork_eps(probs, sinks, [IM_A], [PA_A], self.rho, self.summ, self.eps)
        prefill = rows.start < self.prompt_len
        return ref_attn_redist(probs, coords, sinks, [IM_A], [PA_A], self.p, prefill=prefill).to(probs.dtype)


def ref_head_fork_eps(attn, sinks, im, pa, rho, summ, eps):
    """ref_head_fork with the 1e-6 as a switch (eps = 1e-6: the code)."""
    if eps == 1e-6:
        return ref_head_fork(attn, sinks, im, pa, rho, summ)
    B, H, Q, K = attn.shape
    a = attn.double().tolist()
    coords = []
    for b in range(B):
        vis = [i for i in sinks[b] if im[b] <= i < im[b] + pa[b]]
        if not vis:
            continue
        for h in range(H):
            for q in range(Q):
                image_attn = a[b][h][q][im[b]:im[b] + pa[b]]
                total = sum(x + eps for x in image_attn)
                portion = sum(a[b][h][q][v] for v in vis) / total if total > 0 else float("nan")
                if portion <= rho and sum(image_attn) >= summ:
                    coords.append((b, h, q))
    return coords


def official_state(cfg: VARConfig, keep_selections=False) -> VARState:
    ids = torch.tensor([PROMPT_A])
    sinks = Sinks(TINY_DIMS, cfg.tau, L4, ids == IMG, strict=cfg.rule == "official", layers=cfg.sink_layers(L4))
    return VARState(cfg, sinks, keep_selections=keep_selections)


def greedy(model, hooks, patches=(5,), steps=10):
    ids = torch.tensor([PROMPT_A])
    return generate(model, ids, tiny_pixels(patches), max_new_tokens=steps, eos_token_id=None, hooks=hooks).output_ids[0]


@pytest.mark.parametrize("rho,p", [(0.5, 0.6), (0.02, 0.6), (0.3, 0.2)])
@pytest.mark.parametrize("patches", [(5,), (2, 40)])
def test_official_rule_end_to_end_equals_released_code(planted, rho, p, patches):
    _, _, model = planted
    cfg = VARConfig(rule="official", tau=TINY_TAU, rho=rho, p=p)
    state = official_state(cfg)
    ref = RefReleased(tau=TINY_TAU, rho=rho, summ=0.2, p=p, prompt_len=len(PROMPT_A), detect=range(2, L4))
    got = greedy(model, state, patches)
    assert got == greedy(model, ref, patches)
    for layer in range(L4):                                       # per-layer sink sets: none in layers 0 and 1
        assert state.sinks.sinks[layer][0].nonzero().flatten().tolist() == ref.indices.get(layer, [])
    assert ref.indices[2] == [0] + [IM_A + q for q in patches]   # BOS and the planted patches
    counts = state.report(0)["redistributed"]
    assert counts["prefill"][:2] == counts["decode"][:2] == [0, 0]
    if rho >= 0.3:                                                # (rho 0.02 selects little, in the last layer nothing)
        assert counts["prefill"][3] > 0 and counts["decode"][3] > 0                    # the last layer is modified
    if (rho, patches) == (0.5, (5,)):
        assert got != greedy(model, None, patches)                # VAR changes this model's answer


@pytest.mark.parametrize("rho_paper,p_paper", [(0.8, 0.6), (0.98, 0.3)])
def test_released_code_without_its_differences_is_the_paper_rule_end_to_end(planted, rho_paper, p_paper):
    _, _, model = planted
    paper = VARConfig(tau=TINY_TAU, rho=rho_paper, p=p_paper)
    rho, p = paper_equivalent(rho_paper, p_paper)
    ref = RefReleased(tau=TINY_TAU, rho=rho, summ=0.2, p=p, prompt_len=len(PROMPT_A), detect=range(L4),
                      modify=range(L4 - 1), strict=False, eps=0.0)
    state = official_state(paper)
    got = greedy(model, state)
    assert got == greedy(model, ref)
    assert sum(state.report(0)["redistributed"]["prefill"]) > 0
    if rho_paper == 0.8:
        assert got != greedy(model, None)                         # VAR changes this model's answer


def test_each_switch_of_the_released_code_moves_the_logits(planted):
    """The released code's layer sets alone (sinks from layer 2 on, the last layer modified) change the last
    logits: the code's own layers vs. the code with the paper's layers."""
    _, _, model = planted
    ids, px = torch.tensor([PROMPT_A]), tiny_pixels((5,))

    def last_logits(hook):
        with torch.inference_mode():
            return model(ids, px, hooks=hook)[0, -1]

    code = dict(tau=TINY_TAU, rho=0.5, summ=0.2, p=0.6, prompt_len=len(PROMPT_A))
    released = last_logits(RefReleased(**code, detect=range(2, L4)))
    torch.testing.assert_close(last_logits(official_state(VARConfig(rule="official", tau=TINY_TAU))), released,
                               rtol=0, atol=1e-4)
    without_last = last_logits(RefReleased(**code, detect=range(2, L4), modify=range(L4 - 1)))
    with_early = last_logits(RefReleased(**code, detect=range(L4)))
    assert (released - without_last).abs().max() > 1e-2             # the last layer's redistribution shows
    assert (released - with_early).abs().max() > 1e-2                # so does scanning layers 0 and 1
    # and the minivar switch for the last layer: the official rule limited to layer 2
    limited = last_logits(official_state(VARConfig(rule="official", tau=TINY_TAU, layers=(2,))))
    torch.testing.assert_close(limited, without_last, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rule,rho", [("official", 0.02), ("paper", 0.98)])
def test_heads_all_touches_every_head_of_the_touched_rows(planted, rule, rho):
    _, _, model = planted
    centric = official_state(VARConfig(rule=rule, tau=TINY_TAU, rho=rho))
    every = official_state(VARConfig(rule=rule, tau=TINY_TAU, rho=rho, heads="all"), keep_selections=True)
    greedy(model, centric)
    greedy(model, every)
    H, rows_after_image, steps = 4, len(PROMPT_A) - (IM_A + PA_A), 9       # 10 tokens: 9 decoding calls
    layers = sorted(every.layers)
    want_prefill = [H * rows_after_image if layer in layers else 0 for layer in range(L4)]
    want_decode = [H * steps if layer in layers else 0 for layer in range(L4)]
    rep = every.report(0)["redistributed"]
    assert rep == {"prefill": want_prefill, "decode": want_decode}
    for layer, chunks in every.selections.items():
        for rows, selected in chunks:
            positions = torch.arange(rows.start, rows.stop)
            assert torch.equal(selected[0], (positions >= IM_A + PA_A)[None, :].expand(H, -1))
    # image-centric selection really selects fewer on this model, so "all" is a different rule here
    assert sum(centric.report(0)["redistributed"]["prefill"]) < sum(want_prefill)


def test_official_config_defaults_report_and_presets():
    c = VARConfig(rule="official")
    assert (c.tau, c.rho, c.p, c.min_image_attention) == (20.0, 0.5, 0.6, 0.2)
    assert (c.rho, c.p, c.min_image_attention) == (OFFICIAL_DEFAULTS["rho"], OFFICIAL_DEFAULTS["p"],
                                                   OFFICIAL_DEFAULTS["summ"])
    assert c.paper_values() == (0.5, 0.4) and c.moved == pytest.approx(0.4)
    assert VARConfig().rho == 0.8 and VARConfig().paper_values() == (0.8, 0.6) and VARConfig().moved == 0.6
    assert VARConfig.preset("general", rule="official").rho == 0.2
    assert VARConfig.preset("vision", rule="official").rho == 0.1
    assert VARConfig.preset(None, rule="official") == c
    assert VARConfig.preset("general", rule="official", rho=0.3).rho == 0.3
    assert c.layer_set(32) == frozenset(range(2, 32)) and c.sink_layers(32) == frozenset(range(2, 32))
    assert VARConfig().sink_layers(32) is None and VARConfig().layer_set(32) == frozenset(range(31))
    # issue 19: the released rule never touches layers 0 and 1 (no sinks are found there): a request for them
    # reports what is touched
    assert VARConfig(rule="official", layers=(0, 31)).layer_set(32) == frozenset({31})
    rep = official_state(VARConfig(rule="official", tau=TINY_TAU, rho=0.2, p=0.7)).report(0)
    assert (rep["rule"], rep["heads"], rep["rho"], rep["p"], rep["rho_paper"], rep["p_paper"]) == \
        ("official", "image-centric", 0.2, 0.7, 0.8, 0.3)
    with pytest.raises(MinivarError, match="VARConfig.rule"):
        VARConfig(rule="authors")
    with pytest.raises(MinivarError, match="VARConfig.heads"):
        VARConfig(heads="most")


def test_official_p1_keeps_everything_and_skips_the_explicit_path(planted):
    """Under the code's convention p = 1 keeps all of the sinks' attention: nothing moves, as with VAR off."""
    _, _, model = planted
    state = official_state(VARConfig(rule="official", tau=TINY_TAU, p=1.0))
    assert greedy(model, state) == greedy(model, None)
    assert not any(state.active(layer) for layer in range(L4))


def test_official_rule_through_the_pipeline(planted, tmp_path):
    cfg, state, _ = planted
    pipe = minivar.load(str(write_checkpoint(tmp_path / "ckpt", state, cfg, tokenizer=True)), device="cpu",
                        dtype="float32")
    var = VARConfig(rule="official", tau=TINY_TAU, sink_dims=TINY_DIMS)
    r = pipe.generate(tiny_pil((5,)), "What is in the image?", max_new_tokens=3, var=var)
    s = r.var["image_span"][0]
    assert r.var["visual_sinks"]["0"] == r.var["visual_sinks"]["1"] == []
    assert r.var["visual_sinks"]["2"] == r.var["visual_sinks"]["3"] == [s + 5]
    assert r.var["rule"] == "official" and r.var["p_paper"] == 0.4
    assert r.var["redistributed"]["prefill"][3] > 0


# =================================================================================================================
# 5. The command line (run.py) on the tiny checkpoint (2 decoder layers: the released code's layers 2..L−1 are none)

def run_json(*argv):
    from conftest import run_cli
    rc, out, err = run_cli(["--image", TINY_IMAGE, "--prompt", "Is it red?", "--max-new-tokens", "2", "--json",
                            *argv])
    assert rc == 0, err
    return json.loads(out)


TINY_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "example.jpg"


def test_cli_var_rule_official_reports_both_conventions(tiny_checkpoint):
    record = run_json("--model", tiny_checkpoint, "--var", "--var-rule", "official", "--sink-dims", "3,7")
    var = record["var"]
    assert (var["rule"], var["heads"], var["tau"], var["rho"], var["p"]) == ("official", "image-centric", 20.0, 0.5, 0.6)
    assert (var["rho_paper"], var["p_paper"], var["min_image_attention"]) == (0.5, 0.4, 0.2)
    assert var["layers"] == [] and var["sinks"]["0"] == var["sinks"]["1"] == []      # layers 2..L−1 of 2 layers
    assert record["prompt_tokenization"] == "llava"
    var = run_json("--model", tiny_checkpoint, "--var", "--var-rule", "official", "--var-preset", "general",
                   "--p", "0.3", "--sink-dims", "3,7")["var"]
    assert (var["rho"], var["rho_paper"], var["p"], var["p_paper"]) == (0.2, 0.8, 0.3, 0.7)
    var = run_json("--model", tiny_checkpoint, "--var", "--sink-dims", "3,7")["var"]
    assert (var["rule"], var["rho"], var["rho_paper"], var["p_paper"], var["layers"]) == ("paper", 0.8, 0.8, 0.6, [0])


def test_cli_var_heads_and_layers(tiny_checkpoint):
    var = run_json("--model", tiny_checkpoint, "--var", "--var-heads", "all", "--var-layers", "0-1",
                   "--sink-dims", "3,7")["var"]
    assert var["heads"] == "all" and var["layers"] == [0, 1]          # the last layer, named
    var = run_json("--model", tiny_checkpoint, "--var", "--var-layers", "1", "--sink-dims", "3,7")["var"]
    assert var["layers"] == [1]


def test_cli_prompt_tokenization_official(tiny_checkpoint):
    record = run_json("--model", tiny_checkpoint, "--prompt-tokenization", "official")
    tok = Tokenizer(tiny_checkpoint, image_token_id=259)
    assert record["prompt_tokenization"] == "official"
    assert record["prompt_ids"] == official_prompt_ids(tok, "Is it red?", 16, 259)
    llava = run_json("--model", tiny_checkpoint)["prompt_ids"]
    assert llava[0] == tok.bos_id and record["prompt_ids"] == llava[1:]     # byte-level: no 29871, only BOS differs
    pipe = minivar.load(str(tiny_checkpoint), device="cpu", dtype="float32")        # the Python API, both paths
    one = pipe.generate(TINY_IMAGE, "Is it red?", max_new_tokens=1, prompt_tokenization="official")
    many = pipe.generate_many(TINY_IMAGE, ["Is it red?", "Is it blue?"], max_new_tokens=1,
                              prompt_tokenization="official")
    assert one.prompt_ids == many[0].prompt_ids == record["prompt_ids"]
    assert many[1].prompt_ids == official_prompt_ids(tok, "Is it blue?", 16, 259)


@pytest.mark.parametrize("argv,names", [
    (["--var-rule", "official"], ["--var-rule", "--var"]),
    (["--var-heads", "all"], ["--var-heads", "--var"]),
    (["--var", "--var-layers", "3-1"], ["--var-layers", "3-1"]),
    (["--var", "--var-layers", "0-5", "--sink-dims", "3,7"], ["--var-layers", "0..1"]),
    (["--var", "--var-rule", "authors"], ["--var-rule"]),
    (["--prompt-tokenization", "official", "--conv-mode", "llava_hf"], ["--prompt-tokenization", "--conv-mode"]),
])
def test_cli_errors(tiny_checkpoint, argv, names):
    from conftest import assert_one_line_error, run_cli
    rc, out, err = run_cli(["--image", TINY_IMAGE, "--prompt", "Hi", "--model", tiny_checkpoint,
                            "--max-new-tokens", "1", *argv])
    assert_one_line_error(rc, out, err, *names)


def test_cli_status_line_names_the_rule(tiny_checkpoint):
    from conftest import run_cli
    rc, out, err = run_cli(["--image", TINY_IMAGE, "--prompt", "Hi", "--model", tiny_checkpoint, "--max-new-tokens",
                            "1", "--var", "--var-rule", "official", "--var-heads", "all", "--sink-dims", "3,7"])
    assert rc == 0, err
    assert "rule official: rho 0.5 (ρ 0.5), p 0.6 kept (p 0.4 moved), every head" in err
