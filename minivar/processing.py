"""Everything between the user's files and the model's inputs: images → pixel tensors, prompts → token ids.

Two image modes, both ending in a float32 [3, 336, 336] tensor normalised with CLIP's mean/std:
  - "pad"  (original LLaVA-1.5 evaluation, the VAR paper): paste the image centred on a mean-coloured square, then
           the same steps as "crop" (which then only resizes: a square needs no cropping).
  - "crop" (llava-hf's CLIPImageProcessor): resize the shortest edge to 336, centre-crop 336×336.
Both are written so that they give *exactly* the numbers transformers' CLIPImageProcessorPil gives (tests pin this).

Prompts: the single `<image>` placeholder of the template becomes `num_image_tokens` copies of the image token id.
Three tokenizations (`prompt_tokenization`): "llava" — BOS + the template tokenized by tokenizer.json as LLaVA's
fast tokenizer does, text the user typed always plain text, even if it spells `<image>` or `</s>`; "official" — the
ids VAR's released code feeds (official_prompt_ids); "damro" — the ids DAMRO's released scripts feed
(damro_prompt_ids). The last two tokenize as transformers' slow sentencepiece LlamaTokenizer does (slow_llama_ids),
typed special tokens included.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from minivar.errors import MinivarError
from minivar.defaults import PROMPT_TOKENIZATIONS  # noqa: F401  (llava, official, damro: the three below)

IMAGE_PLACEHOLDER = "<image>"
CONV_MODES = ("vicuna_v1", "llava_hf", "llava_v1")   # LLaVA-1.5's; every template (mistral_instruct too): _TEMPLATES
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA's conv_llava_v1: the same template with "human" for "user" in the system line. It is not LLaVA-1.5's
# evaluation template, but DAMRO's and VCD's released scripts build every LLaVA prompt with it.
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# OpenAI CLIP's normalisation constants (the llava-hf and liuhaotian preprocessor configs use these).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA's pad colour is tuple(int(m * 255) for m in IMAGE_MEAN): truncated, not rounded.
PAD_COLOR = (122, 116, 104)
IMAGE_MODES = ("pad", "crop")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece byte-fallback pieces


def _one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line (MinivarError messages are one line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB; every way a file can be bad becomes a MinivarError naming it."""
    name = f"image file '{path}'"
    p = Path(path)
    if p.is_dir():
        raise MinivarError(f"{name} is a directory, not an image")
    try:
        with Image.open(p) as img:
            # Image.open only reads the header; load() decodes the pixels now, so a truncated or corrupt file fails
            # here with its name rather than later inside preprocessing. EXIF orientation is deliberately not
            # applied: neither LLaVA nor transformers does, so the model saw photos as stored.
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise MinivarError(f"{name} not found") from None
    except PermissionError as e:
        raise MinivarError(f"{name} cannot be read: {_one_line(e)}") from None
    except UnidentifiedImageError:
        raise MinivarError(f"{name} is not an image format PIL can read") from None
    except Image.DecompressionBombError as e:
        raise MinivarError(f"{name} is too large: {_one_line(e)}") from None
    except MinivarError as e:  # from to_rgb: add the file name
        raise MinivarError(f"{name}: {e}") from None
    except Exception as e:
        # PIL's decoders signal broken data with many types (OSError "image file is truncated", SyntaxError
        # "broken PNG file", ValueError, EOFError, struct.error ...); all of them mean "this file is bad".
        raise MinivarError(f"{name} is truncated or corrupt: {_one_line(e)}") from None


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Map an integer (I;16*, I) or float (F) single-channel image onto 8-bit grey ("L").

    PIL's own convert("L"/"RGB") *clips* these to 0..255, so a normal 16-bit photo comes out almost all white.
    Rules (documented, since there is no single right answer for I and F):
      - I;16, I;16B, I;16L, I;16N: 16-bit by definition → value >> 8.
      - I (32-bit int): 16-bit files often arrive in this mode; if any value exceeds 255 take it as 16-bit
        (clip to 0..65535, >> 8), otherwise as 8-bit.
      - F (32-bit float): maximum ≤ 1 → the [0, 1] convention (× 255); ≤ 255 → already 8-bit; else 16-bit (/ 256).
    """
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a8 = (a.astype(np.uint16) >> 8).astype(np.uint8)
    elif img.mode == "I":
        a = a.astype(np.int64)
        a8 = (np.clip(a, 0, 65535) >> 8) if a.size and a.max() > 255 else np.clip(a, 0, 255)
        a8 = a8.astype(np.uint8)
    else:  # "F"
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = a.max() if a.size else 0.0
        scale = 255.0 if peak <= 1.0 else (1.0 if peak <= 255.0 else 1.0 / 256.0)
        a8 = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(a8, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → a new RGB image, the way LLaVA and llava-hf (transformers 4.x) do it: img.convert("RGB").

    That *drops* alpha (transparent pixels show whatever colour they store) rather than compositing on white; the
    model was trained on images converted this way. (transformers 5.x's convert_to_rgb composites on white instead,
    so for images with transparency its output differs from LLaVA's.) 16-bit and float images are first scaled to
    8 bits, because convert() would clip them (see _high_bit_depth_to_l).
    """
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_bit_depth_to_l(img)
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA": dropping the
        # transparency is exactly what we want here.
        warnings.simplefilter("ignore", UserWarning)
        try:
            return img.convert("RGB")
        except ValueError as e:
            error = e
        # Modes PIL cannot take straight to RGB go through an alpha mode (premultiplied "La" only converts to "LA").
        for via in ("RGBA", "LA"):
            try:
                return img.convert(via).convert("RGB")
            except ValueError:
                pass
        raise MinivarError(f"cannot convert image mode '{img.mode}' to RGB: {_one_line(error)}")


def expand_to_square(img: Image.Image, background: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """LLaVA-1.5's expand2square: paste the image centred on a background square of side max(W, H).

    The offset on the short axis is (long - short) // 2, so an odd difference leaves the extra row/column of
    background at the bottom/right, as in LLaVA.
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    w, h = img.size
    if w == h:
        return img.copy()
    side = max(w, h)
    square = Image.new("RGB", (side, side), tuple(background))
    square.paste(img, ((side - w) // 2, (side - h) // 2))  # one of the two offsets is 0
    return square


def _resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is `size`, as transformers' get_resize_output_image_size(default_to_square=False).

    The long side is int(size * long / short): truncated, computed in that order, exactly as transformers does,
    so a 512×352 image becomes 488×336, not 489×336.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    # PIL bicubic on the uint8 image (no reducing_gap): the resampling CLIPImageProcessor uses.
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    # top/left rounded down, as transformers' center_crop; after the shortest-edge resize both sides are ≥ size.
    w, h = img.size
    top, left = (h - size) // 2, (w - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_normalised_tensor(img: Image.Image, mean=IMAGE_MEAN, std=IMAGE_STD, rescale_factor: float = 1 / 255) -> torch.Tensor:
    """uint8 HWC RGB → normalised float32 CHW, with transformers' arithmetic so results are bit-identical."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # [H, W, 3] → [3, H, W]
    # Rescale in float64 and only then round to float32, as transformers' rescale() does.
    x = (x.to(torch.float64) * rescale_factor).to(torch.float32)
    # Normalise in float32 with float32 constants (transformers casts mean/std to the image dtype).
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def preprocess(img: Image.Image, image_size: int = 336, mode: str = "pad") -> torch.Tensor:
    """A PIL image (any mode) → float32 [3, image_size, image_size] pixel values for the CLIP tower."""
    return _to_normalised_tensor(model_image(img, image_size, mode))


def model_image(img: Image.Image, image_size: int = 336, mode: str = "pad") -> Image.Image:
    """The image as the model sees it: RGB, padded to a square (pad) or not (crop), resized, center-cropped."""
    if mode not in IMAGE_MODES:
        raise MinivarError(f"unknown image mode '{mode}' (choose from {', '.join(IMAGE_MODES)})")
    if not isinstance(img, Image.Image):
        raise TypeError(f"preprocess expects a PIL image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise MinivarError(f"image has zero size ({img.width}x{img.height})")
    img = to_rgb(img)
    if mode == "pad":
        img = expand_to_square(img)
    img = _resize_shortest_edge(img, image_size)
    return _center_crop(img, image_size)


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------

# Each template as (text before the image placeholder, text after it with a {prompt} slot). Keeping the two halves
# apart lets the tokenizer put the image tokens in place without ever searching the user's text for "<image>".
_TEMPLATES = {
    # llava-hf model card.
    "llava_hf": ("USER: ", "\n{prompt} ASSISTANT:"),
    # Original LLaVA-1.5 conv_vicuna_v1 (sep " "), used by its evaluation scripts and the VAR paper.
    "vicuna_v1": (VICUNA_SYSTEM + " USER: ", "\n{prompt} ASSISTANT:"),
    # Original LLaVA conv_llava_v1 (sep " ", the "human" wording): DAMRO's and VCD's scripts prompt with it.
    "llava_v1": (LLAVA_V1_SYSTEM + " USER: ", "\n{prompt} ASSISTANT:"),
    # LLaVA-NeXT's conv_mistral_instruct (llava-v1.6-mistral-7b; also its llava-hf model card), no system prompt.
    "mistral_instruct": ("[INST] ", "\n{prompt} [/INST]"),
}


def _template_halves(user_text: str, conv_mode: str) -> tuple[str, str]:
    if conv_mode not in _TEMPLATES:
        raise MinivarError(f"unknown conv mode '{conv_mode}' (choose from {', '.join(_TEMPLATES)})")
    if not isinstance(user_text, str) or not user_text.strip():
        raise MinivarError("empty prompt")
    before, after = _TEMPLATES[conv_mode]
    # str.replace, not str.format: the user's text may contain braces. The text is kept as typed (LLaVA and
    # llava-hf do not strip it either).
    return before, after.replace("{prompt}", user_text)


def build_prompt(user_text: str, conv_mode: str = "vicuna_v1") -> str:
    """The full prompt string, with one "<image>" placeholder where the image features go."""
    before, after = _template_halves(user_text, conv_mode)
    return before + IMAGE_PLACEHOLDER + after


class Tokenizer:
    """The LLaMA tokenizer (a tokenizer.json for the `tokenizers` library) plus LLaVA's image-token expansion."""

    def __init__(self, path_to_tokenizer_json: str | os.PathLike, image_token_id: int):
        from tokenizers import Tokenizer as _HFTokenizer  # imported here so image-only users need no tokenizers

        path = Path(path_to_tokenizer_json)
        in_checkpoint = path.is_dir()
        if in_checkpoint:  # a checkpoint folder: take its tokenizer.json
            path = path / "tokenizer.json"
        self.path = path
        if not path.is_file():
            raise MinivarError(f"'{path}' not found: the checkpoint directory needs the tokenizer.json llava-hf ships"
                               if in_checkpoint else f"tokenizer file '{path}' not found")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for malformed JSON or an unknown model type
            raise MinivarError(f"tokenizer file '{path}' cannot be loaded: {_one_line(e)}") from None
        # With encode_special_tokens the tokenizer no longer matches special added tokens ("<image>", "</s>", ...)
        # inside the text, so anything the user types stays plain text. The template's own image placeholder never
        # reaches the tokenizer (the template is encoded in two halves around it), so nothing is lost.
        tok.encode_special_tokens = True
        self._tok = tok
        self._no_prefix = None         # the same without its dummy prefix, made when needed (_without_dummy_prefix)
        self._special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

        def lookup(token: str, fallback: int) -> int:
            i = tok.token_to_id(token)
            return fallback if i is None else i

        self.bos_id = lookup("<s>", 1)
        self.eos_id = lookup("</s>", 2)
        self.image_token_id = int(image_token_id)
        known = tok.token_to_id(IMAGE_PLACEHOLDER)
        if known is not None and known != self.image_token_id:
            raise MinivarError(
                f"tokenizer file '{path}' maps '{IMAGE_PLACEHOLDER}' to id {known}, "
                f"but the model's image token id is {self.image_token_id}"
            )

    def encode_prompt(self, user_text: str, conv_mode: str = "vicuna_v1", num_image_tokens: int = 576) -> list[int]:
        """Template + user text → ids: BOS, the text before the image, num_image_tokens image ids, the rest.

        These are exactly the ids that tokenizing the whole build_prompt() string gives (followed by expanding its
        one image id), because the `tokenizers` library also splits the text at special tokens and normalises each
        piece on its own — that is where the "▁" (29871) on both sides of the image token comes from, as in LLaVA.
        """
        if int(num_image_tokens) < 1:
            raise MinivarError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
        before, after = _template_halves(user_text, conv_mode)
        # add_special_tokens=True lets the tokenizer's own post-processor put BOS first.
        head = self._tok.encode(before, add_special_tokens=True).ids
        tail = self._tok.encode(after, add_special_tokens=False).ids
        if self.image_token_id in head or self.image_token_id in tail:
            # Only possible if the tokenizer lists "<image>" as a *non-special* added token, which
            # encode_special_tokens does not turn off; refusing beats silently miscounting image features.
            raise MinivarError(
                f"tokenizer file '{self.path}' turns prompt text into image token id {self.image_token_id}; "
                f"'{IMAGE_PLACEHOLDER}' must be a special token"
            )
        return head + [self.image_token_id] * int(num_image_tokens) + tail

    def decode(self, ids) -> str:
        """Ids → text, leaving out special tokens (BOS, EOS, image, pad)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_token_stream(self) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence (see StreamDecoder)."""
        return StreamDecoder(self)

    def _closes_byte_run(self, token_id: int) -> bool:
        """True for an ordinary vocabulary token: decoded text up to it can no longer change.

        Byte-fallback tokens (<0x00>..<0xFF>) may still join later bytes; special tokens are skipped when decoding
        and unknown ids (the lm_head's padding rows >= vocab size) decode to nothing, so neither separates runs.
        """
        if token_id in self._special_ids:
            return False
        piece = self._tok.id_to_token(token_id)
        return piece is not None and not _BYTE_TOKEN.fullmatch(piece)


class StreamDecoder:
    r"""Turns generated ids into printable text as they arrive: push() pieces + flush() == tokenizer.decode(ids).

    Decoding one token at a time is wrong: a sentencepiece "▁the" alone decodes to "the" (the decoder strips the
    leading space of the whole text), and a character may be spread over several tokens. So each push decodes all
    ids so far and prints only the part of that text that later tokens can no longer change. Two kinds of
    tokenizer hold text back in two ways:
      - sentencepiece with byte fallback (LLaMA): a character missing from the vocabulary is spelled as byte tokens
        (<0xE2><0x82><0xAC> = "€"), and the decoder turns a whole *run* of adjacent byte tokens into U+FFFDs if the
        run is not valid UTF-8 — so a byte that reads fine now ("\n" is <0x0A>) can read differently once more
        bytes join its run. Text is final only up to the last ordinary token, which closes the run.
      - byte-level BPE (GPT-2 style; minivar's demo): every token is bytes, and the decoder reads the bytes of the
        whole text as UTF-8, showing a character whose bytes have not all arrived as one U+FFFD at the end. Bytes
        that arrive later complete (or invalidate) only that tail; everything before it is final.
    So text is printed up to the last ordinary token, less any U+FFFD at its end (held until the next token shows
    whether it was a character in the making, or until flush()). The delay is one token for a byte run (e.g. a
    newline in LLaMA) and nothing for ordinary text.
    Each push re-decodes everything so far; quadratic, but even at 1,000 tokens one push costs ~0.2 ms, far less
    than a decoder step.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._printed = ""

    def push(self, token_id: int) -> str:
        """Add one generated id; return the new text it makes final (often ""). Call flush() at the end."""
        self.ids.append(int(token_id))
        if not self._tokenizer._closes_byte_run(self.ids[-1]):
            return ""
        return self._emit(self._tokenizer.decode(self.ids).rstrip("\ufffd"))

    def flush(self) -> str:
        """At the end of generation: the text still held back (trailing byte tokens or an incomplete character)."""
        return self._emit(self._tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        # `text` is final (see the class docstring), so it extends what was printed; the check guards that claim.
        if not text.startswith(self._printed):
            raise AssertionError(f"stream decoding went back on printed text: {self._printed[-20:]!r}")
        new = text[len(self._printed):]
        self._printed = text
        return new


# The LLaMA tokenizer's lone "▁" piece; the released VAR code hard-codes this id (src/stash.py:segment_prompt).
SPACE_ID = 29871
SPIECE = "▁"
# sentencepiece's own control tokens: a slow LlamaTokenizer splits them out of any text, whatever else was added
SENTENCEPIECE_SPECIALS = ("<unk>", "<s>", "</s>")


# ---------------------------------------------------------------------------------------------------------------
# The slow (sentencepiece) LlamaTokenizer's rule, as the released codes load it (use_fast=False, legacy=False)

def slow_llama_ids(tokenizer, text: str, specials: dict[str, int]) -> list[int]:
    """`text` → ids (no BOS) as transformers' slow, sentencepiece LlamaTokenizer with `legacy=False` tokenizes it —
    the tokenizer LLaVA's and llava-hf's checkpoints configure ("legacy": false in tokenizer_config.json) and the
    released codes load with use_fast=False. transformers 4.43 (the version DAMRO's repository ships):
    models/llama/tokenization_llama.py LlamaTokenizer.tokenize and _tokenize, tokenization_utils.py
    PreTrainedTokenizer.tokenize; 5.x keeps the rule in tokenization_utils_sentencepiece.py (_tokenize), and its
    tokenizers-backed LlamaTokenizer (a Metaspace pre-tokenizer, prepend_scheme "first") gives the same ids for
    any text that does not start with a space (one that does gets one "▁" there, not two).
      1. every "▁" in the text becomes a space, and one "▁" goes before the whole text (add_prefix_space);
      2. the text is cut at every special token (`specials`: {token: id}; leftmost, longest first; none of
         LLaMA's strips the spaces beside it), each becoming its id — typed ones too;
      3. each piece between them is encoded by the sentencepiece model with no dummy prefix, a space being "▁"
         (the "<unk>"-prefix trick of _tokenize keeps a piece's leading space as its first word's "▁"): a piece
         after a special token that starts with a space starts with "▁", one that does not ("\\n" after
         "<image>") gets none — where tokenizer.json's Prepend("▁") normalizer puts a "▁" before every piece;
      4. a text that starts with a special token loses the lone "▁" of step 1 (no template starts so).
    tokenizer: a processing.Tokenizer or a tokenizers.Tokenizer. A tokenizer.json without a dummy prefix (a
    byte-level one, like the demo's) has nothing to turn off: its pieces are encoded as they are."""
    tok, prefix = _without_dummy_prefix(tokenizer)
    if prefix:
        text = prefix + text.replace(prefix, " ")
    ids: list[int] = []
    pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
    for piece in re.split(pattern, text) if specials else [text]:
        if piece in specials:
            ids.append(int(specials[piece]))
        elif piece:
            ids += tok.encode(piece, add_special_tokens=False).ids
    if prefix and len(ids) > 1 and ids[0] == tok.token_to_id(prefix) and ids[1] in specials.values():
        ids = ids[1:]
    return ids


def _without_dummy_prefix(tokenizer):
    """(the tokenizer.json with its sentencepiece dummy prefix turned off — the Prepend("▁") normalizer dropped, a
    Metaspace pre-tokenizer set to prepend never — and its added tokens never matched in text; "▁" if it had such
    a prefix, else ""). Made once per processing.Tokenizer (or _Prepared)."""
    import json as _json
    from tokenizers import Tokenizer as _HFTokenizer
    cached = getattr(tokenizer, "_no_prefix", None)
    if cached is not None:
        return cached
    spec = _json.loads(getattr(tokenizer, "_tok", tokenizer).to_str())
    found = False
    norm = spec.get("normalizer")
    if norm and norm.get("type") == "Sequence":
        kept = [n for n in norm["normalizers"] if n.get("type") != "Prepend"]
        found = len(kept) < len(norm["normalizers"])
        spec["normalizer"] = {"type": "Sequence", "normalizers": kept}
    elif norm and norm.get("type") == "Prepend":
        spec["normalizer"], found = None, True
    pre = spec.get("pre_tokenizer")
    if pre and pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never":
        pre["prepend_scheme"], found = "never", True
    tok = _HFTokenizer.from_str(_json.dumps(spec))
    tok.encode_special_tokens = True           # the specials are split out by slow_llama_ids, as the slow one does
    result = (tok, SPIECE if found else "")
    if hasattr(tokenizer, "_no_prefix"):
        tokenizer._no_prefix = result
    return result


class _Prepared:
    """A bare tokenizers.Tokenizer with a place for its prefix-free copy, so that the segments of one prompt make
    that copy once."""

    def __init__(self, tok):
        self._tok, self._no_prefix = tok, None


def _prepared(tokenizer):
    return tokenizer if hasattr(tokenizer, "_no_prefix") else _Prepared(getattr(tokenizer, "_tok", tokenizer))


def special_tokens(tokenizer, names=None) -> dict[str, int]:
    """{token: id} of the tokenizer.json's special tokens (all of them, or those `names` that it has)."""
    tok = getattr(tokenizer, "_tok", tokenizer)
    found = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return found if names is None else {n: found[n] for n in names if n in found}


# ---------------------------------------------------------------------------------------------------------------
# Prompt ids as DAMRO's released scripts build them (coder-gx/DAMRO, 03008ac)

DAMRO_TEMPLATES = ("llava_v1", "vicuna_v1", "llava_hf")     # the scripts' llava_v1, and LLaVA's other LLaMA ones


def damro_prompt_ids(tokenizer, user_text: str, conv_mode: str, num_image_tokens: int, image_token_id: int) -> list[int]:
    """The prompt's ids as DAMRO's released scripts feed them: `evaluation/*/run_*.py` put "<image>\\n" + the
    question through `conv_templates["llava_v1"]` (every script, LLaVA-1.5 and LLaVA-NeXT alike) and the whole
    string through llava-hf's processor with its slow tokenizer (`AutoProcessor(..., use_fast=False)`): BOS, then
    slow_llama_ids over the checkpoint's special tokens, the one `<image>` id then expanded to num_image_tokens
    (transformers 4.43's merge). So no "▁" after the image: `… 29871, 32000, 13, 5618 …` ("USER: <image>\\nWhat")
    where "llava" gives `… 29871, 32000, 29871, 13, 5618 …`. The same rule holds for vicuna_v1 and llava_hf.
    A question that spells "<image>" would be a second image token there (the released code then stops with an
    error): refused."""
    if conv_mode not in DAMRO_TEMPLATES:
        raise MinivarError(f"`prompt_tokenization` damro tokenizes LLaVA's LLaMA templates "
                           f"({', '.join(DAMRO_TEMPLATES)}; the released scripts use llava_v1), not {conv_mode}")
    if int(num_image_tokens) < 1:
        raise MinivarError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
    tokenizer = _prepared(tokenizer)
    ids = [tokenizer._tok.token_to_id("<s>")] + slow_llama_ids(tokenizer, build_prompt(user_text, conv_mode),
                                                    special_tokens(tokenizer))
    image_token_id = int(image_token_id)
    if ids.count(image_token_id) != 1:
        raise MinivarError(f"the prompt spells '{IMAGE_PLACEHOLDER}', which the tokenizer of DAMRO's released "
                           f"scripts turns into a second image token (their code then stops with an error); "
                           f"leave it out or use --prompt-tokenization llava")
    at = ids.index(image_token_id)
    return ids[:at] + [image_token_id] * int(num_image_tokens) + ids[at + 1:]


# ---------------------------------------------------------------------------------------------------------------
# Prompt ids as the VAR authors' released code builds them (MICV-yonsei/VisAttnSink, 98e62d6)

def official_segments(user_text: str) -> list[tuple[str, str | None]]:
    """The five (name, text) segments official_prompt_ids tokenizes, the image's text None."""
    # The same string the code's conv_templates["vicuna_v1"] builds. The system text has no "USER", so the first
    # "USER" is the role's, never the question's.
    prompt = build_prompt(user_text, "vicuna_v1")
    system, _, rest = prompt.partition("USER")
    user, found, assistant_rest = ("USER" + rest).partition("ASSISTANT")
    role_1 = "ASSISTANT" + assistant_rest if found else ""
    role_0, _, inst_q = user.partition("<image>")          # the template's <image> comes before the question
    return [("system", system), ("role_0", role_0), ("image", None), ("inst_q", inst_q), ("role_1", role_1)]


def official_prompt_ids(tokenizer, user_text: str, num_image_tokens: int, image_token_id: int, *,
                        space_id: int = SPACE_ID) -> list[int]:
    """The vicuna_v1 prompt's ids as the released code feeds them to the model.

    Restates stash.py:MetadataStation.segment_prompt (lines 209-326; the 29871 filter at 232-241), whose ids
    replace those mm_utils.py:tokenizer_image_token built (lines 203-212): the prompt "{SYSTEM} USER: <image>\\n{question} ASSISTANT:" is cut into five segments with str.split at
    the first "USER", then the first "ASSISTANT" after it, then the first "<image>" —
        system "{SYSTEM} ", role_0 "USER: ", image, inst_q "\\n{question} ", role_1 "ASSISTANT:"
    — each text segment is tokenized on its own with add_special_tokens=False (so **no BOS**) by the code's slow
    LlamaTokenizer (slow_llama_ids: LLaVA's tokenizer, use_fast=False), and every `space_id` (29871, the lone "▁")
    after the first one is dropped. The first is the one that ends the system segment; the
    dropped ones include those the tokenizer puts before a digit or a non-ASCII character *inside* the question.
    Faithfully, a question that itself contains "ASSISTANT" is cut there. The image segment becomes
    num_image_tokens copies of image_token_id (the code puts one placeholder there and the model expands it).

    Typed special tokens are split out as that tokenizer splits them: `</s>`, `<s>`, `<unk>` in the question
    become ids 2, 1, 0 (and the text right after one gets no "▁" unless it starts with a space), while a typed
    "<image>" stays text — LLaVA's own tokenizer, which the code loads, has no such token (its image placeholder
    is an index, -200).

    tokenizer: minivar's processing.Tokenizer, or a `tokenizers.Tokenizer` of a LLaMA tokenizer.json.
    """
    if int(num_image_tokens) < 1:
        raise MinivarError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
    tokenizer = _prepared(tokenizer)
    specials = special_tokens(tokenizer, SENTENCEPIECE_SPECIALS)
    ids: list[int] = []
    space_seen = False
    for name, text in official_segments(user_text):
        if name == "image":
            ids += [int(image_token_id)] * int(num_image_tokens)
            continue
        for t in slow_llama_ids(tokenizer, text, specials):
            if t == int(image_token_id):
                raise MinivarError(f"the tokenizer turns prompt text into image token id {image_token_id}; "
                                   "'<image>' must be a special token")
            if t == space_id:
                if space_seen:
                    continue                               # every "▁" after the first is dropped
                space_seen = True
            ids.append(t)
    return ids


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Id rows → [R, T] ids left-padded to the longest (every row's last token at T − 1, where generation goes on)
    and the attention mask [R, T] (None when nothing is padded). The one padding rule of minivar."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        input_ids[b, T - len(r):] = torch.as_tensor(r, dtype=torch.long)
        attention_mask[b, T - len(r):] = True
    return input_ids, (None if bool(attention_mask.all()) else attention_mask)
