"""Qwen3-VL / Qwen3-VL-MoE through everything else minivar has: the image processor and the checkpoint's chat
template against transformers' (pixels, grids, prompt ids), stop ids, the command line (--json, sampling, pixel
caps, refusals), batches, generate_many, the capture, VAR on a planted-sink checkpoint against the loop-level
re-statement of the rule, DAMRO refused, VCD against the two-pass reference, minivar-eval, the lmms-eval plugin,
pictures. Tiny checkpoints made with transformers here (test_qwen3_vl_model's helpers) with the local byte-level
BPE of test_qwen2_vl_pipeline: nothing is downloaded."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from test_qwen2_vl_pipeline import NAMES, cli, instances, picture, var_by_loops, write_tokenizer  # noqa: E402
from test_qwen3_vl_model import hf_model, write_checkpoint  # noqa: E402

import minivar  # noqa: E402
from minivar.errors import MinivarError  # noqa: E402
from minivar.models.qwen2_vl.processing import preprocess_image, smart_resize  # noqa: E402
from minivar.models.qwen3_vl.model import QWEN3_IMAGE  # noqa: E402
from minivar.models.qwen3_vl.template import Qwen3Tokenizer  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 32 * 32 * 2, 32 * 32 * 24          # the tiny checkpoints' preprocessor_config.json
# Qwen3-VL-8B-Instruct's chat template (chat_template.json), restated for the messages minivar renders (system
# turns, string or list contents, images counted, the generation prompt); no default system turn.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- if message.content is string %}{{- message.content }}{%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}{{- content.text }}{%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
PREPROCESSOR = {"size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, "patch_size": 16,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}


def make_checkpoint(directory: Path, kind: str = "dense", seed: int = 0, plant=None, template: bool = True) -> Path:
    """A tiny random checkpoint in the hub layout with the local tokenizer (its ids in config.json), the chat
    template, generation_config.json's stop ids and a preprocessor_config.json capping images at 24 tokens.
    plant(model, ids): changes to the weights before saving."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(directory)
    hf = hf_model(kind, seed=seed, token_ids={k: ids[v] for k, v in NAMES.items()})
    if plant is not None:
        with torch.no_grad():
            plant(hf, ids)
    keep = (directory / "tokenizer.json").read_bytes()
    write_checkpoint(hf, directory, "hub")
    (directory / "tokenizer.json").write_bytes(keep)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    if template:
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (directory / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}))
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return directory


@pytest.fixture(scope="module", params=("dense", "moe"))
def qwen3_dir(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pipe(qwen3_dir):
    return minivar.load(str(qwen3_dir), device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------------------------
# Images and prompts against transformers' processor

@pytest.mark.parametrize("size", [(1, 1), (40, 300), (300, 40), (700, 500), (64, 64)])
def test_images_equal_transformers_image_processor(size):
    """A 1×1 image, tall, wide, above max_pixels, exact: transformers' Qwen3-VL image processor (Qwen2VL's PIL
    processor with the checkpoint's preprocessor_config.json): the same grid and pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    cfg = QWEN3_IMAGE.with_pixels(MIN_PIXELS, MAX_PIXELS)
    ref_proc = Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if "class" not in k
                                           and k != "image_processor_type"})
    pil = picture(*size, seed=size[0])
    im = preprocess_image(pil, cfg)
    ref = ref_proc(images=[pil], return_tensors="pt")
    assert list(im.meta["grid_thw"]) == ref["image_grid_thw"][0].tolist()
    assert torch.equal(im.pixel_values, ref["pixel_values"])
    h, w = smart_resize(size[1], size[0], 32, MIN_PIXELS, MAX_PIXELS)
    assert im.num_tokens == h * w // 32 ** 2 <= 24


def test_an_extreme_aspect_ratio_is_refused_in_one_line_as_transformers_refuses_it(qwen3_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    pil = Image.new("RGB", (402, 2))
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        Qwen2VLImageProcessorPil(patch_size=16)(images=[pil])
    from minivar.models.registry import family_for
    cfg = minivar.checkpoint.read_config(qwen3_dir)
    with pytest.raises(MinivarError, match="aspect ratio of 201.0; Qwen3-VL(-MoE)? takes at most 200") as e:
        family_for(cfg.model_type).images(pil, cfg, None)
    assert "\n" not in str(e.value)
    preprocess_image(Image.new("RGB", (400, 2)), QWEN3_IMAGE)             # 200 exactly is taken


@pytest.mark.parametrize("question", ["What is in the image?", "Describe it.\nIn detail, please: 3 things!",
                                      "  café, then a space at the end "])
@pytest.mark.parametrize("n_images", [1, 2])
def test_prompt_ids_equal_the_transformers_processor(qwen3_dir, question, n_images):
    """transformers' Qwen3VLProcessor steps: the checkpoint's chat template rendered by its tokenizer, each
    `<|image_pad|>` repeated grid.prod() / 4 times (replace_image_token), tokenized. No system turn."""
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(qwen3_dir))
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    text = hf_tok.apply_chat_template([{"role": "user", "content": content}], chat_template=CHAT_TEMPLATE,
                                      add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    counts = [6, 15][:n_images]
    parts = text.split("<|image_pad|>")
    expanded = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
    cfg = minivar.checkpoint.read_config(qwen3_dir)
    tok = Qwen3Tokenizer(qwen3_dir, cfg)
    assert tok.encode_prompt(question, num_image_tokens=counts) == hf_tok(expanded)["input_ids"]
    assert tok.prompt_tail(question) == "assistant\n"


def test_a_thinking_checkpoints_template_is_rendered_as_transformers_renders_it(tmp_path, qwen3_dir):
    """A -Thinking checkpoint's template opens the answer with `<think>\n` (<think> an added, non-special token):
    the same ids as transformers' tokenizer gives the rendered prompt; the answer's text starts after <think>."""
    import shutil
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer
    d = tmp_path / "thinking"
    shutil.copytree(qwen3_dir, d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.save(str(d / "tokenizer.json"))
    template = CHAT_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}{%- endif %}",
                                     "{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
    assert template != CHAT_TEMPLATE
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    hf_tok = AutoTokenizer.from_pretrained(str(d))
    question = "Why is the sky blue?"
    text = hf_tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                        "text": question}]}],
                                      chat_template=template, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    ours = Qwen3Tokenizer(d, minivar.checkpoint.read_config(d))
    assert ours.encode_prompt(question, num_image_tokens=4) == hf_tok(text.replace("<|image_pad|>",
                                                                                   "<|image_pad|>" * 4))["input_ids"]
    assert ours.prompt_tail(question) == "\n"


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('one image only') }}", "cannot be rendered: one image only"),
    ("{% for m in messages %}{{ m['content'][-1]['text'] | upper }}{% endfor %}", "changes the question's text"),
    ("{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}", "one <\\|image_pad\\|> per image"),
    ("{% for m in messages %}", "cannot be rendered"),
])
def test_a_template_minivar_cannot_use_is_one_line(tmp_path, qwen3_dir, template, message):
    import shutil
    d = tmp_path / "bad"
    shutil.copytree(qwen3_dir, d)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tok = Qwen3Tokenizer(d, minivar.checkpoint.read_config(d))
    with pytest.raises(MinivarError, match=message) as e:
        tok.encode_prompt("What is it?", num_image_tokens=3)
    assert "\n" not in str(e.value)


def test_without_a_chat_template_the_instruct_prompt_and_typed_special_tokens_stay_text(tmp_path, qwen3_dir):
    d = make_checkpoint(tmp_path / "plain", template=False)
    cfg = minivar.checkpoint.read_config(d)
    plain, own = Qwen3Tokenizer(d, cfg), Qwen3Tokenizer(qwen3_dir, minivar.checkpoint.read_config(qwen3_dir))
    assert plain.encode_prompt("What is it?", num_image_tokens=3) == own.encode_prompt("What is it?", num_image_tokens=3)
    ids = plain.encode_prompt("Spell <|im_start|> and <|image_pad|>", num_image_tokens=[2, 3])
    assert ids.count(cfg.image_token_id) == 5 and ids.count(plain.ids["<|im_start|>"]) == 2   # user's, assistant's
    assert ids.count(cfg.vision_start_token_id) == 2
    text = plain._tok.decode(ids, skip_special_tokens=False)
    assert "Spell <|im_start|> and <|image_pad|><|im_end|>" in text


def test_stop_ids_come_from_generation_config(qwen3_dir, tmp_path):
    cfg = minivar.checkpoint.read_config(qwen3_dir)
    tok = Qwen3Tokenizer(qwen3_dir, cfg)
    assert tok.stop_ids == (tok.ids["<|im_end|>"], tok.ids["<|endoftext|>"]) and tok.eos_id == tok.ids["<|im_end|>"]
    (qwen3_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.ids["<|endoftext|>"]}))
    try:
        assert Qwen3Tokenizer(qwen3_dir, cfg).stop_ids == (tok.ids["<|endoftext|>"],)
    finally:
        (qwen3_dir / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [tok.ids["<|im_end|>"], tok.ids["<|endoftext|>"]]}))


def test_from_pil_images_to_tokens_equals_transformers_end_to_end(qwen3_dir, pipe):
    """PIL images (1×1, wide, tall, above max_pixels) and a question: transformers' image processor, chat template,
    tokenizer and model loaded from the same hub-layout files (its own conversions of the hub's config and experts)
    against minivar's pipeline: ids, pixels, the last logits of a padded batch, greedy tokens."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    cls = Qwen3VLMoeForConditionalGeneration if pipe.config.is_moe else Qwen3VLForConditionalGeneration
    hf = cls.from_pretrained(str(qwen3_dir), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(qwen3_dir))
    hf_proc = Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if k in ("size", "patch_size",
                                                                                       "image_mean", "image_std")})
    question = "What is in the image?"
    text = hf_tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                        "text": question}]}],
                                      chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    rows, images, pixels = [], [], []
    for i, size in enumerate([(1, 1), (300, 40), (40, 300), (700, 500)]):
        pil = picture(*size, seed=i)
        ref = hf_proc(images=[pil], return_tensors="pt")
        im = pipe.image(pil)
        assert torch.equal(im.pixel_values, ref["pixel_values"])
        n = int(ref["image_grid_thw"][0].prod()) // 4
        ref_ids = hf_tok(text.replace("<|image_pad|>", "<|image_pad|>" * n))["input_ids"]
        assert pipe.prompt_ids(question, num_image_tokens=im.num_tokens)[0].tolist() == ref_ids
        rows.append(ref_ids)
        images.append(im)
        pixels.append(ref)
    pad = pipe.tokenizer.ids["<|endoftext|>"]
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = (ids != pad).long()
    inputs = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == pipe.config.image_token_id).int(),
                  pixel_values=torch.cat([p["pixel_values"] for p in pixels]),
                  image_grid_thw=torch.cat([p["image_grid_thw"] for p in pixels]))
    with torch.no_grad():
        ref_logits = hf(**inputs).logits[:, -1]
        ref_tokens = hf.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                 pad_token_id=pad)[:, T:].tolist()
    got = pipe.generate_batch([picture(*s, seed=i) for i, s in enumerate([(1, 1), (300, 40), (40, 300), (700, 500)])],
                              [question] * 4, max_new_tokens=6)
    with torch.no_grad():
        got_logits = pipe.model(ids, images, attention_mask=mask, output="last")
    assert (got_logits - ref_logits).abs().max().item() <= 1e-4
    stops = set(pipe.stop_ids)
    assert [r.output_ids for r in got] == [[t for t in row[:next((j for j, t in enumerate(row) if t in stops),
                                                                 len(row))]] for row in ref_tokens]
    assert sum(len(r.output_ids) for r in got) > 8


# ---------------------------------------------------------------------------------------------------------------
# The command line

@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    picture(200, 300, seed=1).save(path)
    return path


def base_args(d, image_file, *more):
    return ("--model", d, "--image", image_file, "--prompt", "What is in the image?", "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", 6, *more)


def test_cli_json_greedy_equals_the_pipeline_with_the_checkpoints_template(capsys, qwen3_dir, image_file, pipe):
    rc, out, err = cli(capsys, *base_args(qwen3_dir, image_file, "--json"))
    assert rc == 0, err
    record = json.loads(out)
    ref = pipe.generate(str(image_file), "What is in the image?", max_new_tokens=6)
    assert record["output_ids"] == ref.output_ids and record["prompt_ids"] == ref.prompt_ids and record["text"] == ref.text
    h, w = smart_resize(300, 200, 32, MIN_PIXELS, MAX_PIXELS)
    n = h * w // 32 ** 2
    assert record["prompt_ids"] == pipe.tokenizer.encode_prompt("What is in the image?", "qwen3", n)
    assert record["prompt_ids"].count(pipe.config.image_token_id) == n == 24


def test_cli_sampling_is_seeded_and_pixel_caps_change_the_token_count(capsys, qwen3_dir, image_file):
    runs = [json.loads(cli(capsys, *base_args(qwen3_dir, image_file, "--json", "--temperature", 1.5, "--seed", s))[1])
            for s in (1, 1, 2)]
    assert runs[0]["output_ids"] == runs[1]["output_ids"] != runs[2]["output_ids"]
    rc, out, err = cli(capsys, *base_args(qwen3_dir, image_file, "--temperature", 1.5, "--seed", 1))
    assert rc == 0 and out == runs[0]["text"] + "\n"
    rc, out, err = cli(capsys, *base_args(qwen3_dir, image_file, "--json", "--max-pixels", 32 * 32 * 6))
    h, w = smart_resize(300, 200, 32, MIN_PIXELS, 32 * 32 * 6)
    image_id = minivar.checkpoint.read_config(qwen3_dir).image_token_id
    assert rc == 0 and json.loads(out)["prompt_ids"].count(image_id) == h * w // 1024 < 24


@pytest.mark.parametrize("more, words", [(("--max-pixels", 100), ("--max-pixels 100",)),
                                         (("--damro",), ("--damro", "CLS token", "Qwen3-VL")),
                                         (("--conv-mode", "qwen"), ("qwen", "Qwen3-VL"))])
def test_cli_refusals_are_one_line(capsys, qwen3_dir, image_file, more, words):
    rc, out, err = cli(capsys, *base_args(qwen3_dir, image_file, *more))
    assert rc == 2 and out == "" and err.count("\n") == 1 and all(w in err for w in words), err


def test_cli_refuses_an_extreme_image_in_one_line(capsys, qwen3_dir, tmp_path):
    path = tmp_path / "thin.png"
    Image.new("RGB", (600, 2)).save(path)
    rc, out, err = cli(capsys, *base_args(qwen3_dir, path))
    assert rc != 0 and err.count("\n") == 1 and "aspect ratio of 300.0" in err and "Traceback" not in err


def test_cli_an_id_beyond_the_tokenizer_streams_nothing_and_does_not_crash(capsys, tmp_path, image_file):
    def beyond_only(hf, ids):
        hf.lm_head.weight[:max(ids.values()) + 1] = 0.0
    d = make_checkpoint(tmp_path / "beyond", plant=beyond_only)
    for more in ((), ("--json",)):
        rc, out, err = cli(capsys, *base_args(d, image_file, *more))
        assert rc == 0, err
    record = json.loads(out)
    assert len(record["output_ids"]) == 6 and min(record["output_ids"]) >= 280 and record["text"] == ""


# ---------------------------------------------------------------------------------------------------------------
# Batches, shared prefixes, the capture

SIZES = [(90, 60), (40, 260), (300, 300)]         # 6, 8 and 16 (capped) tokens
PROMPTS = ["What is in the image?", "Describe it.", "Is there a dog in the image? Answer the question using a "
           "single word or phrase."]


def test_batch_of_images_of_different_sizes_equals_one_by_one(pipe):
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    assert len({pipe.image(im).num_tokens for im in images}) == 3
    batch = pipe.generate_batch(images, PROMPTS, max_new_tokens=6)
    alone = [pipe.generate(im, p, max_new_tokens=6) for im, p in zip(images, PROMPTS)]
    assert [r.output_ids for r in batch] == [r.output_ids for r in alone]


def test_generate_many_shares_the_prefix_and_equals_one_by_one(pipe):
    img = picture(120, 80, seed=3)
    prompts = ["What is in the image?", "Describe it.", "What is in the image? Describe it."]
    many = pipe.generate_many(img, prompts, max_new_tokens=6)
    alone = [pipe.generate(img, p, max_new_tokens=6) for p in prompts]
    assert [r.output_ids for r in many] == [r.output_ids for r in alone]
    assert many[0].timing["prefix_tokens"] > pipe.image(img).num_tokens


def test_capture_records_the_attention_of_the_image_pad_span(pipe):
    from minivar.methods.var import VARConfig
    img = picture(90, 60)
    cap = pipe.capture(img, "What is in the image?", layers=[0, 2], heads=[0, 3], var=VARConfig(sink_dims=(3, 17),
                                                                                              tau=2.0))
    ids = cap.result.prompt_ids
    T = len(ids)
    assert cap.attention_probs[2]["after"].shape == (1, 2, T, T)
    pads = [j for j, t in enumerate(ids) if t == pipe.config.image_token_id]
    assert cap.result.var["image_span"] == [pads[0], pads[-1] + 1] and len(pads) == pipe.image(img).num_tokens


# ---------------------------------------------------------------------------------------------------------------
# VAR on a planted-sink checkpoint; DAMRO refused; VCD

TEXT_DIM, VISUAL_DIM = 11, 40
TAU = 5.0
SINK_TOKENS = (1, 11)                # merged tokens (row 0, col 1) and (row 2, col 3) of a 3×4 token image


def plant_sinks(hf, ids):
    """Massive values in the decoder's input: <|im_start|>'s embedding (a text sink in both dims) and the image
    tokens whose 32×32 block is bright red. The ViT blocks are the identity (output projections zeroed), its
    learned positions zero, patch dim 0 sums the red channel, and the merger turns a large dim 0 into a massive
    VISUAL_DIM; a red value at 123 marks nothing. The DeepStack mergers stay random: they add their features to the
    image positions after layers 0 and 1, on the residual stream φ is measured on."""
    emb = hf.model.language_model.embed_tokens.weight
    emb[ids["<|im_start|>"], TEXT_DIM] = 100.0
    emb[ids["<|im_start|>"], VISUAL_DIM] = 100.0
    visual = hf.model.visual
    for block in visual.blocks:
        for lin in (block.attn.proj, block.mlp.linear_fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    visual.pos_embed.weight.zero_()
    w = visual.patch_embed.proj.weight                          # [32, 3, 2, 16, 16]
    w[0].zero_()
    w[0, 0] = 0.08                                             # dim 0: ≈ 41 for a bright patch, ≈ −1.4 at 123
    visual.patch_embed.proj.bias[0] = 0.0
    first, last = visual.merger.linear_fc1, visual.merger.linear_fc2
    first.weight[0].zero_()
    first.weight[0, 0] = 1.0
    first.bias[0] = -3.0
    last.weight[:, 0] = 0.0
    last.weight[VISUAL_DIM, 0] = 50.0


def planted_picture(tokens=SINK_TOKENS, seed=0, size=(128, 96)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    w, h = size
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    arr[..., 0] = 123
    for t in tokens:
        r, c = divmod(t, w // 32)
        arr[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32, 0] = 255
    return Image.fromarray(arr.numpy())


@pytest.fixture(scope="module", params=("dense", "moe"))
def planted(request, tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("planted"), request.param, plant=plant_sinks)
    return minivar.load(str(d), device="cpu", dtype="float32")


@pytest.mark.parametrize("rho", [0.8, 0.5])
def test_var_on_planted_sinks_equals_the_rule_written_as_loops(planted, rho):
    """Sinks, visual sinks, selected (head, row) pairs and redistributed probabilities of every layer, from the
    capture of a real run (residual inputs after DeepStack), against test_qwen2_vl_pipeline.var_by_loops."""
    from minivar.methods.var import VARConfig
    var = VARConfig(tau=TAU, rho=rho)
    cap = planted.capture(planted_picture(), "What is in the image?", layers="all", residuals=True, var=var,
                          warn=lambda m: None)
    ids = cap.result.prompt_ids
    image = [j for j, t in enumerate(ids) if t == planted.config.image_token_id]
    im_start = [j for j, t in enumerate(ids) if t == planted.tokenizer.ids["<|im_start|>"]]
    report = cap.result.var
    assert report["sink_dims"] == [TEXT_DIM, VISUAL_DIM] and report["sink_dims_source"] == "finder"
    assert report["image_span"] == [image[0], image[-1] + 1] and len(image) == 12
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


def test_batch_and_generate_many_with_var_equal_one_by_one(planted):
    from minivar.methods.var import VARConfig
    var = VARConfig(sink_dims=(TEXT_DIM, VISUAL_DIM), tau=TAU)
    images = [planted_picture((1, 11)), planted_picture((0,), size=(96, 64)), planted_picture((3, 7), size=(64, 160))]
    batch = planted.generate_batch(images, PROMPTS, max_new_tokens=5, var=var)
    alone = [planted.generate(im, p, max_new_tokens=5, var=var) for im, p in zip(images, PROMPTS)]
    assert [r.output_ids for r in batch] == [r.output_ids for r in alone]
    assert [r.var["redistributed"] for r in batch] == [r.var["redistributed"] for r in alone]
    assert sum(alone[0].var["redistributed"]["prefill"]) > 0
    many = planted.generate_many(images[0], PROMPTS[:2], max_new_tokens=5, var=var)
    assert [r.output_ids for r in many] == [r.output_ids for r in [alone[0], planted.generate(
        images[0], PROMPTS[1], max_new_tokens=5, var=var)]]


def test_damro_is_refused_by_the_api_in_one_line(pipe):
    from minivar.methods.damro import DAMRO
    with pytest.raises(MinivarError, match="--damro: DAMRO needs a vision encoder with a CLS token") as e:
        pipe.generate(picture(90, 60), "What is in the image?", methods=[DAMRO()], max_new_tokens=2)
    assert "\n" not in str(e.value) and pipe.family.name in str(e.value)


@pytest.mark.parametrize("seed, temperature", [(None, 0.0), (7, 1.0)])
def test_vcd_equals_the_two_pass_reference(pipe, seed, temperature):
    from test_qwen2_vl_pipeline import vcd_two_pass
    from minivar.methods.vcd import VCD, VCDConfig
    cfg = VCDConfig(alpha=3.0, beta=0.05)
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:2])]
    kw = dict(max_new_tokens=6, temperature=temperature, seed=seed)
    if temperature == 0.0:
        batch = pipe.generate_batch(images, PROMPTS[:2], methods=[VCD(cfg, seed=seed)], **kw)
        assert [r.output_ids for r in batch] == [vcd_two_pass(pipe, im, p, cfg, seed, 6)
                                                  for im, p in zip(images, PROMPTS[:2])]
        many = pipe.generate_many(images[0], PROMPTS[:2], methods=[VCD(cfg, seed=seed)], **kw)
        assert many[0].output_ids == batch[0].output_ids
    one = pipe.generate(images[0], PROMPTS[0], methods=[VCD(cfg, seed=seed)], **kw)
    assert one.output_ids == vcd_two_pass(pipe, images[0], PROMPTS[0], cfg, seed, 6, temperature)


def test_cli_pictures_draw_the_merged_grid(capsys, planted, tmp_path):
    from minivar import viz
    img = tmp_path / "planted.png"
    planted_picture((3, 7), size=(64, 160)).save(img)
    pics = tmp_path / "pics"
    rc, out, err = cli(capsys, "--model", planted.directory, "--image", img, "--prompt", "What is in the image?",
                       "--device", "cpu", "--dtype", "float32", "--max-new-tokens", 3, "--var", "--tau", TAU,
                       "--sink-dims", "11,40", "--save-attention", pics)
    assert rc == 0, err
    numbers, views = viz.load_numbers(pics / "attention.json")
    assert [(p["rows"], p["cols"]) for p in numbers["panels"]] == [(5, 2)] and [v.size for v in views] == [(64, 160)]
    assert numbers["visual_sinks"] == {str(layer): [3, 7] for layer in range(3)}
    assert (pics / "explorer.html").is_file()                                   # the explorer page too


# ---------------------------------------------------------------------------------------------------------------
# minivar-eval and the lmms-eval plugin

@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    from test_reproduce import make_root
    return make_root(tmp_path_factory.mktemp("evaldata"))


def test_eval_run_uses_the_checkpoints_template(pipe, eval_root, tmp_path):
    from test_eval_harness import answers, cli as eval_cli
    out = tmp_path / "pope"
    rc, stdout, err = eval_cli(["run", "pope", "--data", eval_root / "pope", "--images", eval_root / "coco/val2014",
                                "--out", out, "--model", pipe.directory, "--device", "cpu", "--dtype", "float32",
                                "--max-new-tokens", "3", "--limit", "3", "--json"])
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["conv_mode"] == "qwen3" and run["image_aspect_ratio"] == "smart_resize"
    from minivar.eval.benchmarks import get
    questions = {q.question_id: q for q in get("pope").read([eval_root / "pope"], images=eval_root / "coco/val2014")}
    rec = answers(out / "answers.jsonl")[0]
    ref = pipe.generate(questions[rec["question_id"]].load_image(), rec["prompt"], max_new_tokens=3)
    assert rec["output_ids"] == ref.output_ids


def test_plugin_generate_until_and_loglikelihood(qwen3_dir):
    pytest.importorskip("lmms_eval")
    from minivar.lmms_plugin import Minivar
    lmm = Minivar(pretrained=str(qwen3_dir), device="cpu", dtype="float32", batch_size=2)
    assert (lmm.conv_mode, lmm.image_aspect_ratio) == ("qwen3", "smart_resize")
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:2])]
    lmm.task_dict = {"t": {"test": list(range(2))}}
    out = lmm.generate_until(instances("generate_until", [
        (p, (lambda d, im=im: [im]), {"max_new_tokens": 4, "do_sample": False}) for p, im in zip(PROMPTS, images)]))
    assert [o.text for o in out] == [lmm.pipeline.generate(im, p, max_new_tokens=4).text.strip()
                                     for p, im in zip(PROMPTS, images)]
    q, c = "Is there a dog in the image?", "Yes"
    (loss, greedy), = [r.text for r in lmm.loglikelihood(instances("loglikelihood", [(q, (lambda d: [images[0]]), c)]))]
    n = lmm.pipeline.image(images[0]).num_tokens
    prompt, cont = lmm.encode_pair(q, c, n)
    assert prompt == lmm.pipeline.tokenizer.encode_prompt(q, "qwen3", n)
    logits = lmm.pipeline.logits(torch.tensor([prompt + cont]), [lmm.pipeline.image(images[0])])[0]
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    assert loss == pytest.approx(-logp[range(len(cont)), cont].sum().item(), abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The offline demos

def test_demo_builds_loads_and_the_finder_finds_its_planted_sinks(tmp_path, model_type="qwen3_vl_moe"):
    """The MoE demo (models/qwen3_vl/demo.py; the dense one differs only in its MLPs): built, loaded, the finder finds the planted dims, the two near-white
    blocks of the picture are the visual sinks of every layer, and VAR redistributes attention."""
    from minivar.methods.var import VARConfig
    from minivar.models.qwen3_vl.demo import SINK_DIMS, build_demo
    from minivar.models.registry import family_for
    pipe = minivar.load(str(build_demo(tmp_path / model_type, family_for(model_type))), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    arr = torch.randint(90, 160, (128, 192, 3), generator=g, dtype=torch.uint8)
    for r, c in [(0, 2), (3, 4)]:
        arr[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = 250
    notes = []
    res = pipe.generate(Image.fromarray(arr.numpy()), "What is in the image?", max_new_tokens=3, var=VARConfig(),
                        warn=notes.append)
    start = res.var["image_span"][0]
    assert res.var["sink_dims"] == list(SINK_DIMS) and "finder found dims [37, 301]" in notes[0]
    assert all(v == [start + 2, start + 3 * 6 + 4] for v in res.var["visual_sinks"].values())
    assert sum(res.var["redistributed"]["prefill"]) > 0


def test_reproduce_var_runs_base_and_var_with_the_checkpoints_template(planted, eval_root, tmp_path):
    from test_reproduce import args_for
    from test_eval_harness import cli as eval_cli
    out = tmp_path / "runs"
    rc, stdout, err = eval_cli(args_for(eval_root, out, planted.directory, "--benchmarks", "pope", "--limit", "2",
                                        "--json"))
    assert rc == 0, err
    runs = sorted(p.parent.name for p in out.rglob("run.json"))
    assert len(runs) == 2 and any("var" in r for r in runs)
    for p in out.rglob("run.json"):
        assert json.loads(p.read_text())["conv_mode"] == "qwen3"
