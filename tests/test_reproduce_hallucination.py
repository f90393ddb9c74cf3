"""`minivar-eval reproduce hallucination` on tiny fixtures in the real formats: POPE's three split files with COCO
images, and CHAIR's COCO annotation files holding OPERA's 500 image ids (their images tiny JPEGs). The runs use a
tiny 4-layer checkpoint (so PAI's released layers 2-32 clip to 2..3), two questions each and two-token answers."""
import json
import shutil

import pytest

from conftest import assert_one_line_error, tiny_llava_config, to_hub_key, unused_tensors, write_checkpoint
from minivar.eval import hallucination, reproduce
from minivar.eval.compare import flatten
from test_eval_benchmarks import write_image, write_pope
from test_eval_harness import cli


def write_chair(root):
    """coco/annotations/{instances,captions}_val2014.json listing OPERA's 500 images (a dog in the first, a human
    caption naming a car in the second) and coco/val2014/ with a tiny JPEG for each."""
    from minivar.eval.benchmarks.chair import DEFAULT_IMAGE_IDS, read_image_ids
    ids = read_image_ids(DEFAULT_IMAGE_IDS)
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 4, "height": 3} for i in ids]
    notes = root / "coco" / "annotations"
    notes.mkdir(parents=True, exist_ok=True)
    (notes / "instances_val2014.json").write_text(json.dumps({
        "images": images, "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}],
        "annotations": [{"id": 1, "image_id": ids[0], "category_id": 18}]}))
    (notes / "captions_val2014.json").write_text(json.dumps({
        "images": images, "annotations": [{"id": 2, "image_id": ids[1], "caption": "A red car on a street."}]}))
    for i in ids:
        write_image(root / "coco" / "val2014" / f"COCO_val2014_{i:012d}.jpg", color=(i % 256, 40, 90))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hall_data")
    write_pope(root / "pope", splits=("adversarial", "random", "popular"))
    write_chair(root)
    for image in (root / "pope" / "val2014").iterdir():
        shutil.move(image, root / "coco" / "val2014" / image.name)
    return root


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    """A tiny LLaVA with 4 decoder layers (PAI's released 2-32 → layers 2, 3)."""
    from minivar.demo import random_state_dict
    cfg = tiny_llava_config(num_hidden_layers=4)
    state = {to_hub_key(k): v for k, v in (random_state_dict(cfg, seed=4) | unused_tensors(cfg)).items()}
    return write_checkpoint(tmp_path_factory.mktemp("tiny4"), state, cfg, tokenizer=True)


def argv(root, out, model, *extra):
    return ["reproduce", "hallucination", "--data-root", root, "--out", out, "--model", model, "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", "2", "--limit", "2", "--resamples", "50", *extra]


def arms_here():
    from minivar.eval.__main__ import build_parser
    parser = build_parser().run_parser
    return [a for a in hallucination.ARMS if hallucination.available(a, parser) is None]


@pytest.fixture(scope="module")
def hall(data_root, model4, tmp_path_factory):
    out = tmp_path_factory.mktemp("hall_runs")
    rc, stdout, err = cli(argv(data_root, out, model4, "--json"))
    assert rc == 0, err
    return out, json.loads(stdout), err


def test_every_method_is_against_its_own_base_and_equals_its_runs(hall):
    out, table, _ = hall
    arms = arms_here()
    methods = [a for a in arms if a.base is not None]
    assert {a.name for a in arms} >= {"base", "var", "pai", "vcd", "vcd-base", "damro", "damro-base"}
    assert len(table["rows"]) == 2 * 2 * len(methods)             # 2 benchmarks × 2 metrics × every method
    pairs = {(r["method"], r["base"]) for r in table["rows"]}
    assert pairs == {(a.name, a.base) for a in methods}
    assert ("vcd", "vcd-base") in pairs and ("damro", "damro-base") in pairs and ("pai", "base") in pairs
    for row in table["rows"]:
        base = json.loads((out / f"{row['benchmark']}-{row['base']}" / "metrics.json").read_text())
        mine = json.loads((out / f"{row['benchmark']}-{row['method']}" / "metrics.json").read_text())
        assert row["measured"]["base"] == pytest.approx(100 * flatten(base["metrics"])[row["metric"]])
        assert row["measured"]["method"] == pytest.approx(100 * flatten(mine["metrics"])[row["metric"]])
        assert row["delta"] == pytest.approx(row["measured"]["method"] - row["measured"]["base"])
        assert row["n"] == mine["n"] == base["n"]
        assert row["reported"]["status"] == ("reported, not verified" if row["reported"]["source"] else "no figure")
    rc, stdout, err = cli(["compare", out / "chair-vcd-base", out / "chair-vcd", "--json", "--resamples", "50"])
    assert rc == 0, err
    row = next(r for r in table["rows"] if r["method"] == "vcd" and r["metric"] == "chair_s")
    assert row["ci95"] == pytest.approx([100 * x for x in json.loads(stdout)["metrics"]["chair_s"]["ci95"]])
    var = next(r for r in table["rows"] if r["method"] == "var" and r["metric"] == "mean.f1")
    assert (var["reported"]["base"], var["reported"]["method"]) == (85.90, 86.53)
    damro = next(r for r in table["rows"] if r["method"] == "damro" and r["metric"] == "chair_s")
    assert (damro["reported"]["base"], damro["reported"]["method"]) == (12.4, 6.0)
    assert table["quick_check"] and table["limit"] == 2


def test_runs_carry_the_released_settings(hall):
    out, table, err = hall
    commands = {}
    for line in err.splitlines():
        if line.startswith("minivar: python -m minivar.eval run "):
            words = line.split(" run ", 1)[1].split()
            commands[words[words.index("--out") + 1].rsplit("/", 1)[1]] = " ".join(words)
    assert len(commands) == 2 * len(arms_here())
    assert commands["pope-pai"].endswith("--pai --pai-alpha 0.2 --pai-layers 2-32 --pai-gamma 1.1")
    vcd = "--conv-mode llava_v1 --image-aspect-ratio crop --temperature 1 --seed 55"
    assert commands["pope-vcd"].endswith(f"--vcd --vcd-alpha 1 --vcd-beta 0.2 --vcd-noise-step 500 {vcd}")
    assert commands["chair-vcd"].endswith(f"--vcd --vcd-alpha 1 --vcd-beta 0.1 --vcd-noise-step 500 {vcd}")
    assert commands["pope-vcd-base"].endswith(vcd) and "--vcd " not in commands["pope-vcd-base"]
    damro = " ".join(reproduce.DAMRO_PROTOCOL)            # reproduce damro's: its scripts' prompt, pixels, sampling
    assert commands["chair-damro"].endswith(f"--damro --damro-alpha 1.5 --damro-beta 0.1 --damro-topk 4 {damro}")
    assert commands["pope-var"].endswith("--var") and commands["chair-base"].endswith("--limit 2")
    run = json.loads((out / "chair-pai" / "run.json").read_text())
    assert run["methods"]["pai"] == {"alpha": 0.2, "layers": [2, 32], "gamma": 1.1, "first_token": "unedited"}
    assert run["benchmark"] == "chair"
    if any(a.name == "opera" for a in arms_here()):
        assert "--opera" in commands["pope-opera"] and "--num-beams 5" in commands["pope-opera"]
        opera = next(r for r in table["rows"] if r["method"] == "opera" and r["metric"] == "mean.f1")
        assert opera["reported"]["method"] == pytest.approx((89.6 + 86.4 + 81.0) / 3)
    else:
        assert [x["method"] for x in table["left_out"]] == ["opera"]
        assert "minivar.methods.opera is not in this build" in err


def test_the_table_prints_and_reruns_resume(hall, data_root, model4):
    out, table, _ = hall
    rc, stdout, err = cli(argv(data_root, out, model4))
    assert rc == 0, err
    assert "loaded" not in err                        # every run was complete: resumed, nothing generated
    lines = stdout.splitlines()
    assert lines[0].startswith("reproduce hallucination: ") and "QUICK CHECK" in stdout
    header = next(line for line in lines if line.startswith("benchmark"))
    assert "reported base → method" in header and "95% CI" in header and header.split()[2] == "method"
    row = next(line for line in lines if line.startswith("chair") and " PAI " in line)
    pai = next(r for r in table["rows"] if r["method"] == "pai" and r["metric"] == "chair_s")
    assert f"{pai['measured']['base']:.2f} → {pai['measured']['method']:.2f}" in row and "- → -" in row
    assert any(line.startswith("reported: PAI paper") and "not transcribed" in line for line in lines)
    assert any(line.startswith("setting: vcd: ") for line in lines)


def test_opera_left_out_is_said_and_dry_run_makes_nothing(data_root, model4, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "minivar.methods.opera" else real(name, *a))
    out = tmp_path / "runs"
    rc, stdout, err = cli(argv(data_root, out, model4, "--dry-run", "--json"))
    assert rc == 0, err
    plan = json.loads(stdout)
    assert not out.exists()
    assert [x["method"] for x in plan["left_out"]] == ["opera"]
    assert "minivar.methods.opera is not in this build" in plan["left_out"][0]["reason"]
    assert [p["benchmark"] for p in plan["found"]] == ["pope", "chair"]
    assert all(p["questions"] == 2 for p in plan["found"])
    for p in plan["found"]:
        names = [r["setting"] for r in p["runs"]]
        assert "opera" not in names and {"base", "pai", "vcd", "damro", "var"} <= set(names)
        cost = {r["setting"]: r["estimated_s"] for r in p["runs"]}
        assert cost["pai"] > cost["base"] > 0
    rc, stdout, err = cli(argv(data_root, out, model4, "--dry-run"))
    assert rc == 0 and "left out: OPERA: minivar.methods.opera is not in this build" in stdout


def test_bad_input_is_one_line(data_root, tmp_path):
    out = tmp_path / "x"
    assert_one_line_error(*cli(["reproduce", "hallucination", "--data-root", data_root, "--out", out,
                                "--benchmarks", "pope,mme"]), "--benchmarks", "mme")
    assert_one_line_error(*cli(["reproduce", "hallucination", "--data-root", tmp_path / "nope", "--out", out]),
                          "--data-root")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, stdout, err = cli(["reproduce", "hallucination", "--data-root", empty, "--out", out])
    assert rc == 2 and stdout == "" and err.splitlines()[-1].startswith("minivar: error: no data")
    assert not out.exists()


def test_settings_are_the_released_ones():
    arms = hallucination.ARM
    assert arms["damro"].flags["pope"] == next(e.method_flags for e in reproduce.PAPERS["damro"].entries
                                                if e.bench == "pope")
    assert arms["damro-base"].flags["chair"] == reproduce.DAMRO_PROTOCOL
    for name in ("var", "pai", "opera"):
        assert arms[name].base == "base"
    assert {a.name: a.base for a in hallucination.ARMS if a.base not in (None, "base")} == \
        {"vcd": "vcd-base", "damro": "damro-base"}
