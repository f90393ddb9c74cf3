"""InternVL through everything else minivar has: the command line (--json, --max-patches), batches of images with
different tile counts, generate_many, minivar-eval, the lmms-eval plugin, the pictures (a panel per tile and the
thumbnail), VAR on a planted-sink checkpoint against the loop-level re-statement, DAMRO's outliers against its
released rule restated on transformers' tower and its decoding against a two-pass reference, VCD against a two-pass
reference. Tiny checkpoints made with transformers here (tests/test_internvl.py's helpers) and its local tokenizer."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from test_internvl import hf_model, write_tokenizer  # noqa: E402
from test_qwen2_vl_pipeline import var_by_loops  # noqa: E402

import minivar  # noqa: E402

MAX_PATCHES = 4                                 # the tiny checkpoints' preprocessor_config.json
PROMPTS = ["What is in the image?", "Describe it.", "Is there a dog in the image?"]
SIZES = [(56, 56), (120, 60), (50, 150)]        # 1 tile; 2×1 + thumbnail; 1×3 + thumbnail


def make_checkpoint(directory: Path, kind: str = "qwen2", seed: int = 0, plant=None, tile: int = 56,
                    max_patches: int = MAX_PATCHES) -> Path:
    """A tiny random checkpoint (hub layout) whose token ids are the local tokenizer's, with the tokenizer, the
    chat template and a preprocessor_config.json (tiles of `tile` px, at most `max_patches`)."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(directory)
    hf = hf_model(kind, seed=seed, image_token_id=ids["<IMG_CONTEXT>"], image_size=[tile, tile])
    hf.config.text_config.eos_token_id = ids["<|im_end|>"]
    hf.config.text_config.pad_token_id = ids["<|endoftext|>"]
    if plant is not None:
        with torch.no_grad():
            plant(hf, ids)
    keep = {name: (directory / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    hf.save_pretrained(directory, max_shard_size="100KB")
    for name, data in keep.items():
        (directory / name).write_bytes(data)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": False, "min_patches": 1,
         "max_patches": max_patches, "size": {"height": tile, "width": tile}, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225], "resample": 3}))
    return directory


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    """InternVL3.5's layout (a Qwen3 decoder); test_from_pil_and_text_to_tokens_equals_transformers runs both."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def pipe(internvl_dir):
    return minivar.load(str(internvl_dir), device="cpu", dtype="float32")


def cli(capsys, *argv):
    from minivar import cli as cli_mod
    capsys.readouterr()
    rc = cli_mod.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    picture(150, 50, seed=1).save(path)
    return path


def base_args(directory, image_file, *more):
    return ("--model", directory, "--image", image_file, "--prompt", "What is in the image?", "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", 6, *more)


# ---------------------------------------------------------------------------------------------------------------
# The command line and the API

def test_cli_json_greedy_equals_the_pipeline_with_the_checkpoints_template(capsys, internvl_dir, image_file, pipe):
    rc, out, err = cli(capsys, *base_args(internvl_dir, image_file, "--json"))
    assert rc == 0, err
    record = json.loads(out)
    ref = pipe.generate(str(image_file), "What is in the image?", max_new_tokens=6)
    assert record["output_ids"] == ref.output_ids and record["prompt_ids"] == ref.prompt_ids
    tok = pipe.tokenizer
    # 150×50: 3 tiles across + the thumbnail, 4 tokens each, between <img> and </img>
    assert record["prompt_ids"] == tok.encode_prompt("What is in the image?", "internvl", 16)
    assert record["prompt_ids"].count(pipe.config.image_token_id) == 16
    assert record["prompt_ids"][:1] == [tok._tok.token_to_id("<|im_start|>")]


@pytest.mark.parametrize("cap, tokens", [(1, 4), (2, 12), (3, 16)])
def test_cli_max_patches_caps_the_tiles(capsys, internvl_dir, image_file, cap, tokens):
    rc, out, err = cli(capsys, *base_args(internvl_dir, image_file, "--json", "--max-patches", cap))
    assert rc == 0, err
    assert json.loads(out)["prompt_ids"].count(minivar.checkpoint.read_config(internvl_dir).image_token_id) == tokens


@pytest.mark.parametrize("flags, names", [(("--max-patches", 0), "--max-patches must be a positive integer, got 0"),
                                          (("--max-patches", -3), "--max-patches must be a positive integer, got -3"),
                                          (("--image-aspect-ratio", "pad"), "'pad' is not one of InternVL's image modes"),
                                          (("--conv-mode", "vicuna_v1"), "'vicuna_v1' is not one of InternVL's templates"),
                                          (("--min-pixels", 3136), "--min-pixels applies to Qwen2-VL")])
def test_cli_bad_image_options_are_one_line(capsys, internvl_dir, image_file, flags, names):
    rc, out, err = cli(capsys, *base_args(internvl_dir, image_file, *flags))
    assert rc != 0 and out == "" and names in err and err.count("\n") == 1 and "Traceback" not in err


def test_max_patches_on_another_family_is_one_line(capsys, image_file):
    from test_qwen2_vl_pipeline import make_checkpoint as qwen_checkpoint
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        qwen = qwen_checkpoint(Path(d) / "q")
        rc, out, err = cli(capsys, *base_args(qwen, image_file, "--max-patches", 2))
    assert rc != 0 and "--max-patches applies to InternVL, not to Qwen2-VL" in err and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_from_pil_and_text_to_tokens_equals_transformers(tmp_path, kind):
    """End to end, InternVL3's and InternVL3.5's decoders: the pipeline's prompt, pixels and greedy tokens against
    transformers' InternVLProcessor (tests/test_internvl.py's, without its video processor) and
    InternVLForConditionalGeneration."""
    from test_internvl import hf_internvl_processor
    from transformers import InternVLForConditionalGeneration
    internvl_dir = make_checkpoint(tmp_path, kind, seed=1)
    pipe = minivar.load(str(internvl_dir), device="cpu", dtype="float32")
    hf = InternVLForConditionalGeneration.from_pretrained(str(internvl_dir)).eval()
    processor = hf_internvl_processor(internvl_dir, MAX_PATCHES)
    generated = 0
    for size in SIZES:
        img = picture(*size, seed=5)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, images=[img], return_tensors="pt")
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
        got = pipe.generate(img, PROMPTS[0], max_new_tokens=6)
        assert got.prompt_ids == inputs["input_ids"][0].tolist()
        expected = ref[0, inputs["input_ids"].shape[1]:].tolist()
        stops = [i for i, t in enumerate(expected) if t in pipe.stop_ids]
        assert got.output_ids == expected[:stops[0] if stops else None]
        generated += len(got.output_ids)
    assert generated >= 6


def test_batch_of_images_with_different_tile_counts_equals_one_by_one(pipe):
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    assert [pipe.image(im).num_tokens for im in images] == [4, 12, 16]
    batch = pipe.generate_batch(images, PROMPTS, max_new_tokens=8)
    alone = [pipe.generate(im, p, max_new_tokens=8) for im, p in zip(images, PROMPTS)]
    assert [r.output_ids for r in batch] == [r.output_ids for r in alone]
    assert [r.prompt_ids for r in batch] == [r.prompt_ids for r in alone]


def test_generate_many_shares_the_prefix_and_equals_one_by_one(pipe):
    img = picture(120, 60, seed=3)
    prompts = ["What is in the image?", "Describe it.", "What is in the image? Describe it."]
    many = pipe.generate_many(img, prompts, max_new_tokens=8)
    alone = [pipe.generate(img, p, max_new_tokens=8) for p in prompts]
    assert [r.output_ids for r in many] == [r.output_ids for r in alone]
    assert many[0].timing["prefix_tokens"] > pipe.image(img).num_tokens


# ---------------------------------------------------------------------------------------------------------------
# VAR on planted sinks (112 px tiles, one tile: 4×4 tokens)

TEXT_DIM, VISUAL_DIM = 11, 40
TAU = 5.0
SINK_TOKENS = (1, 11)                # tokens (row 0, col 1) and (row 2, col 3) of the 4×4 tile


def plant_sinks(hf, ids):
    """Massive values in the decoder's input: <|im_start|>'s embedding in both dims, and the image tokens whose
    28×28 block is bright red. The ViT blocks are the identity (layer scale 0), patch dim 0 sums the red channel,
    and the projector (after its LayerNorm) turns a large dim 0 of a token's first patch into a massive
    VISUAL_DIM; red at 123 (≈ ImageNet's mean) marks nothing."""
    emb = hf.model.language_model.embed_tokens.weight
    emb[ids["<|im_start|>"], TEXT_DIM] = 100.0
    emb[ids["<|im_start|>"], VISUAL_DIM] = 100.0
    tower = hf.model.vision_tower
    for layer in tower.encoder.layer:
        layer.lambda_1.zero_()
        layer.lambda_2.zero_()
    conv = tower.embeddings.patch_embeddings.projection
    conv.weight[0].zero_()
    conv.weight[0, 0] = 0.08
    conv.bias[0] = 0.0
    proj = hf.model.multi_modal_projector
    proj.linear_1.weight[0].zero_()
    proj.linear_1.weight[0, 0] = 1.0
    proj.linear_1.bias[0] = -3.0
    proj.linear_2.weight[:, 0] = 0.0
    proj.linear_2.weight[VISUAL_DIM, 0] = 50.0


def planted_picture(tokens=SINK_TOKENS, seed=0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (112, 112, 3), generator=g, dtype=torch.uint8)
    arr[..., 0] = 123
    for t in tokens:
        r, c = divmod(t, 4)
        arr[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28, 0] = 255
    return Image.fromarray(arr.numpy())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("planted"), "qwen3", plant=plant_sinks, tile=112, max_patches=1)
    return minivar.load(str(d), device="cpu", dtype="float32")


@pytest.mark.parametrize("rho", [0.8, 0.5])
def test_var_on_planted_sinks_equals_the_rule_written_as_loops(planted, rho):
    """Sinks (the finder's dims), visual sinks, selected (head, row) pairs and redistributed probabilities of every
    layer against tests/test_qwen2_vl_pipeline.var_by_loops; the image span is the <IMG_CONTEXT> tokens."""
    from minivar.methods.var import VARConfig
    var = VARConfig(tau=TAU, rho=rho)
    cap = planted.capture(planted_picture(), "What is in the image?", layers="all", residuals=True, var=var,
                          warn=[].append)
    ids = cap.result.prompt_ids
    image = [j for j, t in enumerate(ids) if t == planted.config.image_token_id]
    im_start = [j for j, t in enumerate(ids) if t == planted.tokenizer._tok.token_to_id("<|im_start|>")]
    report = cap.result.var
    assert report["sink_dims"] == [TEXT_DIM, VISUAL_DIM] and report["sink_dims_source"] == "finder"
    assert report["image_span"] == [image[0], image[-1] + 1] and len(image) == 16
    L = planted.config.text.num_hidden_layers
    total = 0
    for layer in range(L):
        S, V, selected, after = var_by_loops(cap.residuals[layer][0], cap.attention_probs[layer]["before"][0], image,
                                             report["sink_dims"], TAU, rho, var.p, var.min_image_attention,
                                             touched_layer=layer < L - 1)
        assert V == [image[t] for t in SINK_TOKENS] and S == sorted(im_start + V)
        assert report["sinks"][str(layer)] == S and report["visual_sinks"][str(layer)] == V
        assert sorted(map(tuple, cap.selected(layer)[0].nonzero().tolist())) == selected
        assert (cap.attention_probs[layer]["after"][0] - torch.tensor(after)).abs().max().item() <= 1e-6
        total += len(selected)
    assert total > 5


# ---------------------------------------------------------------------------------------------------------------
# DAMRO and VCD

def released_damro_outliers(hf, pixel_values: torch.Tensor, k: int) -> torch.Tensor:
    """DAMRO's released rule (coder-gx/DAMRO, modeling_llava_next.py) restated on transformers' InternVL tower:
    hooks on q_proj / k_proj of `layers[vision_feature_layer]`, the tiles as the batch, attn = softmax(q kᵀ ·
    C^−½) over the full width, cls = attn[:, 0, 1:], topk per tile → [tiles, k]."""
    outputs = {}
    layer = hf.model.vision_tower.encoder.layer[hf.config.vision_feature_layer]
    hooks = [layer.attention.q_proj.register_forward_hook(lambda m, i, o: outputs.__setitem__("q", o)),
             layer.attention.k_proj.register_forward_hook(lambda m, i, o: outputs.__setitem__("k", o))]
    with torch.no_grad():
        selected = hf.model.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
    for h in hooks:
        h.remove()
    B, N, C = selected.shape
    attn = torch.softmax((outputs["q"] @ outputs["k"].transpose(-2, -1)) * C ** -0.5, dim=-1)
    return torch.topk(attn[:, 0, 1:], k, dim=1, largest=True).indices


def two_pass(pipe, branches, combine_args, max_new_tokens):
    """Two prompts (ids, image features) each run alone with a cache of its own, combined per step by
    contrastive.combine: the released way of decoding with a contrast branch."""
    from minivar.generate import new_cache, sample_next
    from minivar.methods.contrastive import combine
    model = pipe.model
    caches, logits = [], []
    with torch.inference_mode():
        for ids, feats in branches:
            cache = new_cache(model, 1, len(ids) + max_new_tokens, torch.device("cpu"), torch.float32)
            caches.append(cache)
            logits.append(model(torch.tensor([ids]), image_features=feats, cache=cache, output="last"))
        out = []
        for step in range(max_new_tokens):
            t = int(sample_next(combine(logits[0], logits[1], *combine_args), 0.0, 1.0, None))
            if t in pipe.stop_ids:
                break
            out.append(t)
            logits = [model(torch.tensor([[t]]), cache=c, input_pos=len(ids) + step, output="last")
                      for (ids, _), c in zip(branches, caches)]
    return out


@pytest.mark.parametrize("size", [(56, 56), (120, 60)])
def test_damro_outliers_equal_the_released_rule_and_decode_as_two_passes(internvl_dir, pipe, size):
    """Per tile the released top-k (checked on every tile); the contrast image is the whole-image view's (the
    thumbnail, or the one tile) outlier patches' tokens, each once, in top-k order; the answer equals the full and
    the contrast prompt decoded alone and combined."""
    from transformers import InternVLForConditionalGeneration
    from minivar.methods.damro import DAMRO, DAMROConfig, internvl_outliers
    hf = InternVLForConditionalGeneration.from_pretrained(str(internvl_dir)).eval()
    img = picture(*size, seed=9)
    im = pipe.image(img)
    k = 3
    ref = released_damro_outliers(hf, im.pixel_values, k)                      # [tiles, k]
    full, contrast, found = internvl_outliers(pipe.model, [im], k)
    assert found[0].tolist() == ref[-1].tolist()
    with torch.no_grad():
        hf_tokens = hf.model.get_image_features(pixel_values=im.pixel_values).pooler_output   # [tiles, 4, D]
    g, s = 4, 2
    tokens = list(dict.fromkeys(int((p // g // s) * (g // s) + (p % g) // s) for p in ref[-1]))
    assert (contrast[0] - hf_tokens[-1, tokens]).abs().max().item() <= 1e-5
    assert (full[0] - hf_tokens.reshape(-1, hf_tokens.shape[-1])).abs().max().item() <= 1e-5
    cfg = DAMROConfig(alpha=2.0, beta=0.1, topk=k)
    got = pipe.generate(img, PROMPTS[0], methods=[DAMRO(cfg)], max_new_tokens=6)
    assert got.reports["damro"]["outliers"] == ref[-1].tolist()
    ids = got.prompt_ids
    at = [i for i, t in enumerate(ids) if t == pipe.config.image_token_id]
    contrast_ids = ids[:at[0]] + [pipe.config.image_token_id] * len(tokens) + ids[at[-1] + 1:]
    expected = two_pass(pipe, [(ids, full[0]), (contrast_ids, contrast[0])], (cfg.alpha, cfg.beta), 6)
    assert got.output_ids == expected


def test_damro_batch_and_generate_many_equal_one_by_one(pipe):
    from minivar.methods.damro import DAMRO, DAMROConfig
    method = [DAMRO(DAMROConfig(topk=3))]
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    batch = pipe.generate_batch(images, PROMPTS, max_new_tokens=5, methods=method)
    alone = [pipe.generate(im, p, max_new_tokens=5, methods=method) for im, p in zip(images, PROMPTS)]
    assert [r.output_ids for r in batch] == [r.output_ids for r in alone]
    many = pipe.generate_many(images[1], PROMPTS, max_new_tokens=5, methods=method)
    assert [r.output_ids for r in many] == [pipe.generate(images[1], p, max_new_tokens=5, methods=method).output_ids
                                            for p in PROMPTS]


def test_vcd_equals_the_two_pass_reference(pipe):
    from minivar.methods import vcd
    from minivar.methods.vcd import VCD, VCDConfig
    cfg = VCDConfig(alpha=3.0, beta=0.05)
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:2])]
    batch = pipe.generate_batch(images, PROMPTS[:2], methods=[VCD(cfg, seed=7)], max_new_tokens=6)
    for img, prompt, got in zip(images, PROMPTS[:2], batch):
        im = pipe.image(img)
        noised = vcd.noised_images(im.pixel_values[None], cfg.noise_step, 7)[0]
        ids = pipe.prompt_ids(prompt, num_image_tokens=im.num_tokens)[0].tolist()
        feats = [torch.cat(pipe.model.image_features([type(im)(x, im.num_tokens, im.panels, im.meta)]))
                 for x in (im.pixel_values, noised)]
        assert got.output_ids == two_pass(pipe, [(ids, feats[0]), (ids, feats[1])], (cfg.alpha, cfg.beta), 6)


# ---------------------------------------------------------------------------------------------------------------
# minivar-eval and the lmms-eval plugin

@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    """POPE's three splits and their COCO images in the data-root layout (tests/test_reproduce.make_root's)."""
    import shutil
    from test_eval_benchmarks import write_pope
    root = tmp_path_factory.mktemp("evaldata")
    write_pope(root / "pope", splits=("adversarial", "random", "popular"))
    (root / "coco").mkdir()
    shutil.move(root / "pope" / "val2014", root / "coco" / "val2014")
    return root


def test_eval_run_uses_the_internvl_template(pipe, eval_root, tmp_path):
    from test_eval_harness import answers, cli as eval_cli
    out = tmp_path / "pope"
    rc, stdout, err = eval_cli(["run", "pope", "--data", eval_root / "pope", "--images", eval_root / "coco/val2014",
                                "--out", out, "--model", pipe.directory, "--device", "cpu", "--dtype", "float32",
                                "--max-new-tokens", "3", "--limit", "3", "--json"])
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["conv_mode"] == "internvl" and run["image_aspect_ratio"] == "tiles"
    from minivar.eval.benchmarks import get
    questions = {q.question_id: q for q in get("pope").read([eval_root / "pope"], images=eval_root / "coco/val2014")}
    for rec in answers(out / "answers.jsonl")[:2]:
        ref = pipe.generate(questions[rec["question_id"]].load_image(), rec["prompt"], max_new_tokens=3)
        assert rec["output_ids"] == ref.output_ids


@pytest.fixture(scope="module")
def lmm(internvl_dir):
    pytest.importorskip("lmms_eval")
    from minivar.lmms_plugin import Minivar
    return Minivar(pretrained=str(internvl_dir), device="cpu", dtype="float32", batch_size=2)


def test_plugin_generate_until_and_loglikelihood(lmm):
    from test_qwen2_vl_pipeline import instances
    assert (lmm.conv_mode, lmm.image_aspect_ratio) == ("internvl", "tiles")
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    lmm.task_dict = {"t": {"test": list(range(3))}}
    reqs = instances("generate_until", [(p, (lambda d, im=im: [im]), {"max_new_tokens": 4, "do_sample": False})
                                        for p, im in zip(PROMPTS, images)])
    for p, im, o in zip(PROMPTS, images, lmm.generate_until(reqs)):
        assert o.text == lmm.pipeline.generate(im, p, max_new_tokens=4).text.strip()
    reqs = instances("loglikelihood", [(p, (lambda d, im=im: [im]), " Yes") for p, im in zip(PROMPTS, images)])
    tok = lmm.pipeline.tokenizer
    for p, im, r in zip(PROMPTS, images, lmm.loglikelihood(reqs)):
        loss, _ = r.text
        n = lmm.pipeline.image(im).num_tokens
        prompt, cont = lmm.encode_pair(p, " Yes", n)
        assert prompt == tok.encode_prompt(p, "internvl", n)
        logits = lmm.pipeline.logits(torch.tensor([prompt + cont]), [lmm.pipeline.image(im)])[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        assert loss == pytest.approx(-logp[range(len(cont)), cont].sum().item(), abs=1e-4)


def test_reproduce_damro_runs_base_and_method_on_internvl(pipe, eval_root, tmp_path):
    """`minivar-eval reproduce damro` on an InternVL checkpoint (POPE only): both runs made with the family's own
    template and image mode (DAMRO's llava_v1 / crop protocol is LLaVA's; the family keeps its own)."""
    paper, base, method = "damro", "sampled-base", "damro"
    from test_eval_harness import cli as eval_cli
    out = tmp_path / "runs"
    rc, stdout, err = eval_cli(["reproduce", paper, "--data-root", eval_root, "--out", out, "--model", pipe.directory,
                                "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2", "--limit", "2",
                                "--benchmarks", "pope", "--resamples", "20", "--json"])
    assert rc == 0, err
    for setting in (base, method):
        run = json.loads((out / f"pope-{setting}" / "run.json").read_text())
        assert run["conv_mode"] == "internvl" and run["image_aspect_ratio"] == "tiles"
        assert (out / f"pope-{setting}" / "metrics.json").is_file()
    assert json.loads(stdout)["rows"]


def test_demo_internvl_answers_and_var_finds_its_planted_sinks(capsys, tmp_path, monkeypatch):
    """`--model demo-internvl` is built on first use and runs: the finder finds its planted dims, and its visual
    sinks are tokens (1, 2) and (5, 5) of every tile and of the thumbnail (models/internvl/demo.py)."""
    from minivar import checkpoint
    from minivar.models.internvl import demo
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    img = tmp_path / "x.png"
    picture(300, 150, seed=4).save(img)
    rc, out, err = cli(capsys, "--model", "demo-internvl", "--image", img, "--prompt", "What is in the image?",
                       "--device", "cpu", "--dtype", "float32", "--max-new-tokens", 3, "--json", "--var")
    assert rc == 0, err
    record = json.loads(out)
    assert record["var"]["sink_dims"] == list(demo.DEMO_SINK_DIMS if hasattr(demo, "DEMO_SINK_DIMS")
                                              else (demo.TEXT_DIM, demo.VISUAL_DIM))
    start = record["var"]["image_span"][0]
    tiles = record["prompt_ids"].count(demo.IDS["<IMG_CONTEXT>"]) // 64
    expected = sorted(start + 64 * t + 8 * r + c for t in range(tiles) for r, c in demo.SINK_TOKENS)
    assert tiles == 3 and record["var"]["visual_sinks"]["0"] == expected
    assert sum(record["var"]["redistributed"]["prefill"]) > 0


def test_cli_pictures_draw_each_tile_and_the_thumbnail_and_damros_patch_scores(capsys, pipe, tmp_path):
    """--damro --save-attention on a tiled image: one 2×2-token panel per tile and one for the thumbnail, each over
    the pixels its tokens saw; attention.json's DAMRO part is the thumbnail's 4×4 patch grid (the CLS attention the
    outliers were chosen by) and the run's outliers."""
    from minivar import viz
    from minivar.methods.damro import cls_attention, tower_layers
    img = tmp_path / "wide.png"
    picture(120, 60, seed=2).save(img)
    pics = tmp_path / "pics"
    rc, out, err = cli(capsys, "--model", pipe.directory, "--image", img, "--prompt", "What is in the image?",
                       "--device", "cpu", "--dtype", "float32", "--max-new-tokens", 2, "--damro", "--damro-topk", 3,
                       "--sink-dims", "1,2", "--save-attention", pics, "--json")
    assert rc == 0, err
    numbers, views = viz.load_numbers(pics / "attention.json")
    assert [(p["name"], p["rows"], p["cols"]) for p in numbers["panels"]] == [
        ("tile 1,1", 2, 2), ("tile 1,2", 2, 2), ("thumbnail", 2, 2)]
    assert [v.size for v in views] == [(56, 56)] * 3
    dam = numbers["damro"]
    assert dam["grid"] == [4, 4] and dam["panel"] == 2 and len(dam["cls_attention"]) == 16
    im = pipe.image(Image.open(img))
    with torch.inference_mode():
        _, hidden = pipe.model.patch_features(im.pixel_values, keep=(1,))
        ref = cls_attention(tower_layers(pipe.model)[1], hidden[1])[-1]
    assert dam["cls_attention"] == pytest.approx(ref.tolist(), abs=1e-4)
    assert dam["outliers"] == json.loads(out)["damro"]["outliers"] == ref.topk(3).indices.tolist()
    assert (pics / "damro_outliers.png").is_file() and (pics / "explorer.html").is_file()
    # the explorer marks the tokens over the outlier patches (the contrast image), on the thumbnail's 2×2 cells
    from minivar.explorer import method_records
    (record,) = [r for r in method_records(numbers, {}, {}) if r["method"] == "damro"]
    tokens = list(dict.fromkeys((p // 4 // 2) * 2 + (p % 4) // 2 for p in dam["outliers"]))
    assert record["panel"] == 2 and record["marks"] == tokens and len(record["values"]) == 4
    assert max(record["values"]) == pytest.approx(max(dam["cls_attention"]))
