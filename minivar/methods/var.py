"""Visual Attention Redistribution (VAR), Kang et al., ICLR 2025: "See What You Are Told: Visual Attention Sink
in Large Multimodal Models" — its settings and the method object the generation loop drives.

VAR is read in this order (every name below is importable from this module too):

  var_paper.py     the paper's three steps — visual sinks, image-centric heads, redistribution — as plain functions
                   of tensors, and the rule object (`Rule`) the hooks call; start there
  var_state.py     one call's state as hooks: `Sinks` (φ and the sink sets per layer, read off the residual stream)
                   and `VARState` (head selection and redistribution on the rows after the image, counters, report)
  sink_finder.py   which sink dims: the user's, the known ones of LLaVA-1.5-7B/13B, or the massive-activation finder
  var.py           this file: `VARConfig` (τ, ρ, p, layers, rule, heads; the paper's presets) and `VAR`, the method

VARConfig.rule = "paper" (the default) runs the paper's rule; "official" runs the same hooks with the authors'
released code's arithmetic instead (var_official.py: strict φ > τ, sinks only in layers 2..L−1, the last layer
modified, its rho/p conventions); VARConfig.heads = "all" redistributes on every head of the touched rows (the
paper's ablation without head selection).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MinivarError
from .method import Method, MethodRun
from .sink_finder import find_sink_dims, known_sink_dims, resolve_sink_dims  # noqa: F401
from .var_paper import (PRESETS, RULES, Rule, after_image, first_after_image, image_centric, image_span,  # noqa: F401
                        image_sums, redistribute, select_heads, sink_scores, sink_sets)
from .var_state import Sinks, VARState  # noqa: F401

# "image-centric": the selected heads only; "all": every head of the touched rows (the paper's ablation)
HEADS = ("image-centric", "all")


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
