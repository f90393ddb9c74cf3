"""One call's VAR state, as hooks (hooks.py): the sink sets the call's prompt rows produce (`Sinks`) and the head
selection and redistribution on the rows after the image (`VARState`), with their counters.

Both are made per generate/forward call and passed down — never stored on the model — so two images in a row get
their own sinks; whether a row is in the prompt or generated follows from its position alone. The arithmetic is
the rule's (var_paper.py for the paper's, var_official.py for the released code's); this module only decides which
rows and layers it runs on and keeps what it found.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .hooks import Hook
from .var_paper import RULES, Rule, after_image, first_after_image, image_span


class Sinks(Hook):
    """The sink sets of one call, read off each layer's residual input as the prompt's rows go by (in one call or
    in chunks): φ, S^ℓ and V^ℓ per layer over the prompt positions. Rows past the prompt (generated tokens) are never
    sinks. VAR, the capture and sink masking all read these sets; none computes them again."""

    def __init__(self, sink_dims: tuple[int, ...], tau: float, n_layers: int, image_mask: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, *, strict: bool = False,
                 layers: frozenset[int] | None = None, rule: Rule | None = None):
        """image_mask [B, T_prompt] bool: where the image tokens sit in each (padded) prompt; attention_mask
        [B, T_prompt]: 0 on padding (never a sink), None when nothing is padded. rule: whose sink test (default the
        paper's φ ≥ τ; strict=True: the released code's φ > τ); layers: the layers scanned for sinks (None: all; the
        others have none)."""
        self.rule = rule or (RULES["official"] if strict else RULES["paper"])
        self.sink_dims, self.tau, self.n_layers = tuple(sink_dims), float(tau), n_layers
        self.strict, self.layers = strict, layers
        self.image = image_mask.bool()                                          # I  [B, T]
        B, T = self.image.shape
        self.real = attention_mask.bool() if attention_mask is not None else torch.ones_like(self.image)
        self.prompt_len = T
        self.image_start, self.image_end = image_span(self.image)              # [B] each
        dev = self.image.device
        self.phi = [torch.zeros(B, T, device=dev) for _ in range(n_layers)]     # φ [B, T] per layer
        self.sinks = [torch.zeros(B, T, dtype=torch.bool, device=dev) for _ in range(n_layers)]          # S^ℓ
        self.visual_sinks = [torch.zeros(B, T, dtype=torch.bool, device=dev) for _ in range(n_layers)]   # V^ℓ
        self.has_visual_sink = [False] * n_layers          # any sample, this layer: read once per prompt chunk

    def residual(self, layer: int, h: torch.Tensor, rows: range) -> None:
        n = min(rows.stop, self.prompt_len) - rows.start         # this call's prompt rows (none while decoding)
        if n <= 0 or (self.layers is not None and layer not in self.layers):
            return
        cols = slice(rows.start, rows.start + n)
        # a batch-G call on a B-sample state (G < B) is a shared prefix (generate_many): row g holds the same rows
        # for the g-th of G equal groups of samples (G = 1: every sample; G = 2: a contrastive call's branches)
        step = self.image.shape[0] // h.shape[0]
        phi, sinks, vis = self.rule.sink_sets(h[:, :n], self.sink_dims, self.tau, self.image[::step, cols],
                                              self.real[::step, cols])
        if 1 < step < self.image.shape[0]:
            phi, sinks, vis = (t.repeat_interleave(step, 0) for t in (phi, sinks, vis))
        self.phi[layer][:, cols], self.sinks[layer][:, cols], self.visual_sinks[layer][:, cols] = phi, sinks, vis
        self.has_visual_sink[layer] = self.has_visual_sink[layer] or bool(vis.any())   # a sync per prefill chunk

    def keys(self, layer: int, S: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S^ℓ, I, V^ℓ) as key masks [B, S] over S key positions (positions past the prompt are in none)."""
        pad = S - self.prompt_len
        masks = (self.sinks[layer], self.image, self.visual_sinks[layer])
        return masks if pad == 0 else tuple(F.pad(m, (0, pad)) for m in masks)

    def report(self, b: int = 0) -> dict:
        """Sample b's sink sets, JSON-ready (layer indices as strings), in positions of its own unpadded prompt."""
        index = self.real[b].long().cumsum(0) - 1                  # cache position → position among real tokens

        def positions(mask):
            return index[torch.nonzero(mask[b]).flatten()].tolist()

        start, end = int(self.image_start[b]), int(self.image_end[b])
        return {"sink_dims": list(self.sink_dims), "tau": self.tau,
                "image_span": ([int(index[start]), int(index[end - 1]) + 1] if end > start    # no image: [n, n]
                               else [int(index[-1]) + 1] * 2),
                "sinks": {str(l): positions(s) for l, s in enumerate(self.sinks)},
                "visual_sinks": {str(l): positions(s) for l, s in enumerate(self.visual_sinks)}}


class VARState(Hook):
    """VAR for one call (one batch of prompts): the Sinks it reads, then head selection and redistribution on the
    rows after the image in its layers. Created per generate/forward call, never stored on the model."""

    def __init__(self, cfg: "VARConfig", sinks: Sinks, max_len: int | None = None, keep_selections: bool = False):
        """max_len: the cache length (the decode steps' key masks are built once at that length)."""
        self.cfg, self.sinks, self.max_len = cfg, sinks, max_len
        self.layers = cfg.layer_set(sinks.n_layers)
        B = sinks.image.shape[0]
        # prefill rows from the first position after the image on are VAR's to touch (every generated row too)
        self.first_position = first_after_image(sinks.image_end)   # read once per call, not in every layer
        dev = sinks.image.device
        self.counts = {"prefill": torch.zeros(B, sinks.n_layers, dtype=torch.long, device=dev)}
        self.decode_rows = torch.zeros(B, sinks.n_layers, 0, dtype=torch.long, device=dev)   # [B, L, generated row]
        self._keys: dict[int, tuple] = {}                        # decoding's key masks, per layer
        # keep_selections: the (head, row) pairs selected per layer, {layer: [(rows, selected [B, H, R])]}, for the
        # pictures (probe.Capture reads them, so they show what VAR decided)
        self.selections: dict[int, list] | None = {} if keep_selections else None

    def residual(self, layer, h, rows):
        self.sinks.residual(layer, h, rows)        # VAR's own sink sets, read off h^ℓ

    def active(self, layer: int) -> bool:
        return layer in self.layers and self.sinks.has_visual_sink[layer] and self.cfg.moved > 0

    def explicit_from(self, layer, rows):
        if not self.active(layer) or rows.stop <= self.first_position:
            return None
        return self.first_position

    def probs(self, layer, probs, rows, before):
        """probs [B', H, R, K] of positions `rows` → after VAR (unchanged where no (head, row) is selected)."""
        if not self.active(layer):
            return probs
        B, K = probs.shape[0], probs.shape[-1]
        # B < samples: a shared prefix, row g for the g-th of B equal groups of samples (see Sinks): their first rows
        step = self.sinks.image.shape[0] // B
        sink, image, vis = (m[::step] for m in self._key_masks(layer, K))
        positions = torch.arange(rows.start, rows.stop, device=probs.device)
        touched = after_image(positions, self.sinks.image_end[::step])                # [B, R]
        touched = touched & vis.any(-1, keepdim=True)   # a sample without visual sinks in this layer is left alone
        T = self.sinks.prompt_len
        if rows.start < T:                                        # prompt rows: padding rows are no one's rows
            real = self.sinks.real[::step, rows.start:min(rows.stop, T)]
            touched = touched & F.pad(real, (0, max(0, rows.stop - T)), value=True)
        cfg, rule = self.cfg, self.cfg.rule_impl
        if cfg.heads == "all":                           # the ablation: every head of the touched rows
            selected = touched[:, None, :].expand(B, probs.shape[1], -1)
        else:
            selected = rule.select_heads(probs, image, vis, touched, cfg)
        prefill = selected[..., :max(0, T - rows.start)].sum(dim=(1, 2))                # [B]
        self.counts["prefill"][:, layer] += prefill.repeat_interleave(step) if step > 1 else prefill
        if rows.stop > T:                      # generated rows: counted per row, so a report can stop at a sample's end
            first = max(rows.start, T)
            if self.decode_rows.shape[-1] < rows.stop - T:     # room for every generated row (once per call)
                room = max(rows.stop, self.max_len or 0) - T
                self.decode_rows = F.pad(self.decode_rows, (0, room - self.decode_rows.shape[-1]))
            self.decode_rows[:, layer, first - T:rows.stop - T] += selected[..., first - rows.start:].sum(1)
        if self.selections is not None:
            self.selections.setdefault(layer, []).append((rows, selected))
        return rule.redistribute(probs, selected, sink, image, vis, cfg.p)

    def _key_masks(self, layer: int, K: int):
        """(S^ℓ, I, V^ℓ) over the first K key positions, [B, K] each."""
        if K <= self.sinks.prompt_len:          # prompt rows: the live sets (a later chunk may still add sinks)
            return tuple(m[:, :K] for m in (self.sinks.sinks[layer], self.sinks.image, self.sinks.visual_sinks[layer]))
        keys = self._keys.get(layer)
        if keys is None or keys[0].shape[-1] < K:   # decoding: padded once to the cache length, sliced per step
            keys = self._keys[layer] = self.sinks.keys(layer, max(K, self.max_len or 0))
        return tuple(m[:, :K] for m in keys)

    def report(self, b: int = 0, generated_rows: int | None = None, rows: list[int] | None = None) -> dict:
        """Sample b's settings, sinks and counters, JSON-ready, in positions of its own (unpadded) prompt.
        generated_rows: count only the first that many generated rows (a sample that stopped before the others of
        its batch; None: all). rows: under beam search, the row each generated token of the answer ran in (the
        counters are kept per row and step; beams move between rows)."""
        if rows:
            steps = torch.arange(len(rows), device=self.decode_rows.device)
            decode = self.decode_rows[torch.tensor(rows, dtype=torch.long, device=steps.device), :, steps].sum(0)
        else:
            decode = self.decode_rows[b, :, :0 if rows is not None else generated_rows].sum(-1)
        rho_paper, p_paper = self.cfg.paper_values()
        asked = set(self.cfg.layers or ()) - set(self.layers)      # named layers the rule can never touch
        untouched = {"layers_not_touched": sorted(asked),
                     "why": "the released code's rule finds sinks (and so redistributes) only in layers "
                            f"{min(self.cfg.rule_impl.sink_layers(self.sinks.n_layers) or {0})}.."
                            f"{self.sinks.n_layers - 1}"} if asked else {}
        return ({"rule": self.cfg.rule, "heads": self.cfg.heads, "tau": self.cfg.tau, "rho": self.cfg.rho,
                 "p": self.cfg.p, "rho_paper": rho_paper, "p_paper": p_paper,
                 "min_image_attention": self.cfg.min_image_attention, "layers": sorted(self.layers)} | untouched
                | self.sinks.report(b)
                | {"redistributed": {"prefill": self.counts["prefill"][b].tolist(), "decode": decode.tolist()}})
