"""InternVL3 / InternVL3.5 (transformers' `internvl`): InternViT, pixel shuffle, projector, the Qwen2 and Qwen3
decoders, the tiling, the chat template and tokenizer — against transformers' own classes
(InternVLForConditionalGeneration, GotOcr2ImageProcessorPil, InternVLProcessor) on tiny random checkpoints and a
small byte-level BPE made here at test time. Nothing is downloaded."""
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from test_qwen2_vl_model import QWEN_SPLIT  # noqa: E402

from minivar.checkpoint import load_model, read_config  # noqa: E402
from minivar.errors import MinivarError  # noqa: E402
from minivar.generate import generate, new_cache, prefill  # noqa: E402
from minivar.models.images import ImageInput  # noqa: E402
from minivar.models.internvl.processing import TileConfig, grid_for, preprocess_image  # noqa: E402
from minivar.models.internvl.template import CHAT_TEMPLATE, InternVLTokenizer  # noqa: E402

KINDS = ("qwen2", "qwen3")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
IMAGE, START, END, PAD = 290, 291, 292, 293          # ids of the model-only tests (no tokenizer)
TILE, SIDE = 56, 2                                     # tiny tower: 56 px tiles, 4×4 patches → 2×2 = 4 tokens
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def hf_config(kind: str, tied: bool = False, image_token_id: int = IMAGE, **vision_changes):
    from transformers import InternVLConfig
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=[TILE, TILE], patch_size=[14, 14], use_qk_norm=kind == "qwen3",
                  norm_type="rms_norm" if kind == "qwen3" else "layer_norm") | vision_changes
    text = dict(model_type=kind, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, eos_token_id=299)
    if kind == "qwen3":
        text["head_dim"] = 24                          # ≠ hidden / heads: Qwen3's explicit head_dim
    side = vision["image_size"][0] // 28                   # 14 px patches, 2×2 per token
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                          image_seq_length=side * side, tie_word_embeddings=tied)


def hf_model(kind: str, tied: bool = False, seed: int = 0, **changes):
    from transformers import InternVLForConditionalGeneration
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(hf_config(kind, tied, **changes)).eval()
    with torch.no_grad():   # norms start at 1, biases at 0, layer scale at 0.1: move them all, so a missed one shows
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def write_checkpoint(model, directory: Path, layout: str = "hub") -> Path:
    """hub: save_pretrained's files (language_model.model.*, vision_tower.*, sharded); v5: the in-memory names
    (model.language_model.*, lm_head), two shards and an index."""
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "hub":
        model.save_pretrained(directory, max_shard_size="100KB")
        return directory
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(directory / name))
        weight_map.update({k: name for k in names})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return directory


def image(tiles: int, seed: int = 0) -> ImageInput:
    from minivar.models.internvl.processing import panels_of
    g = torch.Generator().manual_seed(seed)
    cols = tiles - 1 if tiles > 1 else 1
    return ImageInput(torch.randn(tiles, 3, TILE, TILE, generator=g), tiles * SIDE * SIDE, panels_of(cols, 1, SIDE),
                      {"grid": (cols, 1)})


def prompt_ids(images, seed=0, n_text=(3, 5)) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 250, (n_text[0],), generator=g).tolist()
    for im in images:
        ids += [START] + [IMAGE] * im.num_tokens + [END]
    return ids + torch.randint(1, 250, (n_text[1],), generator=g).tolist()


def left_pad(rows):
    T = max(map(len, rows))
    return (torch.tensor([[PAD] * (T - len(r)) + r for r in rows]),
            torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]))


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    return request.param, hf, load_model(write_checkpoint(hf, tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("kind,layout,tied", [("qwen2", "hub", False), ("qwen2", "v5", True), ("qwen3", "hub", True),
                                              ("qwen3", "v5", False)])
def test_logits_equal_transformers(tmp_path, kind, layout, tied):
    hf = hf_model(kind, tied)
    ours = load_model(write_checkpoint(hf, tmp_path, layout))
    images = [image(3, 1), image(1, 2)]                 # 2 tiles + thumbnail, then one tile: 12 + 4 tokens
    ids = torch.tensor([prompt_ids(images)])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=torch.cat([im.pixel_values for im in images])).logits
        got = ours(ids, images)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-4
    assert ours.language_model.model.layers[0].self_attn.qk_norm == (kind == "qwen3")


@pytest.mark.parametrize("changes", [dict(vision_feature_layer=-2), dict(use_mean_pooling=False),
                                     dict(attention_bias=True, use_qk_norm=True, norm_type="rms_norm")])
def test_tower_variants_equal_transformers(tmp_path, changes):
    """The config's other settings: an earlier feature layer (the later layers not loaded), the final LayerNorm
    of use_mean_pooling false, q/k/v biases with q/k norm and RMSNorm blocks."""
    vision_changes = {k: v for k, v in changes.items() if k != "vision_feature_layer"}
    hf = hf_model("qwen2", **vision_changes)
    if "vision_feature_layer" in changes:
        hf.config.vision_feature_layer = changes["vision_feature_layer"]
    ours = load_model(write_checkpoint(hf, tmp_path))
    images = [image(3, 3)]
    ids = torch.tensor([prompt_ids(images)])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images[0].pixel_values).logits
        got = ours(ids, images)
    assert (got - ref).abs().max().item() <= 1e-4
    if "vision_feature_layer" in changes:
        assert len(ours.vision_tower.encoder.layer) == 1


@pytest.mark.parametrize("size", [(56, 56), (84, 42), (28, 70)])
def test_position_embeddings_interpolated_to_the_grid(pair, size):
    """A tile of another size: the patch positions resized (bicubic) to its grid, as transformers does."""
    _, hf, ours = pair
    px = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.model.vision_tower.embeddings(px)
        got = ours.vision_tower.embeddings(px)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-5


def test_pixel_shuffle_maps_each_token_to_its_2x2_patches(pair):
    """Token (i, j) of a tile holds patches (2i..2i+1, 2j..2j+1): the projector's input equals transformers'
    pixel_shuffle, and changing one patch moves exactly the token over it."""
    from minivar.models.internvl.model import pixel_shuffle
    _, hf, _ = pair
    x = torch.randn(3, 4, 4, 5)
    ref = hf.model.pixel_shuffle(x, 0.5).reshape(3, -1, 20)
    assert torch.equal(pixel_shuffle(x, 2), ref)
    y = x.clone()
    y[1, 3, 0] += 1                          # patch row 3, column 0 → token (1, 0) = index 2
    changed = (pixel_shuffle(y, 2) != pixel_shuffle(x, 2)).any(-1)
    assert changed.nonzero().tolist() == [[1, 2]]


def greedy_hf(hf, ids, mask, pixels, n):
    out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=PAD)
    return out[:, ids.shape[1]:].tolist()


def test_greedy_tokens_and_padded_batch_equal_transformers_and_one_by_one(pair):
    """Images of different tile counts in one left-padded batch: the tokens of transformers' generate, and the
    same as each prompt alone."""
    _, hf, ours = pair
    images = [image(1, 5), image(4, 6), image(3, 7)]
    rows = [prompt_ids([im], seed=i, n_text=(3 + i, 4)) for i, im in enumerate(images)]
    ids, mask = left_pad(rows)
    pixels = torch.cat([im.pixel_values for im in images])
    with torch.no_grad():
        ref = greedy_hf(hf, ids, mask, pixels, 6)
        batch = generate(ours, ids, images, max_new_tokens=6, eos_token_id=None, attention_mask=mask).output_ids
        alone = [generate(ours, torch.tensor([r]), [im], max_new_tokens=6, eos_token_id=None).output_ids[0]
                 for r, im in zip(rows, images)]
        ref_logits = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
        got_logits = ours(ids, images, attention_mask=mask, output="last")
    assert batch == ref == alone
    assert (got_logits - ref_logits).abs().max().item() <= 1e-4


def test_chunked_prefill_equals_one_call(pair):
    """A prompt prefilled in pieces (pieces ending inside an image, in text, across images) equals one call."""
    _, _, ours = pair
    images = [image(3, 8), image(1, 9)]
    rows = [prompt_ids(images, seed=3), prompt_ids(images, seed=4, n_text=(6, 2))]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        whole = ours(ids, images * 2, attention_mask=mask, output="last")
        for chunk in (5, 7, 13):
            cache = new_cache(ours, 2, ids.shape[1] + 1, torch.device("cpu"), torch.float32)
            got = prefill(ours, ids, images * 2, cache=cache, attention_mask=mask, chunk=chunk)
            assert (got - whole).abs().max().item() <= 1e-5


def test_key_rules_and_strict_loading(tmp_path):
    hf = hf_model("qwen3")
    directory = write_checkpoint(hf, tmp_path / "ok", "v5")
    from safetensors.torch import load_file, save_file
    shard = directory / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    state["model.vision_tower.extra.weight"] = torch.zeros(2)
    save_file(state, str(shard))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.vision_tower.extra.weight"] = shard.name
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MinivarError, match="unexpected tensor 'vision_tower.extra.weight'"):
        load_model(directory)


# ---------------------------------------------------------------------------------------------------------------
# Config

@pytest.mark.parametrize("change,message", [
    (lambda d: d["text_config"].update(model_type="llama"), "text_config.model_type 'llama'"),
    (lambda d: d["vision_config"].update(norm_type="batch_norm"), "norm_type 'batch_norm'"),
    (lambda d: d.update(vision_feature_layer=[-1, -2]), "vision_feature_layer"),
    (lambda d: d.update(downsample_ratio=0.3), "downsample_ratio"),
    (lambda d: d.update(vision_feature_select_strategy="full"), "drops the CLS"),
    (lambda d: d.update(image_seq_length=256), "image_seq_length 256"),
])
def test_bad_configs_are_one_line(tmp_path, change, message):
    d = hf_config("qwen2").to_dict()
    change(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(MinivarError, match=re.escape(message)):
        read_config(tmp_path)


@pytest.mark.parametrize("name,use", [("InternVL3-8B", "OpenGVLab/InternVL3-8B-hf"),
                                      ("InternVL3_5-4B", "OpenGVLab/InternVL3_5-4B-HF"),
                                      ("InternVL2-8B", "OpenGVLab/InternVL3-8B-hf"),
                                      ("InternVL2_5-1B", "OpenGVLab/InternVL3-1B-hf")])
def test_remote_code_checkpoints_are_refused_naming_the_hf_repo(tmp_path, name, use):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "architectures":
                                                       ["InternVLChatModel"]}))
    with pytest.raises(MinivarError) as e:
        read_config(directory)
    assert "\n" not in str(e.value) and "internvl_chat" in str(e.value) and str(e.value).endswith(f"use {use}")


def test_config_defaults_are_transformers_defaults():
    from transformers import InternVLConfig as HFConfig
    from minivar.models.internvl.config import InternVLConfig
    ours = InternVLConfig.from_hf({"model_type": "internvl"})
    hf = HFConfig()
    v = hf.vision_config
    assert (ours.vision.hidden_size, ours.vision.num_hidden_layers, ours.vision.image_size, ours.vision.patch_size,
            ours.vision.layer_norm_eps, ours.vision.norm_type) == (v.hidden_size, v.num_hidden_layers,
                                                                     v.image_size[0], v.patch_size[0],
                                                                     v.layer_norm_eps, v.norm_type)
    t = hf.text_config
    assert (ours.text.hidden_size, ours.text.vocab_size, ours.text.n_kv_heads, ours.text.rope_theta,
            ours.text.tie_word_embeddings) == (t.hidden_size, t.vocab_size, t.num_key_value_heads,
                                               t.rope_parameters["rope_theta"], hf.tie_word_embeddings)
    assert (ours.image_token_id, ours.tokens_per_tile, ours.vision_feature_layer) == (hf.image_token_id, 256, -1)


# ---------------------------------------------------------------------------------------------------------------
# Tiling

def hf_processor(max_patches=6, min_patches=1, size=TILE):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    return GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True, min_patches=min_patches,
                                    max_patches=max_patches, image_mean=MEAN, image_std=STD)


def picture(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("size", [(1, 1), (56, 56), (40, 300), (300, 40), (120, 60), (200, 150), (112, 56),
                                  (400, 400), (57, 55)])
@pytest.mark.parametrize("max_patches", [1, 6])
def test_pixels_and_tiles_equal_transformers(size, max_patches):
    """1×1, exactly one tile, tall, wide, 2:1 (a tie), large (the most tiles), near-square: the tiles, their
    pixels and their number equal GotOcr2ImageProcessorPil's with crop_to_patches (InternVLProcessor's)."""
    cfg = TileConfig(tile=TILE, max_patches=max_patches)
    pil = picture(*size)
    ours = preprocess_image(pil, cfg, SIDE)
    ref = hf_processor(max_patches)(images=[pil], crop_to_patches=True, return_tensors="pt")
    assert ours.pixel_values.shape[0] == int(ref["num_patches"][0])
    assert torch.equal(ours.pixel_values, ref["pixel_values"])
    cols, rows = ours.meta["grid"]
    tiles = cols * rows + (cols * rows > 1)
    assert ours.num_tokens == tiles * SIDE * SIDE == sum(p.num_tokens for p in ours.panels)
    assert [p.name for p in ours.panels][-1] == ("thumbnail" if tiles > 1 else "tile 1,1")


def test_grid_rule_and_its_tie_break_equal_transformers():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    for h in (1, 20, 56, 100, 448, 900):
        for w in (1, 33, 56, 112, 448, 1000):
            for lo, hi in ((1, 12), (1, 6), (2, 4)):
                assert grid_for(h, w, 448, lo, hi) == get_optimal_tiled_canvas((h, w), (448, 448), lo, hi)
    assert grid_for(448, 896, 448, 1, 12) == (2, 1)          # 2:1 ties with 4:2; 896·448 is not > half of 8 tiles
    assert grid_for(1000, 2000, 448, 1, 12) == (4, 2)        # a large 2:1 image takes the bigger grid


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template

def write_tokenizer(directory: Path, template: str | None = CHAT_TEMPLATE) -> dict:
    """A small byte-level BPE laid out as Qwen2's, with InternVL's image tokens (tokenizer_config.json's
    extra_special_tokens, as the -hf checkpoints') and the chat template in chat_template.jinja."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is in the image? Describe it.", "user assistant",
              "Is there a dog in the image? Answer the question using a single word or phrase. Yes No"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=266, initial_alphabet=pre_tokenizers.ByteLevel
                                                        .alphabet(), show_progress=False))
    tok.add_special_tokens(SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                  "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}}))
    if template is not None:
        (directory / "chat_template.jinja").write_text(template)
    return {name: tok.token_to_id(name) for name in SPECIALS}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("internvl-tokenizer")
    write_tokenizer(directory)
    return directory


def tok_config(directory):
    from tokenizers import Tokenizer
    from minivar.models.internvl.config import InternVLConfig
    d = hf_config("qwen2", image_token_id=Tokenizer.from_file(str(directory / "tokenizer.json"))
                  .token_to_id("<IMG_CONTEXT>")).to_dict()
    return InternVLConfig.from_hf(d)


def hf_internvl_processor(directory, max_patches=6):
    """transformers' InternVLProcessor (its __call__ and replace_image_token) without the video processor, which
    needs torchvision: the same attributes its __init__ sets."""
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Processor(InternVLProcessor):
        def __init__(self, image_processor, tokenizer, image_seq_length, chat_template):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.image_seq_length = image_seq_length
            for ours, theirs in (("start_image_token", "start_image_token"), ("end_image_token", "end_image_token"),
                                 ("image_token", "context_image_token"), ("video_token", "video_token")):
                setattr(self, ours, getattr(tokenizer, theirs))
                setattr(self, ours + "_id", getattr(tokenizer, theirs + "_id"))
            self.multimodal_pattern = re.compile(f"(?P<image>{re.escape(self.image_token)})|"
                                                 f"(?P<video>{re.escape(self.video_token)})")

    return Processor(hf_processor(max_patches), AutoTokenizer.from_pretrained(str(directory)), SIDE * SIDE,
                     (directory / "chat_template.jinja").read_text())


@pytest.mark.parametrize("question", ["What is in the image?", "Describe it.\nIn detail, please: 3 things!",
                                      "\n\n  leading newlines and café"])
@pytest.mark.parametrize("size", [(56, 56), (150, 60)])
def test_prompt_ids_equal_the_transformers_processor(tokenizer_dir, question, size):
    processor = hf_internvl_processor(tokenizer_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pil = picture(*size)
    ref = processor(text=text, images=[pil], return_tensors="pt")
    cfg = tok_config(tokenizer_dir)
    im = preprocess_image(pil, TileConfig(tile=TILE, max_patches=6), SIDE)
    ours = InternVLTokenizer(tokenizer_dir, cfg).encode_prompt(question, num_image_tokens=im.num_tokens)
    assert ours == ref["input_ids"][0].tolist()
    assert torch.equal(im.pixel_values, ref["pixel_values"])


def test_typed_image_tokens_stay_text_and_stop_ids(tokenizer_dir):
    cfg = tok_config(tokenizer_dir)
    tok = InternVLTokenizer(tokenizer_dir, cfg)
    ids = tok.encode_prompt("Spell <IMG_CONTEXT>, <img> and <|im_end|>", num_image_tokens=[4, 8])
    assert ids.count(cfg.image_token_id) == 12
    assert ids.count(tok.ids["<img>"]) == 2 and ids.count(tok.ids["<|im_end|>"]) == 1
    assert "<IMG_CONTEXT>, <img> and <|im_end|>" in tok.decode([i for i in ids if i not in tok._special_ids])
    assert tok.stop_ids == (tok.ids["<|im_end|>"], tok.ids["<|endoftext|>"], 299)
    assert tok.prompt_tail("Hi") == "assistant\n"


def test_the_checkpoints_own_template_is_the_one_used(tmp_path):
    """A checkpoint whose chat_template.jinja has a system turn: the ids follow it (transformers' rendering)."""
    template = CHAT_TEMPLATE.replace("{% for message in messages %}",
                                     "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% for message in messages %}")
    write_tokenizer(tmp_path, template)
    processor = hf_internvl_processor(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.")
    ref = processor(text=text, images=[picture(56, 56)], return_tensors="pt")["input_ids"][0].tolist()
    assert InternVLTokenizer(tmp_path, tok_config(tmp_path)).encode_prompt("What?", num_image_tokens=4) == ref


def test_tokenizer_that_disagrees_with_config_json_is_one_line(tokenizer_dir):
    import dataclasses
    cfg = dataclasses.replace(tok_config(tokenizer_dir), image_token_id=5)
    with pytest.raises(MinivarError, match="image_token_id is 5"):
        InternVLTokenizer(tokenizer_dir, cfg)
