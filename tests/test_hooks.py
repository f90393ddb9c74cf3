"""The hook protocol and explicit positions: a prompt fed in chunks is one call; captures only record; errors.

Runs on test_var's tiny model with planted sinks (3 layers; visual sinks where the image has bright patches).
"""
import dataclasses

import pytest
import torch

from conftest import build_model
from minivar.errors import MinivarError
from minivar.generate import generate
from minivar.models.llama import KVCache
from minivar.probe import Capture
from minivar.methods.var import Sinks, VARConfig, VARState
from test_var import (IMG, PATCHES_2, PROMPT_A, PROMPT_B, TINY_DIMS, TINY_TAU, ids_of, sink_test_config,
                      sink_test_state, tiny_pixels)

N_IMG = 64
IMAGE = (4, 4 + N_IMG)                     # PROMPT_A's image tokens
CHUNKINGS = {                              # where a prompt of len(PROMPT_A) = 74 tokens is cut
    "inside the system text": [2],
    "inside the image": [30],
    "after the image": [70],
    "everywhere": [2, 30, 68, 71],
}


@pytest.fixture(scope="module")
def tiny():
    cfg = sink_test_config()
    return cfg, build_model(cfg, sink_test_state(cfg))


def var_state(ids, cfg=None, **kw):
    cfg = cfg or VARConfig(tau=TINY_TAU)
    return VARState(cfg, Sinks(TINY_DIMS, cfg.tau, 3, ids == IMG), **kw)


def chunked_forward(model, ids, px, cuts, hooks, cache):
    """The prompt in several consecutive calls, each with its own positions and its share of the image features."""
    feats = torch.stack(model.image_features(px))
    bounds = [0, *cuts, ids.shape[1]]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        before, inside = int((ids[:, :a] == IMG).sum()), int((ids[:, a:b] == IMG).sum())
        f = feats[:, before:before + inside] if inside else None
        parts.append(model(ids[:, a:b], image_features=f, cache=cache, input_pos=a, hooks=hooks))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("var", [False, True], ids=["var-off", "var-on"])
@pytest.mark.parametrize("where", list(CHUNKINGS))
def test_prefill_in_chunks_equals_one_call(tiny, where, var):
    cfg, model = tiny
    ids, px = ids_of(PROMPT_A), tiny_pixels(PATCHES_2)
    T = ids.shape[1]
    with torch.inference_mode():
        one_state, chunk_state = (var_state(ids) if var else None), (var_state(ids) if var else None)
        one_cap, chunk_cap = Capture(layers="all", rows="all"), Capture(layers="all", rows="all")
        for cap, state in ((one_cap, one_state), (chunk_cap, chunk_state)):
            cap.bind(ids == IMG, sinks=state.sinks if state else None, var_state=state, n_layers=3, n_heads=4)
        one = model(ids, px, hooks=[one_state, one_cap])
        chunks = chunked_forward(model, ids, px, CHUNKINGS[where], [chunk_state, chunk_cap],
                                 KVCache(cfg.text, 1, T, torch.float32, "cpu"))
    assert (chunks - one).abs().max().item() <= 1e-5
    if var:
        assert chunk_state.report(0) == one_state.report(0)                   # sink sets and counts
        assert sum(one_state.report(0)["redistributed"]["prefill"]) > 0
    assert chunk_cap.rows == one_cap.rows == list(range(T))
    for layer in range(3):
        for kind in ("before", "after"):
            torch.testing.assert_close(chunk_cap.attention_probs[layer][kind][..., :T],
                                       one_cap.attention_probs[layer][kind], rtol=0, atol=1e-5)


@pytest.mark.parametrize("var", [False, True], ids=["var-off", "var-on"])
def test_generation_after_a_chunked_prefill_equals_one_call(tiny, var):
    """generate() continuing from a cache filled by earlier chunks gives the greedy tokens and VAR report of a
    generation from scratch."""
    cfg, model = tiny
    ids, px = ids_of(PROMPT_A), tiny_pixels(PATCHES_2)
    T, n = ids.shape[1], 10
    with torch.inference_mode():
        ref_state = var_state(ids) if var else None
        ref = generate(model, ids, px, max_new_tokens=n, eos_token_id=None, hooks=ref_state)
        state = var_state(ids, max_len=T + n) if var else None
        cache = KVCache(cfg.text, 1, T + n, torch.float32, "cpu")
        cut = 30                                                    # inside the image
        feats = torch.stack(model.image_features(px))
        model(ids[:, :cut], image_features=feats[:, :cut - 4], cache=cache, hooks=state)
        got = generate(model, ids[:, cut:], image_features=feats[:, cut - 4:], cache=cache, input_pos=cut,
                       max_new_tokens=n, eos_token_id=None, hooks=state)
    assert got.output_ids == ref.output_ids
    if var:
        assert state.report(0) == ref_state.report(0)
        assert sum(ref_state.report(0)["redistributed"]["decode"]) > 0


@pytest.mark.parametrize("var", [False, True], ids=["var-off", "var-on"])
@pytest.mark.parametrize("chunk", [5, 30, 64])
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_with_its_prefill_in_pieces_equals_one_call(tiny, monkeypatch, var, chunk, batch):
    """generate() runs a prompt longer than PREFILL_CHUNK as consecutive calls (less memory for LLaVA-NeXT's long
    prompts): one prompt (its cache's values stored transposed for the decode loop) and a left-padded batch of two
    images, VAR on and off, give the logits, tokens and VAR reports of the prompt in one call — whether a piece ends
    inside the system text, inside an image or after it."""
    import minivar.generate as gen_mod
    from minivar.generate import new_cache, prefill
    cfg, model = tiny
    pad = len(PROMPT_A) - len(PROMPT_B)
    ids = ids_of(PROMPT_A, [0] * pad + PROMPT_B)
    mask = ids_of([1] * len(PROMPT_A), [0] * pad + [1] * len(PROMPT_B)).bool()
    px = torch.cat([tiny_pixels(PATCHES_2), tiny_pixels(PATCHES_2[:1], seed=1)])
    ids, mask, px = ids[:batch], (mask[:batch] if batch > 1 else None), px[:batch]
    T, n = ids.shape[1], 8
    runs = {}
    with torch.inference_mode():
        for name, pieces in (("one call", 10_000), ("pieces", chunk)):
            monkeypatch.setattr(gen_mod, "PREFILL_CHUNK", pieces)
            state = var_state(ids, max_len=T + n) if var else None
            logits = prefill(model, ids, px, cache=new_cache(model, batch, T + n, torch.device("cpu")),
                             attention_mask=mask, hooks=var_state(ids, max_len=T + n) if var else None)
            out = generate(model, ids, px, max_new_tokens=n, eos_token_id=None, attention_mask=mask, hooks=state)
            runs[name] = logits, out.output_ids, [state.report(b) for b in range(batch)] if var else None
    (one_logits, one_ids, one_reports), (logits, got_ids, reports) = runs["one call"], runs["pieces"]
    assert (logits - one_logits).abs().max().item() <= 1e-5
    assert got_ids == one_ids
    assert reports == one_reports
    if var:
        assert sum(one_reports[0]["redistributed"]["prefill"]) > 0


def test_a_capture_does_not_change_a_var_generation(tiny):
    cfg, model = tiny
    ids, px = ids_of(PROMPT_A), tiny_pixels(PATCHES_2)
    plain_state, state = var_state(ids), var_state(ids, keep_selections=True)
    cap = Capture(layers="all", rows="all", decode=True, head_stats=True, residuals=True)
    cap.bind(ids == IMG, sinks=state.sinks, var_state=state, n_layers=3, n_heads=4)
    a = generate(model, ids, px, max_new_tokens=12, eos_token_id=None, hooks=plain_state)
    b = generate(model, ids, px, max_new_tokens=12, eos_token_id=None, hooks=[state, cap])
    assert a.output_ids == b.output_ids
    assert state.report(0) == plain_state.report(0)
    # the capture shows VAR's own decisions: its selections are where "after" differs from "before"
    for layer in range(3):
        sel = cap.selected(layer)[0]                                      # [H, R]
        probs = cap.attention_probs[layer]
        changed = (probs["after"][0] - probs["before"][0]).abs().amax(-1) > 0
        assert torch.equal(sel, changed), layer
    assert int(cap.selected(0).sum()) + int(cap.selected(1).sum()) == sum(
        sum(state.report(0)["redistributed"][k]) for k in ("prefill", "decode"))


def test_bf16_var_finds_the_fp32_sink_sets(tiny):
    """In bf16 the planted sinks are found exactly as in fp32 (φ is computed in fp32 from the bf16 residual).
    The greedy tokens are compared for the first step only: later bf16 rounding may pick other near-tied tokens."""
    cfg, model = tiny
    model16 = build_model(dataclasses.replace(cfg), {k: v.to(torch.bfloat16) for k, v in sink_test_state(cfg).items()})
    ids, px = ids_of(PROMPT_A), tiny_pixels(PATCHES_2)
    s32, s16 = var_state(ids), var_state(ids)
    g32 = generate(model, ids, px, max_new_tokens=4, eos_token_id=None, hooks=s32)
    g16 = generate(model16, ids, px.to(torch.bfloat16), max_new_tokens=4, eos_token_id=None, hooks=s16)
    r32, r16 = s32.report(0), s16.report(0)
    assert r16["sinks"] == r32["sinks"] and r16["visual_sinks"] == r32["visual_sinks"]
    assert r32["visual_sinks"]["0"] == [4 + p for p in PATCHES_2]
    assert sum(r16["redistributed"]["prefill"]) > 0
    assert g16.output_ids[0][0] == g32.output_ids[0][0]


def test_sampling_with_var_is_seeded(tiny):
    cfg, model = tiny
    ids, px = ids_of(PROMPT_A), tiny_pixels(PATCHES_2)
    runs = [generate(model, ids, px, max_new_tokens=12, eos_token_id=None, temperature=1.5, top_p=0.95, seed=s,
                     hooks=var_state(ids)).output_ids for s in (1, 1, 2)]
    greedy = generate(model, ids, px, max_new_tokens=12, eos_token_id=None, hooks=var_state(ids)).output_ids
    assert runs[0] == runs[1] and runs[0] != runs[2] and greedy not in runs


def test_cache_overflow_and_context_errors(tiny):
    cfg, model = tiny
    ids, px = ids_of(PROMPT_A), tiny_pixels(PATCHES_2)
    T = ids.shape[1]
    cache = KVCache(cfg.text, 1, T, torch.float32, "cpu")
    with torch.inference_mode():
        model(ids, px, cache=cache)
        with pytest.raises(MinivarError, match=f"KV cache full: position {T} is past its {T} positions"):
            model(ids[:, :1], cache=cache, input_pos=T)
    with pytest.raises(MinivarError, match="past the model's context of 512"):
        generate(model, ids, px, max_new_tokens=512 - T + 2, eos_token_id=None)
    assert len(generate(model, ids, px, max_new_tokens=512 - T + 1, eos_token_id=None).output_ids[0]) == 512 - T + 1
