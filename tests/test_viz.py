"""The pictures (minivar/viz.py, run.py --save-attention): valid PNGs of the stated size, not blank, sink marks on
the planted sink patches (checked pixel by pixel), numbers written next to them and enough to redraw them, no
half-written files, one-line errors.

One CLI run on the offline demo model (24×24 patch grid, sinks planted at demo.DEMO_SINK_PATCHES) plus pictures
drawn from hand-made numbers. CPU, seconds.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_cli
from minivar import demo, viz
from minivar.errors import MinivarError
from minivar.inspection import sink_layer_ranges

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "assets" / "example.jpg"
PROMPT = "What is in the image?"
DEMO_NAMES = {"visual_sinks_on_image.png", "answer_attention_layers1-2.png", "heads_image_attention.png",
              "sink_scores_phi.png", "attention.json", "explorer.html"}


@pytest.fixture(scope="module")
def saved(demo_env, tmp_path_factory):
    """run.py --var --save-attention DIR --json on the demo: (directory, the --json record)."""
    directory = tmp_path_factory.mktemp("pictures") / "out"
    rc, out, err = run_cli(["--image", IMAGE, "--prompt", PROMPT, "--model", "demo", "--dtype", "float32",
                            "--max-new-tokens", "4", "--var", "--sink-dims", "37,301", "--json",
                            "--save-attention", directory])
    assert rc == 0, err
    return directory, json.loads(out)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def mark_mask(arr: np.ndarray) -> np.ndarray:
    return (arr == np.array(viz.SINK_MARK, dtype=arr.dtype)).all(-1)


def check_sink_marks(arr, layout, panel, expected):
    """In sinks-picture panel `panel`, mark-coloured pixels lie exactly on the outlines of the `expected` patches."""
    grid, cell = layout.grid, layout.cell
    x0, y0, _, _ = layout.box(panel, 0)
    _, _, x1, y1 = layout.box(panel, grid * grid - 1)
    ys, xs = np.nonzero(mark_mask(arr[y0:y1 + 1, x0:x1 + 1]))
    marked = set((ys // cell * grid + xs // cell).tolist())
    assert marked == set(expected)
    for p in expected:
        bx0, by0, bx1, by1 = layout.box(panel, p)
        for x, y in ((bx0, by0), (bx1, by0), (bx0, by1), (bx1, by1), ((bx0 + bx1) // 2, by0), (bx0, (by0 + by1) // 2)):
            assert tuple(arr[y, x]) == viz.SINK_MARK, (panel, p, x, y)
        assert tuple(arr[(by0 + by1) // 2, (bx0 + bx1) // 2]) != viz.SINK_MARK      # an outline, not a filled box


def check_picture(path):
    with Image.open(path) as im:
        im.verify()                               # a complete, valid PNG
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert max(im.size) >= viz.MIN_SIDE
        arr = np.asarray(im.convert("RGB")).astype(np.int16)
    packed = (arr[..., 0].astype(np.int32) << 16) | (arr[..., 1].astype(np.int32) << 8) | arr[..., 2]
    assert len(np.unique(packed)) > 50                            # not blank: text, colour scales, images
    assert arr.std() > 20
    return arr


# ---------------------------------------------------------------------------------------------------------------
# The demo run

def test_files_and_json(saved):
    directory, record = saved
    assert {p.name for p in directory.iterdir()} == DEMO_NAMES              # no temporary files left behind
    assert sorted(Path(p).name for p in record["pictures"]) == sorted(DEMO_NAMES)
    numbers, view = viz.load_numbers(directory / viz.NUMBERS_FILE)
    assert view.size == (336, 336)
    assert numbers["grid"] == 24 and numbers["layer_range"] == [1, 2] and numbers["n_layers"] == 4
    assert len(numbers["attention"]["before"]) == len(numbers["attention"]["after"]) == 576
    assert len(numbers["phi"]) == 4 and all(len(row) == 576 for row in numbers["phi"])
    assert numbers["visual_sinks"] == {str(layer): sorted(demo.DEMO_SINK_PATCHES) for layer in range(4)}
    assert len(numbers["heads"]["image_attention"]) == 4 and len(numbers["heads"]["image_attention"][0]) == 8
    assert len(numbers["answer_rows"]) == 4                                 # last prompt row + 3 decoding steps


def test_pictures_are_valid_pngs_of_the_stated_size(saved):
    directory, _ = saved
    for name in DEMO_NAMES - {"attention.json", "explorer.html"}:
        check_picture(directory / name)


def test_sink_marks_sit_on_the_planted_patches(saved):
    directory, _ = saved
    numbers, view = viz.load_numbers(directory / viz.NUMBERS_FILE)
    arr = pixels(directory / "visual_sinks_on_image.png")
    layout = viz.sink_layout(numbers, view)
    assert layout.cell == 14 and len(layout.origins) == 5
    for panel in range(1, len(numbers["sink_ranges"]) + 1):
        check_sink_marks(arr, layout, panel, demo.DEMO_SINK_PATCHES)
    # the first panel is the input itself, unmarked
    x0, y0, _, _ = layout.box(0, 0)
    assert not mark_mask(arr[y0:y0 + 336, x0:x0 + 336]).any()
    # and it is the image as the model saw it (pad mode: grey bars above and below a 512×352 picture)
    assert tuple(arr[y0 + 2, x0 + 168]) == (122, 116, 104)


def test_attention_picture_shows_var_moving_attention_off_the_sinks(saved):
    directory, _ = saved
    numbers, _ = viz.load_numbers(directory / viz.NUMBERS_FILE)
    before, after = numbers["attention"]["before"], numbers["attention"]["after"]
    for p in demo.DEMO_SINK_PATCHES:
        assert after[p] < before[p]
    assert sum(after) > sum(before)            # budget moved from the (text and visual) sinks onto the image
    arr = check_picture(directory / "answer_attention_layers1-2.png")
    half = arr.shape[1] // 2
    assert not np.array_equal(arr[:, :half - 100], arr[:, half - 100: 2 * half - 200])     # the panels differ


def test_pictures_can_be_redrawn_from_the_numbers(saved, tmp_path):
    directory, _ = saved
    assert viz.main([str(directory / viz.NUMBERS_FILE), str(tmp_path)]) == 0
    for name in DEMO_NAMES - {"attention.json", "explorer.html"}:
        assert np.array_equal(pixels(tmp_path / name), pixels(directory / name)), name


# ---------------------------------------------------------------------------------------------------------------
# Hand-made numbers (no model)

def synthetic_numbers(n_layers=8, n_heads=4, grid=24, image_size=336, sinks=None, var=True):
    n = grid * grid
    sinks = sinks or {str(layer): [3, 40, n - 1] if layer >= 2 else [] for layer in range(n_layers)}
    attn = [0.001 * (1 + (i % 7)) for i in range(n)]
    return {
        "version": 1, "image_size": image_size, "grid": grid, "image_span": [5, 5 + n], "n_layers": n_layers,
        "n_heads": n_heads, "sink_dims": [1, 2], "tau": 20.0,
        "var": {"rho": 0.8, "p": 0.6, "min_image_attention": 0.2, "layers": list(range(n_layers - 1))} if var else None,
        "selection_rule": {"rho": 0.8, "min_image_attention": 0.2, "layers": list(range(n_layers - 1))},
        "layer_range": [1, 2], "answer_rows": [10, 11, 12],
        "attention": {"before": attn, "after": [a * 1.5 for a in attn]} if var else {"before": attn},
        "heads": {"image_attention": [[(l + h) / (n_layers + n_heads) for h in range(n_heads)] for l in range(n_layers)],
                  "nonsink_ratio": [[0.5 + 0.05 * h for h in range(n_heads)] for l in range(n_layers)],
                  "selected_fraction": [[1.0 if (l + h) % 3 == 0 else 0.0 for h in range(n_heads)]
                                        for l in range(n_layers)]},
        "phi": [[30.0 if str(l) in sinks and i in sinks[str(l)] else 1.0 + (i % 5) for i in range(n)]
                for l in range(n_layers)],
        "visual_sinks": sinks, "sink_ranges": [list(r) for r in sink_layer_ranges(n_layers)],
        "masked": None, "prompt": "a prompt", "answer": "an answer with unicode \u03c6 \u2013", "image_aspect_ratio": "pad",
    }


def synthetic_view(size=336):
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    arr = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 90, np.uint8)], -1)
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("grid, image_size, n_layers, n_heads, var", [
    (24, 336, 8, 4, True),     # LLaVA-1.5's grid
    (4, 56, 2, 4, False),      # a tiny model: pictures are still ≥ 512 px
    (24, 336, 32, 32, True),   # 7B-sized layers × heads
])
def test_synthetic_pictures(tmp_path, grid, image_size, n_layers, n_heads, var):
    numbers = synthetic_numbers(n_layers, n_heads, grid, image_size, var=var,
                                sinks={str(layer): [1, grid * grid - 2] for layer in range(n_layers)})
    view = synthetic_view(image_size)
    paths = viz.save(tmp_path / "pics", numbers, view)
    assert [p.name for p in paths][-1] == "attention.json"
    for p in paths[:-1]:
        check_picture(p)
    arr = pixels(tmp_path / "pics" / "visual_sinks_on_image.png")
    layout = viz.sink_layout(numbers, view)
    for panel in range(1, len(numbers["sink_ranges"]) + 1):
        check_sink_marks(arr, layout, panel, [1, grid * grid - 2])


def test_sink_marks_per_layer_range(tmp_path):
    numbers = synthetic_numbers()              # sinks only from layer 2 on: the first range (layers 0-1) has none
    view = synthetic_view()
    arr = np.asarray(viz.draw_sinks(numbers, view))
    layout = viz.sink_layout(numbers, view)
    assert numbers["sink_ranges"][0] == [0, 1]
    check_sink_marks(arr, layout, 1, [])
    for panel in (2, 3, 4):
        check_sink_marks(arr, layout, panel, [3, 40, 575])
    with pytest.raises(AssertionError):        # the check does catch a mark that is missing
        check_sink_marks(arr, layout, 2, [3, 40])


# ---------------------------------------------------------------------------------------------------------------
# Files: errors, no half-written files

def test_save_attention_path_that_is_a_file_is_one_line_error(demo_env, tmp_path):
    target = tmp_path / "not_a_dir.png"
    target.write_bytes(b"x")
    rc, out, err = run_cli(["--image", IMAGE, "--prompt", PROMPT, "--model", "demo", "--save-attention", target])
    assert_one_line_error(rc, out, err)
    assert err.strip().splitlines() == [f"minivar: error: --save-attention '{target}' exists and is not a directory"]
    assert target.read_bytes() == b"x"


def test_save_attention_under_a_file_is_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MinivarError, match="is not a directory"):
        viz.check_directory(tmp_path / "file" / "sub" / "pics")


def unwritable_directory(tmp_path) -> Path:
    """A directory nobody may write into: a read-only one, or for root (who ignores permission bits) /sys."""
    if os.geteuid() == 0:
        return Path("/sys")
    d = tmp_path / "read-only"
    d.mkdir(mode=0o555)
    return d


def test_save_attention_into_an_unwritable_directory_fails_before_the_model_loads(demo_env, tmp_path, monkeypatch):
    import minivar
    target = unwritable_directory(tmp_path) / "pics"

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --save-attention was checked")
    monkeypatch.setattr(minivar, "load", no_load)
    rc, out, err = run_cli(["--image", IMAGE, "--prompt", PROMPT, "--model", "demo", "--save-attention", target])
    assert_one_line_error(rc, out, err, f"--save-attention '{target}'", "cannot write")
    assert not target.exists()


def test_redrawing_a_bad_file_names_it(tmp_path, capsys):
    cases = {"missing": tmp_path / "nope.json", "not json": tmp_path / "notes.json",
             "other json": tmp_path / "other.json"}
    cases["not json"].write_text("hello")
    cases["other json"].write_text('{"version": 1}')
    for name, path in cases.items():
        assert viz.main([str(path), str(tmp_path / "out")]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("minivar: error: ") and str(path) in lines[0], (name, lines)
    assert not (tmp_path / "out").exists()
    assert viz.main([]) == 2                                         # usage: the same one-line form
    assert capsys.readouterr().err.startswith("minivar: error: ")


def test_save_attention_needs_a_generated_token(demo_env, tmp_path):
    rc, out, err = run_cli(["--image", IMAGE, "--prompt", PROMPT, "--model", "demo", "--max-new-tokens", "0",
                            "--save-attention", tmp_path / "p"])
    assert_one_line_error(rc, out, err, "--max-new-tokens")
    assert not (tmp_path / "p").exists()


def test_a_failed_drawing_writes_nothing(tmp_path, monkeypatch):
    def broken(numbers):
        raise RuntimeError("drawing failed")
    monkeypatch.setattr(viz, "draw_heads", broken)
    with pytest.raises(RuntimeError):
        viz.save(tmp_path / "pics", synthetic_numbers(), synthetic_view())
    assert not (tmp_path / "pics").exists() or not any((tmp_path / "pics").iterdir())


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    real_save = Image.Image.save
    calls = []

    def flaky(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:              # the second picture (the first save is the view, into memory)
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky)
    with pytest.raises(MinivarError, match="No space left on device"):
        viz.save(tmp_path / "pics", synthetic_numbers(), synthetic_view())
    files = list((tmp_path / "pics").iterdir())
    assert [f.name for f in files] == ["visual_sinks_on_image.png"]        # complete files only, no temp names
    monkeypatch.setattr(Image.Image, "save", real_save)
    check_picture(files[0])


# ---------------------------------------------------------------------------------------------------------------
# Issue 19 (defects 8 and 17): help, legends, shareable numbers, the docs' command

def test_viz_help(capsys):
    assert viz.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m minivar.viz attention.json [OUT_DIR]") and "Redraw" in out
    import subprocess
    import sys
    got = subprocess.run([sys.executable, "-m", "minivar.viz", "-h"], capture_output=True, text=True, cwd=REPO)
    assert got.returncode == 0 and got.stdout.startswith("usage:") and got.stderr == ""


def test_masked_patches_have_a_legend_entry_and_marks():
    numbers = synthetic_numbers(var=False)
    view = synthetic_view()
    plain = np.asarray(viz.draw_attention(numbers, view))
    assert not np.all(plain == viz.MASK_MARK, axis=-1).any()
    numbers["masked"] = {"kind": "visual_sinks", "patches": {"1": [3, 40], "2": [40, 575], "5": [7]}}
    lines, legend = viz.attention_text(numbers)
    assert any(line.startswith("cyan square = masked patch (3 in layers 1-2)") for line in legend)
    marked = np.asarray(viz.draw_attention(numbers, view))
    assert np.all(marked == viz.MASK_MARK, axis=-1).sum() > 3 * 4 * 14     # three patch outlines, ≥ 1 px wide
    numbers["masked"] = {"kind": "random_image_tokens", "n": 2, "seed": 0, "patches": [5, 9]}
    assert "(2 in layers 1-2)" in viz.attention_text(numbers)[1][1]


def test_one_panel_has_no_shared_scale():
    one = viz.attention_text(synthetic_numbers(var=False))[0][0]
    two = viz.attention_text(synthetic_numbers(var=True))[0][0]
    assert "shared" not in one and "both panels" not in one
    assert "both panels on one colour scale" in two


def test_attention_json_names_no_machine_path(demo_env, tmp_path):
    committed = json.loads((REPO / "docs" / "img" / "attention.json").read_text())
    strings = [v for v in committed.values() if isinstance(v, str) and v != committed["image_png_base64"]]
    assert committed["model"] == "demo" and not any(s.startswith("/") or ":\\" in s for s in strings)
    assert viz.shareable_model_name(str(demo_env / "demo")) == "demo"          # a folder of the weights dir
    hub = tmp_path / "llava-1.5-7b-hf"
    hub.mkdir()
    (hub / ".hub-id").write_text("llava-hf/llava-1.5-7b-hf\n")
    assert viz.shareable_model_name(str(hub)) == "llava-hf/llava-1.5-7b-hf"
    assert viz.shareable_model_name(str(tmp_path)) == str(tmp_path)            # the user's own folder, as given
    assert viz.shareable_model_name("demo") == "demo"


def test_the_documented_picture_command_writes_no_tracked_file():
    import re
    import shutil
    import subprocess
    text = (REPO / "docs" / "pictures.md").read_text()
    targets = re.findall(r"--save-attention\s+(\S+)", text.split("```bash", 1)[1].split("```", 1)[0])
    assert targets
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for target in targets:
        tracked = subprocess.run(["git", "ls-files", "--", target], capture_output=True, text=True, cwd=REPO).stdout
        assert tracked == "", (target, tracked)
