"""LLaVA-NeXT's image processing ("anyres"): one PIL image → the base crop plus the tiles, as transformers'
LlavaNextImageProcessorPil makes them (its PIL backend; the tests compare the pixels).

Steps, for an image of h×w pixels and S = the CLIP image size (336):
  1. RGB: transparent images are composited on white, as transformers' convert_to_rgb does (LLaVA-1.5's
     processing.to_rgb drops alpha instead); other modes as processing.to_rgb (16-bit images scaled, not clipped).
  2. The best pinpoint (H, W) (llava_next.select_best_resolution); the image resized, keeping its aspect ratio, to
     fit it (the side that limits gets the pinpoint's length, the other ceil(side·scale)), bicubic, and centred on a
     black H×W canvas (an odd leftover goes to the bottom/right).
  3. The canvas cut into (H/S)×(W/S) tiles of S×S, row by row.
  4. The base: the whole image squashed to S×S (bicubic, aspect ratio not kept), first.
  5. Every crop rescaled (×1/255 in float64, then float32) and normalised with the CLIP mean/std. (transformers also
     resizes each crop's shortest edge to S and centre-crops S×S: with size = crop = S, as llava_next.py requires,
     both leave an S×S crop unchanged.)

Where llava-hf (this, and transformers' model) differs from the original LLaVA-NeXT code (haotian-liu/LLaVA,
`mm_utils.process_anyres_image` and `llava_arch.prepare_inputs_labels_for_multimodal`):
  * pinpoints are (height, width) pairs in llava-hf and (width, height) pairs in the original. The default list is
    symmetric, so the same shapes are on offer, but ties go to the first listed: a small square image (every
    pinpoint keeps all its pixels, two waste the same) gets a 1×2 grid (wide) in llava-hf and 2×1 (tall) in the
    original.
  * unpadding rounds `int(round(x, 7))` in transformers and truncates `int(x)` in the original: where the float
    product falls just below an integer (e.g. 23.999999) the original keeps one more padding row/column pair out.
  * transparency: transformers composites on white, the original (`.convert('RGB')`) drops alpha.
  * the prompt: llava-hf expands `<image>` into as many image tokens as the image gives (this module's num_tokens);
    the original splices the features in place of a single placeholder id (−200) at embedding time. The tokens the
    decoder sees are the same.
"""
from __future__ import annotations

import math
import warnings

import torch
from PIL import Image

from ..errors import MinivarError
from ..processing import _to_normalised_tensor, to_rgb
from .images import ImageInput, Panel


# ---------------------------------------------------------------------------------------------------------------
# The anyres geometry (shared by the image processor's token count and the model's packing)

def select_best_resolution(image_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most of the image's pixels when it is scaled to fit, and among
    those wastes the least area; the first such in the list wins ties (transformers' select_best_resolution)."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    return best


def unpadded_span(image_size: tuple[int, int], grid_h: int, grid_w: int) -> tuple[slice, slice]:
    """Which rows and columns of a grid_h×grid_w feature grid (the tiles' features side by side) show the image
    rather than the letterbox padding: transformers' unpad_image, whose rounding is round(·, 7) then int, and which
    cuts the same amount from both ends (so an odd leftover keeps one padding row/column)."""
    height, width = image_size
    if width / height > grid_w / grid_h:                    # wider than the grid: padding above and below
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return slice(pad, grid_h - pad), slice(0, grid_w)
    new_w = int(round(width * (grid_h / height), 7))        # taller (or equal): padding left and right
    pad = (grid_w - new_w) // 2
    return slice(0, grid_h), slice(pad, grid_w - pad)


def anyres_layout(image_size: tuple[int, int], cfg: LlavaNextConfig) -> tuple[tuple[int, int], tuple[slice, slice]]:
    """(tiles (rows, cols), the unpadded rows/columns of the (rows·P)×(cols·P) feature grid) for an image (h, w)."""
    best_h, best_w = select_best_resolution(image_size, cfg.image_grid_pinpoints)
    tiles = (best_h // cfg.vision.image_size, best_w // cfg.vision.image_size)
    P = cfg.patches_per_side
    return tiles, unpadded_span(image_size, tiles[0] * P, tiles[1] * P)


def count_image_tokens(image_size: tuple[int, int], cfg: LlavaNextConfig) -> int:
    """How many LLM tokens an image of size (h, w) becomes: P² base + the unpadded grid + one newline per row."""
    _, (rows, cols) = anyres_layout(image_size, cfg)
    n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
    return cfg.patches_per_side ** 2 + n_rows * (n_cols + 1)


def to_rgb_on_white(img: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb: an image with an alpha band or a transparency entry is composited onto
    white; anything else goes through processing.to_rgb."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        with warnings.catch_warnings():   # "Palette images with Transparency ...": converting is what we do
            warnings.simplefilter("ignore", UserWarning)
            rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return to_rgb(img)


def fit_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the image resized to fit `target` (h, w) keeping its aspect ratio (get_patch_output_size)."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def panels(image_size: tuple[int, int], cfg: LlavaNextConfig) -> tuple[Panel, Panel]:
    """The token layout: the base's P×P grid (no newline), then the unpadded tile grid with a newline per row."""
    P = cfg.patches_per_side
    _, (rows, cols) = anyres_layout(image_size, cfg)
    return Panel("base", P, P), Panel("tiles", rows.stop - rows.start, cols.stop - cols.start, newline=True)


def crops(img: Image.Image, cfg: LlavaNextConfig) -> list[Image.Image]:
    """The RGB crops the model sees, as PIL images: the base, then the tiles row by row."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"process_image expects a PIL image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise MinivarError(f"image has zero size ({img.width}x{img.height})")
    img = to_rgb_on_white(img)
    S = cfg.vision.image_size
    size = (img.height, img.width)
    best_h, best_w = select_best_resolution(size, cfg.image_grid_pinpoints)
    new_h, new_w = fit_size(size, (best_h, best_w))
    canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC),
                 ((best_w - new_w) // 2, (best_h - new_h) // 2))
    tiles = [canvas.crop((x, y, x + S, y + S)) for y in range(0, best_h, S) for x in range(0, best_w, S)]
    return [img.resize((S, S), resample=Image.Resampling.BICUBIC)] + tiles


def process_image(img: Image.Image, cfg: LlavaNextConfig) -> ImageInput:
    """A PIL image (any mode) → its ImageInput: float32 pixel_values [1 + tiles, 3, S, S] (the base first), its
    token count, its panels, meta {"image_size": (h, w)} (the model unpads with it)."""
    pieces = crops(img, cfg)
    pixels = torch.stack([_to_normalised_tensor(p, cfg.image_mean, cfg.image_std, cfg.rescale_factor) for p in pieces])
    size = (img.height, img.width)
    return ImageInput(pixel_values=pixels, num_tokens=count_image_tokens(size, cfg), panels=panels(size, cfg),
                      meta={"image_size": size})


def tile_view(img: Image.Image, cfg: LlavaNextConfig) -> tuple[Image.Image, Image.Image | None]:
    """What the two panels cover, as the model saw it: the base crop (S×S), and the tiles put back together into the
    padded canvas and cut to the rows/columns the unpadding keeps (one patch = patch_size px); None when the
    unpadding keeps no row (an extreme aspect ratio)."""
    pieces = crops(img, cfg)
    S, p = cfg.vision.image_size, cfg.vision.patch_size
    (n_rows, n_cols), (rows, cols) = anyres_layout((img.height, img.width), cfg)
    canvas = Image.new("RGB", (n_cols * S, n_rows * S))
    for i, tile in enumerate(pieces[1:]):
        canvas.paste(tile, ((i % n_cols) * S, (i // n_cols) * S))
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return pieces[0], None
    return pieces[0], canvas.crop((cols.start * p, rows.start * p, cols.stop * p, rows.stop * p))
