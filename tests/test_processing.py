"""Tests for minivar.processing: prompt templates and tokenization, image preprocessing, image loading.

Pixel values are pinned against transformers' CLIPImageProcessorPil when transformers is installed, and against a
small committed golden file (tests/golden/preprocess_ref.json) when it is not. Regenerate the golden file with
`PYTHONPATH=. python tests/test_processing.py` (needs transformers).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minivar.errors import MinivarError
from minivar.processing import (
    CONV_MODES,
    IMAGE_MEAN,
    IMAGE_STD,
    VICUNA_SYSTEM,
    Tokenizer,
    build_prompt,
    expand_to_square,
    load_image,
    preprocess,
    to_rgb,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_JPG = REPO / "assets" / "example.jpg"
GOLDEN = Path(__file__).resolve().parent / "golden" / "preprocess_ref.json"

IMAGE_ID = 32000
PROMPT = "What is the content of this image?"
PROMPT_IDS = [5618, 338, 278, 2793, 310, 445, 1967, 29973]  # "What is the content of this image?" after "\n"
ASSISTANT_IDS = [319, 1799, 9047, 13566, 29901]  # " ASSISTANT:"
VICUNA_SYSTEM_IDS = [319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076,
                     8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155, 29889]

# Ordinary prompts, for which encode_prompt must equal tokenizing the whole template string.
NORMAL_PROMPTS = [
    PROMPT,
    "Describe this image in detail.",
    "Is there a dog in the image? Answer yes or no.",
    "  leading spaces",
    "trailing spaces   ",
    " one leading and one trailing ",
    "multi\nline\n\nprompt",
    "\nstarts with a newline",
    "ends with a newline\n",
    "tabs\tand\r\nwindows line ends",
    "Ünïcödé café naïve façade",
    "この画像を説明してください。",
    "emoji 😀🐱 and symbols € ∑ ≠",
    "a",
    "?",
    "{braces} and {prompt} and %s",
    "USER: ASSISTANT: role words inside",
    "<b>html-ish</b> <img> <imag e> < image >",
    "non\u00a0breaking\u2009spaces",
    "word " * 200,
]


# ---------------------------------------------------------------------------------------------------------------
# Prompt templates and tokenization
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_tok(llama_tokenizer_path):
    """The `tokenizers` library on the real LLaMA tokenizer, used as is: the reference."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(llama_tokenizer_path))


@pytest.fixture(scope="module")
def tok(llama_tokenizer_path):
    return Tokenizer(llama_tokenizer_path, image_token_id=IMAGE_ID)


def expand_image(ids, n):
    """Whole-string ids with their one image id replaced by n copies."""
    assert ids.count(IMAGE_ID) == 1
    i = ids.index(IMAGE_ID)
    return ids[:i] + [IMAGE_ID] * n + ids[i + 1:]


def test_build_prompt_templates():
    assert CONV_MODES == ("vicuna_v1", "llava_hf", "llava_v1")
    # LLaVA's conv_llava_v1.get_prompt() (SeparatorStyle.TWO, sep " "): DAMRO's and VCD's scripts' prompt
    human = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.")
    assert build_prompt(PROMPT, "llava_v1") == human + " " + "USER: <image>\n" + PROMPT + " " + "ASSISTANT:"
    assert build_prompt(PROMPT, "mistral_instruct") == f"[INST] <image>\n{PROMPT} [/INST]"
    assert build_prompt(PROMPT, "llava_hf") == f"USER: <image>\n{PROMPT} ASSISTANT:"
    assert build_prompt(PROMPT, "vicuna_v1") == f"{VICUNA_SYSTEM} USER: <image>\n{PROMPT} ASSISTANT:"
    assert build_prompt(PROMPT) == build_prompt(PROMPT, "vicuna_v1")
    # Braces in the user's text are not format fields.
    assert build_prompt("{prompt} {0}", "llava_hf") == "USER: <image>\n{prompt} {0} ASSISTANT:"


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_empty_prompt_rejected(text):
    with pytest.raises(MinivarError, match="empty prompt"):
        build_prompt(text)


def test_unknown_conv_mode_rejected():
    with pytest.raises(MinivarError, match="llava_v2"):
        build_prompt(PROMPT, "llava_v2")


def test_reference_tokenization_of_testdata(raw_tok):
    # The fact everything else rests on (design.md §2): 29871 on both sides of the image token.
    ids = raw_tok.encode("USER: <image>\nWhat is the content of this image?\nASSISTANT:").ids
    assert ids == [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 5618, 338, 278, 2793, 310, 445, 1967, 29973,
                   13, 22933, 9047, 13566, 29901]


def test_encode_prompt_llava_hf(tok):
    ids = tok.encode_prompt(PROMPT, "llava_hf", num_image_tokens=576)
    assert ids == [1, 3148, 1001, 29901, 29871] + [IMAGE_ID] * 576 + [29871, 13] + PROMPT_IDS + ASSISTANT_IDS


def test_encode_prompt_vicuna_v1(tok):
    ids = tok.encode_prompt(PROMPT)  # defaults: vicuna_v1, 576 image tokens
    assert ids == ([1] + VICUNA_SYSTEM_IDS + [3148, 1001, 29901, 29871] + [IMAGE_ID] * 576 + [29871, 13]
                   + PROMPT_IDS + ASSISTANT_IDS)


def test_token_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.image_token_id) == (1, 2, IMAGE_ID)


@pytest.mark.parametrize("conv_mode", CONV_MODES + ("mistral_instruct",))
@pytest.mark.parametrize("text", NORMAL_PROMPTS)
def test_encode_prompt_equals_whole_string_tokenization(tok, raw_tok, conv_mode, text):
    whole = raw_tok.encode(build_prompt(text, conv_mode), add_special_tokens=True).ids
    for n in (1, 576):
        assert tok.encode_prompt(text, conv_mode, num_image_tokens=n) == expand_image(whole, n)


@pytest.mark.parametrize("conv_mode", CONV_MODES + ("mistral_instruct",))
def test_user_text_special_strings_stay_text(tok, conv_mode):
    text = "What is <image> here? </s> <s> <pad> <unk> <image><image>"
    ids = tok.encode_prompt(text, conv_mode, num_image_tokens=576)
    # Exactly one contiguous group of image ids, and no other special id after BOS.
    assert ids.count(IMAGE_ID) == 576
    start = ids.index(IMAGE_ID)
    assert ids[start:start + 576] == [IMAGE_ID] * 576
    assert ids[0] == 1
    assert not {0, 1, 2, 32001} & set(ids[1:])
    # The text comes back as typed.
    assert tok.decode(ids).endswith("\n" + text + build_prompt(text, conv_mode).rsplit(text, 1)[1])


def test_encode_prompt_rejects_bad_input(tok):
    with pytest.raises(MinivarError, match="empty prompt"):
        tok.encode_prompt("  \n")
    with pytest.raises(MinivarError, match="conv mode"):
        tok.encode_prompt(PROMPT, "chatml")
    with pytest.raises(MinivarError, match="num_image_tokens"):
        tok.encode_prompt(PROMPT, num_image_tokens=0)


def test_tokenizer_file_errors(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(MinivarError, match=str(missing)):
        Tokenizer(missing, image_token_id=IMAGE_ID)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(MinivarError, match="cannot be loaded") as e:
        Tokenizer(broken, image_token_id=IMAGE_ID)
    assert str(broken) in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_image_id_mismatch(llama_tokenizer_path):
    with pytest.raises(MinivarError, match="32000"):
        Tokenizer(llama_tokenizer_path, image_token_id=32001)


ROUND_TRIP_TEXTS = [
    "The image shows a cat sitting on a windowsill.",
    "Line one.\nLine two,  with two spaces.\n\n- a bullet",
    "Ünïcödé, 日本語, emoji 😀🐱, € and ∑.",
    "Numbers 3.14159 and code: `x = f(y) + 1`",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_and_stream_round_trip(tok, raw_tok, text):
    ids = raw_tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    stream = tok.decode_token_stream()
    pieces = [stream.push(i) for i in ids] + [stream.push(tok.eos_id), stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # no half characters printed on the way
    # Spaces survive: the piece for "▁cat" is " cat", not "cat".
    if text.startswith("The image"):
        assert " cat" in pieces


def test_stream_decoder_holds_byte_tokens_until_closed(tok, raw_tok):
    ids = raw_tok.encode("a😀 b\n", add_special_tokens=False).ids
    assert len(ids) == 7  # "a", the emoji as four byte-fallback tokens, " b", "\n" (the byte token <0x0A>)
    stream = tok.decode_token_stream()
    # A run of byte tokens prints once an ordinary token closes it; a trailing one waits for flush().
    assert [stream.push(i) for i in ids] == ["a", "", "", "", "", "😀 b", ""]
    assert stream.push(tok.eos_id) == "" and stream.flush() == "\n"


def test_stream_decoder_random_ids(tok):
    # Arbitrary ids, byte tokens (3..258) included: the pieces still add up to decode(all).
    rng = np.random.default_rng(0)
    ids = np.where(rng.random(400) < 0.3, rng.integers(3, 259, 400), rng.integers(259, 32000, 400)).tolist()
    ids[50:50] = [2, 1, 32000]  # special tokens in the middle are skipped
    stream = tok.decode_token_stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# Image preprocessing
# ---------------------------------------------------------------------------------------------------------------


def reference_expand2square(pil_img, background_color):
    """LLaVA-1.5's expand2square (llava/mm_utils.py), restated from design.md."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def smooth_image(w, h, seed=0):
    """A deterministic RGB test image with gradients plus noise (so resampling has something to do)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def test_example_image_size():
    assert load_image(EXAMPLE_JPG).size == (512, 352)


@pytest.fixture(scope="module")
def clip_processor():
    pytest.importorskip("transformers")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return make_llava_hf_processor(CLIPImageProcessorPil)


def make_llava_hf_processor(cls):
    # llava-hf/llava-1.5-7b-hf's preprocessor_config.json.
    return cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_convert_rgb=True,
               image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))


def reference_pixels(processor, img, mode):
    if mode == "pad":
        img = reference_expand2square(img, tuple(int(x * 255) for x in processor.image_mean))
    return processor(img, return_tensors="pt")["pixel_values"][0]


PARITY_IMAGES = {
    "example_512x352": lambda: load_image(EXAMPLE_JPG),
    "tall_240x700": lambda: smooth_image(240, 700, seed=1),
    "wide_odd_1001x337": lambda: smooth_image(1001, 337, seed=2),
    "tiny_5x3": lambda: smooth_image(5, 3, seed=3),
    "square_336": lambda: smooth_image(336, 336, seed=4),
}


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("name", list(PARITY_IMAGES))
def test_preprocess_matches_transformers(clip_processor, name, mode):
    img = PARITY_IMAGES[name]()
    ours = preprocess(img, mode=mode)
    ref = reference_pixels(clip_processor, img, mode)
    assert ours.dtype == torch.float32 and ours.shape == (3, 336, 336)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def golden_record(x: torch.Tensor) -> dict:
    x64 = x.double()
    return {
        "sum": x64.sum().item(),
        "sum_sq": (x64 * x64).sum().item(),
        "channel_mean": x64.mean(dim=(1, 2)).tolist(),
        "pixels": {f"{c},{y},{x_}": x[c, y, x_].item() for c, y, x_ in GOLDEN_POSITIONS},
    }


GOLDEN_POSITIONS = [(0, 0, 0), (1, 0, 335), (2, 335, 0), (0, 335, 335), (1, 168, 168), (2, 40, 300), (0, 200, 17),
                    (1, 300, 250)]


def decoded_sha256(img):
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_preprocess_golden(mode):
    golden = json.loads(GOLDEN.read_text())
    img = load_image(EXAMPLE_JPG)
    if decoded_sha256(img) != golden["decoded_rgb_sha256"]:
        pytest.skip("this Pillow's JPEG decoder gives different pixels than the one that wrote the golden file")
    got, want = golden_record(preprocess(img, mode=mode)), golden[mode]
    assert got["sum"] == pytest.approx(want["sum"], abs=1e-3)
    assert got["sum_sq"] == pytest.approx(want["sum_sq"], rel=1e-9)
    assert got["channel_mean"] == pytest.approx(want["channel_mean"], abs=1e-9)
    assert got["pixels"] == pytest.approx(want["pixels"], abs=1e-6)


def test_pad_mode_background_and_placement():
    # A 6x2 white image padded: rows 0-1 and 4-5 are the mean colour, i.e. normalise to ~0.
    img = Image.new("RGB", (6, 2), (255, 255, 255))
    sq = expand_to_square(img)
    assert sq.size == (6, 6)
    a = np.asarray(sq)
    assert (a[[0, 1, 4, 5]] == (122, 116, 104)).all() and (a[2:4] == 255).all()
    # Odd differences put the extra background row/column at the bottom/right, as LLaVA's expand2square.
    for size in [(5, 2), (2, 5), (7, 7), (1, 4)]:
        im = smooth_image(*size)
        assert np.array_equal(np.asarray(expand_to_square(im)),
                              np.asarray(reference_expand2square(im, (122, 116, 104))))
    assert expand_to_square(img, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    # Padding is (nearly) zero after normalisation: int(mean * 255) / 255 is just below the mean.
    x = preprocess(Image.new("RGB", (100, 10), (122, 116, 104)), mode="pad")
    assert x.abs().max() < 0.015


def test_preprocess_other_sizes_and_errors():
    img = smooth_image(50, 30)
    assert preprocess(img, image_size=224, mode="crop").shape == (3, 224, 224)
    with pytest.raises(MinivarError, match="resize"):
        preprocess(img, mode="resize")
    with pytest.raises(MinivarError, match="zero size"):
        preprocess(Image.new("RGB", (0, 4)))


def make_mode_images():
    rgb = smooth_image(40, 24)
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    p_transparent = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_transparent.info["transparency"] = 0
    gradient16 = np.tile(np.linspace(0, 65535, 40), (24, 1)).astype(np.uint16)
    return {
        "L": rgb.convert("L"),
        "LA": rgba.convert("LA"),
        "La": rgba.convert("LA").convert("La"),
        "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "P+transparency": p_transparent,
        "PA": rgba.convert("PA"),
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": Image.fromarray(gradient16),
        "I;16B": Image.frombytes("I;16B", rgb.size, gradient16.astype(">u2").tobytes()),
        "I": Image.fromarray(gradient16.astype(np.int32)),
        "F": Image.fromarray(gradient16.astype(np.float32) / 65535),
        "1": rgb.convert("1"),
    }


@pytest.mark.parametrize("name", list(make_mode_images()))
def test_every_mode_preprocesses(name):
    img = make_mode_images()[name]
    assert to_rgb(img).mode == "RGB"
    lo = (0 - torch.tensor(IMAGE_MEAN)) / torch.tensor(IMAGE_STD)
    hi = (1 - torch.tensor(IMAGE_MEAN)) / torch.tensor(IMAGE_STD)
    x = preprocess(img, mode="crop")  # "pad" shares every step after expand_to_square
    assert x.dtype == torch.float32 and x.shape == (3, 336, 336)
    assert torch.isfinite(x).all()
    assert (x >= lo.view(3, 1, 1) - 1e-5).all() and (x <= hi.view(3, 1, 1) + 1e-5).all()
    assert x.std() > 0.1  # not a flat image
    assert preprocess(img, mode="pad").shape == (3, 336, 336)


def test_16bit_and_float_images_are_scaled_not_clipped():
    images = make_mode_images()
    want = (np.asarray(images["I;16"]) >> 8).astype(np.uint8)
    for name in ("I;16", "I;16B", "I", "F"):
        grey = np.asarray(to_rgb(images[name]))[..., 0]
        assert grey.mean() < 200, name  # PIL's plain convert("RGB") makes this almost all 255
        assert np.abs(grey.astype(int) - want).max() <= 1, name
    # An 8-bit-range "I" image stays as it is.
    small = Image.fromarray(np.full((4, 4), 100, np.int32))
    assert np.asarray(to_rgb(small))[0, 0].tolist() == [100, 100, 100]


def test_alpha_is_dropped_like_llava():
    # LLaVA and llava-hf (transformers 4.x) call img.convert("RGB"): a fully transparent pixel keeps its colour.
    img = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(img).getpixel((0, 0)) == (10, 20, 30)


# ---------------------------------------------------------------------------------------------------------------
# Loading image files
# ---------------------------------------------------------------------------------------------------------------


def assert_error_names(path, excinfo, words):
    msg = str(excinfo.value)
    assert str(path) in msg and words in msg and "\n" not in msg, msg


def test_load_image_missing(tmp_path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(MinivarError) as e:
        load_image(path)
    assert_error_names(path, e, "not found")


def test_load_image_directory(tmp_path):
    with pytest.raises(MinivarError) as e:
        load_image(tmp_path)
    assert_error_names(tmp_path, e, "directory")


def test_load_image_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a JPEG\n")
    with pytest.raises(MinivarError) as e:
        load_image(str(path))
    assert_error_names(path, e, "not an image")


def test_load_image_truncated(tmp_path):
    data = EXAMPLE_JPG.read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MinivarError) as e:
        load_image(path)
    assert_error_names(path, e, "truncated or corrupt")


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.tile(np.arange(0, 65536, 4096, dtype=np.uint16), (3, 1))).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (16, 3)
    assert np.asarray(img)[0, :, 0].tolist() == list(range(0, 256, 16))


# ---------------------------------------------------------------------------------------------------------------
# Golden file writer (needs transformers): PYTHONPATH=. python tests/test_processing.py
# ---------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = make_llava_hf_processor(CLIPImageProcessorPil)
    img = load_image(EXAMPLE_JPG)
    out = {"source": "assets/example.jpg through transformers CLIPImageProcessorPil (llava-hf config)",
           "decoded_rgb_sha256": decoded_sha256(img)}
    for mode in ("pad", "crop"):
        out[mode] = golden_record(reference_pixels(processor, img, mode))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
