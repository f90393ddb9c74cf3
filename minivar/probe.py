"""Looking inside: capture attention / residuals / sink sets of one call, and mask key columns (sink removal).

A *probe* is an object passed explicitly down Llava.forward → LlamaModel.forward → every LlamaAttention, for one
call. It is never stored on the model (no hooks, no attributes), so nothing stays attached afterwards.
A probe subclasses `minivar.llama.Probe`, whose defaults do nothing, and overrides what it needs. The interface the
decoder calls, in this order for each layer of each forward call:

    probe.record_residual(layer, h)                h [B, T, D]: the layer's residual input (after var.observe)
    probe.masks_keys -> bool                       True if key_mask may remove columns (then every call builds an
                                                   explicit mask; False keeps the fused kernel's causal mode)
    probe.key_mask(layer, mask) -> mask            mask [B, 1, T, S] bool, True = may attend; return a new tensor
                                                   (called only where masks_keys is True)
    probe.wants(layer) -> bool                     True: compute explicit probabilities in this layer (slow path)
    probe.first_row() -> int                       the first query row of this call whose probabilities are
                                                   needed; earlier rows go through the fused kernel
    probe.record_attention(layer, before, after)   fp32 probs [B, H, T', S] of the call's last T' ≥ T − first_row()
                                                   query rows, before / after VAR (the same tensor where VAR did
                                                   not act); called only where wants() was True

`Capture` is minivar's probe. It keeps only what was asked for (a 7B prompt's full attention is GBs):
  - attention probabilities (before and/or after VAR) of chosen layers and heads, for chosen query rows:
    "all" prompt rows, "after_image" (the rows VAR may touch) or "answer" (the rows that produce answer tokens:
    the last prompt row, plus one row per decoding step when decode=True);
  - residual inputs of the chosen layers; per-(layer, head, row) image-attention sums for every layer (head_stats);
  - the sink score φ and the sink sets S^ℓ, V^ℓ of every layer, with the same sink dims and τ as VAR.
It can also remove tokens from attention: the visual sinks of each layer (their key columns masked in that layer,
sinks read off that layer's residual input as VAR does), or N random image tokens (seeded, the same in every layer).

Each forward call through the model is one step: step 0 is the prefill, later steps are decoding steps. Call
`bind(...)` before a call (Pipeline.generate / Pipeline.capture do) so it knows where the image is and which sink
dims to use; an unbound Capture still records attention and residuals.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import MinivarError
from .llama import Probe
from .var import VARConfig, image_centric, image_span, image_sums, sink_sets

ROWS = ("all", "after_image", "answer")
KINDS = ("before", "after")


class Capture(Probe):
    """A probe for one call: records the asked-for tensors on `store` (default CPU) and optionally masks key columns."""

    def __init__(self, layers=(), heads=None, *, attention=KINDS, residuals: bool = False, head_stats: bool = False,
                 sinks: bool = True, rows: str = "all", decode: bool = False, mask: str | None = None,
                 mask_random: int = 0, mask_seed: int = 0, sink_dims=None, tau: float | None = None, store="cpu"):
        """layers: "all" or layer indices whose attention/residuals to keep; heads: None (all) or head indices.
        attention: which probabilities to keep, a subset of ("before", "after"); () for none.
        mask: None or "visual_sinks"; mask_random: mask this many random image tokens (seeded by mask_seed).
        sink_dims / tau: None = what bind() is given (Pipeline passes VAR's)."""
        self.layers = None if isinstance(layers, str) and layers == "all" else frozenset(int(x) for x in layers)
        self.heads = None if heads is None else tuple(int(x) for x in heads)
        attention = (attention,) if isinstance(attention, str) else tuple(attention or ())
        for kind in attention:
            if kind not in KINDS:
                raise MinivarError(f"attention kind '{kind}' is not one of {', '.join(KINDS)}")
        if rows not in ROWS:
            raise MinivarError(f"rows '{rows}' is not one of {', '.join(ROWS)}")
        if mask not in (None, "visual_sinks"):
            raise MinivarError(f"mask '{mask}' is not None or 'visual_sinks'")
        if mask_random < 0:
            raise MinivarError(f"--mask-random-image-tokens must be ≥ 0 (0 = off), got {mask_random}")
        if mask is not None and mask_random:
            raise MinivarError("mask the visual sinks or random image tokens, not both")
        self.attention, self.residuals_wanted, self.head_stats_wanted = attention, residuals, head_stats
        self.sinks_wanted, self.rows_mode, self.decode = sinks, rows, decode
        self.mask, self.mask_random, self.mask_seed = mask, int(mask_random), int(mask_seed)
        self.sink_dims = None if sink_dims is None else tuple(sink_dims)
        self.tau = tau
        self._dims = self.sink_dims or ()                         # what is used; bind() fills in the defaults
        self._tau = tau if tau is not None else VARConfig.tau
        self.store = torch.device(store)
        self.result = None                 # Pipeline.capture puts the generation Result here
        self.image = None                  # I  [B, T_prompt] bool, set by bind()
        self._reset()

    # -- setup -------------------------------------------------------------------------------------------------------
    def _reset(self):
        self._step = -1
        self._active = False
        self._first_row = 0                # this step's kept query rows: first_row.. (always the last ones of the call)
        self._rows: list[int] = []         # absolute positions of the kept rows, all steps
        self._attn: dict[int, dict[str, list]] = {}
        self._res: dict[int, list] = {}
        self._stats: dict[int, dict[str, list]] = {}
        self._phi, self._sinks, self._vis = {}, {}, {}       # per layer, on the store device
        self._vis_dev: dict[int, torch.Tensor] = {}          # per layer, on the model's device (for masking)
        self._random_cols = None
        self._heads_idx = None
        self._cache: dict = {}
        self.prompt_len = None

    @property
    def _uses_sinks(self) -> bool:
        """Does this capture compute φ and the sink sets (kept, read by the head stats, or masked)?"""
        return self.sinks_wanted or self.head_stats_wanted or self.mask == "visual_sinks"

    @property
    def needs_sink_dims(self) -> bool:
        """Does bind() need sink dims (to compute φ and the sink sets)?"""
        return self.sink_dims is None and self._uses_sinks

    def bind(self, image_mask: torch.Tensor, *, n_layers: int | None = None, n_heads: int | None = None,
             sink_dims=None, tau: float | None = None) -> "Capture":
        """Prepare for one call: image_mask [B, T_prompt] bool (where the image tokens are), model sizes for checks,
        and the sink dims / τ to use where the constructor left them None. Clears anything recorded before."""
        self._reset()
        self.image = image_mask.bool()
        B, T = self.image.shape
        self.image_start, self.image_end = image_span(self.image)        # [B] each; T where there is no image
        if n_layers is not None and self.layers is not None:
            bad = sorted(x for x in self.layers if not 0 <= x < n_layers)
            if bad:
                raise MinivarError(f"capture layer {bad[0]} is outside 0..{n_layers - 1}")
        if n_heads is not None:
            self._check_heads(n_heads)
        self._dims = self.sink_dims if self.sink_dims is not None else (tuple(sink_dims) if sink_dims is not None else ())
        self._tau = self.tau if self.tau is not None else (tau if tau is not None else VARConfig.tau)
        if self.mask == "visual_sinks" and not self._dims:
            raise MinivarError("masking visual sinks needs sink dims (none were given or found)")
        if self.mask_random:
            g = torch.Generator().manual_seed(self.mask_seed)
            cols = torch.zeros(B, T, dtype=torch.bool)
            for b in range(B):
                idx = torch.nonzero(self.image[b].cpu()).flatten()
                if self.mask_random > len(idx):
                    raise MinivarError(f"--mask-random-image-tokens {self.mask_random} is more than the "
                                       f"{len(idx)} image tokens")
                cols[b, idx[torch.randperm(len(idx), generator=g)[: self.mask_random]]] = True
            self._random_cols = cols.to(self.image.device)
        return self

    def _check_heads(self, n_heads: int):
        bad = [h for h in self.heads or () if not 0 <= h < n_heads]
        if bad:
            raise MinivarError(f"capture head {bad[0]} is outside 0..{n_heads - 1}")

    def _wants_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def _begin_step(self, h: torch.Tensor):
        """Layer 0's residual opens a forward call: step 0 is the prefill, later ones decode one token each."""
        self._step += 1
        self._cache.clear()
        B, T, _ = h.shape
        if self._step == 0:
            if self.image is not None and self.image.shape[1] != T:
                raise MinivarError(f"the probe was bound to a {self.image.shape[1]}-token prompt, the call has {T}")
            self.prompt_len = T
            self._active = True
            if self.rows_mode == "all":
                rows = list(range(T))
            elif self.rows_mode == "answer":
                rows = [T - 1]                       # the last prompt row produces the first answer token
            else:
                if self.image is None:
                    raise MinivarError("rows='after_image' needs bind() with the image mask")
                rows = list(range(int(self.image_end.min()), T))   # the earliest image end over the batch
            self._first_row = rows[0] if rows else T
        else:
            self._active = self.decode
            start = self.prompt_len + self._step - 1                 # cache length before this step
            rows = list(range(start, start + T))
            self._first_row = 0
        if self._active:
            self._rows.extend(rows)

    # -- the probe interface (called by the decoder) ------------------------------------------------------------------
    def record_residual(self, layer: int, h: torch.Tensor) -> None:
        if layer == 0:
            self._begin_step(h)
        if self._step == 0 and self._dims and self._uses_sinks:
            # as VAR: φ from this layer's residual input, once per sample in the prefill, over all prompt positions
            # a capture serves one prompt (Pipeline refuses a probe on a batch), so there is no padding to exclude
            image = self.image if self.image is not None else torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
            phi, sinks, vis = sink_sets(h, self._dims, self._tau, image)
            self._vis_dev[layer] = vis
            self._phi[layer], self._sinks[layer], self._vis[layer] = (t.to(self.store, copy=True) for t in (phi, sinks, vis))
        if self.residuals_wanted and self._active and self._wants_layer(layer):
            self._res.setdefault(layer, []).append(h.detach().to(self.store, copy=True))

    @property
    def masks_keys(self) -> bool:
        return self.mask is not None or self.mask_random > 0

    def key_mask(self, layer: int, mask: torch.Tensor) -> torch.Tensor:
        cols = self.masked_columns(layer, device=True)
        if cols is None:
            return mask
        cols = F.pad(cols, (0, mask.shape[-1] - cols.shape[-1]))          # generated tokens are never masked
        new = mask & ~cols[:, None, None, :]
        # a row left with no key at all would give NaN; keep its original mask (never the case for LLaVA prompts)
        return torch.where(new.any(-1, keepdim=True), new, mask)

    def wants(self, layer: int) -> bool:
        return self._active and ((bool(self.attention) and self._wants_layer(layer)) or self.head_stats_wanted)

    def first_row(self) -> int:
        return self._first_row

    def record_attention(self, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        if not self._active:
            return
        # the call's query rows from first_row() on, or more of them where VAR needed earlier rows: keep the last
        n_rows = self.prompt_len - self._first_row if self._step == 0 else before.shape[2]

        def rows_of(t):
            return t[:, :, t.shape[2] - n_rows:]

        if self.attention and self._wants_layer(layer):
            if self._heads_idx is None and self.heads is not None:
                self._check_heads(before.shape[1])
                self._heads_idx = torch.tensor(self.heads, device=before.device)
            kept: dict[int, torch.Tensor] = {}
            for kind in self.attention:
                t = before if kind == "before" else after
                if id(t) not in kept:                    # VAR did not act: before and after share one copy
                    x = rows_of(t)
                    if self._heads_idx is not None:
                        x = x.index_select(1, self._heads_idx)
                    kept[id(t)] = x.to(self.store, copy=True)
                self._attn.setdefault(layer, {}).setdefault(kind, []).append(kept[id(t)])
        if self.head_stats_wanted:
            S = before.shape[-1]
            B = before.shape[0]
            image = (F.pad(self.image, (0, S - self.image.shape[1])) if self.image is not None
                     else torch.zeros(B, S, dtype=torch.bool, device=before.device))
            vis = self._vis_dev.get(layer)
            vis = F.pad(vis, (0, S - vis.shape[1])) if vis is not None else torch.zeros_like(image)
            d = self._stats.setdefault(layer, {})
            for kind, t in (("before", before), ("after", after)):
                if kind == "after" and after is before:              # VAR did not act here: the same numbers
                    d.setdefault("image_after", []).append(d["image_before"][-1])
                    d.setdefault("nonsink_after", []).append(d["nonsink_before"][-1])
                    continue
                image_attn, nonsink_attn = image_sums(rows_of(t), image, vis)     # as VAR's selection reads them
                d.setdefault(f"image_{kind}", []).append(image_attn.to(self.store, copy=True))
                d.setdefault(f"nonsink_{kind}", []).append(nonsink_attn.to(self.store, copy=True))

    # -- results -----------------------------------------------------------------------------------------------------
    @property
    def rows(self) -> list[int]:
        """Absolute query positions of the kept rows (row r of every attention / head_stats tensor)."""
        return list(self._rows)

    @property
    def attention_probs(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {"before"|"after": fp32 [B, H_kept, R, S]}}; decoding rows are zero-padded to the final S
        (keys that did not exist yet). Without VAR, "before" and "after" are the same tensor."""
        if "attn" not in self._cache:
            out = {}
            for layer, kinds in sorted(self._attn.items()):
                built: dict[int, torch.Tensor] = {}
                out[layer] = {}
                for kind, chunks in kinds.items():
                    key = tuple(id(c) for c in chunks)
                    if key not in built:
                        built[key] = _cat_rows(chunks)
                    out[layer][kind] = built[key]
            self._cache["attn"] = out
        return self._cache["attn"]

    @property
    def residuals(self) -> dict[int, torch.Tensor]:
        """{layer: residual input [B, T_kept, D]} (the prompt, plus one row per decoding step when decode=True)."""
        if "res" not in self._cache:
            self._cache["res"] = {layer: torch.cat(chunks, 1) for layer, chunks in sorted(self._res.items())}
        return self._cache["res"]

    @property
    def head_stats(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {"image_before", "nonsink_before", "image_after", "nonsink_after": [B, H, R]}}: per head and kept
        row, Σ_{j∈I} α_ij and Σ_{j∈I∖V} α_ij (what VAR's head selection reads)."""
        if "stats" not in self._cache:
            self._cache["stats"] = {layer: {k: torch.cat(v, -1) for k, v in d.items()}
                                    for layer, d in sorted(self._stats.items())}
        return self._cache["stats"]

    @property
    def phi(self) -> dict[int, torch.Tensor]:
        """{layer: sink score φ [B, T_prompt]} for every layer (empty without sink dims)."""
        return dict(self._phi)

    @property
    def sinks(self) -> dict[int, torch.Tensor]:
        """{layer: S^ℓ [B, T_prompt] bool}: φ ≥ τ."""
        return dict(self._sinks)

    @property
    def visual_sinks(self) -> dict[int, torch.Tensor]:
        """{layer: V^ℓ [B, T_prompt] bool}: sinks that are image tokens."""
        return dict(self._vis)

    @property
    def used_sink_dims(self) -> tuple[int, ...]:
        return tuple(self._dims)

    @property
    def used_tau(self) -> float:
        return self._tau

    def image_span(self, b: int = 0) -> tuple[int, int]:
        """[start, end) of sample b's image tokens in the prompt."""
        return int(self.image_start[b]), int(self.image_end[b])

    def masked_columns(self, layer: int, device: bool = False) -> torch.Tensor | None:
        """[B, T_prompt] bool: key positions removed from attention in `layer` (None: nothing masked)."""
        if self.mask == "visual_sinks":
            cols = self._vis_dev.get(layer)
        else:
            cols = self._random_cols
        if cols is None or device:
            return cols
        return cols.to(self.store)

    def mask_report(self, b: int = 0) -> dict | None:
        """JSON-ready: what was masked for sample b (prompt positions, and patch indices within the image)."""
        if self.mask is None and not self.mask_random:
            return None
        start = self.image_span(b)[0] if self.image is not None else 0
        if self.mask == "visual_sinks":
            pos = {str(layer): torch.nonzero(v[b]).flatten().tolist() for layer, v in sorted(self._vis.items())}
            return {"kind": "visual_sinks", "sink_dims": list(self.used_sink_dims), "tau": self.used_tau,
                    "positions": pos, "patches": {k: [p - start for p in v] for k, v in pos.items()},
                    "count": {k: len(v) for k, v in pos.items()}}
        pos = torch.nonzero(self._random_cols[b]).flatten().tolist() if self._random_cols is not None else []
        return {"kind": "random_image_tokens", "n": self.mask_random, "seed": self.mask_seed,
                "positions": pos, "patches": [p - start for p in pos]}


def _cat_rows(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B, H, r, S_i] chunks along rows, zero-padding the key axis to the largest S."""
    S = max(c.shape[-1] for c in chunks)
    return torch.cat([F.pad(c, (0, S - c.shape[-1])) for c in chunks], dim=2)


# ---------------------------------------------------------------------------------------------------------------
# From a capture to the numbers behind the pictures (viz.py draws them; no torch there)

def default_layer_range(n_layers: int) -> tuple[int, int]:
    """Layers 10–12 of a 32-layer model (where the paper looks), scaled to other depths; inclusive."""
    lo = min(n_layers - 1, math.floor(10 * n_layers / 32 + 0.5))
    hi = min(n_layers - 1, max(lo, math.floor(12 * n_layers / 32 + 0.5)))
    return lo, hi


def parse_layer_range(text: str, n_layers: int | None = None) -> tuple[int, int]:
    """'10-12' or '11' → (10, 12) / (11, 11), checked against the model's depth when given."""
    parts = text.strip().split("-")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise MinivarError(f"--attention-layers '{text}' is not a layer or a range like 10-12")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo > hi:
        raise MinivarError(f"--attention-layers '{text}': {lo} > {hi}")
    if n_layers is not None and hi >= n_layers:
        raise MinivarError(f"--attention-layers '{text}': the model has layers 0..{n_layers - 1}")
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
        has_vis = layer in vis and bool(vis[layer][b].any())
        sel = image_centric(a, ns, rule.min_image_attention, rule.rho) & (layer in var_layers and has_vis)
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
        "var": None if var is None else {"rho": var.rho, "p": var.p, "min_image_attention": var.min_image_attention,
                                         "layers": sorted(var_layers)},
        "selection_rule": {"rho": rule.rho, "min_image_attention": rule.min_image_attention,
                           "layers": sorted(var_layers)},
        "layer_range": list(layer_range),
        "answer_rows": capture.rows,
        "attention": attention,                      # kind → mean attention per image patch (row-major grid)
        "heads": {"image_attention": image_attn, "nonsink_ratio": ratio, "selected_fraction": selected},
        "phi": phi,                                  # [layer][patch]
        "visual_sinks": sinks,                       # layer → patch indices
        "sink_ranges": [list(r) for r in sink_layer_ranges(n_layers)],
        "masked": capture.mask_report(b),
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
        """Write the pictures (if asked); return the fields run.py adds to --json."""
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
