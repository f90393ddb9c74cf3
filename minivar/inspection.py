"""The command line's inspection flags: --save-attention (pictures), --mask-visual-sinks, --mask-random-image-tokens.

RunInspection checks them before the model loads, makes the probe (probe.Capture) for the run, and afterwards writes
the pictures (viz.py) and returns what --json reports. The probe itself knows nothing of the command line.
"""
from __future__ import annotations

from . import viz
from .errors import MinivarError
from .probe import KINDS, Capture, default_layer_range, parse_layer_range, picture_numbers
from .var import VARConfig


class RunInspection:
    """What the inspection flags ask for: checked before the model loads, then a probe, then pictures + JSON."""

    def __init__(self, save_attention=None, attention_layers: str | None = None, mask_visual_sinks: bool = False,
                 mask_random: int | None = None, seed: int | None = None):
        self.directory = viz.check_directory(save_attention) if save_attention is not None else None
        if attention_layers is not None and self.directory is None:
            raise MinivarError("--attention-layers only applies with --save-attention")
        if attention_layers is not None:
            parse_layer_range(attention_layers)                  # its form, now; against the model's depth: probe()
        self.attention_layers = attention_layers
        if mask_random is not None and mask_random < 1:
            raise MinivarError(f"--mask-random-image-tokens must be ≥ 1, got {mask_random}")
        self.mask = "visual_sinks" if mask_visual_sinks else None
        self.mask_random = mask_random or 0
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

    @property
    def uses_sinks(self) -> bool:
        """Do the asked-for pictures or masking find sinks (so --tau / --sink-dims matter without --var)?"""
        return self.directory is not None or self.mask is not None

    def probe(self, llava, var: VARConfig | None, sink_dims=None, tau: float | None = None) -> Capture:
        """The probe for this run. sink_dims / tau: the sink rule its sink sets use (None: VAR's, as the pipeline
        binds them), so sink masking and the pictures can use another τ or other dims without VAR."""
        t = llava.config.text
        if self.directory is None:               # masking only: keep nothing, stay on the fast path
            self.capture = Capture((), attention=(), sinks=self.mask is not None, mask=self.mask,
                                   mask_random=self.mask_random, mask_seed=self.seed, sink_dims=sink_dims, tau=tau)
            return self.capture
        if self.attention_layers is not None:
            self.layer_range = parse_layer_range(self.attention_layers, t.num_hidden_layers)
        else:
            self.layer_range = default_layer_range(t.num_hidden_layers)
        self.capture = Capture(range(self.layer_range[0], self.layer_range[1] + 1),
                               attention=KINDS if var is not None else ("before",), head_stats=True, sinks=True,
                               rows="answer", decode=True, mask=self.mask, mask_random=self.mask_random,
                               mask_seed=self.seed, sink_dims=sink_dims, tau=tau)
        return self.capture

    def finish(self, llava, result, image, image_aspect_ratio: str, var: VARConfig | None, prompt: str,
               log=None) -> dict:
        """Write the pictures (if asked); return the fields the CLI adds to --json."""
        out = {}
        report = self.capture.mask_report() if self.capture is not None else None
        if report is not None:
            out["masked"] = report
            if log:
                if report["kind"] == "visual_sinks":
                    counts = list(report["count"].values()) or [0]
                    log(f"minivar: masked the visual sinks in every layer ({min(counts)}-{max(counts)} per layer)")
                else:
                    log(f"minivar: masked {report['n']} random image tokens (seed {report['seed']})")
        if self.directory is not None:
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
