"""Visual Attention Redistribution (VAR), Kang et al., ICLR 2025: "See What You Are Told: Visual Attention Sink
in Large Multimodal Models".

Notation (the README's "VAR: where each step is"): layers ℓ = 0..L−1; image tokens occupy prompt positions I = [s, s+N); h^ℓ is the residual
input of layer ℓ; α the post-softmax attention probabilities (fp32).

  1. sink dims D        massive-activation dims of the base LLM (7B: 1415, 2533; 13B: 2100, 4743), or found
  2. sink score         φ_j = max_{d∈D} |h_j[d]| / sqrt(mean_k h_j[k]² + 1e-6);  sinks S^ℓ = {j : φ_j ≥ τ}
                        visual sinks V^ℓ = S^ℓ ∩ I.  Computed once per sample in the prefill, reused while decoding.
  3. rows touched       layers 0..L−2 only; prefill rows after the image (i ≥ s+N) and every decoding row;
                        a layer (of a sample) without visual sinks is left alone.
  4. image-centric      A = Σ_{j∈I} α_ij,  r = Σ_{j∈I∖V} α_ij / A;  selected iff A ≥ 0.2 and r ≥ ρ.
  5. redistribution     every sink j ∈ S^ℓ keeps (1−p)·α_ij; Ω = p·Σ_{j∈S^ℓ} α_ij goes to I∖V in proportion:
                        α'_ij = α_ij + Ω·α_ij / Σ_{k∈I∖V} α_ik.  Rows still sum to 1.

That is the paper's rule (VARConfig.rule = "paper", the default). VARConfig.rule = "official" runs the same hooks
with the authors' released code's arithmetic instead (var_official.py: strict φ > τ, sinks only in layers 2..L−1, the
last layer modified, its rho/p conventions); VARConfig.heads = "all" redistributes on every head of the touched rows
(the paper's ablation without head selection).

The math is in plain functions of tensors (`sink_scores`, `sink_sets`, `select_heads`, `redistribute`). Two hooks
(see hooks.py) hold one call's state: `Sinks` (φ and the sink sets per layer) and `VARState` (head selection and
redistribution, counters). Both are made per call and passed down — never stored on the model — so two images in
a row get their own sinks; whether a row is in the prompt or generated follows from its position alone.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MinivarError
from .hooks import Hook
from .method import Method, MethodRun

PRESETS = {"general": 0.8, "hallucination": 0.5, "vision": 0.9}   # ρ per task family, from the paper
# "image-centric": the selected heads only; "all": every head of the touched rows (the paper's ablation)
HEADS = ("image-centric", "all")

class Rule:
    """A VAR rule: its conventions, its layers and its three steps (sink sets, head selection, redistribution).
    The paper's rule is this class; the released code's is var_official.OfficialRule. VARConfig.rule names one."""
    name = "paper"
    default_rho = PRESETS["general"]

    def paper_values(self, rho: float, p: float) -> tuple[float, float]:
        """(ρ, p) in the paper's conventions."""
        return rho, p

    def preset_rho(self, paper_rho: float) -> float:
        """A preset's ρ (paper convention) in this rule's convention."""
        return paper_rho

    def moved(self, p: float) -> float:
        """The fraction of the sinks' attention moved to the image."""
        return p

    def sink_layers(self, n_layers: int) -> frozenset[int] | None:
        """The layers whose residual input is scanned for sinks (None: every one)."""
        return None

    def layer_set(self, n_layers: int) -> frozenset[int]:
        """The layers VAR may modify: every layer but the last."""
        return frozenset(range(n_layers - 1))

    def sink_sets(self, h, dims, tau, image, real):
        return sink_sets(h, dims, tau, image, real)

    def select_heads(self, probs, image, visual_sink, rows, cfg: "VARConfig"):
        return select_heads(probs, image, visual_sink, rows, cfg.min_image_attention, cfg.rho)

    def redistribute(self, probs, selected, sink, image, visual_sink, p):
        return redistribute(probs, selected, sink, image, visual_sink, p)


# "paper": the rule as the paper writes it (this module); "official": as the authors' released code computes it
# (var_official.py registers it; docs/official-rule.md lists the differences).
RULES: dict[str, Rule] = {"paper": Rule()}


@dataclass(frozen=True)
class VARConfig:
    """VAR hyper-parameters. Under rule="paper" (the default) in the paper's conventions: p is the fraction of sink
    attention *moved*, ρ a *non-sink* floor. Under rule="official" in the released code's: p is the fraction
    *kept*, rho a *visual-sink* ceiling (paper_rho, paper_p convert), and its defaults are that code's
    (A_exps/lv1.5_7b.yml: τ 20, rho 0.5, p 0.6, summ 0.2 — the paper's ρ 0.5 and p 0.4)."""
    tau: float = 20.0                    # sink threshold on φ
    rho: float | None = None             # paper: non-sink share of image attention ≥ ρ (default 0.8);
                                         # official: visual-sink share ≤ rho (default 0.5)
    p: float = 0.6                       # paper: fraction of the sinks' attention moved; official: fraction kept
    min_image_attention: float = 0.2     # image-centric head: total image attention ≥ this (the code's `summ`)
    sink_dims: tuple[int, ...] | None = None   # None: the known dims of LLaVA-1.5-7B/13B, else the finder's
    find_sink_dims: bool = False         # True: run the sink-dim finder even for a model whose dims are known
    layers: tuple[int, ...] | None = None      # None: the rule's layers (paper: all but the last; official: 2..L−1)
    rule: str = "paper"                  # "paper" | "official"
    heads: str = "image-centric"         # "image-centric" | "all" (every head of the touched rows: an ablation)

    def __post_init__(self):
        if self.rule not in RULES:   # (RULES fills when minivar.methods is imported, before any VARConfig exists)
            raise MinivarError(f"`VARConfig.rule` must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.heads not in HEADS:
            raise MinivarError(f"`VARConfig.heads` must be one of {', '.join(HEADS)}, got {self.heads!r}")
        if self.rho is None:             # the rule's own default, in its own convention
            object.__setattr__(self, "rho", RULES[self.rule].default_rho)
        if self.sink_dims is not None:
            if isinstance(self.sink_dims, str) or not all(isinstance(d, int) for d in self.sink_dims):
                raise MinivarError(f"VAR sink_dims must be a tuple of ints or None (find_sink_dims=True runs the "
                                   f"finder), got {self.sink_dims!r}")
            object.__setattr__(self, "sink_dims", tuple(self.sink_dims))
        if self.sink_dims is not None and self.find_sink_dims:
            raise MinivarError("VAR: give sink_dims or find_sink_dims=True, not both")

    @staticmethod
    def preset(name: str | None = "general", **overrides) -> "VARConfig":
        """The paper's ρ for a task family, with any field overridden (None values are ignored); sink_dims="auto"
        (what parse_sink_dims gives for --sink-dims auto) means find_sink_dims=True. Under rule="official" the
        preset's ρ is given in the code's convention (rho = 1 − ρ); name=None keeps the rule's default."""
        if name is not None and name not in PRESETS:
            raise MinivarError(f"`VARConfig.preset` name '{name}' is not one of {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("sink_dims") == "auto":
            del given["sink_dims"]
            given["find_sink_dims"] = True
        preset = {}
        if name is not None:
            rule = RULES.get(given.get("rule", "paper"))
            preset["rho"] = rule.preset_rho(PRESETS[name]) if rule is not None else PRESETS[name]
        return VARConfig(**(preset | given))          # an explicit rho beats the preset

    @property
    def rule_impl(self) -> Rule:
        return RULES[self.rule]

    @property
    def moved(self) -> float:
        """The fraction of the sinks' attention moved to the image (the paper's p), under either rule."""
        return self.rule_impl.moved(self.p)

    def paper_values(self) -> tuple[float, float]:
        """(ρ, p) in the paper's conventions: as given under rule="paper", (1 − rho, 1 − p) under "official"."""
        return self.rule_impl.paper_values(self.rho, self.p)

    def sink_layers(self, n_layers: int) -> frozenset[int] | None:
        """The layers whose residual input is scanned for sinks: every one (None) under the paper's rule, 2..L−1
        under the released code's."""
        return self.rule_impl.sink_layers(n_layers)

    def layer_set(self, n_layers: int) -> frozenset[int]:
        """The layers VAR modifies: the configured ones within those the rule can touch (the released code never
        touches layers without sink detection), else the rule's — every layer but the last (paper), or the layers
        with sink detection, 2..L−1, the last one included (the released code)."""
        if self.layers is None:
            return self.rule_impl.layer_set(n_layers)
        reach = self.rule_impl.sink_layers(n_layers)
        return frozenset(self.layers) if reach is None else frozenset(self.layers) & reach

    def validate(self, hidden_size: int | None = None, n_layers: int | None = None) -> "VARConfig":
        """Range checks; sink dims and layers are checked against the model when its sizes are given."""
        if not 0.0 <= self.p <= 1.0:
            raise MinivarError(f"`VARConfig.p` must be in [0, 1], got {self.p}")
        if not 0.0 <= self.rho <= 1.0:
            raise MinivarError(f"`VARConfig.rho` must be in [0, 1], got {self.rho}")
        if not self.tau > 0:
            raise MinivarError(f"`VARConfig.tau` must be > 0, got {self.tau}")
        if not 0.0 <= self.min_image_attention <= 1.0:
            raise MinivarError(f"`VARConfig.min_image_attention` must be in [0, 1], got {self.min_image_attention}")
        for d in (self.sink_dims if self.sink_dims is not None and hidden_size is not None else ()):
            if not 0 <= d < hidden_size:
                raise MinivarError(f"`VARConfig.sink_dims`: dim {d} is outside the hidden size {hidden_size}")
        for layer in (self.layers or ()) if n_layers is not None else ():
            if not 0 <= layer < n_layers:      # the last layer only when named (the paper's rule leaves it alone)
                raise MinivarError(f"`VARConfig.layers`: layer {layer} is outside the model's layers 0..{n_layers - 1}")
        return self


def parse_sink_dims(text: str) -> tuple[int, ...] | str:
    """'1415,2533' → (1415, 2533); 'auto' → 'auto'. Malformed lists are errors."""
    text = text.strip()
    if text == "auto":
        return "auto"
    if not re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        raise MinivarError(f"--sink-dims '{text}' is not 'auto' or a comma-separated list of dims like 1415,2533")
    dims = tuple(sorted({int(x) for x in text.split(",")}))
    return dims


def known_sink_dims(cfg) -> tuple[str, tuple[int, ...]] | None:
    """Recognise a model whose sink dims its family knows (LLaVA-1.5-7B/13B) by name or by exact decoder shape;
    None for anything else."""
    from ..models.registry import family_of
    t = cfg.text
    shape = (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size)
    name = cfg.name_or_path.lower()
    for key, (known_shape, dims) in family_of(cfg).known_sink_dims.items():
        if shape == known_shape and (key in name or t.vocab_size in (32000, 32064)):
            return key, dims
    return None


# ---------------------------------------------------------------------------------------------------------------
# The math, as plain tensor functions

def sink_scores(h: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """φ [B, T] for residual states h [B, T, D]: the largest |h[d]| over sink dims, relative to the token's RMS."""
    h = h.float()
    rms = torch.sqrt(h.pow(2).mean(-1) + 1e-6)                      # [B, T]
    return h[..., list(dims)].abs().amax(-1) / rms


def sink_sets(h: torch.Tensor, dims: tuple[int, ...], tau: float, image: torch.Tensor, real: torch.Tensor | None = None):
    """One layer's φ [B, T] and sink sets from its residual input h [B, T, D]: S = {φ ≥ τ} (only among `real` [B, T]
    tokens where given: padding is never a sink) and the visual sinks V = S ∩ I, with I = `image` [B, T]."""
    phi = sink_scores(h, dims) if dims else torch.zeros(h.shape[:2], device=h.device)
    sinks = phi >= tau
    if real is not None:
        sinks = sinks & real
    return phi, sinks, sinks & image


def image_span(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, end) of each sample's image tokens ([B] each) from image masks [B, T]; (T, T) for a sample without."""
    T = image.shape[-1]
    positions = torch.arange(T, device=image.device)
    start = torch.where(image, positions, T).amin(-1)
    end = torch.where(image.any(-1), torch.where(image, positions + 1, 0).amax(-1), T)
    return start, end


def after_image(positions: torch.Tensor, image_end: torch.Tensor) -> torch.Tensor:
    """The rows VAR reads and changes: positions [R] at or after each sample's image end ([B]) → [B, R] bool
    (prompt rows after the image, and every generated row). The capture's rows="after_image" is the same rule."""
    return positions[None, :] >= image_end[:, None]


def first_after_image(image_end: torch.Tensor) -> int:
    """The first position any sample's after_image rows start at (one host read per call)."""
    return int(image_end.min())


def select_heads(probs: torch.Tensor, image: torch.Tensor, visual_sink: torch.Tensor, rows: torch.Tensor,
                 min_image_attention: float, rho: float) -> torch.Tensor:
    """Image-centric (head, row) pairs [B, H, Q] of probs [B, H, Q, K].

    image / visual_sink: [B, K] key masks (I and V); rows: [B, Q] query rows VAR may touch.
    A = Σ_{j∈I} α_ij;  r = Σ_{j∈I∖V} α_ij / A;  selected iff A ≥ min_image_attention, r ≥ ρ (and I∖V has mass).
    """
    image_attn, nonsink_attn = image_sums(probs, image, visual_sink)
    return image_centric(image_attn, nonsink_attn, min_image_attention, rho) & rows[:, None, :]


def image_sums(probs: torch.Tensor, image: torch.Tensor, visual_sink: torch.Tensor):
    """A = Σ_{j∈I} α_ij and Σ_{j∈I∖V} α_ij, each [B, H, Q], of probs [B, H, Q, K]; image / visual_sink: [B, K]."""
    image_attn = (probs * image[:, None, None, :]).sum(-1)                          # A
    nonsink_attn = (probs * (image & ~visual_sink)[:, None, None, :]).sum(-1)       # Σ over I∖V
    return image_attn, nonsink_attn


def image_centric(image_attn: torch.Tensor, nonsink_attn: torch.Tensor, min_image_attention: float,
                  rho: float) -> torch.Tensor:
    """The head-selection rule on A = Σ_{j∈I} α_ij and Σ_{j∈I∖V} α_ij: A ≥ min_image_attention and r ≥ ρ."""
    ratio = nonsink_attn / image_attn.clamp_min(1e-30)                              # r
    return (image_attn >= min_image_attention) & (ratio >= rho) & (nonsink_attn > 0)


def redistribute(probs: torch.Tensor, selected: torch.Tensor, sink: torch.Tensor, image: torch.Tensor,
                 visual_sink: torch.Tensor, p: float) -> torch.Tensor:
    """Move a fraction p of the sinks' attention to the visual non-sink tokens, on the selected rows only.

    sink: [B, K] all sinks S^ℓ (text and visual). α'_ij = (1−p)α_ij on sinks;
    α'_ij = α_ij + Ω·α_ij / Σ_{k∈I∖V} α_ik on I∖V with Ω = p·Σ_{j∈S} α_ij; every other entry unchanged.
    """
    sink_k = sink[:, None, None, :]
    target = (image & ~visual_sink)[:, None, None, :]
    omega = p * (probs * sink_k).sum(-1, keepdim=True)                              # Ω  [B, H, Q, 1]
    to_target = probs * target
    share = to_target / to_target.sum(-1, keepdim=True).clamp_min(1e-30)            # α_ij / Σ_{I∖V} α_ik
    new = probs - p * probs * sink_k + omega * share
    return torch.where(selected[..., None], new, probs)


# ---------------------------------------------------------------------------------------------------------------
# Per-call state

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

    def __init__(self, cfg: VARConfig, sinks: Sinks, max_len: int | None = None, keep_selections: bool = False):
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
        if rows is not None:
            steps = torch.arange(len(rows), device=self.decode_rows.device)
            decode = self.decode_rows[torch.tensor(rows, dtype=torch.long, device=steps.device), :, steps].sum(0) \
                if rows and self.decode_rows.shape[-1] >= len(rows) else self.decode_rows[b, :, :0].sum(-1)
        else:
            decode = self.decode_rows[b, :, :generated_rows].sum(-1)
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


# ---------------------------------------------------------------------------------------------------------------
# Finding sink dims for models we do not know

@torch.inference_mode()
def find_sink_dims(model, input_ids: torch.Tensor, ratio: float = 100.0) -> tuple[tuple[int, ...], dict]:
    """Massive-activation dims (Sun et al. 2024): dims where the first token's residual stream is ≥ `ratio` × its
    median magnitude in at least half of the middle layers. Runs the decoder on the text tokens of `input_ids`."""
    text_ids = input_ids[:1][~model.image_positions(input_ids[:1])][None]             # [1, T_text]
    n_layers = model.config.text.num_hidden_layers
    lo = max(1, n_layers // 4) if n_layers > 1 else 0
    hi = max(lo + 1, (3 * n_layers) // 4)
    middle = range(lo, min(hi, n_layers))
    recorder = _ResidualRecorder(set(middle))
    model(text_ids, hooks=recorder, output="hidden")
    votes: dict[int, int] = {}
    for layer in middle:
        first = recorder.residuals[layer][0, 0].float().abs()                            # BOS  [D]
        massive = torch.nonzero(first >= ratio * first.median().clamp_min(1e-12)).flatten().tolist()
        for d in massive:
            votes[d] = votes.get(d, 0) + 1
    dims = tuple(sorted(d for d, v in votes.items() if v * 2 >= len(middle)))
    return dims, {"middle_layers": [middle.start, middle.stop], "votes": votes}


class _ResidualRecorder(Hook):
    """A minimal hook that keeps the residual input of some layers (the finder's only need)."""

    def __init__(self, layers: set[int]):
        self.layers, self.residuals = layers, {}

    def residual(self, layer, h, rows):
        if layer in self.layers:
            self.residuals[layer] = h.detach()


def resolve_sink_dims(model_cfg, var_cfg: VARConfig, model=None, input_ids=None, warn=None):
    """Which sink dims to use, and where they came from: the user's list, the known table, or the finder.
    warn(message): where the finder's notes go (the command lines print them; default: a Python warning)."""
    warn = warn or (lambda msg: warnings.warn(msg.removeprefix("minivar: "), stacklevel=4))
    if var_cfg.sink_dims is not None:
        return var_cfg.sink_dims, "user"
    if not var_cfg.find_sink_dims:
        known = known_sink_dims(model_cfg)
        if known is not None:
            return known[1], f"known:{known[0]}"
    if model is None or input_ids is None:
        raise MinivarError("sink dims are unknown for this model; pass --sink-dims d1,d2 or --sink-dims auto")
    dims, _ = find_sink_dims(model, input_ids)
    if not var_cfg.find_sink_dims:
        from ..models.registry import family_of
        known = ", ".join(family_of(model_cfg).known_sink_dims) or f"none for {family_of(model_cfg).name}"
        again = f" (--sink-dims {','.join(map(str, dims))} passes them without the finder)" if dims else ""
        warn(f"minivar: model not recognised as one whose sink dims are known ({known}); sink-dim finder found "
             f"dims {list(dims)}{again}")
    else:
        warn(f"minivar: sink-dim finder found dims {list(dims)}")
    if not dims:
        warn("minivar: no sink dims found, so no token counts as a visual sink")
    return dims, "finder"


# ---------------------------------------------------------------------------------------------------------------
# VAR as a method (method.py): its settings, its per-call hooks, its report

class VAR(Method):
    """VAR with one VARConfig: per call, the sink sets (shared with the capture and sink masking) and a VARState."""
    name = "var"

    def __init__(self, config: "VARConfig | None" = None):
        self.config = as_var_config(config)

    def settings(self) -> dict:
        from dataclasses import asdict
        return json_ready(asdict(self.config))

    def check(self, pipeline) -> None:
        t = pipeline.config.text
        self.config.validate(t.hidden_size, t.num_hidden_layers)

    def start(self, call) -> "VARRun":
        sinks, source = call_sinks(call, self.config)
        state = VARState(self.config, sinks, max_len=call.max_len, keep_selections=call.capture)
        call.shared["var_state"] = state
        return VARRun(state, source)


class VARRun(MethodRun):
    def __init__(self, state: VARState, sink_dims_source: str):
        self.state, self.sink_dims_source = state, sink_dims_source
        self.hooks = [state]                 # it updates the sink sets it shares with the capture and the masking

    def report(self, b, generated_rows, rows=None):
        return self.state.report(b, generated_rows, rows) | {"sink_dims_source": self.sink_dims_source}


def call_sinks(call, cfg: VARConfig) -> tuple[Sinks, str]:
    """The call's sink sets under `cfg`'s rule (τ, sink dims, sink test, layers), made once per call and shared by
    VAR, the capture and sink masking (call.shared["sinks"]), and where the dims came from."""
    if "sinks" not in call.shared:
        t = call.pipeline.config.text
        cfg.validate(t.hidden_size, t.num_hidden_layers)
        ids, mask = call.input_ids, call.attention_mask
        first = ids[:1] if mask is None else ids[:1, mask[0]]                   # sample 0, unpadded
        dims, source = call.pipeline.sink_dims(cfg, first, call.warn)
        call.shared["sinks"] = Sinks(dims, cfg.tau, t.num_hidden_layers, call.image_mask, mask,
                                     rule=cfg.rule_impl, layers=cfg.sink_layers(t.num_hidden_layers))
        call.shared["sink_dims_source"] = source
    return call.shared["sinks"], call.shared["sink_dims_source"]


def as_var_config(var) -> VARConfig:
    """What `var=` may be: a VARConfig, True (the general preset) or a preset's name; anything else is a TypeError
    naming the types accepted."""
    if isinstance(var, VARConfig):
        return var
    if var is None or var is True:
        return VARConfig()
    if isinstance(var, str):
        return VARConfig.preset(var)
    raise TypeError(f"`var` must be a VARConfig, True or a preset name ({', '.join(PRESETS)}), "
                    f"got {type(var).__name__}")


def json_ready(d: dict) -> dict:
    """Tuples as lists (as JSON reads them back), so a resume compares like with like."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
