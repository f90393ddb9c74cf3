"""Qwen2-VL / Qwen2.5-VL image processing: a PIL image → the flattened patches the vision tower reads.

The steps of transformers' Qwen2VLImageProcessor (both families use it), with its arithmetic, so the numbers are
identical to its PIL backend (`Qwen2VLImageProcessorPil`; tests pin this):
  1. RGB (minivar.processing.to_rgb, as for LLaVA: alpha dropped, 16-bit scaled — see "Differences" below);
  2. `smart_resize`: the nearest size whose sides are multiples of 28 (patch 14 × merge 2) and whose area lies in
     [min_pixels, max_pixels], keeping the aspect ratio (which must not exceed 200); PIL bicubic on uint8;
  3. ×(1/255) in float64, then float32; (x − mean) / std in float32 (CLIP's mean/std unless the config says others);
  4. the still image repeated `temporal_patch_size` (2) times in time, cut into 14×14 patches and flattened to
     [grid_h·grid_w, C·2·14·14], in merge order (the 4 patches of each 2×2 block consecutive, blocks row-major).
One image becomes grid_h·grid_w / 4 LLM tokens: a 448×448 image 16·16 = 256 tokens.

min_pixels / max_pixels come from preprocessor_config.json (top-level `min_pixels`/`max_pixels`, or `size:
{shortest_edge, longest_edge}`; the top-level keys win, as in transformers); a caller may override both. The hub
files say max_pixels 12,845,056 (up to 16,384 tokens per image): cap it to bound memory and time.

Differences from transformers 5.x: images with transparency are converted as LLaVA's (and transformers 4.x's)
`convert("RGB")` does — alpha dropped — where transformers 5.x composites them on white first; images without
transparency give identical pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from ...errors import MinivarError
from ...processing import to_rgb
from ..images import ImageInput, Panel  # noqa: F401  (ImageInput: for callers)

# OpenAI CLIP's normalisation constants (Qwen2-VL's preprocessor_config.json gives these).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class QwenImageConfig:
    """preprocessor_config.json of a Qwen2-VL / Qwen2.5-VL checkpoint; defaults are transformers' class defaults."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC.value
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        """Both sides of the resized image are multiples of this (28): a whole number of 2×2 merge blocks."""
        return self.patch_size * self.merge_size

    @staticmethod
    def from_hf(d: dict | None, name_or_path: str = "", defaults: "QwenImageConfig | None" = None) -> "QwenImageConfig":
        """The file's values over `defaults` (None: this class's, transformers' Qwen2VLImageProcessor's)."""
        where = f"preprocessor_config.json of '{name_or_path}'"
        defaults = QwenImageConfig() if defaults is None else defaults
        if d is None:
            return defaults
        if not isinstance(d, dict):
            raise MinivarError(f"{where} is not a JSON object")
        kwargs = {}
        size = d.get("size")
        if size is not None:
            if not isinstance(size, dict):
                raise MinivarError(f"{where}: size is not a JSON object")
            # A given `size` replaces the class default entirely (as in transformers); 4.x files spelled it
            # {min_pixels, max_pixels}, 5.x files {shortest_edge, longest_edge} (of the *area*, despite the names).
            kwargs["min_pixels"] = size.get("shortest_edge", size.get("min_pixels"))
            kwargs["max_pixels"] = size.get("longest_edge", size.get("max_pixels"))
        for key in ("min_pixels", "max_pixels"):        # the top-level keys win over `size`
            if d.get(key) is not None:
                kwargs[key] = d[key]
        if size is not None and (kwargs["min_pixels"] is None or kwargs["max_pixels"] is None):
            raise MinivarError(f"{where}: size {size} needs both shortest_edge and longest_edge")
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample",
                    "do_resize", "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        for key in ("image_mean", "image_std"):
            value = d.get(key)
            if value is not None:
                value = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
                if len(value) != 3:
                    raise MinivarError(f"{where}: {key} {list(value)} must give 3 values (R, G, B)")
                kwargs[key] = tuple(float(v) for v in value)
        cfg = replace(defaults, **kwargs)
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
                raise MinivarError(f"{where}: {key} must be a positive integer, got {getattr(cfg, key)!r}")
        if cfg.resample not in {r.value for r in Image.Resampling}:
            raise MinivarError(f"{where}: resample {cfg.resample!r} is not a PIL resampling filter (3 is bicubic)")
        if any(s == 0 for s in cfg.image_std):
            raise MinivarError(f"{where}: image_std {list(cfg.image_std)} has a zero")
        check_pixels(cfg.min_pixels, cfg.max_pixels, cfg.factor, where=f"{where}: ")
        return cfg

    def with_pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> "QwenImageConfig":
        """The same config with the caller's min_pixels / max_pixels (None keeps the file's)."""
        cfg = replace(self, min_pixels=self.min_pixels if min_pixels is None else min_pixels,
                      max_pixels=self.max_pixels if max_pixels is None else max_pixels)
        check_pixels(cfg.min_pixels, cfg.max_pixels, cfg.factor)
        return cfg


def check_pixels(min_pixels, max_pixels, factor: int, where: str = "") -> None:
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MinivarError(f"{where}`{name}` must be a positive integer, got {value!r}")
    if max_pixels < factor * factor:
        raise MinivarError(f"{where}`max_pixels` {max_pixels} is below one {factor}x{factor} block ({factor * factor})")
    if min_pixels > max_pixels:
        raise MinivarError(f"{where}`min_pixels` {min_pixels} is larger than `max_pixels` {max_pixels}")


class AspectRatioError(MinivarError):
    """An image too long and thin for smart_resize; the family's loader says it again naming its own model."""

    def __init__(self, width: int, height: int, model: str = "Qwen2-VL and Qwen2.5-VL take"):
        self.width, self.height = width, height
        ratio = max(height, width) / min(height, width)
        super().__init__(f"image {width}x{height} has an aspect ratio of {ratio:.1f}; {model} at most "
                         f"{MAX_ASPECT_RATIO} (pad or crop it)")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) → the (h, w) the image is resized to: multiples of `factor`, area in [min_pixels, max_pixels]
    (except that no side goes below `factor`), aspect ratio kept as nearly as that allows. transformers' rule."""
    if height < 1 or width < 1:
        raise MinivarError(f"image has zero size ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise AspectRatioError(width, height)
    # round() is Python's (halves to even), as in transformers: 42 / 28 = 1.5 → 2 blocks, 70 / 28 = 2.5 → 2.
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        # Shrink both sides by the same beta so the area is max_pixels, then round *down* to the factor.
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        # Grow to the area min_pixels, rounding *up*.
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def model_image(img: Image.Image, cfg: QwenImageConfig = QwenImageConfig()) -> Image.Image:
    """The image as the model sees it: RGB, resized by smart_resize (PIL, on uint8, the config's resample filter)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise MinivarError(f"image has zero size ({img.width}x{img.height})")
    img = to_rgb(img)
    if not cfg.do_resize:
        if img.height % cfg.factor or img.width % cfg.factor:
            raise MinivarError(f"image {img.width}x{img.height}: with do_resize false both sides must be multiples "
                               f"of {cfg.factor}")
        return img
    h, w = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return img.resize((w, h), resample=cfg.resample)


def patchify(x: torch.Tensor, cfg: QwenImageConfig) -> torch.Tensor:
    """[C, H, W] → [grid_h·grid_w, C·tp·p·p]: patches in merge order, the frame repeated tp times in each."""
    C, H, W = x.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = H // p, W // p
    # [C, H, W] → [C, gh/m, m, p, gw/m, m, p] → [gh/m, gw/m, m, m, C, p, p] (block row, block col, row/col in block)
    x = x.reshape(C, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    # A still image is a clip of tp identical frames: insert the time axis after C, as the Conv3d kernel expects.
    x = x.unsqueeze(5).expand(*x.shape[:5], tp, p, p)
    return x.reshape(gh * gw, C * tp * p * p)


def preprocess_image(img: Image.Image, cfg: QwenImageConfig = QwenImageConfig(), *, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> ImageInput:
    """A PIL image (any mode) → ImageInput with the flattened patches, the token count and the merged-token grid."""
    if min_pixels is not None or max_pixels is not None:
        cfg = cfg.with_pixels(min_pixels, max_pixels)
    size = (img.height, img.width) if isinstance(img, Image.Image) else None
    resized = model_image(img, cfg)
    x = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)          # [H, W, 3] → [3, H, W]
    if cfg.do_rescale:
        # Rescale in float64 and only then round to float32, as transformers' rescale() does.
        x = (x.to(torch.float64) * cfg.rescale_factor).to(torch.float32)
    else:
        x = x.to(torch.float32)
    if cfg.do_normalize:
        # float32 arithmetic with float32 constants (transformers casts mean/std to the image's dtype).
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std
    patches = patchify(x, cfg).contiguous()
    gh, gw = resized.height // cfg.patch_size, resized.width // cfg.patch_size
    m = cfg.merge_size
    return ImageInput(
        pixel_values=patches,
        num_tokens=gh * gw // (m * m),
        panels=(Panel("image", gh // m, gw // m),),
        meta={"grid_thw": (1, gh, gw), "image_size": size, "resized_size": (resized.height, resized.width)},
    )


def vision_inputs(images: list[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several images → the vision tower's inputs: (pixel_values [Σ patches, C·tp·p·p], grid_thw [n, 3] int64)."""
    if not images:
        raise MinivarError("`images` is empty")
    pixel_values = torch.cat([im.pixel_values for im in images])
    grid_thw = torch.tensor([im.meta["grid_thw"] for im in images], dtype=torch.int64)
    return pixel_values, grid_thw
