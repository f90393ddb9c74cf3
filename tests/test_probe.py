"""Capture API and sink removal (minivar/probe.py) on a small demo-like model with planted sinks at known patches.

The model is the demo's (hidden 768 > τ², 4 layers, 8 heads, sinks planted by demo.plant_sinks in dims
demo.DEMO_SINK_DIMS) with a 112 px image (an 8×8 grid of 64 image tokens) so every run is a ~100-token prompt.
Its visual sinks are the image tokens of SINK_PATCHES in every layer. CPU, fp32, seconds.
"""
import json
from pathlib import Path

import pytest
import torch

import minivar
from conftest import assert_one_line_error, run_cli, write_checkpoint
from minivar import demo
from minivar.errors import MinivarError
from minivar.inspection import default_layer_range, parse_layer_range, sink_layer_ranges
from minivar.probe import Capture, KeyMask
from minivar.methods.var import Sinks, VARConfig, select_heads

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "assets" / "example.jpg"
PROMPT = "What is in the image?"
VAR = VARConfig(sink_dims=demo.DEMO_SINK_DIMS)
N_NEW = 3
CONV = "llava_hf"                      # the short template: fewer tokens, faster tests
SINK_PATCHES = (9, 30, 52)
N_IMAGE = 64


def small_demo_checkpoint(directory: Path) -> Path:
    """The demo model at 112 px (64 image tokens), sinks planted at SINK_PATCHES; config, fp32 weights, tokenizer."""
    import dataclasses
    cfg = demo.demo_config()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=112))
    assert cfg.num_image_tokens == N_IMAGE
    state = demo.random_state_dict(cfg, seed=0)
    demo.plant_sinks(state, cfg, text_dim=demo.DEMO_SINK_DIMS[0], visual_dim=demo.DEMO_SINK_DIMS[1],
                     common_dim=demo.DEMO_COMMON_DIM, patches=SINK_PATCHES)
    return write_checkpoint(directory, state, cfg, tokenizer=True)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return small_demo_checkpoint(tmp_path_factory.mktemp("small_demo") / "model")


@pytest.fixture(scope="module")
def llava(small_dir):
    return minivar.load(str(small_dir), device="cpu", dtype="float32")


def capture(llava, **kwargs):
    return llava.capture(IMAGE, PROMPT, conv_mode=CONV, **kwargs)


@pytest.fixture(scope="module")
def span(llava):
    ids = llava.prompt_ids(PROMPT, CONV)[0]
    image = (ids == llava.config.image_token_index).nonzero().flatten()
    return int(image[0]), int(image[-1]) + 1, len(ids)


@pytest.fixture(scope="module")
def planted(span):
    return sorted(span[0] + p for p in SINK_PATCHES)


@pytest.fixture(scope="module")
def var_capture(llava):
    """VAR on; every row (prompt and decoding) of layer 0 (VAR acts there) and layer 3 (the last: VAR never acts)."""
    return capture(llava, layers=[0, 3], rows="all", decode=True, max_new_tokens=N_NEW, var=VAR)


def hooks_and_attributes(model):
    hooks = [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for name, m in model.named_modules()]
    return hooks, {name: sorted(vars(m)) for name, m in model.named_modules()}


# ---------------------------------------------------------------------------------------------------------------
# Capture: shapes, only what was asked for, nothing left behind

def test_capture_returns_the_requested_shapes(llava, span, var_capture):
    start, end, T = span
    cap = capture(llava, layers=[1, 2], heads=[0, 5], rows="after_image", decode=True,
                        residuals=True, max_new_tokens=N_NEW, var=VAR)
    steps = N_NEW - 1                                                      # decoding steps (no EOS in the demo)
    assert cap.rows == list(range(end, T)) + [T + k for k in range(steps)]
    R, S = len(cap.rows), T + steps
    assert sorted(cap.attention_probs) == [1, 2]
    for layer in (1, 2):
        assert sorted(cap.attention_probs[layer]) == ["after", "before"]
        for t in cap.attention_probs[layer].values():
            assert t.shape == (1, 2, R, S) and t.dtype == torch.float32 and t.device.type == "cpu"
    assert {k: tuple(v.shape) for k, v in cap.residuals.items()} == {1: (1, S, 768), 2: (1, S, 768)}
    assert cap.residuals[1].dtype == torch.float32
    # sink sets of every layer, over the prompt
    assert sorted(cap.visual_sinks) == [0, 1, 2, 3]
    assert all(v.shape == (1, T) and v.dtype == torch.bool for v in cap.sinks.values())
    assert cap.image_span() == (start, end)
    # the sliced heads / rows are exactly those of a full capture (same greedy run)
    full = var_capture.attention_probs
    assert var_capture.result.output_ids == cap.result.output_ids
    rows = torch.tensor([var_capture.rows.index(r) for r in cap.rows])
    ref = capture(llava, layers=[1], rows="all", decode=True, max_new_tokens=N_NEW, var=VAR)
    torch.testing.assert_close(cap.attention_probs[1]["after"],
                               ref.attention_probs[1]["after"][:, [0, 5]][:, :, rows], rtol=0, atol=0)
    assert full[0]["before"].shape == (1, 8, T + steps, S)


def test_capture_keeps_only_what_was_asked(llava, span):
    _, _, T = span
    cap = capture(llava, layers=[2], attention="before", rows="answer", max_new_tokens=N_NEW)
    assert list(cap.attention_probs) == [2] and list(cap.attention_probs[2]) == ["before"]
    assert cap.attention_probs[2]["before"].shape == (1, 8, 1, T)        # the last prompt row only (decode=False)
    assert cap.rows == [T - 1]
    assert cap.residuals == {} and cap.head_stats == {}
    # decoding steps: the fast path everywhere
    assert [cap.explicit_from(layer, range(T, T + 1)) for layer in range(4)] == [None] * 4


def test_capture_leaves_nothing_attached(llava):
    before = hooks_and_attributes(llava.model)
    ids_before = llava.generate(IMAGE, PROMPT, conv_mode=CONV, max_new_tokens=4).output_ids
    cap = capture(llava, layers="all", heads=[1], rows="answer", decode=True, residuals=True,
                        head_stats=True, max_new_tokens=4, var=VAR, mask="visual_sinks")
    assert cap.attention_probs and cap.residuals and cap.head_stats
    assert hooks_and_attributes(llava.model) == before
    assert all(h == (name, 0, 0, 0) for h, name in zip(before[0], (n for n, _ in llava.model.named_modules())))
    assert llava.generate(IMAGE, PROMPT, conv_mode=CONV, max_new_tokens=4).output_ids == ids_before


def test_capture_without_var_shares_before_and_after(llava):
    cap = capture(llava, layers=[1], rows="answer")
    probs = cap.attention_probs[1]
    assert probs["before"] is probs["after"]
    torch.testing.assert_close(probs["before"].sum(-1), torch.ones(1, 8, 1))


def test_a_capture_works_on_the_model_directly(llava, span):
    """Hooks passed straight to the model: the sink sets, then a capture reading them; capturing changes nothing."""
    _, _, T = span
    ids, px = llava.prompt_ids(PROMPT, CONV), llava.pixels(IMAGE)
    sinks = Sinks(demo.DEMO_SINK_DIMS, 20.0, 4, torch.zeros(1, T, dtype=torch.bool))     # no image mask given
    probe = Capture(layers=[0], heads=[1], residuals=True).bind(None, sinks=sinks)
    with torch.inference_mode():
        logits = llava.model(ids, px, hooks=[sinks, probe])
    torch.testing.assert_close(logits, llava.logits(ids, px), rtol=0, atol=1e-5)
    assert probe.attention_probs[0]["before"].shape == (1, 1, T, T)
    assert probe.residuals[0].shape == (1, T, 768)
    assert not any(v.any() for v in probe.visual_sinks.values())                  # no image mask: no visual sinks
    assert set(torch.nonzero(probe.sinks[0][0]).flatten().tolist()) >= {0}       # BOS is a text sink


# ---------------------------------------------------------------------------------------------------------------
# VAR seen through the capture

def test_var_rows_sum_to_one_and_change_only_where_selected(llava, span, var_capture, planted):
    start, end, T = span
    cap = var_capture
    assert sorted(torch.nonzero(cap.visual_sinks[0][0]).flatten().tolist()) == planted
    for layer in (0, 3):
        before, after = cap.attention_probs[layer]["before"], cap.attention_probs[layer]["after"]
        assert before.shape == after.shape == (1, 8, len(cap.rows), before.shape[-1])
        for t in (before, after):        # every row sums to 1 (decoding rows are zero-padded on later keys)
            torch.testing.assert_close(t.sum(-1), torch.ones(t.shape[:-1]), atol=1e-5, rtol=0)
        changed = (after - before).abs().amax(-1) > 0                                  # [1, H, R]
        if layer == 3:                   # the last layer is never modified
            assert not changed.any()
            continue
        S = before.shape[-1]
        pad = lambda m: torch.nn.functional.pad(m, (0, S - m.shape[-1]))  # noqa: E731
        image = pad(torch.arange(T) >= start)[None] & pad(torch.arange(T) < end)[None]
        vis = pad(cap.visual_sinks[0][0])[None]
        rows = torch.tensor(cap.rows)[None] >= end                                     # prefill after image + decode
        selected = select_heads(before, image, vis, rows, VAR.min_image_attention, VAR.rho)
        assert selected.any() and not selected.all()
        assert torch.equal(changed, selected)
        # on changed rows only sinks and visual non-sink tokens move
        sinks = pad(cap.sinks[0][0])
        moved = ((after - before).abs() > 0).any(dim=(0, 1, 2))
        assert not (moved & ~(sinks | (image[0] & ~vis[0]))).any()


def test_head_stats_match_the_attention(llava, span):
    start, end, T = span
    cap = capture(llava, layers=[0], rows="all", decode=True, head_stats=True,
                        max_new_tokens=N_NEW, var=VAR)
    probs, stats = cap.attention_probs[0]["before"], cap.head_stats[0]
    vis = cap.visual_sinks[0][0]
    torch.testing.assert_close(stats["image_before"], probs[..., start:end].sum(-1))
    nonsink = probs[..., start:end] * (~vis[start:end]).float()
    torch.testing.assert_close(stats["nonsink_before"], nonsink.sum(-1))
    assert sorted(cap.head_stats) == [0, 1, 2, 3]                # head stats cover every layer


def test_head_stats_select_what_var_selected(llava):
    """The heads picture's rule on the head stats picks exactly the (head, row) pairs VAR redistributed while
    decoding (the sums are computed the same way as VAR's)."""
    from minivar.methods.var import image_centric
    cap = capture(llava, layers=[], rows="answer", decode=True, head_stats=True, max_new_tokens=N_NEW + 3, var=VAR)
    counts = cap.result.var["redistributed"]["decode"]
    assert sum(counts) > 0
    for layer in range(4):
        st = cap.head_stats[layer]
        a, ns = st["image_before"][0, :, 1:], st["nonsink_before"][0, :, 1:]      # the decoding rows
        selected = image_centric(a, ns, VAR.min_image_attention, VAR.rho) if layer < 3 else torch.zeros_like(a)
        assert int(selected.sum()) == counts[layer], layer


@pytest.mark.parametrize("var", [None, VAR], ids=["var-off", "var-on"])
def test_answer_rows_are_the_full_captures_rows(llava, span, var):
    """rows="answer" keeps the same numbers as the matching rows of a capture of every row."""
    _, end, T = span
    full = capture(llava, layers=[0, 3], rows="all", decode=True, head_stats=True, max_new_tokens=N_NEW, var=var)
    ans = capture(llava, layers=[0, 3], rows="answer", decode=True, head_stats=True, max_new_tokens=N_NEW, var=var)
    assert ans.rows == [T - 1] + [T + k for k in range(N_NEW - 1)]
    idx = [full.rows.index(r) for r in ans.rows]
    for layer in (0, 3):
        for kind in ("before", "after"):
            torch.testing.assert_close(ans.attention_probs[layer][kind], full.attention_probs[layer][kind][:, :, idx],
                                       rtol=1e-5, atol=1e-6)
    for layer in range(4):
        for name, t in ans.head_stats[layer].items():
            torch.testing.assert_close(t, full.head_stats[layer][name][..., idx], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Sink removal

def zeroed_columns(probs: torch.Tensor, rows: list[int], n_keys: int) -> list[int]:
    """Key columns j < n_keys that get no attention from any kept row at or after j (i.e. where they are visible)."""
    pos = torch.tensor(rows)
    out = []
    for j in range(n_keys):
        visible = pos >= j
        if visible.any() and not (probs[..., visible, j] != 0).any():
            out.append(j)
    return out


def test_mask_visual_sinks_zeroes_exactly_those_columns(llava, span, planted):
    start, end, T = span
    cap = capture(llava, layers="all", heads=[0, 3], attention="before", rows="all", decode=True,
                        max_new_tokens=N_NEW, mask="visual_sinks")
    report = cap.masked.report()
    assert report["kind"] == "visual_sinks"
    for layer in range(4):
        cols = torch.nonzero(cap.masked.columns(layer)[0]).flatten().tolist()
        assert cols == torch.nonzero(cap.visual_sinks[layer][0]).flatten().tolist() == planted
        assert report["positions"][str(layer)] == planted
        assert report["patches"][str(layer)] == sorted(SINK_PATCHES)
        probs = cap.attention_probs[layer]["before"]
        assert zeroed_columns(probs, cap.rows, T) == planted
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)


def test_mask_random_image_tokens_is_seeded_and_exact(llava, span):
    start, end, T = span
    cap = capture(llava, layers=[0, 3], heads=[2], attention="before", rows="all",
                        mask_random=5, mask_seed=7)
    report = cap.masked.report()
    assert report["kind"] == "random_image_tokens" and report["n"] == 5 and report["seed"] == 7
    pos = report["positions"]
    assert len(set(pos)) == 5 and all(start <= p < end for p in pos)
    assert report["patches"] == [p - start for p in pos]
    for layer in (0, 3):                                           # the same tokens in every layer
        assert torch.nonzero(cap.masked.columns(layer)[0]).flatten().tolist() == pos
        assert zeroed_columns(cap.attention_probs[layer]["before"], cap.rows, T) == pos
    again = capture(llava, mask_random=5, mask_seed=7).masked.report()["positions"]
    other = capture(llava, mask_random=5, mask_seed=8).masked.report()["positions"]
    assert again == pos and other != pos


def test_masking_changes_the_computation_and_is_per_call(llava):
    base = llava.generate(IMAGE, PROMPT, conv_mode=CONV, max_new_tokens=1)
    ids = llava.prompt_ids(PROMPT, CONV)
    px = llava.pixels(IMAGE)
    plain = llava.logits(ids, px)
    image = ids == llava.config.image_token_index
    sinks = Sinks(VAR.sink_dims, VAR.tau, 4, image)
    masked = llava.logits(ids, px, hooks=[sinks, KeyMask("visual_sinks").bind(image, sinks)])
    assert not torch.allclose(plain, masked)
    torch.testing.assert_close(llava.logits(ids, px), plain, rtol=0, atol=0)   # nothing stays masked
    assert llava.generate(IMAGE, PROMPT, conv_mode=CONV, max_new_tokens=1).output_ids == base.output_ids


def test_capture_option_errors(llava):
    with pytest.raises(MinivarError, match="not both"):
        capture(llava, mask="visual_sinks", mask_random=3)
    with pytest.raises(MinivarError, match="rows"):
        Capture(rows="some")
    with pytest.raises(MinivarError, match="attention kind"):
        Capture(attention=("during",))
    with pytest.raises(MinivarError, match="layer 9"):
        capture(llava, layers=[9])
    with pytest.raises(MinivarError, match="head 8"):
        capture(llava, layers=[0], heads=[8])
    with pytest.raises(MinivarError, match="more than the 64 image tokens"):
        capture(llava, mask_random=65)


def test_layer_ranges():
    assert default_layer_range(32) == (10, 12)
    assert default_layer_range(40) == (13, 15)
    assert default_layer_range(4) == (1, 2)
    assert default_layer_range(1) == (0, 0)
    assert sink_layer_ranges(32) == [(0, 7), (8, 15), (16, 23), (24, 31)]
    assert sink_layer_ranges(2) == [(0, 0), (1, 1)]
    assert parse_layer_range("10-12", 32) == (10, 12) and parse_layer_range("3") == (3, 3)
    for bad in ("12-10", "a-b", "1-2-3", "40"):
        with pytest.raises(MinivarError):
            parse_layer_range(bad, 32)


# ---------------------------------------------------------------------------------------------------------------
# The CLI: --mask-visual-sinks / --mask-random-image-tokens in --json



@pytest.fixture(scope="module")
def base(small_dir):
    return ["--image", IMAGE, "--prompt", PROMPT, "--model", small_dir, "--conv-mode", CONV, "--dtype", "float32",
            "--max-new-tokens", "2"]


def test_cli_json_reports_masked_visual_sinks(base, planted):
    rc, out, err = run_cli(base + ["--json", "--mask-visual-sinks", "--var", "--sink-dims", "37,301"])
    assert rc == 0, err
    record = json.loads(out)
    assert record["masked"]["kind"] == "visual_sinks"
    assert record["masked"]["positions"] == {str(layer): planted for layer in range(4)}
    assert record["masked"]["sink_dims"] == [37, 301]
    assert "masked the visual sinks" in err


def test_cli_json_reports_masked_random_tokens(base, span):
    rc, out, err = run_cli(base + ["--json", "--mask-random-image-tokens", "4", "--seed", "3"])
    assert rc == 0, err
    masked = json.loads(out)["masked"]
    assert masked["kind"] == "random_image_tokens" and masked["n"] == 4 and masked["seed"] == 3
    assert len(masked["positions"]) == 4 and all(span[0] <= p < span[1] for p in masked["positions"])


@pytest.mark.parametrize("extra, culprit", [
    (["--mask-visual-sinks", "--mask-random-image-tokens", "3"], "not allowed with"),
    (["--mask-random-image-tokens", "0"], "--mask-random-image-tokens"),
    (["--mask-random-image-tokens", "65"], "more than the 64 image tokens"),
    (["--attention-layers", "1-2"], "--attention-layers only applies with --save-attention"),
])
def test_cli_mask_errors_are_one_line(base, extra, culprit):
    assert_one_line_error(*run_cli(base + extra), culprit)
