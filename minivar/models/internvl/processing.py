"""InternVL's image processing: a PIL image → tiles of 448×448 px, as transformers' processor (GotOcr2's PIL
backend with `crop_to_patches`, the setting InternVLProcessor always passes) — numbers equal, tests pin this.

  1. RGB (minivar.processing.to_rgb, as every family);
  2. the tile grid (cols, rows) among every (i, j) with min_patches ≤ i·j ≤ max_patches (preprocessor_config.json):
     the one whose aspect ratio i / j is closest to the image's width / height; on a tie the later grid of the list
     (sorted by tile count) wins while the image's area exceeds half of that grid's area in tile pixels
     (`grid_for`, transformers' get_optimal_tiled_canvas);
  3. the image resized (PIL bicubic, on uint8) to cols·448 × rows·448 and cut into its tiles, row by row; when there
     is more than one tile, the whole image resized to 448×448 (the thumbnail) is appended;
  4. ×(1/255) in float64, then float32; (x − mean) / std in float32 with ImageNet's mean/std.

Each tile becomes 256 LLM tokens (the vision tower's 32×32 patches, pixel-shuffled 2×2 → 16×16, model.py): an
image is 256 · (tiles + thumbnail) tokens — 1 tile 256, 2×3 tiles + thumbnail 1,792, the default cap of 12 tiles +
thumbnail 3,328. `max_patches` (--max-patches) caps it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...errors import MinivarError
from ...processing import to_rgb
from ..images import ImageInput, Panel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TileConfig:
    """preprocessor_config.json of an InternVL checkpoint. Where the file is absent, InternVL's released values
    (448 px tiles, 1–12 tiles, ImageNet mean/std); a file that is present fills what it leaves out from
    transformers' GotOcr2 image-processor class defaults, as transformers does (note: its size default is 384)."""
    tile: int = 448
    min_patches: int = 1
    max_patches: int = 12
    crop_to_patches: bool = True          # InternVLProcessor always passes True
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC.value

    @staticmethod
    def from_hf(d: dict, where: str) -> "TileConfig":
        if not isinstance(d, dict):
            raise MinivarError(f"{where} is not a JSON object")
        size = d.get("size", {"height": 384, "width": 384})
        if not isinstance(size, dict) or size.get("height") != size.get("width") or not size.get("height"):
            raise MinivarError(f"{where}: size {size} is not supported (square tiles: height = width)")
        kwargs = {"tile": size["height"], "image_mean": (0.48145466, 0.4578275, 0.40821073),
                  "image_std": (0.26862954, 0.26130258, 0.27577711)}        # GotOcr2's class defaults (CLIP's)
        for key in ("min_patches", "max_patches", "rescale_factor", "resample"):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        for key in ("image_mean", "image_std"):
            value = d.get(key)
            if value is not None:
                value = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
                if len(value) != 3:
                    raise MinivarError(f"{where}: {key} {list(value)} must give 3 values (R, G, B)")
                kwargs[key] = tuple(float(v) for v in value)
        cfg = TileConfig(**kwargs)
        if any(s == 0 for s in cfg.image_std):
            raise MinivarError(f"{where}: image_std {list(cfg.image_std)} has a zero")
        if cfg.resample not in {r.value for r in Image.Resampling}:
            raise MinivarError(f"{where}: resample {cfg.resample!r} is not a PIL resampling filter (3 is bicubic)")
        return cfg.with_patches(where=f"{where}: ")

    def with_patches(self, max_patches: int | None = None, min_patches: int | None = None,
                     where: str = "") -> "TileConfig":
        """The same config with the caller's tile bounds (None keeps the file's), checked."""
        cfg = replace(self, max_patches=self.max_patches if max_patches is None else max_patches,
                      min_patches=self.min_patches if min_patches is None else min_patches)
        for name in ("min_patches", "max_patches", "tile"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MinivarError(f"{where}`{name}` must be a positive integer, got {value!r}")
        if cfg.min_patches > cfg.max_patches:
            raise MinivarError(f"{where}`min_patches` {cfg.min_patches} is larger than `max_patches` {cfg.max_patches}")
        return cfg


def read_tile_config(directory: str, tile: int) -> TileConfig:
    """A checkpoint directory's preprocessor_config.json, or InternVL's released values for a `tile` px tower."""
    path = Path(directory) / "preprocessor_config.json" if directory else None
    if path is None or not path.is_file():
        return TileConfig(tile=tile)
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinivarError(f"'{path}' is not valid JSON ({e})") from None
    cfg = TileConfig.from_hf(d, f"preprocessor_config.json of '{directory}'")
    if cfg.tile != tile:
        raise MinivarError(f"preprocessor_config.json of '{directory}': tiles of {cfg.tile} px, but the vision "
                           f"tower reads {tile} px")
    return cfg


@lru_cache(maxsize=64)
def allowed_grids(min_patches: int, max_patches: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min ≤ cols·rows ≤ max, sorted by tile count (stable: cols, then rows, ascending)."""
    grids = [(i, j) for i in range(1, max_patches + 1) for j in range(1, max_patches + 1)
             if min_patches <= i * j <= max_patches]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def grid_for(height: int, width: int, tile: int, min_patches: int, max_patches: int) -> tuple[int, int]:
    """(cols, rows) of the tiles: the allowed grid whose aspect ratio is closest to width / height. A tie goes to
    the later grid (more tiles) while the image's area is more than half the grid's area in pixels — so a small
    image is not blown up to many tiles (transformers' rule, exact float comparisons included)."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in allowed_grids(min_patches, max_patches):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def tiles(img: Image.Image, cfg: TileConfig) -> tuple[list[Image.Image], tuple[int, int]]:
    """The RGB image → its tile images (row by row, then the thumbnail when there are several), and (cols, rows)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"InternVL's image processing expects a PIL image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise MinivarError(f"image has zero size ({img.width}x{img.height})")
    img = to_rgb(img)
    t = cfg.tile
    if not cfg.crop_to_patches or cfg.max_patches == 1:
        return [img.resize((t, t), resample=cfg.resample)], (1, 1)
    cols, rows = grid_for(img.height, img.width, t, cfg.min_patches, cfg.max_patches)
    canvas = img.resize((cols * t, rows * t), resample=cfg.resample)
    out = [canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
    if len(out) > 1:
        out.append(img.resize((t, t), resample=cfg.resample))           # the thumbnail: the whole image
    return out, (cols, rows)


def normalise(tile: Image.Image, cfg: TileConfig) -> torch.Tensor:
    """A tile → [3, t, t] float32: ×(1/255) in float64 then float32, (x − mean) / std in float32 (transformers')."""
    x = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1)
    x = (x.to(torch.float64) * cfg.rescale_factor).to(torch.float32)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def panels_of(cols: int, rows: int, side: int) -> tuple[Panel, ...]:
    """The token layout: one side×side panel per tile in reading order, then the thumbnail's (if any)."""
    out = tuple(Panel(f"tile {r + 1},{c + 1}", side, side) for r in range(rows) for c in range(cols))
    return out + ((Panel("thumbnail", side, side),) if len(out) > 1 else ())


def preprocess_image(img: Image.Image, cfg: TileConfig, tokens_side: int) -> ImageInput:
    """A PIL image → ImageInput: pixel_values [tiles, 3, t, t], tokens_side² tokens per tile (16² = 256)."""
    size = (img.height, img.width) if isinstance(img, Image.Image) else None
    parts, (cols, rows) = tiles(img, cfg)
    pixels = torch.stack([normalise(p, cfg) for p in parts])
    return ImageInput(pixels, len(parts) * tokens_side ** 2, panels_of(cols, rows, tokens_side),
                      {"grid": (cols, rows), "image_size": size})


def views(img: Image.Image, cfg: TileConfig) -> list[Image.Image]:
    """What each panel's tokens cover, as the model saw it: each tile, then the thumbnail (Family.view)."""
    return tiles(img, cfg)[0]
