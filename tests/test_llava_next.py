"""LLaVA-NeXT (v1.6) against transformers' own LlavaNextForConditionalGeneration / LlavaNextImageProcessorPil /
LlavaNextProcessor, on tiny random checkpoints made here: CLIP at 56 px / 14-px patches (P = 4), the default
pinpoints scaled by 56/336, a 2-layer LLaMA or Mistral decoder. Images of every shape class select every pinpoint
and hit the unpadding's rounding and odd-leftover cases."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from conftest import find_llama_tokenizer  # noqa: E402
from minivar.errors import MinivarError  # noqa: E402
from minivar.methods.hooks import Hook  # noqa: E402
from minivar.checkpoint import normalise_key, read_config  # noqa: E402
from minivar.models.anyres import process_image  # noqa: E402
from minivar.models.images import ImageInput, token_layout  # noqa: E402
from minivar.models.llava_next import (KEY_RULES, LlavaNextConfig, is_unused_key,  # noqa: E402
                                       select_best_resolution, unpadded_span)

S, PATCH = 56, 14
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]   # llava-hf's defaults × 56/336
IMAGE_ID, VOCAB = 290, 300


def picture(w, h, mode="RGB", seed=0):
    """A w×h image with structure (gradients) and noise, so resampling and tiling errors show."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 60 * np.sin(x / 3 + y / 5)], -1)
    rgb = np.clip(base + g.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        alpha = np.clip(255 * (x + y) / (w + h) + g.normal(0, 30, (h, w)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA")
    if mode == "P":    # a palette image with a transparent entry
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = 3
        return img
    return img


IMAGES = {   # name: (w, h, mode); the comment says which pinpoint (h, w) it selects and what it exercises
    "wide": (150, 70, "RGB"),           # (56, 168), unpadded rows 4 of 4, cols 8 of 12
    "tall": (60, 130, "RGB"),           # (168, 56)
    "square": (120, 120, "RGB"),        # (112, 112), no padding
    "tiny": (9, 7, "RGB"),              # (56, 112): upscaled
    "extreme": (4000, 10, "RGB"),       # (56, 112): the tiles unpad to zero rows, only the base remains
    "extreme_scaled": (667, 2, "RGB"),  # 4000×10 scaled to the tiny model's size
    "narrow": (33, 100, "RGB"),         # (112, 56)
    "gray": (90, 50, "L"),
    "rgba": (70, 100, "RGBA"),          # composited on white, as transformers does
    "palette_transparency": (62, 64, "P"),  # (112, 112), odd leftover: one padding column kept
    "rounding": (47, 188, "RGB"),       # (168, 56): 47·(12/188) = 2.9999999999999996, round(·, 7) makes it 3
    "rounding_wide": (188, 47, "RGB"),  # (56, 168): the same across (int() would keep one column pair more)
    "odd_wide": (118, 31, "RGB"),       # (56, 168), odd leftover
}


def image(name):
    w, h, mode = IMAGES[name]
    return picture(w, h, mode, seed=sum(map(ord, name)))


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=PINPOINTS)


def hf_config(text="llama"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig as HFConfig, MistralConfig
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=S, patch_size=PATCH)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2)
    if text == "llama":
        text_config = LlamaConfig(intermediate_size=128, **common)
    else:   # grouped-query attention, Mistral's own defaults otherwise (sliding_window 4096)
        text_config = MistralConfig(intermediate_size=96, num_key_value_heads=2, **common)
    return HFConfig(vision_config=vision, text_config=text_config, image_grid_pinpoints=PINPOINTS,
                    image_token_index=IMAGE_ID)


def make_reference(text="llama", seed=0):
    from transformers import LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    ref = LlavaNextForConditionalGeneration(hf_config(text)).eval()
    with torch.no_grad():                                  # non-trivial norms and biases
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return ref


def to_hub(key):
    """5.x save_pretrained names → llava-hf's hub names (CLIP's inner vision_model. back in)."""
    return "vision_tower.vision_model." + key[len("vision_tower."):] if key.startswith("vision_tower.") else key


def save(ref, directory, layout="save", dtype=None, shard=None, processor=None):
    """A checkpoint dir in one key layout: 5.x save_pretrained ("save"), llava-hf hub ("hub"), or the 5.x module
    names ("memory"); with preprocessor_config.json when `processor` is given."""
    from safetensors.torch import load_file, save_file
    model = ref.to(dtype) if dtype is not None else ref
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    if processor is not None:
        processor.save_pretrained(directory)
    if layout != "save":
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()} if layout == "memory" else \
            {to_hub(k): v for k, v in load_file(str(directory / "model.safetensors")).items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    ref.to(torch.float32)
    return directory


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, hf_processor):
    """(transformers' model, ours) from one hub-layout fp32 checkpoint with preprocessor_config.json."""
    ref = make_reference("llama")
    d = save(ref, tmp_path_factory.mktemp("next_hub"), "hub", processor=hf_processor)
    return ref, load_llava_next(d), d


@pytest.fixture(scope="module")
def mistral_pair(tmp_path_factory, hf_processor):
    ref = make_reference("mistral", seed=1)
    d = save(ref, tmp_path_factory.mktemp("next_mistral"), "save", processor=hf_processor)
    return ref, load_llava_next(d), d


def prompt_ids(n_image, seed=0, before=4, after=6):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([1]), torch.randint(3, 280, (before,), generator=g),
                      torch.full((n_image,), IMAGE_ID), torch.randint(3, 280, (after,), generator=g)])


def greedy(model, ids, images, n, attention_mask=None):
    """Our greedy loop on the KV cache: prefill with the images, then one token per call (output="last")."""
    B, T = ids.shape
    cache = model.new_cache(B, T + n, torch.float32, "cpu")
    with torch.inference_mode():
        logits = model(ids, images, cache=cache, attention_mask=attention_mask, output="last")
        out = []
        for s in range(n):
            nxt = logits.argmax(-1)
            out.append(nxt)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones(B, 1, dtype=attention_mask.dtype)], 1)
            logits = model(nxt[:, None], cache=cache, input_pos=T + s, attention_mask=attention_mask, output="last")
    return torch.stack(out, 1).tolist()


def hf_inputs(hf_processor, img):
    out = hf_processor(images=img, return_tensors="pt")
    return out["pixel_values"], out["image_sizes"]


# ---------------------------------------------------------------------------------------------------------------
# Images: pixels, pinpoints, token counts

def test_the_images_exercise_every_pinpoint_and_the_unpadding_cases(llama_pair):
    cfg = llama_pair[1].config
    chosen, odd, rounded, empty = set(), 0, 0, 0
    for name, (w, h, _) in IMAGES.items():
        best = select_best_resolution((h, w), cfg.image_grid_pinpoints)
        chosen.add(best)
        gh, gw = best[0] // S * 4, best[1] // S * 4
        rows, cols = unpadded_span((h, w), gh, gw)
        raw = h * (gw / w) if w / h > gw / gh else w * (gh / h)   # the image's height (or width) in the grid
        kept = rows.stop - rows.start if w / h > gw / gh else cols.stop - cols.start
        odd += kept == int(round(raw, 7)) + 1                     # an odd leftover keeps one padding row/column
        g = gh if w / h > gw / gh else gw                         # rounding that changes what is cut:
        rounded += (g - int(raw)) // 2 != (g - int(round(raw, 7))) // 2
        empty += rows.stop == rows.start
    assert chosen == {tuple(p) for p in PINPOINTS}
    assert odd >= 2 and rounded >= 2 and empty >= 1


@pytest.mark.parametrize("name", list(IMAGES))
def test_pixel_tiles_equal_transformers(llama_pair, hf_processor, name):
    img = image(name)
    got = process_image(img, llama_pair[1].config)
    px, sizes = hf_inputs(hf_processor, img)
    assert got.meta["image_size"] == tuple(sizes[0].tolist()) == (img.height, img.width)
    assert got.pixel_values.dtype == torch.float32
    assert torch.equal(got.pixel_values, px[0])           # bit-identical, base first, tiles row by row
    gh, gw = (x // S for x in select_best_resolution((img.height, img.width), PINPOINTS))
    assert got.pixel_values.shape == (1 + gh * gw, 3, S, S)


def processor_with_tokenizer(hf_processor):
    path, why = find_llama_tokenizer()
    if path is None:
        pytest.skip(f"needs the LLaMA tokenizer: {why}")
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return LlavaNextProcessor(image_processor=hf_processor, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1), path


@pytest.mark.parametrize("conv_mode", ["vicuna_v1", "llava_hf", "mistral_instruct"])
def test_prompt_ids_and_token_counts_equal_the_processor(llama_pair, hf_processor, conv_mode):
    """LlavaNextProcessor's <image> expansion and ids equal ours for every image; the model packs that many rows."""
    from minivar.processing import Tokenizer, build_prompt
    processor, path = processor_with_tokenizer(hf_processor)
    ours = Tokenizer(path, image_token_id=32000)
    model = llama_pair[1]
    text = "What is in this image, and why?"
    for name in IMAGES:
        img = image(name)
        inp = process_image(img, model.config)
        expected = processor(images=img, text=build_prompt(text, conv_mode), return_tensors="pt")["input_ids"][0]
        assert int((expected == 32000).sum()) == inp.num_tokens, name
        assert ours.encode_prompt(text, conv_mode, num_image_tokens=inp.num_tokens) == expected.tolist(), name
        with torch.inference_mode():
            assert model.image_features([inp])[0].shape == (inp.num_tokens, 64), name


def test_panels_give_the_token_layout(llama_pair):
    cfg = llama_pair[1].config
    for name in ("wide", "tall", "extreme", "palette_transparency"):
        inp = process_image(image(name), cfg)
        base, tiles = inp.panels
        assert (base.name, base.rows, base.cols, base.newline, tiles.name, tiles.newline) == \
            ("base", 4, 4, False, "tiles", True)
        assert inp.num_tokens == 16 + tiles.rows * (tiles.cols + 1) == len(token_layout(inp.panels))
    wide = process_image(image("wide"), cfg).panels[1]
    assert (wide.rows, wide.cols) == (4, 8)
    layout = token_layout(process_image(image("wide"), cfg).panels)
    assert layout[16:26] == [(1, 0, c) for c in range(8)] + [None, (1, 1, 0)]   # a newline closes each row
    extreme = process_image(image("extreme"), cfg).panels[1]
    assert (extreme.rows, extreme.cols) == (0, 8)


def test_packed_features_equal_transformers(llama_pair, hf_processor):
    ref, model, _ = llama_pair
    names = ["wide", "tall", "extreme", "rounding", "rounding_wide", "palette_transparency"]
    imgs = [image(n) for n in names]
    inputs = [process_image(img, model.config) for img in imgs]
    with torch.inference_mode():
        ours = model.image_features(inputs)
        for img, got in zip(imgs, ours):
            px, sizes = hf_inputs(hf_processor, img)
            expected = ref.model.get_image_features(px, sizes).pooler_output[0]
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# The model: logits and greedy tokens

def assert_parity(ref, model, hf_processor, names, n_new=8, seed=0):
    for i, name in enumerate(names):
        img = image(name)
        inp = process_image(img, model.config)
        ids = prompt_ids(inp.num_tokens, seed=seed + i)[None]
        px, sizes = hf_inputs(hf_processor, img)
        with torch.inference_mode():
            expected = ref(input_ids=ids, pixel_values=px, image_sizes=sizes).logits
            got = model(ids, [inp])
        assert (got - expected).abs().max().item() <= 1e-4, name
        # no EOS on either side (min_new_tokens would instead forbid EOS, which our loop does not)
        ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 0
        hf_tokens = ref.generate(input_ids=ids, pixel_values=px, image_sizes=sizes, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=n_new)[0, ids.shape[1]:]
        assert len(hf_tokens) == n_new
        assert greedy(model, ids, [inp], n_new)[0] == hf_tokens.tolist(), name


@pytest.mark.parametrize("name", list(IMAGES))
def test_logits_and_greedy_tokens_equal_transformers(llama_pair, hf_processor, name):
    ref, model, _ = llama_pair
    assert_parity(ref, model, hf_processor, [name])


def test_mistral_decoder_equals_transformers(mistral_pair, hf_processor):
    ref, model, d = mistral_pair
    cfg = model.config
    assert (cfg.text_model_type, cfg.sliding_window, cfg.text.n_kv_heads) == ("mistral", 4096, 2)
    assert (cfg.default_conv_mode, real_config("llama").default_conv_mode) == ("mistral_instruct", "vicuna_v1")
    assert_parity(ref, model, hf_processor, ["wide", "tall", "square", "extreme", "rgba"])


@pytest.mark.parametrize("layout,dtype,shard", [("save", None, None), ("memory", None, None), ("hub", None, "40KB"),
                                                ("save", torch.float16, "40KB"), ("memory", torch.float16, None)])
def test_every_layout_loads_the_same_model(tmp_path, llama_pair, hf_processor, layout, dtype, shard):
    from transformers import LlavaNextForConditionalGeneration
    ref = make_reference("llama")
    d = save(ref, tmp_path / "ckpt", "save" if shard and layout == "hub" else layout, dtype=dtype, shard=shard,
             processor=hf_processor)
    if layout == "hub" and shard:                           # a sharded hub layout: rename inside every shard
        from safetensors.torch import load_file, save_file
        index = json.loads((d / "model.safetensors.index.json").read_text())
        for shard_file in set(index["weight_map"].values()):
            save_file({to_hub(k): v for k, v in load_file(str(d / shard_file)).items()}, str(d / shard_file),
                      metadata={"format": "pt"})
        index["weight_map"] = {to_hub(k): v for k, v in index["weight_map"].items()}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    mine = load_llava_next(d)
    if dtype is None:                                       # the same numbers as the reference's own
        for k, v in mine.state_dict().items():
            assert torch.equal(v, llama_pair[1].state_dict()[k]), k
    else:
        ref = LlavaNextForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
        assert_parity(ref, mine, hf_processor, ["wide", "tiny"], n_new=6)


def test_key_rules_map_every_layout():
    for minivar_name, names in {
        "image_newline": ["image_newline", "model.image_newline"],
        "vision_tower.encoder.layers.0.mlp.fc1.weight": ["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                                                         "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                                                         "vision_tower.encoder.layers.0.mlp.fc1.weight"],
        "language_model.lm_head.weight": ["lm_head.weight", "language_model.lm_head.weight"],
        "language_model.model.norm.weight": ["model.language_model.norm.weight", "language_model.model.norm.weight"],
        "multi_modal_projector.linear_1.bias": ["model.multi_modal_projector.linear_1.bias"],
    }.items():
        assert {normalise_key(n, KEY_RULES) for n in names} == {minivar_name}


def test_batch_of_different_token_counts_equals_one_by_one(llama_pair):
    """Left padding: three prompts of different lengths, images of different token counts, in one batch."""
    model = llama_pair[1]
    inputs = [process_image(image(n), model.config) for n in ("wide", "extreme", "square")]
    assert len({i.num_tokens for i in inputs}) == 3
    prompts = [prompt_ids(inp.num_tokens, seed=10 + i, before=2 + 3 * i, after=5 - i) for i, inp in enumerate(inputs)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    batched = greedy(model, ids, inputs, 8, attention_mask=mask)
    alone = [greedy(model, p[None], [inp], 8)[0] for p, inp in zip(prompts, inputs)]
    assert batched == alone
    assert len({tuple(a) for a in alone}) > 1


def test_batch_equals_transformers_batch(llama_pair, hf_processor):
    """transformers' own left-padded batch of two images with different tile counts gives our logits."""
    ref, model, _ = llama_pair
    imgs = [image("wide"), image("square")]
    inputs = [process_image(img, model.config) for img in imgs]
    prompts = [prompt_ids(inp.num_tokens, seed=20 + i) for i, inp in enumerate(inputs)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    out = hf_processor(images=imgs, return_tensors="pt")       # pixel_values padded to the most tiles
    with torch.inference_mode():
        expected = ref(input_ids=ids, pixel_values=out["pixel_values"], image_sizes=out["image_sizes"],
                       attention_mask=mask).logits
        got = model(ids, inputs, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The interface: output modes, chunks, hooks, positions

def test_output_modes_chunks_and_explicit_positions(llama_pair):
    model = llama_pair[1]
    inp = process_image(image("tall"), model.config)
    ids = prompt_ids(inp.num_tokens)[None]
    with torch.inference_mode():
        full = model(ids, [inp])
        last = model(ids, [inp], output="last")            # lm_head of one row: the same up to rounding
        assert last.shape == (1, VOCAB) and (last - full[:, -1]).abs().max().item() <= 1e-5
        hidden = model(ids, [inp], output="hidden")
        assert hidden.shape == (1, ids.shape[1], 64)
        explicit = model(ids, [inp], positions=torch.arange(ids.shape[1])[None])
        assert torch.equal(explicit, full)
        # a prompt in two chunks, the split inside the image: each call gets the feature rows of its own tokens
        rows = model.image_features([inp])[0]
        split = 5 + inp.num_tokens // 2
        cache = model.new_cache(1, ids.shape[1], torch.float32, "cpu")
        a = model(ids[:, :split], image_features=rows[:split - 5], cache=cache)
        b = model(ids[:, split:], image_features=rows[split - 5:], cache=cache, input_pos=split)
        with pytest.raises(ValueError, match="output"):
            model(ids, [inp], output="probs")
    assert (torch.cat([a, b], 1) - full).abs().max().item() <= 1e-5


class Recorder(Hook):
    """Asks for every row's probabilities (the written-out attention) and records the residuals it is shown."""

    def __init__(self):
        self.residual_rows, self.prob_rows = [], []

    def residual(self, layer, h, rows):
        self.residual_rows.append((layer, rows.start, rows.stop, h.shape[1]))

    def explicit_from(self, layer, rows):
        return rows.start

    def probs(self, layer, probs, rows, before):
        self.prob_rows.append((layer, rows.start, rows.stop, probs.shape[-1]))
        return probs


def test_hooks_reach_the_decoder(llama_pair):
    model = llama_pair[1]
    inp = process_image(image("wide"), model.config)
    ids = prompt_ids(inp.num_tokens)[None]
    hook = Recorder()
    with torch.inference_mode():
        plain = model(ids, [inp])
        hooked = model(ids, [inp], hooks=hook)
    T = ids.shape[1]
    assert hook.residual_rows == [(layer, 0, T, T) for layer in range(2)]
    assert hook.prob_rows == [(layer, 0, T, T) for layer in range(2)]
    assert (hooked - plain).abs().max().item() <= 1e-5


def test_mistral_sliding_window_is_refused_past_it(mistral_pair):
    import dataclasses
    model = mistral_pair[1]
    small = dataclasses.replace(model.config, sliding_window=8)
    model.config = small
    try:
        with pytest.raises(MinivarError, match="sliding_window of 8"):
            model(torch.ones(1, 9, dtype=torch.long))
        assert model(torch.ones(1, 8, dtype=torch.long)).shape == (1, 8, VOCAB)
    finally:
        model.config = dataclasses.replace(small, sliding_window=4096)


def test_image_rows_must_match_the_image_tokens(llama_pair):
    model = llama_pair[1]
    inp = process_image(image("square"), model.config)
    ids = prompt_ids(inp.num_tokens - 1)[None]
    with pytest.raises(MinivarError, match="image tokens"):
        model(ids, [inp])
    wrong = ImageInput(inp.pixel_values[:3], inp.num_tokens, inp.panels, inp.meta)
    with pytest.raises(MinivarError, match="needs 1 \\+ 2×2 crops"):
        model.image_features([wrong])


# ---------------------------------------------------------------------------------------------------------------
# Bad checkpoints and configs: one clear line each

def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_json(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def test_checkpoint_without_image_newline(tmp_path, llama_pair):
    from safetensors.torch import load_file, save_file
    d = copy_checkpoint(llama_pair[2], tmp_path / "c")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["image_newline"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MinivarError) as e:
        load_llava_next(d)
    assert "image_newline" in one_line(e) and str(d) in str(e.value)


@pytest.mark.parametrize("pinpoints,match", [
    (None, "no image_grid_pinpoints"), ([], "malformed"), ([[56]], "malformed"), ([[50, 112]], "multiples of 56"),
    ("[[56, 112]]", "malformed"), ([[56, 112.0]], "malformed"), ([[0, 56]], "malformed")])
def test_pinpoints_missing_or_malformed(tmp_path, llama_pair, pinpoints, match):
    d = copy_checkpoint(llama_pair[2], tmp_path / "c")
    (d / "preprocessor_config.json").unlink()
    edit_json(d / "config.json", lambda c: c.pop("image_grid_pinpoints") if pinpoints is None
              else c.update(image_grid_pinpoints=pinpoints))
    with pytest.raises(MinivarError, match=match) as e:
        read_config(d)
    one_line(e)


def test_pinpoints_come_from_the_preprocessor_config_when_the_config_lacks_them(tmp_path, llama_pair):
    d = copy_checkpoint(llama_pair[2], tmp_path / "c")
    edit_json(d / "config.json", lambda c: c.pop("image_grid_pinpoints"))
    assert read_config(d).image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
    edit_json(d / "preprocessor_config.json", lambda c: c.update(image_grid_pinpoints=[[56, 112]]))
    edit_json(d / "config.json", lambda c: c.update(image_grid_pinpoints=PINPOINTS))
    with pytest.raises(MinivarError, match="differ") as e:
        read_config(d)
    one_line(e)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(use_image_newline_parameter=False), "use_image_newline_parameter"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
    (lambda c: c["text_config"].update(model_type="gemma"), "model_type 'gemma'"),
    (lambda c: c.update(model_type="llava_nxt"), "'llava_nxt', minivar reads"),
    (lambda c: c["text_config"].update(model_type="mistral", sliding_window=0), "sliding_window"),
])
def test_bad_configs(tmp_path, llama_pair, change, match):
    d = copy_checkpoint(llama_pair[2], tmp_path / "c")
    edit_json(d / "config.json", change)
    with pytest.raises(MinivarError, match=match) as e:
        read_config(d)
    one_line(e)


@pytest.mark.parametrize("change,match", [
    (lambda p: p.update(size={"shortest_edge": 336}), "size"),
    (lambda p: p.update(resample=2), "resample"),
    (lambda p: p.update(image_mean=[0.5, 0.5]), "image_mean"),
    (lambda p: p.update(do_normalize=False), "do_normalize"),
])
def test_bad_preprocessor_configs(tmp_path, llama_pair, change, match):
    d = copy_checkpoint(llama_pair[2], tmp_path / "c")
    edit_json(d / "preprocessor_config.json", change)
    with pytest.raises(MinivarError, match=match) as e:
        read_config(d)
    assert "preprocessor_config.json" in one_line(e)


def test_config_reads_what_transformers_wrote(llama_pair, mistral_pair):
    cfg = llama_pair[1].config
    assert isinstance(cfg, LlavaNextConfig)
    with pytest.raises(MinivarError, match="expected 'llava_next'"):
        LlavaNextConfig.from_hf({"model_type": "llava"})
    assert (cfg.vision.image_size, cfg.patches_per_side, cfg.image_token_index) == (S, 4, IMAGE_ID)
    assert (cfg.text_model_type, cfg.sliding_window, cfg.text.rms_norm_eps) == ("llama", None, 1e-5)
    assert cfg.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
    with pytest.raises(MinivarError, match="depends on its size"):
        cfg.num_image_tokens
    # llava-hf's mistral config.json leaves out what MistralConfig defaults: 14336, 8 kv heads, window 4096
    d = {"model_type": "llava_next", "image_grid_pinpoints": [[336, 672]],
         "text_config": {"model_type": "mistral", "vocab_size": 32064}}
    m = LlavaNextConfig.from_hf(d)
    assert (m.text.intermediate_size, m.text.n_kv_heads, m.sliding_window, m.vision.image_size) == (14336, 8, 4096, 336)


def test_config_of_llava_hf_4x_layout():
    """The 4.x layout llava-hf's v1.6 files use (rope_theta in text_config, pad_token_id there, sliding_window null)."""
    d = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
         "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
         "image_token_index": 32000, "use_image_newline_parameter": True, "vision_feature_layer": -2,
         "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu", "torch_dtype": "float16",
         "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                           "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                           "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
         "text_config": {"model_type": "mistral", "intermediate_size": 14336, "max_position_embeddings": 32768,
                         "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                         "sliding_window": None, "vocab_size": 32064, "pad_token_id": 0}}
    cfg = LlavaNextConfig.from_hf(d, "llava-v1.6-mistral-7b-hf")
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, t.n_kv_heads, t.head_dim, t.rope_theta, t.vocab_size) == \
        (4096, 32, 8, 128, 1e6, 32064)
    assert (cfg.sliding_window, cfg.pad_token_id, cfg.image_token_index, cfg.vision_layers_used) == (None, 0, 32000, 23)
    vicuna = d | {"text_config": {"model_type": "llama", "max_position_embeddings": 4096, "pad_token_id": 0,
                                  "rms_norm_eps": 1e-05, "vocab_size": 32064}}
    v = LlavaNextConfig.from_hf(vicuna).text
    assert (v.intermediate_size, v.n_kv_heads, v.rope_theta, v.rms_norm_eps) == (11008, 32, 10000.0, 1e-5)


@pytest.mark.parametrize("pair", ["llama_pair", "mistral_pair"])
def test_to_hf_round_trips_and_transformers_reads_it(tmp_path, request, hf_processor, pair):
    from transformers import LlavaNextForConditionalGeneration
    ref, model, d = request.getfixturevalue(pair)
    cfg = model.config
    c = copy_checkpoint(d, tmp_path / "c")
    (c / "config.json").write_text(json.dumps(cfg.to_hf()))
    (c / "preprocessor_config.json").write_text(json.dumps(cfg.to_hf_preprocessor()))
    again = read_config(c)
    assert dataclasses_equal(again, cfg)
    theirs = LlavaNextForConditionalGeneration.from_pretrained(c, dtype=torch.float32).eval()
    assert_parity(theirs, model, hf_processor, ["tall"], n_new=4)


def dataclasses_equal(a, b):
    import dataclasses
    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a) if f.name != "name_or_path")


REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def real_config(text="llama"):
    d = {"model_type": "llava_next", "image_grid_pinpoints": REAL_PINPOINTS,
         "text_config": {"model_type": text, "vocab_size": 32064, "pad_token_id": 0}}
    return LlavaNextConfig.from_hf(d, f"llava-v1.6-{text}")


@pytest.mark.parametrize("text", ["llama", "mistral"])
def test_real_size_parameters_equal_transformers(text):
    """The 7B variants' every parameter name and shape (on the meta device: no weights), after the key rules."""
    from transformers import LlavaNextConfig as HFConfig, LlavaNextForConditionalGeneration
    from minivar.models.llava_next import LlavaNext
    cfg = real_config(text)
    with torch.device("meta"):
        theirs = LlavaNextForConditionalGeneration(HFConfig(**cfg.to_hf()))
        ours = LlavaNext(cfg)
    expected = {normalise_key(k, KEY_RULES): tuple(v.shape) for k, v in theirs.state_dict().items()}
    expected = {k: v for k, v in expected.items() if not is_unused_key(k, cfg)}
    assert expected == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(expected) > 500


def test_real_size_token_counts_equal_the_processor():
    """At 336 px with llava-hf's pinpoints: LlavaNextProcessor's count for many sizes (2,928 for 672×672)."""
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from minivar.models.llava_next import count_image_tokens
    path, why = find_llama_tokenizer()
    if path is None:
        pytest.skip(f"needs the LLaMA tokenizer: {why}")
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                 image_grid_pinpoints=REAL_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor,
                                   tokenizer=PreTrainedTokenizerFast(tokenizer_file=str(path)), patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    g = np.random.default_rng(0)
    sizes = [(672, 672), (480, 640), (640, 480), (336, 1344), (1344, 336), (10, 4000), (336, 336), (7, 9)]
    sizes += [tuple(int(x) for x in g.integers(2, 3000, 2)) for _ in range(300)]
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    cfg = real_config()
    assert [count_image_tokens(s, cfg) for s in sizes] == expected
    assert expected[0] == 2928


@pytest.mark.parametrize("w,h,mode", [(500, 375, "RGB"), (375, 900, "RGBA"), (1600, 90, "L")])
def test_real_size_pixels_equal_transformers(w, h, mode):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                 image_grid_pinpoints=REAL_PINPOINTS)
    img = picture(w, h, mode, seed=w)
    got = process_image(img, real_config())
    assert torch.equal(got.pixel_values, image_processor(images=img, return_tensors="pt")["pixel_values"][0])


def test_the_registry_finds_the_family(llama_pair, tiny_checkpoint):
    from minivar.checkpoint import load_model
    from minivar.models.llava_next import LlavaNext
    from minivar.models.registry import family_for, family_of
    ref, model, d = llama_pair
    family = family_of(model.config)
    assert family is family_for("llava_next") and family.name == "LLaVA-NeXT"
    assert isinstance(load_model(d), LlavaNext)                      # checkpoint.py's loader, by config.json
    inp = family.images(image("tall"), model.config, "anyres")
    assert torch.equal(inp.pixel_values, process_image(image("tall"), model.config).pixel_values)
    with pytest.raises(MinivarError, match="anyres") as e:
        family.images(image("tall"), model.config, "pad")
    one_line(e)
    with pytest.raises(MinivarError, match="not LLaVA-NeXT") as e:
        load_llava_next(tiny_checkpoint)                            # a LLaVA-1.5 checkpoint
    one_line(e)


def load_llava_next(directory, dtype=torch.float32, device="cpu"):
    """The loader, refusing any other family's checkpoint."""
    from minivar.checkpoint import load_model
    return load_model(directory, dtype, device, expect="llava_next")
