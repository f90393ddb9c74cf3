"""The offline demos, one per family (`--model demo`, `demo-<model_type>`; minivar/demo.py): every registered family
has one, each is built on first use, loads, answers, and carries planted sinks that VAR's sink-dim finder finds and
that make VAR change the attention and the answer's logits."""
import json

import pytest

import minivar
from minivar import checkpoint, demo
from minivar.methods.var import VARConfig
from minivar.models.qwen2_vl import demo as qwen_demo
from minivar.models.registry import FAMILIES

from conftest import assert_one_line_error, run_cli

NAMES = ("demo", "demo-llava_next", "demo-qwen2_vl", "demo-qwen2_5_vl")
PICTURE = (112, 84)         # demo.sink_picture: near-white 28×28 blocks (0, 1), (2, 3) on grey texture


def test_every_family_registers_a_demo_named_after_its_model_type():
    table = demo.demos()
    assert set(NAMES) <= set(table)
    assert {f.model_type for f in table.values()} == set(FAMILIES)      # a family added later needs one too
    assert table["demo"].model_type == "llava"                           # `demo` stays LLaVA-1.5
    assert all(name == "demo" or name == f"demo-{f.model_type}" for name, f in table.items())


@pytest.fixture(scope="module")
def weights(tmp_path_factory, demo_weights):
    """A weights dir with every demo built (LLaVA-1.5's shared with the session's)."""
    d = tmp_path_factory.mktemp("demos")
    (d / "demo").symlink_to(demo_weights / "demo")
    for name in demo.demos():
        checkpoint.resolve(name, d)
    return d


def expected_visual_sinks(name, image_span):
    """Where the planted visual sinks are, as prompt positions (of the first panel for LLaVA-NeXT)."""
    start = image_span[0]
    if name == "demo":
        return [start + p for p in demo.DEMO_SINK_PATCHES]
    if name == "demo-llava_next":                           # the base crop comes first; the tiles have them too
        return [start + p for p in demo.NEXT_SINK_PATCHES]
    if name.startswith("demo-qwen"):                        # 112×84 px → a 3×4 grid of merged tokens
        return [start + r * 4 + c for r, c in ((0, 1), (2, 3))]
    return []                                               # a family added later: its sinks are found, somewhere


# LLaVA-1.5's demo (`demo`) is held to the same in tests/test_var.py (test_demo_*), on its 576 image tokens
@pytest.mark.parametrize("name", [n for n in demo.demos() if n != "demo"])
def test_each_demo_has_planted_sinks_that_var_finds_and_acts_on(weights, name):
    pipe = minivar.load(name, device="cpu", dtype="float32", weights_dir=weights)
    assert pipe.directory == weights / name and (weights / name / "tokenizer.json").is_file()
    assert pipe.family is demo.demos()[name]
    picture = demo.sink_picture(PICTURE)
    notes = []
    cap = pipe.capture(picture, "What is in the image?", layers=[0], var=VARConfig(), warn=notes.append)
    report = cap.result.var
    assert report["sink_dims"] == list(demo.DEMO_SINK_DIMS) and report["sink_dims_source"] == "finder"
    L = pipe.config.text.num_hidden_layers
    for layer in range(L - 1):                                          # the layers VAR touches
        visual = report["visual_sinks"][str(layer)]
        assert set(expected_visual_sinks(name, report["image_span"])) <= set(visual)
        assert 0 < len(visual) < (report["image_span"][1] - report["image_span"][0]) // 4     # a few, not all
    probs = cap.attention_probs[0]
    assert (probs["after"] - probs["before"]).abs().max().item() > 1e-3           # VAR moved attention
    assert sum(report["redistributed"]["prefill"]) > 0
    # ... and so the answer's logits move (its text is noise: the weights are random)
    ids = pipe.prompt_ids("What is in the image?", num_image_tokens=pipe.image(picture).num_tokens)
    pixels = [pipe.image(picture)]
    plain, with_var, moving_nothing = (pipe.logits(ids, pixels, var=v)[0, -1] for v in
                                       (None, VARConfig(), VARConfig(sink_dims=demo.DEMO_SINK_DIMS, p=0.0)))
    assert (plain - moving_nothing).abs().max().item() < 1e-5
    assert (plain - with_var).abs().max().item() > 1e-3


def test_qwens_demo_plants_its_sinks_on_content_not_positions(weights):
    """A picture without near-white blocks has no visual sink; the same picture with them has one per block."""
    pipe = minivar.load("demo-qwen2_vl", device="cpu", dtype="float32", weights_dir=weights)
    var = VARConfig(sink_dims=demo.DEMO_SINK_DIMS)
    grey = demo.sink_picture(PICTURE).point(lambda v: min(v, 180))
    report = pipe.generate(grey, "Hi", max_new_tokens=1, var=var).var
    assert all(v == [] for v in report["visual_sinks"].values())
    report = pipe.generate(demo.sink_picture(PICTURE), "Hi", max_new_tokens=1, var=var).var
    assert report["visual_sinks"]["0"] == expected_visual_sinks("demo-qwen2_vl", report["image_span"])
    assert pipe.image(grey).num_tokens == 12 and pipe.config.image.max_pixels == qwen_demo.MAX_PIXELS


def test_the_cli_runs_every_demo_offline_and_names_the_demos_on_a_wrong_one(weights, monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", weights)
    image = tmp_path / "small.png"
    demo.sink_picture((112, 84)).save(image)
    for name in NAMES[1:]:
        rc, out, err = run_cli(["--model", name, "--image", image, "--prompt", "Hi", "--device",
                                "cpu", "--dtype", "float32", "--max-new-tokens", "1", "--json"])
        assert rc == 0, err
        assert len(json.loads(out)["output_ids"]) == 1
    rc, out, err = run_cli(["--model", "demo-nope", "--image", image, "--prompt", "Hi"])
    assert_one_line_error(rc, out, err, "demo-nope")
    assert all(n in err for n in NAMES)
    from minivar.eval.reproduce import model_params               # reproduce --dry-run's time estimate
    pipe = minivar.load("demo-qwen2_5_vl", device="cpu", dtype="float32", weights_dir=weights)
    assert model_params("demo-qwen2_5_vl") == sum(p.numel() for p in pipe.model.parameters())


def test_demo_llava_is_the_llava_demo_and_a_half_built_demo_is_rebuilt(tmp_path):
    assert demo.resolve("demo-llava", tmp_path) == tmp_path / "demo"
    d = tmp_path / "demo-qwen2_5_vl"
    d.mkdir()
    (d / "model.safetensors.tmp").write_bytes(b"interrupted")          # no config.json: not a checkpoint yet
    assert checkpoint.resolve("demo-qwen2_5_vl", tmp_path) == d
    assert json.loads((d / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert not (d / "model.safetensors.tmp").exists()
