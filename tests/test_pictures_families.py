"""--save-attention on every model family (tiny random checkpoints made with transformers at test time, the builders
of test_llava_next.py and test_qwen2_vl_model.py): attention.json's panels are the family's layout, each image token's
value lands at its (panel, row, column) — checked against the layout restated here and on the pixels —, newline
tokens are never drawn, the PNGs redraw from attention.json; DAMRO's picture and damro_var_overlap (a direct set
intersection). LLaVA-1.5's own pictures: tests/test_viz.py (pixels against docs/img)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from conftest import find_llama_tokenizer, run_cli  # noqa: E402
from minivar import viz  # noqa: E402
from test_llava_next import PATCH, hf_config as next_hf_config, hf_processor, picture, save as next_save  # noqa: E402,F401
from test_qwen2_vl_model import hf_model as qwen_hf_model, tokenizer_dir, write_checkpoint  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
PROMPT = "What is in the image?"
NEXT_P = 56 // PATCH                    # the tiny LLaVA-NeXT's patches per crop side (4)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory, hf_processor):
    """A tiny LLaVA-NeXT (test_llava_next's config) with the LLaMA tokenizer's vocabulary, so the real
    tokenizer.json can drive it through the command line."""
    path, why = find_llama_tokenizer()
    if path is None:
        pytest.skip(f"needs the LLaMA tokenizer: {why}")
    from transformers import LlavaNextForConditionalGeneration
    cfg = next_hf_config()
    cfg.text_config.vocab_size, cfg.image_token_index = 32064, 32000
    torch.manual_seed(0)
    d = next_save(LlavaNextForConditionalGeneration(cfg).eval(), tmp_path_factory.mktemp("next_pics"), "hub",
                  processor=hf_processor)
    shutil.copy(path, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tokenizer_dir):
    """A tiny Qwen2-VL whose token ids are the test tokenizer's, with that tokenizer in its folder."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = {k: tok.token_to_id(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                               ("vision_start_token_id", "<|vision_start|>"),
                                               ("vision_end_token_id", "<|vision_end|>"))}
    d = write_checkpoint(qwen_hf_model("qwen2_vl", token_ids=ids), tmp_path_factory.mktemp("qwen_pics"), "hub")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, d / name)
    return d


def run(model, image_path, out, *extra):
    rc, stdout, err = run_cli(["--image", image_path, "--prompt", PROMPT, "--model", model, "--dtype", "float32",
                               "--max-new-tokens", "2", "--json", "--save-attention", out, *extra])
    assert rc == 0, err
    return json.loads(stdout), json.loads((Path(out) / "attention.json").read_text())


# The layouts, restated: span offset → (panel, row, col), None for a newline token.
def next_cell(offset, tile_cols):
    if offset < NEXT_P * NEXT_P:
        return [0, offset // NEXT_P, offset % NEXT_P]
    r, c = divmod(offset - NEXT_P * NEXT_P, tile_cols + 1)
    return None if c == tile_cols else [1, r, c]


def qwen_cell(offset, cols):
    return [0, offset // cols, offset % cols]


CASES = {   # family: an image size (w, h)
    "next": (150, 70),                  # pinpoint (56, 168): base 4×4, tiles 1×3 → a 4×12 grid unpadded to 4×8
    "qwen": (112, 84),                  # smart_resize keeps 112×84: 8×6 patches → 3×4 merged tokens
}


def image_file(tmp_path, size, seed=0):
    path = tmp_path / f"img{size[0]}x{size[1]}.png"
    picture(*size, seed=seed).save(path)
    return path


def expected_panels(model_dir, img_path):
    import minivar
    pipe = minivar.load(str(model_dir), dtype="float32", device="cpu")
    im = pipe.family.images(Image.open(img_path), pipe.config, pipe.family.default_image_mode)
    return [list(p) for p in im.panels], im


def planted_tau(numbers):
    """A τ between the largest φ of a drawn image token and the next φ below it (any image token, any layer): one
    (layer, token) pair — a drawn one — becomes the one visual sink above every other."""
    newline = set(numbers["newline_tokens"])
    values = [(v, layer, o) for layer, row in enumerate(numbers["phi"]) for o, v in enumerate(row)]
    top = max(x for x in values if x[2] not in newline)
    below = max([x[0] for x in values if x[0] < top[0]], default=0.0)
    assert top[0] - below > 1e-3 * top[0], "no clear single maximum of phi to plant a sink at"
    return (top[0] + below) / 2, top[1], top[2]


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_panels_and_a_planted_sink_land_at_their_cell(family, request, tmp_path):
    model_dir = request.getfixturevalue(f"{family}_dir")
    img = image_file(tmp_path, CASES[family])
    panels, im = expected_panels(model_dir, img)
    # pass 1: no sinks (τ huge), φ of every image token in every layer
    _, first = run(model_dir, img, tmp_path / "one", "--sink-dims", "5", "--tau", "1e9")
    got = [[p["name"], p["rows"], p["cols"], p["newline"]] for p in first["panels"]]
    assert got == panels
    if family == "next":
        assert got == [["base", 4, 4, False], ["tiles", 4, 8, True]]
    else:
        assert got == [["image", 3, 4, False]]
    assert sum(p["rows"] * (p["cols"] + p["newline"]) for p in first["panels"]) == first["image_span"][1] - first["image_span"][0] == im.num_tokens
    assert first["grid"] is None                                           # not LLaVA-1.5's one square grid
    if family == "next":
        assert [p["name"] for p in first["panels"]] == ["base", "tiles"] and first["panels"][0]["rows"] == NEXT_P
        tile_cols = first["panels"][1]["cols"]
        want = [o for o in range(im.num_tokens) if next_cell(o, tile_cols) is None]
        assert first["newline_tokens"] == want and len(want) == first["panels"][1]["rows"]
        cell_of = lambda o: next_cell(o, tile_cols)                      # noqa: E731
    else:
        assert (first["panels"][0]["rows"], first["panels"][0]["cols"]) == (84 // 28, 112 // 28)
        assert first["newline_tokens"] == []
        cell_of = lambda o: qwen_cell(o, first["panels"][0]["cols"])     # noqa: E731
    assert not any(first["visual_sinks"].values())

    # pass 2: τ just under the largest φ: exactly that (layer, token) is a visual sink
    tau, layer, offset = planted_tau(first)
    record, numbers = run(model_dir, img, tmp_path / "two", "--sink-dims", "5", "--tau", repr(tau))
    expected = {str(l): [o for o, v in enumerate(row) if v >= tau] for l, row in enumerate(first["phi"])}
    assert {k: v for k, v in numbers["visual_sinks"].items() if v} == {k: v for k, v in expected.items() if v}
    assert offset in numbers["visual_sinks"][str(layer)]
    for l, offs in numbers["visual_sinks"].items():
        assert numbers["visual_sink_cells"][l] == [cell_of(o) for o in offs if cell_of(o) is not None]
    cell = cell_of(offset)
    assert cell in numbers["visual_sink_cells"][str(layer)]

    # on the pixels: the sink's outline at its cell, in its panel's item of the layer range holding `layer`
    names = viz.file_names(numbers)
    drawn, views = viz.load_numbers(tmp_path / "two" / "attention.json")
    assert isinstance(views, list) and len(views) == len(numbers["panels"])
    layout = viz.panel_layout(drawn, views)
    rng = next(j for j, (lo, hi) in enumerate(numbers["sink_ranges"]) if lo <= layer <= hi)
    x0, y0, x1, y1 = layout.box(layout.item(cell[0], rng), cell[1], cell[2])
    with Image.open(tmp_path / "two" / names["sinks"]) as pic:
        arr = np.asarray(pic.convert("RGB"))
    for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):
        assert tuple(arr[y, x]) == viz.SINK_MARK
    assert tuple(arr[(y0 + y1) // 2, (x0 + x1) // 2]) != viz.SINK_MARK          # an outline
    # every picture written, at least MIN_SIDE wide, and redrawn from attention.json to the same pixels
    redrawn = viz.draw_all(drawn, views)
    assert set(redrawn) | {"attention.json", "explorer.html"} == {Path(p).name for p in record["pictures"]}
    for name, im_ in redrawn.items():
        with Image.open(tmp_path / "two" / name) as pic:
            assert pic.size == im_.size and pic.width >= viz.MIN_SIDE
            assert np.array_equal(np.asarray(pic.convert("RGB")), np.asarray(im_))
    # each panel's view has the size its grid covers: one patch 14 px (NeXT), one merged token 28 px (Qwen)
    px = PATCH if family == "next" else 28
    for p, v in zip(numbers["panels"], views):
        if v is not None:
            assert v.size == (p["cols"] * px, p["rows"] * px)


def test_newline_tokens_are_not_drawn(next_dir, tmp_path):
    img = image_file(tmp_path, CASES["next"])
    _, numbers = run(next_dir, img, tmp_path / "one", "--sink-dims", "5", "--tau", "1e9")
    drawn, views = viz.load_numbers(tmp_path / "one" / "attention.json")
    nl = drawn["newline_tokens"][0]
    drawn["visual_sinks"] = {str(layer): [] for layer in range(drawn["n_layers"])}
    drawn["visual_sinks"]["0"] = [nl]                                   # a sink on a newline token: listed, not drawn
    sinks = np.asarray(viz.draw_all(drawn, views)[viz.file_names(drawn)["sinks"]])
    assert not (sinks == np.array(viz.SINK_MARK, dtype=sinks.dtype)).all(-1).any()
    drawn["visual_sinks"]["0"] = [nl - 1]                                # the tile row's last token: drawn
    layout = viz.panel_layout(drawn, views)
    x0, y0, _, _ = layout.box(layout.item(1, 0), 0, drawn["panels"][1]["cols"] - 1)
    assert tuple(np.asarray(viz.draw_all(drawn, views)[viz.file_names(drawn)["sinks"]])[y0, x0]) == viz.SINK_MARK
    assert viz.panel_values(drawn, list(range(len(viz.token_cells(drawn)))))[1][0][-1] == nl - 1


def direct_overlap(record, numbers):
    """The overlap restated: DAMRO's outliers ∩ the visual-sink patches of DAMRO's panel, over all layers."""
    p = numbers["panels"][numbers["damro"]["panel"]]
    sinks = set()
    for offs in numbers["visual_sinks"].values():
        for o in offs:
            rel = o - p["first"]
            if 0 <= rel < p["rows"] * (p["cols"] + p["newline"]):
                r, c = divmod(rel, p["cols"] + p["newline"])
                if c < p["cols"]:
                    sinks.add(r * p["cols"] + c)
    return sorted(set(record["damro"]["outliers"]) & sinks), sorted(sinks)


def test_damro_picture_and_overlap_on_llava(demo_env, tmp_path):
    img = REPO / "assets" / "example.jpg"
    record, numbers = run("demo", img, tmp_path / "d", "--var", "--sink-dims", "37,301", "--damro",
                          "--damro-topk", "6")
    ov = record["damro_var_overlap"]
    assert ov == numbers["damro_var_overlap"]
    both, sinks = direct_overlap(record, numbers)
    assert ov["overlap"] == both and ov["count"] == len(both) and ov["visual_sink_patches"] == sinks
    start = record["var"]["image_span"][0] if "image_span" in record["var"] else numbers["image_span"][0]
    var_patches = {q - start for v in record["var"]["visual_sinks"].values() for q in v} \
        if "visual_sinks" in record["var"] else set(sinks)
    assert set(sinks) == var_patches                                     # the sinks VAR itself used
    assert {27, 100, 290, 455} <= set(sinks)                             # the demo's planted sinks
    # the CLS attention is DAMRO's score: its top-k are the run's outliers, in order
    cls = torch.tensor(numbers["damro"]["cls_attention"])
    assert len(cls) == 576 and torch.topk(cls, 6).indices.tolist() == record["damro"]["outliers"]
    from minivar.methods.damro import outlier_layer
    import minivar
    from minivar.probe import vision_cls_attention
    pipe = minivar.load("demo", dtype="float32", device="cpu")
    layer = outlier_layer(pipe.config)
    assert numbers["damro"]["layer"] == layer
    per_layer = vision_cls_attention(pipe, str(img), layers=[layer])
    assert torch.allclose(per_layer[layer][0], cls, rtol=1e-4, atol=1e-7)
    heads = vision_cls_attention(pipe, str(img), layers=[0, layer], heads=True)
    assert heads[0].shape == (1, pipe.config.vision.num_attention_heads, 576)
    assert ((heads[layer].sum(-1) > 0) & (heads[layer].sum(-1) < 1)).all()     # the CLS column is left out
    # minivar.viz draws the per-layer CLS attention over the view
    from minivar.processing import model_image
    pic = viz.draw_cls_layers({0: heads[0][0].mean(0), layer: per_layer[layer][0]},
                              model_image(Image.open(img), 336, "pad"), 24, 24, outliers=record["damro"]["outliers"])
    arr = np.asarray(pic)
    assert pic.width >= viz.MIN_SIDE and (arr == np.array(viz.OUTLIER_MARK, dtype=arr.dtype)).all(-1).sum() > 0
    with pytest.raises(viz.MinivarError, match="576"):
        viz.draw_cls_layers({0: [0.0] * 10}, model_image(Image.open(img), 336, "pad"), 24, 24)
    # the picture: written, outliers outlined green on its first panel
    name = viz.file_names(numbers)["damro"]
    assert str(tmp_path / "d" / name) in record["pictures"]
    with Image.open(tmp_path / "d" / name) as pic:
        arr = np.asarray(pic.convert("RGB"))
        assert pic.width >= viz.MIN_SIDE
    assert (arr == np.array(viz.OUTLIER_MARK, dtype=arr.dtype)).all(-1).sum() > 0
    # LLaVA-1.5's keys stay: one 24×24 grid, the one image
    assert numbers["grid"] == 24 and "views_png_base64" not in numbers
    assert numbers["panels"] == [{"name": "image", "rows": 24, "cols": 24, "newline": False, "first": 0}]


def test_damro_overlap_on_next_base_panel(next_dir, tmp_path):
    img = image_file(tmp_path, CASES["next"])
    record, numbers = run(next_dir, img, tmp_path / "d", "--sink-dims", "5", "--tau", "0.5", "--damro",
                          "--damro-topk", "3")
    assert numbers["damro"]["panel"] == 0 and numbers["damro_var_overlap"]["panel"] == "base"
    both, sinks = direct_overlap(record, numbers)
    assert record["damro_var_overlap"]["overlap"] == both and record["damro_var_overlap"]["count"] == len(both)
    assert len(numbers["damro"]["cls_attention"]) == NEXT_P * NEXT_P
    assert (tmp_path / "d" / viz.file_names(numbers)["damro"]).is_file()


def test_vision_cls_refused_without_cls(qwen_dir, tmp_path):
    import minivar
    from minivar.errors import MinivarError
    from minivar.probe import vision_cls_attention
    pipe = minivar.load(str(qwen_dir), dtype="float32", device="cpu")
    with pytest.raises(MinivarError, match="no CLS token"):
        vision_cls_attention(pipe, image_file(tmp_path, CASES["qwen"]))


def test_masked_tokens_land_on_their_cells(qwen_dir, tmp_path):
    img = image_file(tmp_path, CASES["qwen"])
    record, numbers = run(qwen_dir, img, tmp_path / "m", "--sink-dims", "5", "--mask-random-image-tokens", "2")
    offsets = record["masked"]["patches"]
    assert len(offsets) == 2 and numbers["masked"]["patches"] == offsets
    cols = numbers["panels"][0]["cols"]
    assert viz.panel_marks(numbers, offsets) == [{(o // cols, o % cols) for o in offsets}]
    with Image.open(tmp_path / "m" / viz.file_names(numbers)["attention"]) as pic:
        arr = np.asarray(pic.convert("RGB"))
    ys, xs = np.nonzero((arr == np.array(viz.MASK_MARK, dtype=arr.dtype)).all(-1))
    # exactly the outlines of the two cells, wherever the plot sits: its origin from the top-left-most mark
    cell = viz.panel_cell(numbers["panels"][0], viz.load_numbers(tmp_path / "m" / "attention.json")[1][0])
    cells = [(o // cols, o % cols) for o in offsets]
    x0 = xs.min() - min(c for _, c in cells) * cell
    y0 = ys.min() - min(r for r, _ in cells) * cell
    boxes = [(x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1) for r, c in cells]
    for bx0, by0, bx1, by1 in boxes:
        for x, y in ((bx0, by0), (bx1, by0), (bx0, by1), (bx1, by1)):
            assert tuple(arr[y, x]) == viz.MASK_MARK
    assert all(any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes) for x, y in zip(xs, ys))
