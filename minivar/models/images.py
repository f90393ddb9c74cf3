"""One image as a model family prepares it: its pixels, how many LLM tokens it becomes, and where each token sits.

Every family's image processor returns an ImageInput. Nothing downstream assumes a token count or a square grid:
the prompt's image placeholder expands to `num_tokens`, VAR's image span is wherever those tokens are, and the
pictures draw each token at the (panel, row, column) that `token_layout` gives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class Panel(NamedTuple):
    """A rectangle of image tokens in the token order: `rows` × `cols` tokens, row by row; with `newline`, one
    extra token (LLaVA-NeXT's image_newline) closes each row. A named tuple: equal to (name, rows, cols, newline)."""
    name: str
    rows: int
    cols: int
    newline: bool = False

    @property
    def num_tokens(self) -> int:
        return self.rows * (self.cols + int(self.newline))


@dataclass
class ImageInput:
    """pixel_values: family-specific (LLaVA-1.5: [3, S, S]); num_tokens: the image's LLM tokens; panels: their
    layout in token order; meta: what else the model needs (e.g. the original size, a patch grid)."""
    pixel_values: torch.Tensor
    num_tokens: int
    panels: tuple[Panel, ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        # a family may give plain (name, rows, cols[, newline]) tuples: the same panels
        self.panels = tuple(p if isinstance(p, Panel) else Panel(*p) for p in self.panels)
        if sum(p.num_tokens for p in self.panels) != self.num_tokens:
            raise ValueError(f"panels hold {sum(p.num_tokens for p in self.panels)} tokens, not {self.num_tokens}")

    def to(self, device, dtype=None) -> "ImageInput":
        px = self.pixel_values.to(device=device, dtype=dtype if dtype is not None else self.pixel_values.dtype)
        return ImageInput(px, self.num_tokens, self.panels, dict(self.meta))


def token_layout(panels) -> list[tuple[int, int, int] | None]:
    """(panel index, row, column) of each image token in order; None for a row's newline token."""
    out: list[tuple[int, int, int] | None] = []
    for i, p in enumerate(panels):
        for r in range(p.rows):
            out.extend((i, r, c) for c in range(p.cols))
            if p.newline:
                out.append(None)
    return out


def square_image(pixel_values: torch.Tensor, grid: int, cls: bool = False) -> ImageInput:
    """A LLaVA-1.5 image: pixels [3, S, S] → grid × grid patch tokens (S / patch = grid), after one CLS token when
    the features keep it (vision_feature_select_strategy "full")."""
    panels = ((Panel("CLS", 1, 1),) if cls else ()) + (Panel("image", grid, grid),)
    return ImageInput(pixel_values, grid * grid + int(cls), panels)
