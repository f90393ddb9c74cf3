"""Looking inside: record attention, residuals and sink sets of one call (Capture), and remove key columns from
attention (KeyMask: visual-sink removal, random image tokens). Both are hooks (see hooks.py): passed per call,
never stored on the model, so nothing stays attached afterwards.

`Capture` keeps only what was asked for (a 7B prompt's full attention is GBs):
  - attention probabilities (before and/or after VAR) of chosen layers and heads, for chosen query rows:
    "all" prompt rows, "after_image" (the rows VAR may touch) or "answer" (the rows that produce answer tokens:
    the last prompt row, plus one row per decoding step when decode=True);
  - residual inputs of the chosen layers; per-(layer, head, row) image-attention sums for every layer (head_stats);
  - the sink score φ and the sink sets S^ℓ, V^ℓ of every layer, read from the call's `var.Sinks` (VAR's own when
    VAR runs), and VAR's own head selections: nothing is computed a second time.
Rows are identified by their absolute positions, which every hook method receives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import MinivarError
from .methods.hooks import Hook
from .methods.var import first_after_image, image_span, image_sums
from .methods.var_official import portion_and_summation

ROWS = ("all", "after_image", "answer")
KINDS = ("before", "after")


class Capture(Hook):
    """A recording hook for one call; tensors are copied to `store` (default CPU). Place it after VAR in the hook
    list (Pipeline.capture does) so "after" is VAR's output."""

    def __init__(self, layers=(), heads=None, *, attention=KINDS, residuals: bool = False, head_stats: bool = False,
                 rows: str = "all", decode: bool = False, store="cpu"):
        """layers: "all" or layer indices whose attention/residuals to keep; heads: None (all) or head indices.
        attention: which probabilities to keep, a subset of ("before", "after"); () for none."""
        self.layers = None if isinstance(layers, str) and layers == "all" else frozenset(int(x) for x in layers)
        self.heads = None if heads is None else tuple(int(x) for x in heads)
        attention = (attention,) if isinstance(attention, str) else tuple(attention or ())
        for kind in attention:
            if kind not in KINDS:
                raise MinivarError(f"attention kind '{kind}' is not one of {', '.join(KINDS)}")
        if rows not in ROWS:
            raise MinivarError(f"rows '{rows}' is not one of {', '.join(ROWS)}")
        self.attention, self.residuals_wanted, self.head_stats_wanted = attention, residuals, head_stats
        self.rows_mode, self.decode = rows, decode
        self.store = torch.device(store)
        self.result = None                 # Pipeline.capture puts the generation Result here
        self.masked = None                 # ... and the KeyMask it ran with (None: nothing masked)
        self.bind(None)

    def bind(self, image_mask: torch.Tensor | None, *, sinks=None, var_state=None, n_layers: int | None = None,
             n_heads: int | None = None) -> "Capture":
        """Prepare for one call: image_mask [B, T_prompt] bool (where the image is; None: no image, every row is a
        prompt row), the call's var.Sinks and VARState (None where there are none), model sizes for checks.
        Clears anything recorded before."""
        self.image = image_mask.bool() if image_mask is not None else None
        self.sink_state, self.var_state = sinks, var_state
        if self.image is not None:
            self.prompt_len = self.image.shape[1]
            self.image_start, self.image_end = image_span(self.image)      # [B] each; T where there is no image
        else:
            self.prompt_len = None
        if n_layers is not None and self.layers is not None:
            bad = sorted(x for x in self.layers if not 0 <= x < n_layers)
            if bad:
                raise MinivarError(f"capture layer {bad[0]} is outside 0..{n_layers - 1}")
        if n_heads is not None:
            self._check_heads(n_heads)
        self.n_heads = n_heads
        self._rows: list[int] = []         # absolute positions of the kept rows, all calls
        self._attn: dict[int, dict[str, list]] = {}
        self._res: dict[int, list] = {}
        self._stats: dict[int, dict[str, list]] = {}
        self._heads_idx = None
        self._cache: dict = {}
        return self

    def _check_heads(self, n_heads: int):
        bad = [h for h in self.heads or () if not 0 <= h < n_heads]
        if bad:
            raise MinivarError(f"capture head {bad[0]} is outside 0..{n_heads - 1}")

    def _wants_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def _first_kept(self, rows: range) -> int | None:
        """The first position of `rows` this capture keeps (the kept rows are always the last ones of a call)."""
        T = self.prompt_len if self.prompt_len is not None else rows.stop     # unbound: every row is the prompt's
        if rows.start >= T:                                                   # a generated row
            return rows.start if self.decode else None
        if self.rows_mode == "all":
            first = rows.start
        elif self.rows_mode == "answer":
            first = T - 1                          # the last prompt row produces the first answer token
        else:
            if self.image is None:
                raise MinivarError("rows='after_image' needs bind() with the image mask")
            first = max(rows.start, first_after_image(self.image_end))
        return first if first < rows.stop else None

    # -- the hook interface -------------------------------------------------------------------------------------------
    def residual(self, layer: int, h: torch.Tensor, rows: range) -> None:
        first = self._first_kept(rows)
        if layer == 0 and first is not None:
            self._rows.extend(range(first, rows.stop))
        # residuals: every prompt row, and the generated rows when decode=True
        keeps_residual = self.prompt_len is None or rows.start < self.prompt_len or self.decode
        if self.residuals_wanted and keeps_residual and self._wants_layer(layer):
            self._res.setdefault(layer, []).append(h.detach().to(self.store, copy=True))

    def explicit_from(self, layer: int, rows: range) -> int | None:
        if not ((self.attention and self._wants_layer(layer)) or self.head_stats_wanted):
            return None
        return self._first_kept(rows)

    def probs(self, layer: int, probs: torch.Tensor, rows: range, before: torch.Tensor) -> torch.Tensor:
        first = self._first_kept(rows)
        if first is None or not ((self.attention and self._wants_layer(layer)) or self.head_stats_wanted):
            return probs
        skip = first - rows.start                  # rows another hook needed but this capture does not keep
        if self.attention and self._wants_layer(layer):
            if self._heads_idx is None and self.heads is not None:
                self._check_heads(probs.shape[1])
                self._heads_idx = torch.tensor(self.heads, device=probs.device)
            kept: dict[int, torch.Tensor] = {}
            for kind in self.attention:
                t = before if kind == "before" else probs
                if id(t) not in kept:              # nothing changed the probabilities: before and after share a copy
                    x = t[:, :, skip:]
                    if self._heads_idx is not None:
                        x = x.index_select(1, self._heads_idx)
                    kept[id(t)] = x.to(self.store, copy=True)
                self._attn.setdefault(layer, {}).setdefault(kind, []).append(kept[id(t)])
        if self.head_stats_wanted:
            S, B = probs.shape[-1], probs.shape[0]
            image = (F.pad(self.image, (0, S - self.image.shape[1])) if self.image is not None
                     else torch.zeros(B, S, dtype=torch.bool, device=probs.device))
            vis = (self.sink_state.keys(layer, max(S, self.prompt_len))[2][:, :S] if self.sink_state is not None
                   else torch.zeros_like(image))
            d = self._stats.setdefault(layer, {})
            for kind, t in (("before", before), ("after", probs)):
                image_attn, nonsink_attn = image_sums(t[:, :, skip:], image, vis)      # as VAR's selection reads them
                d.setdefault(f"image_{kind}", []).append(image_attn.to(self.store, copy=True))
                d.setdefault(f"nonsink_{kind}", []).append(nonsink_attn.to(self.store, copy=True))
            # the released code's rule reads another ratio (its portion): kept so the explorer selects as it does
            portion, _ = portion_and_summation(before[:, :, skip:], image, vis)
            d.setdefault("official_portion_before", []).append(portion.to(self.store, copy=True))
        return probs

    # -- results -----------------------------------------------------------------------------------------------------
    @property
    def rows(self) -> list[int]:
        """Absolute query positions of the kept rows (row r of every attention / head_stats tensor)."""
        return list(self._rows)

    @property
    def attention_probs(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {"before"|"after": fp32 [B, H_kept, R, S]}}; decoding rows are zero-padded to the final S
        (keys that did not exist yet). Where nothing changed the probabilities, "before" and "after" are the same
        tensor."""
        if "attn" not in self._cache:
            out = {}
            for layer, kinds in sorted(self._attn.items()):
                built: dict[tuple, torch.Tensor] = {}
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
        """{layer: residual input [B, T', D]}: the prompt's rows, plus one row per decoding step when decode=True."""
        if "res" not in self._cache:
            self._cache["res"] = {layer: torch.cat(chunks, 1) for layer, chunks in sorted(self._res.items())}
        return self._cache["res"]

    @property
    def head_stats(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {"image_before", "nonsink_before", "image_after", "nonsink_after": [B, H, R]}}: per head and kept
        row, Σ_{j∈I} α_ij and Σ_{j∈I∖V} α_ij (what VAR's head selection reads); "official_portion_before": the
        released code's visual-sink share Σ_V α / Σ_I (α + 1e-6) (what its rule reads)."""
        if "stats" not in self._cache:
            self._cache["stats"] = {layer: {k: torch.cat(v, -1) for k, v in d.items()}
                                    for layer, d in sorted(self._stats.items())}
        return self._cache["stats"]

    def selected(self, layer: int) -> torch.Tensor | None:
        """VAR's own selections [B, H, R] of the kept rows in `layer` (all False where VAR did not act); None without
        VAR (or with a VARState made without keep_selections)."""
        if self.var_state is None or self.var_state.selections is None:
            return None
        index = {pos: r for r, pos in enumerate(self._rows)}
        out = torch.zeros(self.image.shape[0], self.n_heads, len(self._rows), dtype=torch.bool)
        for rows, chosen in self.var_state.selections.get(layer, []):
            for i, pos in enumerate(rows):
                if pos in index:
                    out[:, :, index[pos]] = chosen[:, :, i].cpu()
        return out

    def _sink_sets(self, which: str) -> dict[int, torch.Tensor]:
        if self.sink_state is None:
            return {}
        return {layer: t.to(self.store, copy=True) for layer, t in enumerate(getattr(self.sink_state, which))}

    @property
    def phi(self) -> dict[int, torch.Tensor]:
        """{layer: sink score φ [B, T_prompt]} for every layer (empty without a Sinks hook)."""
        return self._sink_sets("phi")

    @property
    def sinks(self) -> dict[int, torch.Tensor]:
        """{layer: S^ℓ [B, T_prompt] bool}: φ ≥ τ."""
        return self._sink_sets("sinks")

    @property
    def visual_sinks(self) -> dict[int, torch.Tensor]:
        """{layer: V^ℓ [B, T_prompt] bool}: sinks that are image tokens."""
        return self._sink_sets("visual_sinks")

    @property
    def used_sink_dims(self) -> tuple[int, ...]:
        return self.sink_state.sink_dims if self.sink_state is not None else ()

    @property
    def used_tau(self) -> float | None:
        return self.sink_state.tau if self.sink_state is not None else None

    def image_span(self, b: int = 0) -> tuple[int, int]:
        """[start, end) of sample b's image tokens in the prompt."""
        return int(self.image_start[b]), int(self.image_end[b])


class KeyMask(Hook):
    """Remove tokens from attention: their key columns are masked (never attended to) in every query row.
    kind "visual_sinks": each layer's visual sinks V^ℓ, read from the call's var.Sinks (set by bind);
    kind "random": n random image tokens (seeded), the same in every layer. Generated tokens are never masked."""
    masks_keys = True

    def __init__(self, kind: str, n: int = 0, seed: int = 0):
        if kind not in ("visual_sinks", "random"):
            raise MinivarError(f"mask kind '{kind}' is not 'visual_sinks' or 'random'")
        if kind == "random" and n < 1:
            raise MinivarError(f"`KeyMask` n (random image tokens) must be ≥ 1, got {n}")
        self.kind, self.n, self.seed = kind, int(n), int(seed)
        self.sink_state, self.random_cols, self.image = None, None, None

    def bind(self, image_mask: torch.Tensor, sinks=None) -> "KeyMask":
        """image_mask [B, T_prompt]; sinks: the call's var.Sinks (needed for kind "visual_sinks")."""
        self.image, self.sink_state = image_mask.bool(), sinks
        if self.kind == "visual_sinks" and (sinks is None or not sinks.sink_dims):
            raise MinivarError("masking visual sinks needs sink dims (none were given or found)")
        if self.kind == "random":
            g = torch.Generator().manual_seed(self.seed)
            cols = torch.zeros(self.image.shape, dtype=torch.bool)
            for b in range(self.image.shape[0]):
                idx = torch.nonzero(self.image[b].cpu()).flatten()
                if self.n > len(idx):
                    raise MinivarError(f"`KeyMask` n = {self.n} random image tokens is more than the {len(idx)} image tokens")
                cols[b, idx[torch.randperm(len(idx), generator=g)[: self.n]]] = True
            self.random_cols = cols.to(self.image.device)
        return self

    def columns(self, layer: int) -> torch.Tensor:
        """[B, T_prompt] bool: the key positions removed in `layer`."""
        return self.sink_state.visual_sinks[layer] if self.kind == "visual_sinks" else self.random_cols

    def key_mask(self, layer, mask, rows):
        cols = self.columns(layer)
        cols = F.pad(cols, (0, mask.shape[-1] - cols.shape[-1])) if mask.shape[-1] > cols.shape[-1] else cols[:, :mask.shape[-1]]
        new = mask & ~cols[:, None, None, :]
        # a row left with no key at all would give NaN; keep its original mask (never the case for LLaVA prompts)
        return torch.where(new.any(-1, keepdim=True), new, mask)

    def report(self, b: int = 0) -> dict:
        """JSON-ready: what was masked for sample b (prompt positions, and patch indices within the image)."""
        start = int(image_span(self.image)[0][b])
        if self.kind == "visual_sinks":
            pos = {str(layer): torch.nonzero(v[b]).flatten().tolist() for layer, v in enumerate(self.sink_state.visual_sinks)}
            return {"kind": "visual_sinks", "sink_dims": list(self.sink_state.sink_dims), "tau": self.sink_state.tau,
                    "positions": pos, "patches": {k: [p - start for p in v] for k, v in pos.items()},
                    "count": {k: len(v) for k, v in pos.items()}}
        pos = torch.nonzero(self.random_cols[b]).flatten().tolist()
        return {"kind": "random_image_tokens", "n": self.n, "seed": self.seed,
                "positions": pos, "patches": [p - start for p in pos]}


def _cat_rows(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B, H, r, S_i] chunks along rows, zero-padding the key axis to the largest S."""
    S = max(c.shape[-1] for c in chunks)
    return torch.cat([F.pad(c, (0, S - c.shape[-1])) for c in chunks], dim=2)




def vision_cls_attention(pipeline, image, *, layers=None, heads: bool = False,
                         image_aspect_ratio: str | None = None) -> dict[int, torch.Tensor]:
    """The vision tower's CLS attention per layer for one image, through a loaded Pipeline: {CLIP layer: [crops, N]}
    — DAMRO's full-width score (methods.damro.cls_attention), or with heads=True {layer: [crops, H, N]}, the
    layer's own heads. crops: 1 for LLaVA-1.5; LLaVA-NeXT's base crop first, then its tiles. layers: CLIP layer
    indices (default every layer the model runs). A family without a CLS token (Qwen2-VL) is refused."""
    from .methods.damro import vision_cls_attention as cls_attention
    if not pipeline.family.has_cls:
        raise MinivarError(f"{pipeline.family.name}'s vision tower has no CLS token: no CLS attention to show")
    px = pipeline.image(image, image_aspect_ratio).pixel_values
    return {layer: t.float().cpu() for layer, t in
            cls_attention(pipeline.model, px[None] if px.ndim == 3 else px, layers, heads).items()}
