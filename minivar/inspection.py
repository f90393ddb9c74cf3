"""From a capture to the pictures: the numbers behind them (viz.py draws them; no torch there), and the glue for
run.py's --save-attention / --mask-visual-sinks / --mask-random-image-tokens."""
from __future__ import annotations

import math

import torch

from .errors import MinivarError
from .probe import Capture, KeyMask, KINDS
from .flags import parse_layer_range  # noqa: F401  (where the layer-range syntax is written)
from .methods.var import VARConfig, image_centric
from .models.images import Panel, token_layout

def default_layer_range(n_layers: int) -> tuple[int, int]:
    """Layers 10–12 of a 32-layer model (where the paper looks), scaled to other depths; inclusive."""
    lo = min(n_layers - 1, math.floor(10 * n_layers / 32 + 0.5))
    hi = min(n_layers - 1, max(lo, math.floor(12 * n_layers / 32 + 0.5)))
    return lo, hi


def sink_layer_ranges(n_layers: int, parts: int = 4) -> list[tuple[int, int]]:
    """Split the layers into up to `parts` contiguous ranges (inclusive) for the sink picture."""
    parts = min(parts, n_layers)
    bounds = [round(i * n_layers / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(parts)]


def _r(x: float) -> float:
    return float(f"{x:.5g}")


def as_panels(panels) -> tuple[Panel, ...]:
    """An ImageInput's panels as Panel objects (a family may give plain (name, rows, cols, newline) tuples)."""
    return tuple(p if isinstance(p, Panel) else Panel(*p) for p in panels)


def layout_numbers(panels, n_tokens: int) -> dict:
    """attention.json's layout: each panel with the span offset of its first token, the offsets of the newline
    tokens (LLaVA-NeXT's image_newline: image tokens, not drawn on the image), and `grid` — the side of the one square
    panel when the image is exactly that (LLaVA-1.5), else None."""
    panels = as_panels(panels)
    if sum(p.num_tokens for p in panels) != n_tokens:
        raise MinivarError(f"the image has {n_tokens} tokens but its panels hold "
                           f"{sum(p.num_tokens for p in panels)}: cannot draw it")
    out, first = [], 0
    for p in panels:
        out.append({"name": p.name, "rows": p.rows, "cols": p.cols, "newline": p.newline, "first": first})
        first += p.num_tokens
    newlines = [i for i, cell in enumerate(token_layout(panels)) if cell is None]
    only = panels[0] if len(panels) == 1 else None
    grid = only.rows if only is not None and only.rows == only.cols and not only.newline else None
    return {"panels": out, "newline_tokens": newlines, "grid": grid}


def token_cells(panels) -> list[list[int] | None]:
    """[panel, row, col] of every image token (span offset order); None for a newline token."""
    return [None if c is None else list(c) for c in token_layout(as_panels(panels))]


def picture_numbers(capture: Capture, *, n_layers: int, n_heads: int, layer_range: tuple[int, int],
                    var: VARConfig | None, image_size: int, b: int = 0, panels=None) -> dict:
    """The numbers behind the pictures, JSON-ready, from a Capture run with rows="answer", head_stats=True and the
    attention of `layer_range` (see RunInspection.probe). Sample b. panels: the image's layout (its ImageInput's
    panels, from the family); None: one square grid (LLaVA-1.5's 24×24)."""
    start, end = capture.image_span(b)
    n_img = end - start
    if panels is None:
        grid = math.isqrt(n_img)
        if n_img == 0 or grid * grid != n_img:
            raise MinivarError(f"the image has {n_img} tokens, not a square patch grid: cannot draw it")
        panels = (Panel("image", grid, grid),)
    layout = layout_numbers(panels, n_img)
    cells = token_cells(panels)
    rule = var if var is not None else VARConfig()
    var_layers = rule.layer_set(n_layers)
    vis = capture.visual_sinks
    probs = capture.attention_probs
    kinds = ["before", "after"] if var is not None else ["before"]
    attention = {}
    for kind in kinds:
        per_layer = [probs[layer][kind][b, :, :, start:end] for layer in range(layer_range[0], layer_range[1] + 1)]
        mean = torch.stack(per_layer).mean(dim=(0, 1, 2))                         # over layers, heads, answer rows
        attention[kind] = [_r(x) for x in mean.tolist()]
    image_attn, ratio, selected = [], [], []
    for layer in range(n_layers):
        st = capture.head_stats[layer]
        a, ns = st["image_before"][b], st["nonsink_before"][b]                  # [H, R]
        r = ns / a.clamp_min(1e-30)
        sel = capture.selected(layer)                  # what VAR itself selected, when VAR ran
        if sel is not None:
            sel = sel[b]
        else:                                          # VAR off: what its rule would select
            has_vis = layer in vis and bool(vis[layer][b].any())
            if rule.rule == "official":                # its convention: the visual-sink share ≤ rho (1e-6 left out)
                sel = (a >= rule.min_image_attention) & ((a - ns) / a.clamp_min(1e-30) <= rule.rho) & (a > 0)
            else:
                sel = image_centric(a, ns, rule.min_image_attention, rule.rho)
            sel = sel & (layer in var_layers and has_vis)
        image_attn.append([_r(x) for x in a.mean(-1).tolist()])
        ratio.append([_r(x) for x in r.mean(-1).tolist()])
        selected.append([_r(x) for x in sel.float().mean(-1).tolist()])
    phi = [[_r(x) for x in capture.phi[layer][b, start:end].tolist()] for layer in range(n_layers)] if capture.phi else []
    sinks = {str(layer): (torch.nonzero(v[b, start:end]).flatten().tolist()) for layer, v in sorted(vis.items())}
    sink_cells = {layer: [cells[i] for i in offsets if cells[i] is not None] for layer, offsets in sinks.items()}
    return {
        "version": 1,
        "image_size": image_size, "grid": layout["grid"], "image_span": [start, end],
        "n_layers": n_layers, "n_heads": n_heads,
        "sink_dims": list(capture.used_sink_dims), "tau": capture.used_tau,
        "var": None if var is None else {"rule": var.rule, "rho": var.rho, "p": var.p,
                                         "min_image_attention": var.min_image_attention, "layers": sorted(var_layers)},
        # the rule in force, in its own convention: paper — rho a non-sink floor; official — rho a visual-sink
        # ceiling, p the fraction kept (the released code's)
        "selection_rule": {"rule": rule.rule, "rho": rule.rho, "min_image_attention": rule.min_image_attention,
                           "layers": sorted(var_layers)},
        "layer_range": list(layer_range),
        "answer_rows": capture.rows,
        "attention": attention,                      # kind → mean attention per image patch (row-major grid)
        "heads": {"image_attention": image_attn, "nonsink_ratio": ratio, "selected_fraction": selected},
        "phi": phi,                                  # [layer][patch]
        "visual_sinks": sinks,                       # layer → patch indices
        "sink_ranges": [list(r) for r in sink_layer_ranges(n_layers)],
        "masked": capture.masked.report(b) if getattr(capture, "masked", None) else None,
        # the layout (docs/pictures.md): which panel, row and column each image token is drawn at
        "panels": layout["panels"],                  # [{name, rows, cols, newline, first}] in token order
        "newline_tokens": layout["newline_tokens"],  # span offsets of newline tokens (never drawn)
        "visual_sink_cells": sink_cells,             # layer → [panel, row, col] of its visual sinks (no newlines)
    }


# ---------------------------------------------------------------------------------------------------------------
# run.py's --save-attention / --mask-visual-sinks / --mask-random-image-tokens

class RunInspection:
    """What run.py's inspection flags ask for: checked before the model loads, then a probe, then pictures + JSON."""

    def __init__(self, save_attention=None, attention_layers: str | None = None, mask_visual_sinks: bool = False,
                 mask_random: int | None = None, seed: int | None = None):
        from . import viz
        self.directory = viz.check_directory(save_attention) if save_attention is not None else None
        if attention_layers is not None and self.directory is None:
            raise MinivarError("--attention-layers only applies with --save-attention")
        if attention_layers is not None:
            parse_layer_range(attention_layers)                  # its form, now; against the model's depth: probe()
        self.attention_layers = attention_layers
        if mask_random is not None and mask_random < 1:
            raise MinivarError(f"--mask-random-image-tokens must be ≥ 1, got {mask_random}")
        self.mask_kind = "visual_sinks" if mask_visual_sinks else None
        self.mask_random = mask_random or 0
        self.mask: KeyMask | None = None
        self.seed = 0 if seed is None else seed
        self.capture: Capture | None = None

    @classmethod
    def from_args(cls, args) -> "RunInspection | None":
        flags = (args.save_attention, args.attention_layers, args.mask_random_image_tokens)
        if all(f is None for f in flags) and not args.mask_visual_sinks:
            return None
        inspection = cls(args.save_attention, args.attention_layers, args.mask_visual_sinks,
                         args.mask_random_image_tokens, args.seed)
        if inspection.directory is not None:
            inspection.check_pictures_possible(args.max_new_tokens)      # one answer row per generated token
        return inspection

    @staticmethod
    def check_pictures_possible(n_answer_rows: int) -> None:
        """The pictures show the rows that produce answer tokens (one per generated token): there must be one."""
        if n_answer_rows < 1:
            raise MinivarError("--save-attention needs at least one generated token (--max-new-tokens ≥ 1)")

    def hooks(self, llava, var: VARConfig | None) -> tuple[Capture | None, KeyMask | None]:
        """The capture (for the pictures) and the key masking asked for; the pipeline binds them to the prompt."""
        t = llava.config.text
        self.mask = (KeyMask("visual_sinks") if self.mask_kind == "visual_sinks" else
                     KeyMask("random", self.mask_random, self.seed) if self.mask_random else None)
        if self.directory is None:               # masking only: keep nothing, stay on the fast path
            self.capture = None
            return None, self.mask
        if self.attention_layers is not None:
            self.layer_range = parse_layer_range(self.attention_layers, t.num_hidden_layers)
        else:
            self.layer_range = default_layer_range(t.num_hidden_layers)
        # every layer's attention of the answer rows: the pictures read the layer range, the explorer every layer
        self.capture = Capture("all",
                               attention=KINDS if var is not None else ("before",), head_stats=True,
                               rows="answer", decode=True)
        self.capture.masked = self.mask
        return self.capture, self.mask

    def finish(self, llava, result, image, image_aspect_ratio: str, var: VARConfig | None, prompt: str,
               log=None) -> dict:
        """Write the pictures (if asked); return the fields run.py adds to --json."""
        out = {}
        report = self.mask.report() if self.mask is not None else None
        if report is not None:
            out["masked"] = report
            if log:
                if report["kind"] == "visual_sinks":
                    counts = list(report["count"].values()) or [0]
                    each = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
                    log(f"minivar: masked the visual sinks in every layer ({each} per layer)")
                else:
                    log(f"minivar: masked {report['n']} random image tokens (seed {report['seed']})")
        if self.directory is not None:
            from . import viz
            self.check_pictures_possible(len(self.capture.rows))      # none when the generation made no call
            t = llava.config.text
            family = llava.family
            im = family.images(image, llava.config, image_aspect_ratio)     # the layout the tokens were drawn from
            numbers = picture_numbers(self.capture, n_layers=t.num_hidden_layers, n_heads=t.num_attention_heads,
                                      layer_range=self.layer_range, var=var, image_size=view_size(llava.config),
                                      panels=im.panels)
            numbers.update(model=str(llava.directory), prompt=prompt, answer=result.text,
                           image_aspect_ratio=image_aspect_ratio)
            views = family_views(family, image, llava.config, image_aspect_ratio, im)      # what the model saw
            damro = (getattr(result, "reports", None) or {}).get("damro")
            if damro is not None and damro.get("outliers") is not None:
                numbers.update(damro_numbers(llava.model, im, numbers, damro))
                out["damro_var_overlap"] = numbers["damro_var_overlap"]
                if log:
                    o = numbers["damro_var_overlap"]
                    log(f"minivar: DAMRO's {len(o['outliers'])} ViT outliers and VAR's "
                        f"{len(o['visual_sink_patches'])} visual-sink patches share {o['count']}")
            pai = (getattr(result, "reports", None) or {}).get("pai")
            if pai is not None and "scores" in pai:
                # PAI's image-key scores before/after its step, per layer (span offset order, as "attention"):
                # attention.json only, --json keeps the settings
                numbers["pai"] = {k: v for k, v in pai.items() if k != "scores"} | {"scores": pai.pop("scores")}
            # LLaVA-1.5 (one square grid): the one image, as before; other layouts: one view per panel
            paths = viz.save(self.directory, numbers, views[-1] if numbers["grid"] is not None else list(views))
            paths.append(self.write_explorer(llava, result, numbers, views, var))
            out["pictures"] = [str(p) for p in paths]
            if log:
                log(f"minivar: wrote {len(paths)} files to {self.directory}")
        return out


    def write_explorer(self, llava, result, numbers: dict, views, var):
        """explorer.html (explorer.py) from this run's capture and attention.json's numbers, written atomically."""
        from . import explorer, viz
        records = {name: [dict(r, steps=explorer.candidate_steps([s["branches"] for s in r["steps"]], llava.tokenizer))
                          if r.get("kind") == "candidates" else r for r in recs]
                   for name, recs in (result.extra or {}).get("explorer", {}).items()}
        data = explorer.explorer_data(self.capture, numbers, views, tokenizer=llava.tokenizer,
                                      output_ids=list(result.output_ids), prompt_ids=list(result.prompt_ids),
                                      reports=dict(result.reports), records=records, var=var)
        path = self.directory / explorer.PAGE_FILE
        html = explorer.page(data)
        try:
            viz._write_atomic(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
        except OSError as e:
            raise MinivarError(f"cannot write '{path}': {e.strerror or e}") from None
        return path


def view_size(cfg) -> int:
    """attention.json's image_size: the CLIP side (336) for the LLaVA families, else 0 (the views carry sizes)."""
    vision = getattr(cfg, "vision", None)
    return int(getattr(vision, "image_size", 0) or 0)


def family_views(family, image, cfg, image_aspect_ratio, image_input) -> tuple:
    """The image each panel covers, as the model saw it (Family.view); None for a panel with nothing to draw."""
    if family.view is None:
        raise MinivarError(f"{family.name} has no picture view (Family.view): cannot draw its pictures")
    views = tuple(family.view(image, cfg, image_aspect_ratio, image_input))
    if len(views) != len(image_input.panels):
        raise MinivarError(f"{family.name}'s view gives {len(views)} images for {len(image_input.panels)} panels")
    return views


def damro_panel(panels: list[dict], n_patches: int) -> int:
    """The panel DAMRO's outliers index: LLaVA-NeXT's base crop, else the one patch grid of n_patches tokens."""
    for i, p in enumerate(panels):
        if p["name"] == "base":
            return i
    for i, p in enumerate(panels):
        if p["rows"] * p["cols"] == n_patches and not p["newline"] and p["name"] != "CLS":
            return i
    raise MinivarError(f"no panel of the image holds DAMRO's {n_patches} patches")


def outlier_overlap(outliers: list[int], numbers: dict, panel: int, scale: int = 1) -> dict:
    """DAMRO's ViT outliers (patch indices of `panel`, row-major) next to the visual sinks VAR's rule found there
    (the sets the pictures show), over all layers and per layer: attention.json's / --json's damro_var_overlap.
    scale: patches per token side (InternVL's pixel shuffle: 2; a sink token then counts as its 2×2 patches)."""
    cols = numbers["panels"][panel]["cols"] * scale
    per_layer = {layer: sorted({(r * scale + dr) * cols + c * scale + dc for p, r, c in cells if p == panel
                                for dr in range(scale) for dc in range(scale)})
                 for layer, cells in numbers["visual_sink_cells"].items()}
    chosen = [int(i) for i in outliers]
    sinks = sorted(set().union(*per_layer.values())) if per_layer else []
    both = sorted(set(chosen) & set(sinks))
    return {"panel": numbers["panels"][panel]["name"], "outliers": chosen, "visual_sink_patches": sinks,
            "overlap": both, "count": len(both),
            "per_layer": {layer: len(set(chosen) & set(v)) for layer, v in per_layer.items()}}


def damro_numbers(model, image_input, numbers: dict, damro_report: dict) -> dict:
    """attention.json's DAMRO part: the CLS attention of the CLIP layer DAMRO scores (over its crop: LLaVA-1.5's
    image, LLaVA-NeXT's base), the outliers the run used, and their overlap with the visual sinks."""
    from .methods.damro import outlier_layer, vision_cls_attention
    layer = outlier_layer(model.config)
    px = image_input.pixel_values
    internvl = getattr(model.config, "model_type", None) == "internvl"
    # LLaVA-NeXT: the crops, the base first; InternVL: the tiles, the whole-image view (thumbnail or one tile) last
    px = px[None] if px.ndim == 3 else px[-1:] if internvl else px[:1]
    weight = next(model.parameters())
    cls = vision_cls_attention(model, px.to(weight.device, weight.dtype), layers=[layer])[layer][0].float()
    extra, scale = {}, 1
    if internvl:              # the scores are per patch, the panel's cells per token (2×2 patches each)
        panel, scale, g = len(numbers["panels"]) - 1, model.config.shuffle, model.config.vision.grid
        extra = {"grid": [g, g]}
    else:
        panel = damro_panel(numbers["panels"], int(cls.numel()))
    return {"damro": {"layer": layer, "panel": panel, "cls_attention": [_r(x) for x in cls.tolist()],
                      "outliers": list(damro_report["outliers"]), "topk": damro_report.get("topk")} | extra,
            "damro_var_overlap": outlier_overlap(damro_report["outliers"], numbers, panel, scale)}
