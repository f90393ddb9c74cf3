"""Pictures of what the model looks at, drawn with pillow alone (no plotting framework, no torch).

Every function here takes the JSON-ready numbers that `inspection.picture_numbers` computes (and `save` writes next to
the pictures as attention.json), plus the image as the model saw it, so any picture can be redrawn from the files:

    python -m minivar.viz out/attention.json [OUT_DIR]

The pictures (file names in FILES):
  visual_sinks_on_image.png           the input after pad/crop, then per layer range the visual-sink patches marked
  answer_attention_layers{lo}-{hi}.png    answer-token attention over the patch grid on the image (before/after VAR)
  heads_image_attention.png           layers × heads: image attention, non-sink ratio, image-centric selection
  sink_scores_phi.png                 φ of every image token in every layer
  damro_outliers.png                  with DAMRO: the ViT's CLS attention with its k outliers, and the outliers next
                                      to the visual sinks (their overlap counted)

The layout comes from the model family (attention.json's "panels"): LLaVA-1.5 one 24×24 grid over the 336-px
image; LLaVA-NeXT the base crop's grid, then the unpadded tile grid (its newline tokens are not drawn); Qwen2-VL
the merged-patch grid over the smart-resized image. Each panel is drawn over its own view of the image.

Text is ASCII only: pillow's default font (Aileron) has no Greek letters, so φ/τ/ρ are spelled phi/tau/rho.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import MinivarError

MIN_SIDE = 512                      # every picture is at least this long on its longer side
SINK_MARK = (255, 0, 255)           # visual-sink outline colour (never produced by the grey panels it is drawn on)
MASK_MARK = (0, 255, 255)           # masked-patch outline colour (cyan: not in the inferno map the heat uses)
INK = (25, 25, 25)
GREY = (120, 120, 120)
BACKGROUND = (255, 255, 255)
NUMBERS_FILE = "attention.json"
OUTLIER_MARK = (0, 200, 0)          # DAMRO's ViT outliers (green: in neither the inferno map nor the grey image)
FILES = {"sinks": "visual_sinks_on_image.png", "attention": "answer_attention_layers{lo}-{hi}.png",
         "heads": "heads_image_attention.png", "phi": "sink_scores_phi.png", "damro": "damro_outliers.png"}

# colour maps as a few stops, linearly interpolated (matplotlib's viridis / inferno, sampled)
VIRIDIS = [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
           (92, 200, 99), (170, 220, 50), (253, 231, 37)]
INFERNO = [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
           (250, 193, 39), (252, 255, 164)]
COOL = [(245, 245, 245), (150, 175, 210), (40, 70, 150)]        # φ below τ: light → blue
HOT = [(255, 170, 0), (225, 50, 20), (130, 0, 30)]              # φ at or above τ: orange → dark red


def interpolate(stops, t: float) -> tuple[int, int, int]:
    t = 0.0 if not t > 0 else (1.0 if t > 1 else t)               # also maps NaN to 0
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i
    return tuple(round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1]))


def linear(stops, vmin: float, vmax: float):
    span = (vmax - vmin) or 1.0
    return lambda v: interpolate(stops, (v - vmin) / span)


def phi_colours(vmax: float, tau: float):
    """Below τ a light-to-blue ramp, at and above τ a red-to-yellow one: sinks stand out at a glance."""
    def colour(v):
        if v < tau:
            return interpolate(COOL, v / tau)
        return interpolate(HOT, (v - tau) / max(vmax - tau, 1e-9))
    return colour


# ---------------------------------------------------------------------------------------------------------------
# Small drawing helpers

@functools.lru_cache(maxsize=None)
def font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                                              # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def text_size(text: str, size: int = 14) -> tuple[int, int]:
    left, top, right, bottom = font(size).getbbox(text or " ")
    return right - left, bottom + 2


def ascii_text(text: str) -> str:
    """What the default font can draw: printable ASCII; other characters become '?', newlines spaces."""
    return "".join(c if 32 <= ord(c) < 127 else (" " if c in "\n\t" else "?") for c in text)


def fit(text: str, width: int, size: int = 14) -> str:
    text = ascii_text(text)
    if text_size(text, size)[0] <= width:
        return text
    while text and text_size(text + "...", size)[0] > width:
        text = text[:-1]
    return text + "..."


def wrap(text: str, width: int, size: int = 14, max_lines: int = 3) -> list[str]:
    """Break text into lines of at most `width` px at spaces; the last line is cut with '...' if it is too long."""
    words, lines = ascii_text(text).split(" "), []
    line = ""
    for w in words:
        trial = f"{line} {w}" if line else w
        if text_size(trial, size)[0] <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = "    " + w                                   # continuation lines are indented
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [fit(t, width, size) for t in lines]


def label(text: str, size: int = 14, colour=INK, rotate: bool = False) -> Image.Image:
    w, h = text_size(text, size)
    im = Image.new("RGB", (w + 2, h + 2), BACKGROUND)
    ImageDraw.Draw(im).text((1, 1), text, font=font(size), fill=colour)
    return im.rotate(90, expand=True) if rotate else im


def heat(values: list[list[float]], colour, cell_w: int, cell_h: int) -> Image.Image:
    """A rows × cols grid of values → an RGB image with each value a cell_w × cell_h block."""
    rows, cols = len(values), len(values[0])
    im = Image.new("RGB", (cols, rows))
    im.putdata([colour(v) for row in values for v in row])
    return im.resize((cols * cell_w, rows * cell_h), Image.Resampling.NEAREST)


def nice_max(x: float) -> float:
    """Round a positive maximum up to 1, 2, 2.5 or 5 × 10^k for a readable colour scale."""
    if not x > 0:
        return 1.0
    k = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if x <= m * k * (1 + 1e-9):
            return m * k
    return 10 * k


def fmt(v: float) -> str:
    return f"{v:.3g}" if v else "0"


def axes(plot: Image.Image, *, title: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
         xticks=(), yticks=()) -> tuple[Image.Image, tuple[int, int]]:
    """Frame a plot with a title, tick marks and labels, axis labels. Ticks are (pixel offset in the plot, text).
    Returns the framed image and where the plot's top-left corner is in it."""
    tick_w = max([text_size(t)[0] for _, t in yticks] or [0])
    ylab = label(ylabel, rotate=True) if ylabel else None
    left = (ylab.width + 4 if ylab else 0) + (tick_w + 8 if yticks else 2)
    tick_h = max([text_size(t)[1] for _, t in xticks] or [0])
    xlab = label(xlabel) if xlabel else None
    bottom = (tick_h + 6 if xticks else 2) + (xlab.height + 2 if xlab else 0)
    # the whole title (a panel narrower than its title grows to hold it: Qwen2-VL's panels of a few tokens)
    ttl = label(fit(title, max(plot.width + left + 40, 600)), 15) if title else None
    top = ttl.height + 4 if ttl else 2
    right = 12
    # wide enough for the title, the x label, and a last tick label hanging over the plot's right edge
    width = max(left + plot.width + right, ttl.width if ttl else 0, xlab.width + left if xlab else 0)
    # a y label longer than the plot is tall (a panel one token high) hangs below it, never above it
    height = top + max(plot.height + bottom, ylab.height if ylab else 0)
    im = Image.new("RGB", (width, height), BACKGROUND)
    im.paste(plot, (left, top))
    d = ImageDraw.Draw(im)
    d.rectangle([left - 1, top - 1, left + plot.width, top + plot.height], outline=INK)
    for x, t in xticks:
        d.line([left + x, top + plot.height, left + x, top + plot.height + 4], fill=INK)
        w = text_size(t)[0]
        d.text((left + x - w // 2, top + plot.height + 5), t, font=font(14), fill=INK)
    for y, t in yticks:
        d.line([left - 5, top + y, left - 1, top + y], fill=INK)
        w, h = text_size(t)
        d.text((left - 7 - w, top + y - h // 2), t, font=font(14), fill=INK)
    if ttl:                                  # centred over the plot where it fits, else moved left to fit whole
        im.paste(ttl, (max(0, min(left + (plot.width - ttl.width) // 2, width - ttl.width)), 0))
    if ylab:
        im.paste(ylab, (0, top + max(0, (plot.height - ylab.height) // 2)))
    if xlab:
        im.paste(xlab, (left + (plot.width - xlab.width) // 2, top + plot.height + bottom - xlab.height))
    return im, (left, top)


def colorbar(height: int, colour, vmin: float, vmax: float, title: str, ticks=None, marks=()) -> Image.Image:
    """A vertical colour scale (vmax at the top) with tick values and a rotated title; marks: (value, text)."""
    strip = Image.new("RGB", (18, height))
    strip.putdata([colour(vmax - (vmax - vmin) * (y + 0.5) / height) for y in range(height) for _ in range(18)])
    ticks = ticks if ticks is not None else [vmin, (vmin + vmax) / 2, vmax]
    items = [(v, fmt(v)) for v in ticks] + list(marks)
    tick_w = max(text_size(t)[0] for _, t in items)
    ttl = label(title, rotate=True)
    pad = 8
    # a title longer than the strip makes the picture taller, never clipped
    im = Image.new("RGB", (18 + 6 + tick_w + 6 + ttl.width, max(height + 2 * pad, ttl.height)), BACKGROUND)
    im.paste(strip, (0, pad))
    d = ImageDraw.Draw(im)
    d.rectangle([0, pad - 1, 17, pad + height], outline=INK)
    for v, t in items:
        y = pad + round((vmax - v) / ((vmax - vmin) or 1) * (height - 1))
        d.line([18, y, 22, y], fill=INK)
        h = text_size(t)[1]
        d.text((24, y - h // 2), t, font=font(14), fill=INK)
    im.paste(ttl, (im.width - ttl.width, pad + max(0, (height - ttl.height) // 2)))
    return im


def stack(images, *, horizontal: bool, gap: int = 16) -> tuple[Image.Image, list[tuple[int, int]]]:
    """Place images in a row (top-aligned) or a column (left-aligned); returns the offsets too."""
    if horizontal:
        size = (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images))
    else:
        size = (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1))
    im = Image.new("RGB", size, BACKGROUND)
    offsets, pos = [], 0
    for part in images:
        xy = (pos, 0) if horizontal else (0, pos)
        im.paste(part, xy)
        offsets.append(xy)
        pos += (part.width if horizontal else part.height) + gap
    return im, offsets


def figure(title: str, lines, body: Image.Image, legend=()) -> tuple[Image.Image, tuple[int, int]]:
    """Title and explanatory lines above the body, legend lines below, margins; at least MIN_SIDE px wide."""
    m = 16
    width = max(body.width + 2 * m, MIN_SIDE)
    inner = width - 2 * m
    head = [label(fit(title, inner, 20), 20)] + [label(t, 14, GREY) for line in lines for t in wrap(line, inner)]
    foot = [label(t, 14) for line in legend for t in wrap(line, inner)]
    height = m + sum(h.height for h in head) + 10 + body.height + 10 + sum(f.height for f in foot) + m
    im = Image.new("RGB", (width, height), BACKGROUND)
    y = m
    for h in head:
        im.paste(h, (m, y))
        y += h.height
    y += 10
    origin = (m + (inner - body.width) // 2, y)
    im.paste(body, origin)
    y += body.height + 10
    for f in foot:
        im.paste(f, (m, y))
        y += f.height
    return im, origin


def _grey(view: Image.Image, size: int) -> Image.Image:
    return view.convert("L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def _grid_ticks(grid: int, cell: int):
    step = next(s for s in (1, 2, 4, 8, 16, 32, 64) if grid / s <= 8)
    return [(i * cell + cell // 2, str(i)) for i in range(0, grid, step)]


# ---------------------------------------------------------------------------------------------------------------
# The four pictures

def _sinks_figure(numbers: dict, view: Image.Image):
    grid, size = numbers["grid"], numbers["image_size"]
    cell = max(size // grid, 240 // grid, 1)       # one patch = cell × cell pixels (14 for CLIP-L/14 at 336)
    side = grid * cell
    tau, dims = numbers["tau"], numbers["sink_dims"]
    panels = [(view.convert("RGB").resize((side, side), Image.Resampling.BICUBIC),
               f"input as the model saw it ({numbers.get('image_aspect_ratio', 'pad')}, {size}x{size})")]
    for lo, hi in numbers["sink_ranges"]:
        patches = sorted({p for layer in range(lo, hi + 1) for p in numbers["visual_sinks"].get(str(layer), [])})
        im = _grey(view, side)
        d = ImageDraw.Draw(im)
        for p in patches:
            r, c = divmod(p, grid)
            d.rectangle([c * cell, r * cell, c * cell + cell - 1, r * cell + cell - 1], outline=SINK_MARK,
                        width=2 if cell >= 6 else 1)
        name = f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"
        panels.append((im, f"{name}: {len(patches)} sink patch{'es' if len(patches) != 1 else ''}"))
    framed = [axes(im, title=t) for im, t in panels]
    cols = min(3, len(framed))
    rows, plot_xy = [], []
    for i in range(0, len(framed), cols):
        row, offs = stack([f for f, _ in framed[i:i + cols]], horizontal=True)
        rows.append(row)
        plot_xy.append([(ox + f[1][0], oy + f[1][1]) for (ox, oy), f in zip(offs, framed[i:i + cols])])
    body, row_offs = stack(rows, horizontal=False, gap=12)
    fig, (bx, by) = figure(
        "Visual sink patches on the image",
        [f"image tokens with sink score phi >= tau={tau:g} in at least one layer of the range "
         f"(sink dims {', '.join(map(str, dims)) or 'none'})",
         f"prompt: {numbers.get('prompt', '')}"],
        body,
        ["Legend: magenta square = visual sink patch (one patch = one image token); grey = the same input image."])
    origins = [(bx + rx + px, by + ry + py) for (rx, ry), row in zip(row_offs, plot_xy) for px, py in row]
    return fig, origins, cell


def draw_sinks(numbers: dict, view: Image.Image) -> Image.Image:
    return _sinks_figure(numbers, view)[0]


class SinkLayout:
    """Where the sinks picture put things: top-left pixel of each panel (0 = the input, 1.. = the layer ranges)."""

    def __init__(self, origins: list[tuple[int, int]], cell: int, grid: int):
        self.origins, self.cell, self.grid = origins, cell, grid

    def box(self, panel: int, patch: int) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1, inclusive) of `patch` in `panel`: where its mark is drawn."""
        x, y = self.origins[panel]
        r, c = divmod(patch, self.grid)
        return x + c * self.cell, y + r * self.cell, x + (c + 1) * self.cell - 1, y + (r + 1) * self.cell - 1


def sink_layout(numbers: dict, view: Image.Image) -> SinkLayout:
    _, origins, cell = _sinks_figure(numbers, view)
    return SinkLayout(origins, cell, numbers["grid"])


def draw_attention(numbers: dict, view: Image.Image) -> Image.Image:
    grid, size = numbers["grid"], numbers["image_size"]
    cell = max(size // grid, 480 // grid)
    side = grid * cell
    attn = numbers["attention"]
    kinds = [k for k in ("before", "after") if attn.get(k) is not None]
    vmax = nice_max(max(max(attn[k]) for k in kinds))
    colour = linear(INFERNO, 0.0, vmax)
    base = _grey(view, side)
    names = {"before": "before VAR", "after": "after VAR"} if numbers.get("var") else {"before": "no VAR"}
    masked = masked_patches(numbers)
    panels = []
    for k in kinds:
        values = [attn[k][r * grid:(r + 1) * grid] for r in range(grid)]
        over = Image.blend(base, heat(values, colour, cell, cell), 0.65)
        d = ImageDraw.Draw(over)
        for p in masked:
            r, c = divmod(p, grid)
            d.rectangle([c * cell, r * cell, c * cell + cell - 1, r * cell + cell - 1], outline=MASK_MARK,
                        width=2 if cell >= 6 else 1)
        share = sum(attn[k])
        panels.append(axes(over, title=f"{names[k]}: {100 * share:.1f}% of the attention on the image",
                           xlabel="patch column", ylabel="patch row",
                           xticks=_grid_ticks(grid, cell), yticks=_grid_ticks(grid, cell))[0])
    panels.append(colorbar(side, colour, 0.0, vmax, "mean attention probability per patch"))
    body, _ = stack(panels, horizontal=True, gap=20)
    lo, hi = numbers["layer_range"]
    lines, legend = attention_text(numbers)
    return figure(f"Attention of the answer over the image, layers {lo}-{hi}", lines, body, legend)[0]


def attention_text(numbers: dict) -> tuple[list[str], list[str]]:
    """The attention picture's lines above (what is averaged, prompt, answer) and its legend lines below."""
    lo, hi = numbers["layer_range"]
    panels = sum(numbers["attention"].get(k) is not None for k in ("before", "after"))
    lines = [f"mean over {numbers['n_heads']} heads of layers {lo}-{hi} and {len(numbers['answer_rows'])} "
             f"answer-token rows (the rows that produce the answer)"
             + ("; both panels on one colour scale" if panels > 1 else ""),
             f"prompt: {numbers.get('prompt', '')}", f"answer: {numbers.get('answer', '')}"]
    legend = ["Legend: bright = much attention on that patch; the colour scale is on the right."]
    if numbers.get("masked"):
        lines.append(f"masked: {numbers['masked']['kind'].replace('_', ' ')}")
        legend.append(f"cyan square = masked patch ({len(masked_patches(numbers))} in layers {lo}-{hi}): its key "
                      f"was masked, so no attention can reach it.")
    return lines, legend


def masked_patches(numbers: dict) -> list[int]:
    """The image patches whose keys were masked in the picture's layer range (a random mask: in every layer)."""
    masked = numbers.get("masked") or {}
    patches = masked.get("patches", [])
    if isinstance(patches, dict):               # visual sinks: per layer
        lo, hi = numbers["layer_range"]
        return sorted({p for layer in range(lo, hi + 1) for p in patches.get(str(layer), [])})
    return sorted(set(patches))


# ---------------------------------------------------------------------------------------------------------------
# Layouts of several panels, or of one that is not square (LLaVA-NeXT, Qwen2-VL): every value of an image token is
# drawn at its (panel, row, column); newline tokens are listed apart (attention.json's newline_tokens), never drawn.

def panels_of(numbers: dict) -> list[dict]:
    """attention.json's panels; an older file (one square grid, no "panels") as that one panel."""
    if numbers.get("panels"):
        return numbers["panels"]
    g = numbers["grid"]
    return [{"name": "image", "rows": g, "cols": g, "newline": False, "first": 0}]


def token_cells(numbers: dict) -> list[tuple[int, int, int] | None]:
    """(panel, row, col) of every image token in span order; None for a newline token."""
    out = []
    for i, p in enumerate(panels_of(numbers)):
        for r in range(p["rows"]):
            out.extend((i, r, c) for c in range(p["cols"]))
            if p["newline"]:
                out.append(None)
    return out


def panel_values(numbers: dict, values) -> list[list[list[float]]]:
    """Per-token values (span order) → one rows × cols grid per panel (newline tokens dropped)."""
    grids = [[[0.0] * p["cols"] for _ in range(p["rows"])] for p in panels_of(numbers)]
    for v, cell in zip(values, token_cells(numbers)):
        if cell is not None:
            grids[cell[0]][cell[1]][cell[2]] = v
    return grids


def panel_marks(numbers: dict, offsets) -> list[set[tuple[int, int]]]:
    """Span offsets (sinks, masked tokens) → per panel the (row, col) cells to mark (newline tokens dropped)."""
    cells = token_cells(numbers)
    marks = [set() for _ in panels_of(numbers)]
    for i in offsets:
        if 0 <= i < len(cells) and cells[i] is not None:
            marks[cells[i][0]].add(cells[i][1:])
    return marks


def as_views(numbers: dict, view) -> list:
    """One view (an image, or None) per panel: a list as saved, or the one image for every panel."""
    if isinstance(view, (list, tuple)):
        return list(view)
    return [view] * len(panels_of(numbers))


def drawable(numbers: dict, views) -> list[int]:
    return [i for i, p in enumerate(panels_of(numbers)) if views[i] is not None and p["rows"] and p["cols"]]


def panel_cell(p: dict, view: Image.Image) -> int:
    """Pixels per token cell: the view's own (14 for CLIP, 28 for Qwen's merged patches), at least 240 px a side."""
    return max(view.width // p["cols"], 240 // max(p["rows"], p["cols"]), 1)


def _on_view(view: Image.Image, p: dict, cell: int, grey: bool) -> Image.Image:
    size = (p["cols"] * cell, p["rows"] * cell)
    im = view.convert("L").convert("RGB") if grey else view.convert("RGB")
    return im.resize(size, Image.Resampling.BICUBIC)


def _outline(d: ImageDraw.ImageDraw, cells, cell: int, colour, inset: int = 0) -> None:
    for r, c in cells:
        d.rectangle([c * cell + inset, r * cell + inset, c * cell + cell - 1 - inset, r * cell + cell - 1 - inset],
                    outline=colour, width=2 if cell >= 6 else 1)


def _grid_figure(items, per_row: int = 3):
    """items: rows of (plot, title) → the framed body and the plot origin of every item in it (row-major)."""
    rows, plot_xy = [], []
    for group in items:
        for i in range(0, len(group), per_row):
            framed = [axes(im, title=t) for im, t in group[i:i + per_row]]
            row, offs = stack([f for f, _ in framed], horizontal=True)
            rows.append(row)
            plot_xy.append([(ox + f[1][0], oy + f[1][1]) for (ox, oy), f in zip(offs, framed)])
    body, row_offs = stack(rows, horizontal=False, gap=12)
    return body, [(rx + px, ry + py) for (rx, ry), row in zip(row_offs, plot_xy) for px, py in row]


def _sinks_panels(numbers: dict, views):
    tau, dims = numbers["tau"], numbers["sink_dims"]
    panels = panels_of(numbers)
    items, where = [], []                          # where: (panel, layer range index or None, cell) per item
    for i in drawable(numbers, views):
        p, view = panels[i], views[i]
        cell = panel_cell(p, view)
        group = [(_on_view(view, p, cell, False), f"{p['name']}: as the model saw it ({view.width}x{view.height})")]
        where.append((i, None, cell))
        for j, (lo, hi) in enumerate(numbers["sink_ranges"]):
            offsets = {o for layer in range(lo, hi + 1) for o in numbers["visual_sinks"].get(str(layer), [])}
            marks = panel_marks(numbers, offsets)[i]
            im = _on_view(view, p, cell, True)
            _outline(ImageDraw.Draw(im), marks, cell, SINK_MARK)
            name = f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"
            group.append((im, f"{p['name']}, {name}: {len(marks)} sink{'s' if len(marks) != 1 else ''}"))
            where.append((i, j, cell))
        items.append(group)
    body, origins = _grid_figure(items, per_row=len(numbers["sink_ranges"]) + 1 if len(items) > 1 else 3)
    newline = len(numbers.get("newline_tokens") or [])
    fig, (bx, by) = figure(
        "Visual sink tokens on the image",
        [f"image tokens with sink score phi >= tau={tau:g} in at least one layer of the range "
         f"(sink dims {', '.join(map(str, dims)) or 'none'}); one row per panel: "
         + ", ".join(f"{p['name']} {p['rows']}x{p['cols']}" for p in panels),
         f"prompt: {numbers.get('prompt', '')}"],
        body,
        ["Legend: magenta square = visual sink (one square = one image token); grey = the same view."]
        + ([f"{newline} newline tokens (one after each tile row) are not drawn: attention.json lists them "
            f"(newline_tokens)."] if newline else []))
    return fig, [((bx + x, by + y), w) for (x, y), w in zip(origins, where)]


class PanelLayout:
    """Where the sinks picture put things in a multi-panel layout: per item its top-left pixel, its panel, its layer
    range (None: the input view) and the pixels per token cell."""

    def __init__(self, items):
        self.items = items

    def item(self, panel: int, layer_range: int | None) -> int:
        return next(k for k, (_, (p, j, _)) in enumerate(self.items) if p == panel and j == layer_range)

    def box(self, item: int, row: int, col: int) -> tuple[int, int, int, int]:
        (x, y), (_, _, cell) = self.items[item]
        return x + col * cell, y + row * cell, x + (col + 1) * cell - 1, y + (row + 1) * cell - 1


def panel_layout(numbers: dict, views) -> PanelLayout:
    return PanelLayout(_sinks_panels(numbers, as_views(numbers, views))[1])


def _attention_panels(numbers: dict, views) -> Image.Image:
    attn = numbers["attention"]
    kinds = [k for k in ("before", "after") if attn.get(k) is not None]
    vmax = nice_max(max(max(attn[k] or [0.0]) for k in kinds))
    colour = linear(INFERNO, 0.0, vmax)
    names = {"before": "before VAR", "after": "after VAR"} if numbers.get("var") else {"before": "no VAR"}
    masked = panel_marks(numbers, masked_patches(numbers))
    panels = panels_of(numbers)
    rows = []
    for i in drawable(numbers, views):
        p, view = panels[i], views[i]
        cell = panel_cell(p, view)
        base = _on_view(view, p, cell, True)
        row = []
        for k in kinds:
            grid = panel_values(numbers, attn[k])[i]
            over = Image.blend(base, heat(grid, colour, cell, cell), 0.65)
            _outline(ImageDraw.Draw(over), masked[i], cell, MASK_MARK)
            share = sum(v for line in grid for v in line)
            row.append(axes(over, title=f"{p['name']}, {names[k]}: {100 * share:.1f}% of the attention",
                            xlabel="token column", ylabel="token row",
                            xticks=_grid_ticks(p["cols"], cell), yticks=_grid_ticks(p["rows"], cell))[0])
        rows.append(stack(row, horizontal=True, gap=20)[0])
    column, _ = stack(rows, horizontal=False, gap=12)
    bar = colorbar(min(column.height, 480), colour, 0.0, vmax, "mean attention probability per token")
    body, _ = stack([column, bar], horizontal=True, gap=20)
    lo, hi = numbers["layer_range"]
    lines, legend = attention_text(numbers)
    if numbers.get("newline_tokens"):
        nl = sum(attn[kinds[0]][o] for o in numbers["newline_tokens"] if o < len(attn[kinds[0]]))
        legend.append(f"{len(numbers['newline_tokens'])} newline tokens are not drawn ({100 * nl:.1f}% of the "
                      f"attention, {names[kinds[0]]}).")
    return figure(f"Attention of the answer over the image, layers {lo}-{hi}", lines, body, legend)[0]


def draw_damro(numbers: dict, view) -> Image.Image:
    """DAMRO's picture: the CLS attention of the ViT layer DAMRO scores, over the crop it scores (LLaVA-1.5: the
    image; LLaVA-NeXT: the base), its k outliers outlined green; then the outliers next to the visual sinks."""
    dam, overlap = numbers["damro"], numbers["damro_var_overlap"]
    i = dam["panel"]
    p = panels_of(numbers)[i]
    if "grid" in dam:              # scores per patch, finer than the panel's tokens (InternVL: 2×2 patches a token)
        p = dict(p, rows=dam["grid"][0], cols=dam["grid"][1])
    v = as_views(numbers, view)[i]
    cell = panel_cell(p, v)
    cls = dam["cls_attention"]
    grid = [cls[r * p["cols"]:(r + 1) * p["cols"]] for r in range(p["rows"])]
    # from the smallest score up: CLS attention is nearly flat over most patches, the outliers stand out
    vmin, vmax = min(cls), max(cls)
    colour = linear(INFERNO, vmin, vmax)
    out_cells = [divmod(o, p["cols"]) for o in dam["outliers"]]
    over = Image.blend(_on_view(v, p, cell, True), heat(grid, colour, cell, cell), 0.65)
    _outline(ImageDraw.Draw(over), out_cells, cell, OUTLIER_MARK)
    both = _on_view(v, p, cell, True)
    d = ImageDraw.Draw(both)
    _outline(d, [divmod(s, p["cols"]) for s in overlap["visual_sink_patches"]], cell, SINK_MARK)
    _outline(d, out_cells, cell, OUTLIER_MARK, inset=2 if cell >= 10 else 0)      # inside a sink's square
    ticks = dict(xticks=_grid_ticks(p["cols"], cell), yticks=_grid_ticks(p["rows"], cell))
    panels = [axes(over, title=f"{p['name']}: CLS attention, vision layer {dam['layer']}", xlabel="patch column",
                   ylabel="patch row", **ticks)[0],
              colorbar(over.height, colour, vmin, vmax, "CLS attention (DAMRO's score)"),
              axes(both, title=f"outliers and visual sinks: {overlap['count']} shared", xlabel="patch column",
                   ylabel="patch row", **ticks)[0]]
    body, _ = stack(panels, horizontal=True, gap=20)
    return figure(
        "DAMRO's ViT outliers and VAR's visual sinks",
        [f"CLS row of softmax(q k^T / sqrt(C)) of vision layer {dam['layer']} over all patches (full width, no "
         f"head split): DAMRO's outlier score; its top-{len(dam['outliers'])} are the outliers",
         f"{overlap['count']} of {len(dam['outliers'])} outliers are visual sinks in some layer "
         f"({len(overlap['visual_sink_patches'])} visual-sink patches on this panel)",
         f"prompt: {numbers.get('prompt', '')}"],
        body,
        ["Legend: green square = DAMRO outlier (top-k CLS attention); magenta square = visual sink "
         "(phi >= tau in at least one layer); both = shared (attention.json: damro_var_overlap)."])[0]


def draw_cls_layers(cls_by_layer: dict, view: Image.Image, rows: int, cols: int, outliers=()) -> Image.Image:
    """The vision tower's CLS attention per layer (probe.vision_cls_attention, one crop: {layer: N values}, as
    lists or anything with tolist()) as heat maps over `view`, one per layer on a shared colour scale; `outliers`
    (patch indices) outlined green on every map."""
    values = {int(layer): list(v.tolist() if hasattr(v, "tolist") else v) for layer, v in cls_by_layer.items()}
    if not values or any(len(v) != rows * cols for v in values.values()):
        raise MinivarError(f"draw_cls_layers: every layer needs {rows}x{cols} = {rows * cols} values")
    vmin = min(min(v) for v in values.values())
    vmax = max(max(v) for v in values.values())
    colour = linear(INFERNO, vmin, vmax)
    p = {"rows": rows, "cols": cols}
    cell = panel_cell(p, view)
    base = _on_view(view, p, cell, True)
    items = []
    for layer, v in sorted(values.items()):
        over = Image.blend(base, heat([v[r * cols:(r + 1) * cols] for r in range(rows)], colour, cell, cell), 0.65)
        _outline(ImageDraw.Draw(over), [divmod(o, cols) for o in outliers], cell, OUTLIER_MARK)
        items.append((over, f"vision layer {layer}"))
    body, _ = _grid_figure([items], per_row=4)
    body, _ = stack([body, colorbar(min(body.height, 320), colour, vmin, vmax, "CLS attention")], horizontal=True)
    return figure("CLS attention of the vision tower, per layer",
                  ["the CLS token's attention to each patch (DAMRO's full-width score, or the mean of heads)"],
                  body, ["Legend: bright = much CLS attention; green square = an outlier given."] if outliers else [])[0]


def draw_heads(numbers: dict) -> Image.Image:
    heads = numbers["heads"]
    L, H = numbers["n_layers"], numbers["n_heads"]
    cell = max(8, min(40, 320 // max(L, H)))
    a, r, sel = heads["image_attention"], heads["nonsink_ratio"], heads["selected_fraction"]
    rule = numbers["selection_rule"]
    xt = [(h * cell + cell // 2, str(h)) for h in range(0, H, max(1, H // 8))]
    yt = [(l * cell + cell // 2, str(l)) for l in range(0, L, max(1, L // 8))]
    a_max = nice_max(max(max(row) for row in a))
    panels = []
    for values, vmax, title, scale in ((a, a_max, "image attention A", "mean A"),
                                       (r, 1.0, "non-sink ratio r", "mean r"),
                                       (sel, 1.0, "image-centric selection", "fraction selected")):
        colour = linear(VIRIDIS, 0.0, vmax)
        plot = heat(values, colour, cell, cell)
        d = ImageDraw.Draw(plot)
        rad = max(2, cell // 5)
        for l in range(L):
            for h in range(H):
                if sel[l][h] >= 0.5:
                    cx, cy = h * cell + cell // 2, l * cell + cell // 2
                    d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=(255, 255, 255), outline=(0, 0, 0))
        framed = axes(plot, title=title, xlabel="head", ylabel="layer", xticks=xt, yticks=yt)[0]
        bar = colorbar(plot.height, colour, 0.0, vmax, scale)
        panels.append(stack([framed, bar], horizontal=True, gap=6)[0])
    body, _ = stack(panels, horizontal=True, gap=24)
    var = numbers.get("var")
    who = "selected by VAR" if var and var.get("p", 0) > 0 else "VAR would select"     # p = 0: VAR moves nothing
    return figure("Image attention per head and layer (answer tokens, before VAR)",
                  ["A = attention on image tokens; r = share of A on non-sink image tokens; per answer-token row, "
                   "then averaged over the answer",
                   f"prompt: {numbers.get('prompt', '')}"],
                  body,
                  rule_legend(rule, who))[0]


def rule_legend(rule: dict, who: str) -> list[str]:
    """The selection legend in the rule's own convention (attention.json's selection_rule)."""
    layers = rule.get("layers") or []
    span = f"layers {min(layers)}-{max(layers)}" if layers else "no layer"
    if rule.get("rule") == "official":
        return [f"Legend: white dot = head {who} (A >= {rule['min_image_attention']:g} and visual-sink share of A "
                f"<= rho={rule['rho']:g}) on at least half of the answer tokens;",
                f"only layers with visual sinks, {span}, the last layer included (the released code's rule)."]
    return [f"Legend: white dot = image-centric head {who} (A >= {rule['min_image_attention']:g} and "
            f"r >= rho={rule['rho']:g}) on at least half of the answer tokens;",
            f"only layers with visual sinks, {span}, never the last layer (the paper's rule)."]


def draw_phi(numbers: dict) -> Image.Image:
    phi, tau, grid = numbers["phi"], numbers["tau"], numbers["grid"]
    L, N = len(phi), len(phi[0])
    cw = max(1, min(6, 1152 // N))
    ch = max(6, min(40, 384 // L))
    vmax = max(max(max(row) for row in phi), tau * 1.25)
    colour = phi_colours(vmax, tau)
    plot = heat(phi, colour, cw, ch)
    if grid is not None:
        step = grid * 4 if N >= grid * 8 else grid
        xlabel = f"image token (patch index, row-major, {grid} per patch row)"
    else:                                          # several panels / not square: span order, panel by panel
        step = max(1, N // 8)
        xlabel = "image token (span order: " + ", then ".join(
            f"{p['name']} {p['rows']}x{p['cols']}{' + newlines' if p['newline'] else ''}"
            for p in panels_of(numbers)) + ")"
    xt = [(i * cw + cw // 2, str(i)) for i in range(0, N, step)]
    yt = [(l * ch + ch // 2, str(l)) for l in range(0, L, max(1, L // 8))]
    framed = axes(plot, title=None, xlabel=xlabel, ylabel="layer", xticks=xt, yticks=yt)[0]
    bar = colorbar(max(plot.height, 160), colour, 0.0, vmax, "sink score phi",
                   ticks=[0.0, vmax], marks=[(tau, f"tau={tau:g}")])
    body, _ = stack([framed, bar], horizontal=True, gap=10)
    n_sinks = sum(1 for row in phi for v in row if v >= tau)
    return figure("Sink score phi of every image token, per layer",
                  [f"phi = max over sink dims {numbers['sink_dims']} of |h[d]| / RMS(h), h = the layer's residual "
                   f"input; {n_sinks} (layer, token) pairs at or above tau",
                   f"prompt: {numbers.get('prompt', '')}"],
                  body, ["Legend: light to blue = below tau (no sink); orange to dark red = phi >= tau (a visual sink)."])[0]


def file_names(numbers: dict) -> dict[str, str]:
    lo, hi = numbers["layer_range"]
    return {k: v.format(lo=lo, hi=hi) for k, v in FILES.items()}


def draw_all(numbers: dict, view) -> dict[str, Image.Image]:
    """{file name: picture} for every picture the numbers allow. view: the image as the model saw it (one square
    grid: LLaVA-1.5), or one view per panel (attention.json's panels)."""
    names = file_names(numbers)
    if numbers.get("grid") is not None:            # one square grid over one image: LLaVA-1.5's pictures
        one = next(v for v in as_views(numbers, view) if v is not None)
        out = {names["sinks"]: draw_sinks(numbers, one), names["attention"]: draw_attention(numbers, one)}
    else:
        views = as_views(numbers, view)
        out = {names["sinks"]: _sinks_panels(numbers, views)[0], names["attention"]: _attention_panels(numbers, views)}
    out[names["heads"]] = draw_heads(numbers)
    if numbers.get("phi"):
        out[names["phi"]] = draw_phi(numbers)
    if numbers.get("damro"):
        out[names["damro"]] = draw_damro(numbers, view)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Files

def check_directory(path, flag: str = "--save-attention") -> Path:
    """The pictures' directory: an existing directory, or one that can be created, and writable — checked before the
    model runs, so a bad one fails at once rather than after the whole generation. Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise MinivarError(f"{flag} '{p}' exists and is not a directory")
    base = p.absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise MinivarError(f"{flag} '{p}': '{base}' is not a directory")
    try:
        # Try it, rather than trust permission bits: root ignores them, and a read-only mount refuses anyone.
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise MinivarError(f"{flag} '{p}': cannot write into '{base}': {e.strerror or e}") from None
    return p


def _write_atomic(path: Path, write) -> None:
    """write(tmp_path) then rename: a failure never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shareable_model_name(model: str) -> str:
    """What attention.json records as the model, without this machine's paths where a name says it: a downloaded
    checkpoint's hub id (its .hub-id file), a folder of the weights dir by its name (`demo`); any other local folder
    as given (the user's own path)."""
    from .checkpoint import SOURCE_FILE, WEIGHTS_DIR
    path = Path(model)
    if not path.is_absolute() or not path.is_dir():
        return model
    if (path / SOURCE_FILE).is_file():
        return (path / SOURCE_FILE).read_text().strip() or model
    try:
        return path.resolve().relative_to(Path(WEIGHTS_DIR).resolve()).as_posix()
    except ValueError:
        return model


def save(directory, numbers: dict, view: Image.Image) -> list[Path]:
    """Draw every picture (in memory first), then write the PNGs and attention.json into `directory`."""
    d = check_directory(directory)
    pictures = draw_all(numbers, view)
    if isinstance(view, (list, tuple)):            # one view per panel (None: a panel not drawn)
        views = [None if v is None else _png_base64(v) for v in view]
        payload = dict(numbers, views_png_base64=views, image_png_base64=next(v for v in views if v is not None))
    else:
        payload = dict(numbers, image_png_base64=_png_base64(view))
    if "model" in payload:
        payload["model"] = shareable_model_name(payload["model"])
    text = json.dumps(payload, separators=(",", ":"))
    try:
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, im in pictures.items():
            _write_atomic(d / name, lambda tmp, im=im: im.save(tmp, format="PNG", optimize=True))
            paths.append(d / name)
        _write_atomic(d / NUMBERS_FILE, lambda tmp: tmp.write_text(text))
        paths.append(d / NUMBERS_FILE)
    except OSError as e:
        raise MinivarError(f"cannot write pictures to '{d}': {e.strerror or e}") from None
    return paths


def _png_base64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def load_numbers(path):
    """attention.json → (numbers, the image as the model saw it — or, for a layout of panels, one view per panel)."""
    numbers = json.loads(Path(path).read_text())
    view = _png(numbers.pop("image_png_base64"))
    if "views_png_base64" in numbers:
        return numbers, [None if v is None else _png(v) for v in numbers.pop("views_png_base64")]
    return numbers, view


USAGE = "usage: python -m minivar.viz attention.json [OUT_DIR]"
HELP = f"""{USAGE}

Redraw the pictures of a --save-attention run from its attention.json (the numbers and the image as the model saw
it) into OUT_DIR (default: the folder of attention.json; created if needed): visual_sinks_on_image.png,
answer_attention_layers<lo>-<hi>.png, heads_image_attention.png, sink_scores_phi.png (and damro_outliers.png
after a --damro run). Each file is written under a
temporary name and renamed, so a failure leaves no half-written picture. See docs/pictures.md."""


def main(argv=None) -> int:
    """Redraw the pictures from an attention.json: python -m minivar.viz attention.json [OUT_DIR]."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    if not 1 <= len(argv) <= 2:
        print("minivar: error: expected an attention.json and at most an output folder "
              "(usage: python -m minivar.viz attention.json [OUT_DIR])", file=sys.stderr)
        return 2
    try:
        out = check_directory(argv[1] if len(argv) > 1 else Path(argv[0]).parent, "OUT_DIR")
        if not Path(argv[0]).is_file():
            raise MinivarError(f"'{argv[0]}' not found (or not a file)")
        try:                                                # every picture drawn in memory before any is written
            pictures = draw_all(*load_numbers(argv[0]))
        except OSError as e:
            raise MinivarError(f"cannot read '{argv[0]}': {' '.join(str(e).split())}") from None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:   # not the file --save-attention writes
            raise MinivarError(f"'{argv[0]}' is not an attention.json written by --save-attention "
                               f"({type(e).__name__}: {' '.join(str(e).split())})") from None
        out.mkdir(parents=True, exist_ok=True)
        for name, im in pictures.items():
            _write_atomic(out / name, lambda tmp, im=im: im.save(tmp, format="PNG", optimize=True))
            print(out / name)
    except OSError as e:
        print(f"minivar: error: cannot write the pictures: {e.strerror or e}", file=sys.stderr)
        return 2
    except MinivarError as e:
        print(f"minivar: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
