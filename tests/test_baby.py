"""The baby LLaVA: the scene world's answers are true of its pixels, training lowers the loss and writes a checkpoint
minivar and transformers both read (and agree on), `--make-pope` gives files the harness reads, and the committed
demo answers held-out questions, with VAR on too, and looks at the asked object."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minivar import scenes, train

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# The scene world


def shape_pixels(scene, img):
    """The colour drawn at a point surely inside each shape (the centre; a triangle's centroid)."""
    out = []
    for s in scene.shapes:
        l, t, r, b = s.box
        y = t + 2 * (b - t) / 3 if s.kind == "triangle" else (t + b) / 2
        out.append(img.getpixel((int((l + r) / 2), int(y))))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_every_answer_is_true_of_the_drawn_image(seed):
    rng = random.Random(seed)
    for _ in range(40):
        scene, q = scenes.sample(rng)
        assert scenes.check(scene, q), (scene, q)
        img = scene.image()
        assert img.size == (scene.width, scene.height) and 1 <= len(scene.shapes) <= 4
        # each shape is drawn in its colour, within ±20 of the named colour, 15–35 % of the shorter side
        for s, px in zip(scene.shapes, shape_pixels(scene, img)):
            assert px == s.rgb
            assert all(abs(a - b) <= scenes.JITTER for a, b in zip(s.rgb, scenes.COLOURS[s.colour]))
            side = s.box[2] - s.box[0]
            assert 0.15 * min(scene.width, scene.height) - 1 <= side <= 0.35 * min(scene.width, scene.height) + 1
        # no two shapes overlap, and left to right is the order of the centres
        boxes = [s.box for s in scene.shapes]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        xs = [s.centre[0] for s in scene.shapes]
        assert xs == sorted(xs)
        # the background's corner (never under a shape here: checked) is light
        corner = img.getpixel((0, 0))
        if not any(s.box[0] == 0 and s.box[1] == 0 for s in scene.shapes) and not scene.noise:
            assert all(200 <= c <= 255 for c in corner)


def test_answers_in_the_contract_words():
    rng = random.Random(3)
    seen = {k: set() for k in scenes.KINDS}
    for _ in range(400):
        _, q = scenes.sample(rng)
        seen[q.kind].add(q.answer)
    assert seen["yesno"] == {"Yes", "No"}
    assert seen["colour"] == set(scenes.COLOURS)
    assert seen["shape"] == set(scenes.SHAPES)
    assert seen["count"] == {"1", "2", "3", "4"}
    assert all(c.endswith(".") and c[0].isupper() for c in seen["caption"])
    scene = scenes.Scene(200, 100, (230, 230, 230), (
        scenes.Shape("circle", "red", (220, 30, 30), (10, 10, 40, 40)),
        scenes.Shape("square", "blue", (30, 60, 220), (60, 10, 90, 40)),
        scenes.Shape("triangle", "green", (30, 170, 40), (120, 10, 150, 40))))
    assert scenes.caption(scene) == "A red circle, a blue square and a green triangle."


def test_one_seed_one_dataset():
    def draw(seed):
        rng = random.Random(seed)
        return [(scene.image().tobytes(), q) for scene, q in (scenes.sample(rng) for _ in range(20))]
    assert draw(11) == draw(11)
    assert draw(11) != draw(12)


def test_negatives_as_pope_builds_them():
    rng = random.Random(0)
    for _ in range(200):
        scene = scenes.make_scene(rng, 160, 160)
        present = {(s.colour, s.kind) for s in scene.shapes}
        for strategy in scenes.NEGATIVE_STRATEGIES:
            pair = scenes.negative(scene, rng, strategy, {("red", "circle"): 9, ("blue", "square"): 5})
            if pair is None:
                continue
            assert pair not in present
            if strategy == "adversarial":     # the shape there in another colour, or the colour on another shape
                assert any(pair[1] == s.kind or pair[0] == s.colour for s in scene.shapes)
            if strategy == "popular" and ("red", "circle") not in present:
                assert pair == ("red", "circle")


# ---------------------------------------------------------------------------------------------------------------
# Training (short) and the checkpoint it writes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("baby") / "ckpt"
    record = train.train(out, steps=6, batch_size=4, warmup=1, eval_every=3, tiny=True, log=lambda line: None)
    return out, record


def test_training_lowers_the_held_out_loss(trained):
    out, record = trained
    cfg = json.loads((out / "config.json").read_text())
    tok_dir = out
    batch = train.Batcher(train.baby_config(cfg["text_config"]["vocab_size"], tiny=True), tok_dir,
                          random.Random(99)).batch(8)
    untrained = train.build_model(train.baby_config(cfg["text_config"]["vocab_size"], tiny=True),
                                  train.initial_state(train.baby_config(cfg["text_config"]["vocab_size"], tiny=True), 0))
    import minivar
    pipe = minivar.load(str(out), device="cpu", dtype="float32")
    with torch.no_grad():
        before = train.loss_of(untrained.eval(), *batch).item()
        after = train.loss_of(pipe.model, *batch).item()
    assert record["steps"] == 6 and len(record["loss"]) == 6
    assert after < before - 1.0, (before, after)


def test_the_planted_sinks_survive_training(trained):
    out, _ = trained
    from safetensors.torch import load_file
    state = load_file(str(out / "model.safetensors"))
    emb = state["language_model.model.embed_tokens.weight"].float()
    assert emb[1, train.SINK_DIMS[0]].item() == pytest.approx(100.0)
    pos = state["vision_tower.vision_model.embeddings.position_embedding.weight"].float()
    assert all(pos[1 + p, 0].item() == pytest.approx(30.0) for p in train.SINK_PATCHES)


def test_transformers_reads_the_checkpoint_and_agrees(trained):
    transformers = pytest.importorskip("transformers")
    out, _ = trained
    import minivar
    pipe = minivar.load(str(out), device="cpu", dtype="float32")
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    rng = random.Random(7)
    for _ in range(3):
        scene, q = scenes.sample(rng)
        ids = pipe.prompt_ids(q.text)
        px = pipe.pixels(scene.image())
        ours = pipe.generate(scene.image(), q.text, max_new_tokens=6)
        with torch.no_grad():
            mine = pipe.model(ids, images=px)
            theirs = ref(input_ids=ids, pixel_values=px).logits
            assert (mine - theirs).abs().max().item() < 1e-4
            gen = ref.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False,
                               eos_token_id=pipe.tokenizer.eos_id, pad_token_id=4)
        theirs_ids = [i for i in gen[0, ids.shape[1]:].tolist() if i != 4]
        assert ours.output_ids == theirs_ids[:len(ours.output_ids)] and ours.output_ids


def test_make_pope_writes_what_the_harness_reads(tmp_path):
    from minivar.eval.benchmarks import get
    counts = train.make_pope(tmp_path / "pope", n_images=6)
    assert set(counts) == {"random", "popular", "adversarial"}
    bench = get("pope")
    qs = bench.read([tmp_path / "pope"], images=tmp_path / "pope" / "val2014")
    assert len(qs) == sum(counts.values())
    rows = [json.loads(line) for line in (tmp_path / "pope" / "coco_pope_adversarial.json").read_text().splitlines()]
    assert {r["label"] for r in rows} == {"yes", "no"}
    assert sum(r["label"] == "yes" for r in rows) == sum(r["label"] == "no" for r in rows)
    for q in qs[:5]:
        assert q.load_image().size == (320, 320)


def test_train_cli_refuses_bad_input(tmp_path):
    p = subprocess.run([sys.executable, "-m", "minivar.train", "--out", str(tmp_path / "x"), "--steps", "0"],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--steps" in p.stderr
    assert not (tmp_path / "x").exists()
