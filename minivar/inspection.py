"""From a capture to the pictures: the numbers behind them (viz.py draws them; no torch there), and the glue for
run.py's --save-attention / --mask-visual-sinks / --mask-random-image-tokens."""
from __future__ import annotations

import math

import torch

from .errors import MinivarError
from .probe import Capture, KeyMask, KINDS
from .flags import parse_layer_range  # noqa: F401  (where the layer-range syntax is written)
from .methods.var import VARConfig, image_centric

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


def picture_numbers(capture: Capture, *, n_layers: int, n_heads: int, layer_range: tuple[int, int],
                    var: VARConfig | None, image_size: int, b: int = 0) -> dict:
    """The numbers behind the pictures, JSON-ready, from a Capture run with rows="answer", head_stats=True and the
    attention of `layer_range` (see RunInspection.probe). Sample b."""
    start, end = capture.image_span(b)
    n_img = end - start
    grid = math.isqrt(n_img)
    if n_img == 0 or grid * grid != n_img:
        raise MinivarError(f"the image has {n_img} tokens, not a square patch grid: cannot draw it")
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
    return {
        "version": 1,
        "image_size": image_size, "grid": grid, "image_span": [start, end],
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
        self.capture = Capture(range(self.layer_range[0], self.layer_range[1] + 1),
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
                    log(f"minivar: masked the visual sinks in every layer ({min(counts)}-{max(counts)} per layer)")
                else:
                    log(f"minivar: masked {report['n']} random image tokens (seed {report['seed']})")
        if self.directory is not None:
            from . import viz
            self.check_pictures_possible(len(self.capture.rows))      # none when the generation made no call
            t = llava.config.text
            numbers = picture_numbers(self.capture, n_layers=t.num_hidden_layers, n_heads=t.num_attention_heads,
                                      layer_range=self.layer_range, var=var, image_size=llava.config.vision.image_size)
            numbers.update(model=str(llava.directory), prompt=prompt, answer=result.text,
                           image_aspect_ratio=image_aspect_ratio)
            from .processing import model_image
            view = model_image(image, llava.config.vision.image_size, image_aspect_ratio)   # what the model saw
            paths = viz.save(self.directory, numbers, view)
            out["pictures"] = [str(p) for p in paths]
            if log:
                log(f"minivar: wrote {len(paths)} files to {self.directory}")
        return out
