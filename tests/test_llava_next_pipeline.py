"""LLaVA-NeXT end to end (issue 21, item 4): the command line, the Python API (generate_batch over images of
different token counts, generate_many, sampling, the capture), VAR with its image span over base, tiles and
newlines, DAMRO through the command line, minivar-eval on the harness's benchmarks and the lmms-eval plugin — on tiny
NeXT checkpoints made here with the demo's byte-level tokenizer (<image> = 259) and planted sinks. The model itself
is checked against transformers in test_llava_next.py; here the greedy answers of the command line are checked
against transformers' LlavaNextForConditionalGeneration loading the same directory."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import assert_one_line_error, run_cli, to_hub_key, write_checkpoint  # noqa: E402
from minivar import demo  # noqa: E402
from minivar.models.config import TextConfig, VisionConfig  # noqa: E402
from minivar.models.llava_next import LlavaNext, LlavaNextConfig, count_image_tokens  # noqa: E402
from test_llava_next import PINPOINTS, S, hf_inputs, picture  # noqa: E402

IMG, PAD = 259, 260                         # the demo tokenizer's <image> and <pad>
DIMS = (11, 77)                             # (text sink dim, visual sink dim) planted
COMMON = 3
TAU = 5.0                                   # hidden 128: one massive dim caps φ at √128 ≈ 11.3 < 20
SINK_PATCHES = (5, 10)                      # patch indices of the 4×4 grid of every crop: base and tiles alike
PROMPT = "What is in the image?"
# w, h: four token counts
SIZES = {"wide": (150, 70), "tall": (60, 130), "square": (120, 120), "tiny": (9, 7)}


def next_config(text: str = "llama") -> LlavaNextConfig:
    """CLIP 64-dim / 3 layers at 56 px (4×4 features per crop), a 3-layer 128-dim decoder; Mistral: grouped-query
    attention (2 KV heads) and its sliding window."""
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=S, patch_size=14)
    t = TextConfig(vocab_size=261, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
                   num_key_value_heads=2 if text == "mistral" else None)
    return LlavaNextConfig(vision=vision, text=t, image_token_index=IMG, pad_token_id=PAD, torch_dtype="float32",
                           image_grid_pinpoints=tuple(tuple(p) for p in PINPOINTS), text_model_type=text,
                           sliding_window=4096 if text == "mistral" else None)


def next_state(cfg: LlavaNextConfig, seed: int = 0) -> dict:
    """Random weights for exactly LlavaNext(cfg)'s parameters, with the demo's planted sinks: BOS a text sink,
    the SINK_PATCHES of every crop visual sinks (their CLIP position embeddings are marked)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlavaNext(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {k: demo.random_tensor(k, shape, g) for k, shape in sorted(shapes.items())}
    for k in state:                  # attention matters for the output, so VAR shows in the greedy tokens
        if k.endswith("o_proj.weight"):
            state[k] *= 10
        if k.endswith("multi_modal_projector.linear_2.weight"):
            state[k] *= 20           # and the image matters: other images, other answers
    demo.plant_sinks(state, cfg, text_dim=DIMS[0], visual_dim=DIMS[1], common_dim=COMMON, patches=SINK_PATCHES)
    state["language_model.lm_head.weight"] *= 10      # wider logit gaps
    return state


def write_next(directory: Path, text: str = "llama") -> Path:
    """A llava-hf hub-layout checkpoint dir: config.json, preprocessor_config.json, model.safetensors,
    tokenizer.json."""
    cfg = next_config(text)
    state = {to_hub_key(k): v for k, v in next_state(cfg).items()}
    write_checkpoint(directory, state, cfg, config=cfg.to_hf(), tokenizer=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(cfg.to_hf_preprocessor(), indent=2))
    return directory


@pytest.fixture(scope="module")
def vicuna_dir(tmp_path_factory):
    return write_next(tmp_path_factory.mktemp("next_vicuna"), "llama")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return write_next(tmp_path_factory.mktemp("next_mistral"), "mistral")


@pytest.fixture(scope="module")
def pipe(vicuna_dir):
    import minivar
    return minivar.load(str(vicuna_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name → (PIL image, its file): sizes that give different token counts."""
    root = tmp_path_factory.mktemp("next_images")
    out = {}
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        img = picture(w, h, seed=i)
        img.save(root / f"{name}.png")
        out[name] = (img, root / f"{name}.png")
    return out


def cli_json(model_dir, image_file, *extra, prompt=PROMPT, n=6):
    rc, out, err = run_cli(["--model", model_dir, "--image", image_file, "--prompt", prompt, "--device", "cpu",
                            "--dtype", "float32", "--max-new-tokens", str(n), "--json", *extra])
    assert rc == 0, err
    return json.loads(out), err


def hf_greedy(model_dir, img, prompt_ids, n):
    """transformers' LlavaNextForConditionalGeneration on the same directory: greedy, no cache, stops at EOS (2)."""
    from transformers import LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    ref = LlavaNextForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=PINPOINTS)
    px, sizes = hf_inputs(proc, img)
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(ref(input_ids=ids, pixel_values=px, image_sizes=sizes).logits[0, -1].argmax())
            if nxt == 2:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The command line

@pytest.mark.parametrize("text, template, head", [("llama", "vicuna_v1", "A chat between"),
                                                  ("mistral", "mistral_instruct", "[INST] ")])
def test_cli_answers_with_the_family_defaults_as_transformers_does(request, images, text, template, head):
    model_dir = request.getfixturevalue("vicuna_dir" if text == "llama" else "mistral_dir")
    import minivar
    pipe = minivar.load(str(model_dir), device="cpu", dtype="float32")
    assert pipe.family.conv_mode_for(pipe.config) == template and pipe.family.default_image_mode == "anyres"
    for name in ("wide", "tall"):
        img, path = images[name]
        rec, err = cli_json(model_dir, path)
        n = count_image_tokens((img.height, img.width), pipe.config)
        assert rec["prompt_ids"] == pipe.prompt_ids(PROMPT, template, num_image_tokens=n)[0].tolist()
        assert rec["prompt_ids"].count(IMG) == n
        assert pipe.tokenizer.decode(rec["prompt_ids"]).startswith(head)
        assert rec["output_ids"] == hf_greedy(model_dir, img, rec["prompt_ids"], 6), name
        assert rec["text"] == pipe.tokenizer.decode(rec["output_ids"])
        assert "minivar: prefill" in err
    # the flags' other choices: llava_hf is a NeXT template; pad is LLaVA-1.5's image mode, not NeXT's
    rec, _ = cli_json(model_dir, images["wide"][1], "--conv-mode", "llava_hf")
    assert pipe.tokenizer.decode(rec["prompt_ids"]).startswith("USER: ")
    assert_one_line_error(*run_cli(["--model", model_dir, "--image", images["wide"][1], "--prompt", PROMPT,
                                    "--device", "cpu", "--image-aspect-ratio", "pad"]), "pad", "anyres")


def test_cli_and_api_sample_alike_seeded(vicuna_dir, pipe, images):
    img, path = images["square"]
    args = ("--temperature", "0.9", "--top-p", "0.95", "--seed", "7")
    a, _ = cli_json(vicuna_dir, path, *args, n=10)
    b, _ = cli_json(vicuna_dir, path, *args, n=10)
    api = pipe.generate(img, PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    greedy = pipe.generate(img, PROMPT, max_new_tokens=10)
    assert a["output_ids"] == b["output_ids"] == api.output_ids != greedy.output_ids
    other = pipe.generate(img, PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=8)
    assert other.output_ids != api.output_ids


# ---------------------------------------------------------------------------------------------------------------
# The Python API: batches of images with different token counts, the shared prefix, the capture

def var_config(**kw):
    from minivar.methods.var import VARConfig
    return VARConfig(**({"tau": TAU, "sink_dims": DIMS} | kw))


@pytest.fixture(scope="module")
def mistral_pipe(mistral_dir):
    import minivar
    return minivar.load(str(mistral_dir), device="cpu", dtype="float32")


@pytest.mark.parametrize("variant, with_var", [("vicuna", False), ("vicuna", True), ("mistral", True)])
def test_batch_of_different_token_counts_equals_one_by_one(request, images, variant, with_var):
    pipe = request.getfixturevalue("pipe" if variant == "vicuna" else "mistral_pipe")
    names = list(SIZES)
    imgs = [images[n][0] for n in names]
    prompts = [PROMPT, "Describe it.", "Is there a cat?", "What colour is the sky, and why is it so?"]
    counts = [pipe.image(i).num_tokens for i in imgs]
    assert len(set(counts)) == len(counts)                 # four token counts in one batch
    var = var_config() if with_var else None
    batch = pipe.generate_batch(imgs, prompts, max_new_tokens=8, var=var)
    alone = [pipe.generate(i, p, max_new_tokens=8, var=var) for i, p in zip(imgs, prompts)]
    assert [r.output_ids for r in batch] == [r.output_ids for r in alone]
    assert len({tuple(r.output_ids) for r in alone}) >= 3  # the images (and prompts) matter
    if with_var:
        assert [r.var for r in batch] == [r.var for r in alone]
        assert all(sum(r.var["redistributed"]["prefill"]) > 0 for r in alone)


@pytest.mark.parametrize("with_var", [False, True])
def test_generate_many_equals_one_by_one(pipe, images, with_var):
    """One image, questions sharing the prefix (template, image and more text), for each token count."""
    prompts = ["Is there a cat?", "Is there a dog in the picture?", "Is there", "What is this?"]
    var = var_config() if with_var else None
    for name in ("wide", "tiny"):
        img = images[name][0]
        many = pipe.generate_many(img, prompts, max_new_tokens=6, var=var)
        alone = [pipe.generate(img, p, max_new_tokens=6, var=var) for p in prompts]
        assert [r.output_ids for r in many] == [r.output_ids for r in alone], name
        assert many[0].timing["prefix_tokens"] > pipe.image(img).num_tokens      # the image is in the prefix
        if with_var:
            assert [r.var for r in many] == [r.var for r in alone]


def test_capture_records_every_image_position(pipe, images):
    img = images["wide"][0]
    n = pipe.image(img).num_tokens
    cap = pipe.capture(img, PROMPT, layers=[0, 2], heads=[1], residuals=True, var=var_config())
    T = len(cap.result.prompt_ids)
    assert cap.attention_probs[0]["before"].shape == (1, 1, T, T)
    assert cap.residuals[2].shape == (1, T, 128)
    start = cap.result.prompt_ids.index(IMG)
    assert cap.result.var["image_span"] == [start, start + n]
    vis = cap.visual_sinks[1][0].nonzero().flatten().tolist()
    assert vis == cap.result.var["visual_sinks"]["1"] and vis and all(start <= j < start + n for j in vis)
    assert not torch.equal(cap.attention_probs[0]["before"], cap.attention_probs[0]["after"])


# ---------------------------------------------------------------------------------------------------------------
# VAR on NeXT: the image span is base + tiles + newlines; reports against a loop-level re-statement of design.md §3

def loop_phi(h, dims):
    """φ_j = max_{d∈D} |h_j[d]| / sqrt(mean_k h_j[k]² + 1e-6), one token at a time (fp32 → Python floats)."""
    out = []
    for row in h.double().tolist():
        rms = (sum(x * x for x in row) / len(row) + 1e-6) ** 0.5
        out.append(max(abs(row[d]) for d in dims) / rms)
    return out


def loop_var(before, sinks, image, rows, *, rho, p, mia):
    """design.md §3.4–5 on one layer's probabilities [H, R, K] for query rows `rows` (absolute positions): the
    selected (head, row) pairs and the probabilities after, row by row."""
    after = before.clone().double()
    selected = []
    vis = [j for j in sinks if j in image]
    for h in range(before.shape[0]):
        for r_i, i in enumerate(rows):
            a = before[h, r_i].double().tolist()
            A = sum(a[j] for j in image if j < len(a))
            non_sink = [j for j in image if j not in vis and j < len(a)]
            r = sum(a[j] for j in non_sink) / A if A > 0 else 0.0
            if not (A >= mia and r >= rho):
                continue
            selected.append((h, i))
            budget = p * sum(a[j] for j in sinks if j < len(a))
            base = sum(a[j] for j in non_sink)
            for j in sinks:
                after[h, r_i, j] = (1 - p) * a[j]
            for j in non_sink:
                after[h, r_i, j] = a[j] + budget * a[j] / base
    return selected, after


def test_var_reports_equal_the_loop_level_restatement(pipe, images):
    """Planted sinks in every crop: VAR's sinks, visual sinks, image span, selected pairs (prefill and decode) and
    the redistributed probabilities equal the loop of design.md §3, with the image span I = every image position
    (base, tiles and the newline tokens, as the released VAR code has it for v1.6)."""
    img = images["wide"][0]
    im = pipe.image(img)
    cfg = var_config(rho=0.5)
    cap = pipe.capture(img, PROMPT, layers="all", residuals=True, decode=True, var=cfg, max_new_tokens=4)
    rep, ids = cap.result.var, cap.result.prompt_ids
    T, L = len(ids), pipe.config.text.num_hidden_layers
    image = [j for j, t in enumerate(ids) if t == IMG]
    assert len(image) == im.num_tokens and image == list(range(image[0], image[0] + im.num_tokens))
    assert rep["image_span"] == [image[0], image[-1] + 1]
    newlines = [image[0] + k for k, where in enumerate(token_layout_of(im)) if where is None]
    assert len(newlines) == im.panels[1].rows and set(newlines) <= set(image)
    planted = {image[0] + p for p in SINK_PATCHES}                         # the base crop's planted patches
    fed = len(cap.result.output_ids) - 1                                  # generated rows fed back (no EOS here)
    assert fed == 3
    total = {"prefill": [0] * L, "decode": [0] * L}
    for layer in range(L):
        phi = loop_phi(cap.residuals[layer][0, :T], DIMS)
        sinks = [j for j in range(T) if phi[j] >= TAU]
        assert rep["sinks"][str(layer)] == sinks
        assert rep["visual_sinks"][str(layer)] == [j for j in sinks if j in image]
        assert planted <= set(sinks) and 0 in sinks and not set(newlines) & set(sinks)   # BOS; newlines never
        assert any(j >= image[0] + 16 for j in rep["visual_sinks"][str(layer)])    # tile sinks too
        probs = cap.attention_probs[layer]
        rows = list(range(image[-1] + 1, T + fed))                          # after the image, prompt and decode
        before, after = probs["before"][0][:, image[-1] + 1:], probs["after"][0][:, image[-1] + 1:]
        if layer == L - 1:                                                 # never touched
            assert torch.equal(before, after)
            continue
        selected, want = loop_var(before, sinks, set(image), rows, rho=cfg.rho, p=cfg.p, mia=cfg.min_image_attention)
        assert (after.double() - want).abs().max() <= 1e-5
        total["prefill"][layer] = sum(i < T for _, i in selected)
        total["decode"][layer] = sum(i >= T for _, i in selected)
    assert rep["redistributed"] == total
    assert min(total["prefill"][:L - 1]) > 0 and min(total["decode"][:L - 1]) > 0


def token_layout_of(im):
    from minivar.models.images import token_layout
    return token_layout(im.panels)


def test_known_sink_dims_of_the_vicuna_variants_and_the_finder_for_mistral(mistral_dir, images):
    """The vicuna variants' decoders are LLaVA-1.5's (Vicuna-1.5 7B/13B): its dims, as the released VAR code
    assumes. Mistral's are unknown: the finder runs (here it finds the planted dims)."""
    from minivar.methods.var import known_sink_dims
    from minivar.models.llava_next import LlavaNextConfig as C
    from test_llava_next import real_config
    vicuna = replace(real_config("llama"), name_or_path="llava-hf/llava-v1.6-vicuna-7b-hf")
    assert known_sink_dims(vicuna) == ("llava-v1.6-vicuna-7b", (1415, 2533))
    t13 = replace(vicuna.text, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                  intermediate_size=13824)
    assert known_sink_dims(replace(vicuna, text=t13, name_or_path="x/llava-v1.6-vicuna-13b-hf"))[1] == (2100, 4743)
    mistral = real_config("mistral")
    assert isinstance(mistral, C) and known_sink_dims(replace(mistral, name_or_path="llava-v1.6-mistral-7b")) is None
    rec, err = cli_json(mistral_dir, images["tall"][1], "--var", "--tau", str(TAU))
    assert rec["var"]["sink_dims_source"] == "finder" and tuple(rec["var"]["sink_dims"]) == DIMS
    assert "sink-dim finder found dims [11, 77]" in err
    assert sum(rec["var"]["redistributed"]["prefill"]) > 0


# ---------------------------------------------------------------------------------------------------------------
# DAMRO through the command line

def test_damro_on_the_command_line(vicuna_dir, pipe, images):
    from minivar.methods.damro import DAMRO, DAMROConfig
    img, path = images["tall"]
    rec, err = cli_json(vicuna_dir, path, "--damro", "--damro-topk", "4", "--damro-alpha", "1.0", n=8)
    api = pipe.generate(img, PROMPT, max_new_tokens=8, methods=[DAMRO(DAMROConfig(alpha=1.0, topk=4))])
    plain = pipe.generate(img, PROMPT, max_new_tokens=8)
    assert rec["output_ids"] == api.output_ids != plain.output_ids
    assert rec["damro"] == json.loads(json.dumps(api.reports["damro"])) and "minivar: DAMRO: ViT outlier" in err


# ---------------------------------------------------------------------------------------------------------------
# minivar-eval on the harness's benchmarks (the real formats, as the eval tests write them)

def bench_data(bench, root: Path):
    """(--data and --images arguments, --limit) of a benchmark's real-format files written into root; the images
    rewritten at sizes with different token counts."""
    import test_eval_benchmarks as eb
    if bench == "pope":
        eb.write_pope(root)
        args, limit = [root / "coco_pope_adversarial.json", root / "coco_pope_random.json", "--images",
                       root / "val2014"], None
    elif bench == "mme":
        args, limit = [eb.write_mme(root / "MME_Benchmark_release_version")], 4
    elif bench == "gqa":
        args, limit = [eb.write_gqa(root)], None
    elif bench == "mmvp":
        args, limit = [eb.write_mmvp(root / "MMVP")], None
    elif bench == "cvbench":
        two, three = eb.cvbench_rows()
        for name, rows in (("test_2d", two[:3]), ("test_3d", three)):
            eb.write_jsonl(root / f"{name}.jsonl", rows)
            for r in rows:
                eb.write_image(root / r["filename"])
        args, limit = [root], None
    else:                                           # chair: the annotation fixtures, a val2014 folder
        from test_eval_chair import FIXTURES, IDS
        for i in IDS:
            eb.write_image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        args, limit = [FIXTURES / "instances_val2014.json", FIXTURES / "captions_val2014.json",
                       FIXTURES / "image_ids.txt", "--images", root / "val2014"], None
    files = sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".png"))
    for k, path in enumerate(files):
        w, h = list(SIZES.values())[k % len(SIZES)]
        picture(w, h, seed=k).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return args, limit


def question_image(bench, args, question_id):
    from minivar.eval.benchmarks import get
    data = [a for a in args if a != "--images"]
    images = args[args.index("--images") + 1] if "--images" in args else None
    if images is not None:
        data.remove(images)
    questions = get(bench).read([Path(d) for d in data], images=images)
    return next(q for q in questions if q.question_id == question_id).load_image()


@pytest.mark.parametrize("bench", ["pope", "mme", "gqa", "mmvp", "cvbench", "chair"])
def test_eval_runs_every_benchmark(vicuna_dir, tmp_path, bench):
    """`minivar-eval run` on NeXT: the benchmark's template as the vicuna variants speak it, anyres (run.json says
    so), and an answer equals the command line's for the same question."""
    from test_eval_harness import answers, cli
    if bench == "chair":
        from minivar.eval.benchmarks.chair import nltk_lemmatizer
        try:
            nltk_lemmatizer()("a dog")
        except Exception as e:                  # noqa: BLE001  (NLTK or its data not installed)
            pytest.skip(f"CHAIR needs NLTK with its data: {e}")
    args, limit = bench_data(bench, tmp_path / "data")
    out = tmp_path / "run"
    argv = ["run", bench, "--data", *args, "--out", out, "--model", vicuna_dir, "--device", "cpu", "--dtype",
            "float32", "--max-new-tokens", "3", "--batch-size", "4", "--json"]
    rc, stdout, err = cli(argv + (["--limit", str(limit)] if limit else []))
    assert rc == 0, err
    result = json.loads(stdout)
    recs = answers(out / "answers.jsonl")
    assert result["n"] == len(recs) >= 2
    run = json.loads((out / "run.json").read_text())
    assert (run["conv_mode"], run["image_aspect_ratio"]) == ("vicuna_v1", "anyres")
    rec = recs[-1]
    image = tmp_path / "question.png"            # the question's image as the benchmark reads it, losslessly
    question_image(bench, args, rec["question_id"]).save(image)
    single, _ = cli_json(vicuna_dir, image, prompt=rec["prompt"], n=3)
    assert single["output_ids"] == rec["output_ids"]


def test_eval_on_the_mistral_variant_records_its_template(mistral_dir, tmp_path):
    from test_eval_harness import answers, cli
    args, _ = bench_data("pope", tmp_path / "data")
    out = tmp_path / "run"
    rc, stdout, err = cli(["run", "pope", "--data", *args, "--out", out, "--model", mistral_dir, "--device", "cpu",
                           "--dtype", "float32", "--max-new-tokens", "3", "--var", "--tau", str(TAU), "--json"])
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert (run["conv_mode"], run["image_aspect_ratio"]) == ("mistral_instruct", "anyres")
    assert run["var_sink_dims_source"] == "finder" and run["var"]["sink_dims"] == list(DIMS)
    rec = answers(out / "answers.jsonl")[0]
    single, _ = cli_json(mistral_dir, tmp_path / "data" / "val2014" / rec["image"], "--var", "--var-preset",
                         "hallucination", "--tau", str(TAU), "--sink-dims", "11,77", prompt=rec["prompt"], n=3)
    assert single["output_ids"] == rec["output_ids"]


# ---------------------------------------------------------------------------------------------------------------
# The lmms-eval plugin

@pytest.fixture(scope="module")
def lmms_model(vicuna_dir):
    pytest.importorskip("lmms_eval")
    from minivar.lmms_plugin import Minivar
    return Minivar(pretrained=str(vicuna_dir), device="cpu", dtype="float32", batch_size=4)


def lmms_requests(kind, items):
    from test_lmms_plugin import requests
    return requests(kind, "t", items)


def test_lmms_generate_until_with_images_of_different_token_counts(lmms_model, images):
    lm = lmms_model
    assert (lm.conv_mode, lm.image_aspect_ratio) == ("vicuna_v1", "anyres")
    docs = [{"name": n} for n in SIZES] + [{"name": "wide"}]          # two questions about one picture too
    lm.task_dict = {"t": {"test": docs}}
    contexts = ["<image>\nWhat is it?", "Describe it.", "Is there a cat?", "What colour?", "Is it wide?"]
    reqs = lmms_requests("generate_until", [(c, lambda d: [images[d["name"]][0]], {"max_new_tokens": 5})
                                                 for c in contexts])
    out = lm.generate_until(reqs)
    for doc, context, o in zip(docs, contexts, out):
        direct = lm.pipeline.generate(images[doc["name"]][0], context.replace("<image>\n", ""), max_new_tokens=5)
        assert o.text == direct.text.strip()
        assert o.token_counts.input_tokens == len(direct.prompt_ids)
    assert len({o.token_counts.input_tokens for o in out}) == 4


def test_lmms_loglikelihood_counts_each_images_own_tokens(lmms_model, images):
    """Each request's prompt holds its own image's token count; the loss equals the pipeline's logits on it."""
    lm = lmms_model
    docs = [{"name": n} for n in SIZES]
    lm.task_dict = {"t": {"test": docs}}
    items = [("Is there a cat?", lambda d: [images[d["name"]][0]], c) for c in (" yes", " no", " maybe", " yes")]
    out = [r.text for r in lm.loglikelihood(lmms_requests("loglikelihood", items))]
    for doc, (q, _, c), (loss, greedy) in zip(docs, items, out):
        im = lm.pipeline.image(images[doc["name"]][0])
        prompt, cont = lm.encode_pair(q, c, im.num_tokens)
        assert prompt.count(IMG) == im.num_tokens
        logits = lm.pipeline.logits(torch.tensor([prompt + cont]), [im])[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        assert loss == pytest.approx(-logp[range(len(cont)), cont].sum().item(), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    assert len({round(loss, 4) for loss, _ in out}) == len(out)


def test_lmms_defaults_follow_the_family(mistral_dir):
    pytest.importorskip("lmms_eval")
    from minivar.errors import MinivarError
    from minivar.lmms_plugin import Minivar
    lm = Minivar(pretrained=str(mistral_dir), device="cpu", dtype="float32")
    assert (lm.conv_mode, lm.image_aspect_ratio) == ("mistral_instruct", "anyres")
    with pytest.raises(MinivarError, match="image_aspect_ratio='pad' is not one of LLaVA-NeXT.s \\(anyres\\)"):
        Minivar(pretrained=str(mistral_dir), device="cpu", image_aspect_ratio="pad")
    with pytest.raises(MinivarError, match="conv_mode='qwen' is not one of LLaVA-NeXT's"):
        Minivar(pretrained=str(mistral_dir), device="cpu", conv_mode="qwen")
