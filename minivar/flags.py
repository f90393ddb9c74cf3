"""Flags → methods, written once for the command line (`minivar`), the harness (`minivar-eval run`) and the
lmms-eval plugin (`--model_args`). Each caller hands over its options by name (the flags' argparse dests) and how
it spells an option in an error message, and gets back the methods to run plus the sink rule of the pictures.

VAR's options: var, var_preset, tau, rho, p, min_image_attention, sink_dims, var_rule, var_heads, var_layers.
One rule for ρ when no --var-preset is given: where minivar knows the task (the harness: the benchmark's family),
the task's preset, in the rule's own convention (the released rule's rho = 1 − ρ); where it does not (`minivar`,
the lmms-eval plugin), the rule's own default — the paper's general preset ρ 0.8, or the released code's
configuration rho 0.5 (A_exps/lv1.5_7b.yml). No torch is imported until a method is built.
"""
from __future__ import annotations

import argparse
import textwrap

from .defaults import PROMPT_TOKENIZATIONS  # noqa: F401  (for the command lines)
from .errors import MinivarError

# every method's options (the argparse dests); add_contrastive_flags writes DAMRO's and VCD's flags once for both
# command lines
DAMRO_OPTIONS = ("damro", "damro_alpha", "damro_beta", "damro_topk", "damro_preset")
VCD_OPTIONS = ("vcd", "vcd_alpha", "vcd_beta", "vcd_noise_step")
PAI_OPTIONS = ("pai", "pai_alpha", "pai_layers", "pai_gamma", "pai_first_token")
OPERA_OPTIONS = ("opera", "opera_scale", "opera_threshold", "opera_candidates", "opera_penalty", "opera_rule")
CONV_MODES = ("vicuna_v1", "llava_hf", "llava_v1", "mistral_instruct", "qwen", "qwen3", "internvl")  # every family's
IMAGE_MODES = ("pad", "crop", "anyres", "smart_resize", "tiles")       # every family's image modes (registry)
PROMPT_TOKENIZATION_HELP = ("llava: BOS + the template as LLaVA's fast tokenizer gives it; official: as the VAR "
                            "authors' released code does (no BOS, 29871 kept once; vicuna_v1 only; "
                            "docs/official-rule.md); damro: as DAMRO's released scripts do (their slow tokenizer: "
                            "no \"▁\" after a special token, typed </s> <s> <unk> as those tokens; LLaMA templates; "
                            "docs/damro.md)")

VAR_ONLY = ("var_preset", "rho", "p", "min_image_attention", "var_rule", "var_heads", "var_layers")
SINK_RULE = ("tau", "sink_dims")            # also the sink sets of the pictures and of sink masking
VAR_OPTIONS = VAR_ONLY + SINK_RULE


def flag(dest: str) -> str:
    """The command line's spelling of an option: var_rule → --var-rule."""
    return "--" + dest.replace("_", "-")


def parse_layer_range(text: str, n_layers: int | None = None, flag: str = "--attention-layers") -> tuple[int, int]:
    """'10-12' or '11' → (10, 12) / (11, 11), checked against the model's depth when given."""
    parts = str(text).strip().split("-")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise MinivarError(f"{flag} '{text}' is not a layer or a range like 10-12")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo > hi:
        raise MinivarError(f"{flag} '{text}': {lo} > {hi}")
    if n_layers is not None and hi >= n_layers:
        raise MinivarError(f"{flag} '{text}': the model has layers 0..{n_layers - 1}")
    return lo, hi


def methods_from_options(opts: dict, *, preset: str | None = None, spell=flag, sinks_used: bool = False):
    """(the methods the options ask for, in order; the sink rule — a VARConfig holding τ and the sink dims — of the
    sink sets the pictures and sink masking read). opts: option name → value (None / False: not given).
    preset: the task's preset (None: the rule's own default). sinks_used: the caller draws pictures or masks sinks,
    so --tau / --sink-dims apply without --var."""
    from .methods.var import VAR, VARConfig, parse_sink_dims
    given = {k: v for k, v in opts.items() if v is not None and v is not False}
    if not given.get("var"):
        stray = [k for k in VAR_ONLY if k in given]
        if stray:
            raise MinivarError(f"{spell(stray[0])} only applies with {spell('var')}")
    sink_dims = given.get("sink_dims")
    if isinstance(sink_dims, str):
        sink_dims = parse_sink_dims(sink_dims)
    elif sink_dims is not None:
        sink_dims = tuple(sink_dims)
    methods = []
    if not given.get("var"):
        rule_flags = [k for k in SINK_RULE if k in given]
        if rule_flags and not sinks_used:
            raise MinivarError(f"{spell(rule_flags[0])} only applies with {spell('var')}, --save-attention or "
                               f"--mask-visual-sinks")
        # the pictures' sinks: τ and dims as given ("auto" runs the finder, as it does for VAR)
        return (contrastive_methods(opts, spell) + opera_methods(opts, spell),
                VARConfig.preset(None, tau=given.get("tau"), sink_dims=sink_dims).validate())
    layers = given.get("var_layers")
    if isinstance(layers, str):
        lo, hi = parse_layer_range(layers, flag=spell("var_layers"))
        layers = tuple(range(lo, hi + 1))
    elif layers is not None:
        layers = tuple(sorted({int(x) for x in layers}))
    cfg = VARConfig.preset(given.get("var_preset") or preset, tau=given.get("tau"), rho=given.get("rho"),
                           p=given.get("p"), min_image_attention=given.get("min_image_attention"),
                           sink_dims=sink_dims, rule=given.get("var_rule"), heads=given.get("var_heads"),
                           layers=layers)
    # the ranges that need no model are checked now, before the slow load (sink dims need the hidden size: later)
    methods.append(VAR(cfg.validate()))
    return methods + contrastive_methods(opts, spell) + opera_methods(opts, spell), cfg


def opera_methods(opts: dict, spell=flag) -> list:
    """OPERA as the options ask for it (with VAR or alone; its released code has no contrast branch, so not with
    DAMRO or VCD); `num_beams` (--num-beams) is its beam width (default 5)."""
    from .methods import opera
    found = opera.from_options(opts, spell)
    if found is None:
        return []
    for other in ("damro", "vcd"):
        if opts.get(other):
            raise MinivarError(f"{spell('opera')} does not combine with {spell(other)}: the released OPERA has no "
                               f"contrast branch")
    if opts.get("pai") and opts.get("pai_gamma") != 1:      # PAI's guidance branch (γ ≠ 1; its default is 1.1)
        raise MinivarError(f"{spell('opera')} does not combine with {spell('pai')}'s guidance branch: the released "
                           f"OPERA has no contrast branch ({spell('pai_gamma')} 1 keeps PAI's attention step alone)")
    return [found]


def num_beams_of(opts: dict, spell=flag) -> int:
    """The beam width the options ask for: --num-beams (default 1; OPERA's own, 5, with --opera)."""
    k = opts.get("num_beams")
    if k is None:
        return 5 if opts.get("opera") else 1
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MinivarError(f"{spell('num_beams')} must be an integer ≥ 1, got {k!r}")
    if opts.get("opera") and k < 2:
        raise MinivarError(f"{spell('num_beams')} must be ≥ 2 with {spell('opera')} (the released OPERA is a beam "
                           f"search), got {k}")
    return k


def add_beam_flags(parser) -> None:
    """Beam search's and OPERA's flags (the same for `minivar` and `minivar-eval run`)."""
    b = parser.add_argument_group("beam search and OPERA (docs/opera.md)")
    b.add_argument("--num-beams", type=int, default=None, metavar="K",
                   help="beam search of K beams, as transformers' generate(num_beams=K) (length penalty 1, no early "
                        "stopping; greedy only) (default: 1, no beam search; 5 with --opera)")
    b.add_argument("--opera", action="store_true",
                   help="apply OPERA (over-trust penalty and retrospection; a beam search) (default: off)")
    b.add_argument("--opera-scale", type=float, default=None, metavar="S",
                   help="scale of the attention in the over-trust score (default: 50)")
    b.add_argument("--opera-threshold", type=int, default=None, metavar="N",
                   help="roll back once a location repeats more than N times (default: 15)")
    b.add_argument("--opera-candidates", type=int, default=None, metavar="C",
                   help="candidates per beam (default: 5)")
    b.add_argument("--opera-penalty", type=float, default=None, metavar="P",
                   help="weight of the over-trust penalty (default: 1)")
    b.add_argument("--opera-rule", choices=["released", "fixed"], default=None,
                   help="released: as shikiw/OPERA's code; fixed: a rollback forgets the exclusions of the positions "
                        "it discards (docs/opera.md) (default: released)")


def contrastive_methods(opts: dict, spell=flag) -> list:
    """DAMRO, VCD and PAI as the options ask for them (each None without its switch); they run with VAR or alone,
    not with each other (each adds a contrast branch; PAI's released code has no way to combine with another
    decoding rule). `seed` (the run's) seeds VCD's noise."""
    from .methods import damro, pai, vcd
    found = [m for m in (damro.from_options(opts, spell), vcd.from_options(opts, spell),
                         pai.from_options(opts, spell)) if m is not None]
    if len(found) > 1:
        names = [spell(m.name) for m in found]
        raise MinivarError(f"{' and '.join(names)} each add a contrast branch: use one of them")
    return found


def add_contrastive_flags(parser) -> None:
    """DAMRO's and VCD's flags (the same for `minivar` and `minivar-eval run`)."""
    d = parser.add_argument_group("DAMRO (the ViT's outlier tokens, contrastive decoding; docs/damro.md)")
    d.add_argument("--damro", action="store_true", help="apply DAMRO (default: off)")
    d.add_argument("--damro-preset", choices=["pope", "chair", "mme"], default=None,
                   help="the released scripts' settings: pope α 0.5 k 4, chair α 1.5 k 4, mme α 2 k 10, β 0.1 "
                        "(default: mme's)")
    d.add_argument("--damro-alpha", type=float, default=None, metavar="A",
                   help="contrast strength α ≥ 0, overrides the preset (default: 2)")
    d.add_argument("--damro-beta", type=float, default=None, metavar="B",
                   help="plausibility cutoff β in (0, 1] (default: 0.1)")
    d.add_argument("--damro-topk", type=int, default=None, metavar="K",
                   help="outlier tokens kept in the contrast image (default: 10)")
    c = parser.add_argument_group("VCD (contrastive decoding against a noised image)")
    c.add_argument("--vcd", action="store_true", help="apply VCD (default: off)")
    c.add_argument("--vcd-alpha", type=float, default=None, metavar="A", help="contrast strength α ≥ 0 (default: 1)")
    c.add_argument("--vcd-beta", type=float, default=None, metavar="B",
                   help="plausibility cutoff β in (0, 1] (default: 0.1)")
    c.add_argument("--vcd-noise-step", type=int, default=None, metavar="N",
                   help="forward-diffusion step of the noised image, 0..999 of 1000 (default: 500); the noise is "
                        "seeded by --seed (default 0) and the image's pixels")
    add_pai_flags(parser)


def add_pai_flags(parser) -> None:
    """PAI's flags (docs/pai.md)."""
    a = parser.add_argument_group("PAI (more attention to the image, guidance against the prompt without it; "
                                  "docs/pai.md)")
    a.add_argument("--pai", action="store_true", help="apply PAI (default: off)")
    a.add_argument("--pai-alpha", type=float, default=None, metavar="A",
                   help="image keys' pre-softmax scores a ← a + α·|a| (default: 0.2)")
    a.add_argument("--pai-layers", default=None, metavar="S-E",
                   help="the layers edited, S … E−1 counted from 0 (the released --start-layer/--end-layer), "
                        "clipped to the model's depth (default: 2-32)")
    a.add_argument("--pai-gamma", type=float, default=None, metavar="G",
                   help="guidance γ ≥ 1 against the prompt without the image; 1: no second branch (default: 1.1)")
    a.add_argument("--pai-first-token", choices=["unedited", "edited"], default=None,
                   help="unedited: as the released loop, which leaves the first generated token's forward "
                        "unedited when γ ≠ 1; edited: the paper's rule (default: unedited)")


def var_of(methods):
    """The VARConfig among `methods` (None without VAR)."""
    return next((m.config for m in methods if m.name == "var"), None)


def contrastive_load(methods) -> bool:
    """Does one of `methods` add a contrast branch (Method.adds_branch; an object without the attribute does not)?
    Then the model is loaded for two-row decode steps (minivar.load(..., contrastive=True))."""
    return any(getattr(m, "adds_branch", False) for m in methods)


def check_seed_applies(seed, temperature: float, methods, spell=flag, uses: tuple[str, ...] = ()) -> None:
    """The command lines' rule for an option that would have no effect: an error naming what it needs. --seed
    seeds sampling (--temperature > 0) and VCD's noise; `uses`: the caller's own flags that draw from it when
    given: (flag, given?) pairs (`minivar`'s --mask-random-image-tokens)."""
    drawn = temperature > 0 or any(m.name == "vcd" for m in methods)
    if seed is None or drawn or any(given for _, given in uses):
        return
    needs = [f"{spell('temperature')} > 0", spell("vcd")] + [name for name, _ in uses]
    raise MinivarError(f"{spell('seed')} only applies with {', '.join(needs[:-1])} or {needs[-1]}: nothing else "
                       f"draws random numbers")


# ---------------------------------------------------------------------------------------------------------------
# What both commands' --help say about the families and methods

METHODS = (   # (name, switch, what it does, which families)
    ("VAR", "--var", "Visual Attention Redistribution: in image-centric heads, attention that sink tokens draw is "
     "moved to the image's other tokens (docs/official-rule.md)", "every family"),
    ("DAMRO", "--damro", "the vision encoder's outlier tokens (its CLS attention) make a contrast image whose "
     "answer is subtracted (docs/damro.md)", "families whose vision tower has a CLS token: {cls}"),
    ("VCD", "--vcd", "Visual Contrastive Decoding: the answer is contrasted with the answer on a noised image",
     "every family"),
)


def overview() -> str:
    """The families (from the registry: a family added there appears here) and the methods, for both commands'
    --help. Imports the models, so it is called only when help is printed."""
    from .demo import name_for
    from .models.registry import FAMILIES
    lines = ["families (--model: a hub id or a local checkpoint of any of them, its config.json's model_type picks "
             "the family; or a tiny offline demo of each, made on first use):"]
    for f in FAMILIES.values():
        demo = f"; demo: --model {name_for(f.model_type)}" if f.demo is not None else ""
        lines.append(f"  {f.name} ({f.model_type}): templates {', '.join(f.conv_modes)}; images "
                     f"{', '.join(f.image_modes)}{demo}")
    cls = ", ".join(f.name for f in FAMILIES.values() if f.has_cls)
    lines.append("methods (training-free; VAR combines with DAMRO or VCD):")
    for name, switch, what, where in METHODS:
        lines.append(f"  {name} ({switch}): {what}; {where.format(cls=cls)}")
    return "\n".join(lines)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help texts without breaking "llava-hf/llava-1.5-7b-hf" at its hyphens; descriptions and epilogs keep
    their lines (each wrapped on its own, an indented item's continuation indented under it)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        out = []
        for line in text.splitlines():
            lead = indent + " " * (len(line) - len(line.lstrip()))
            more = "    " if line.startswith(" ") else ""          # an indented item's continuation goes deeper
            out.append(textwrap.fill(" ".join(line.split()), width, initial_indent=lead,
                                     subsequent_indent=lead + more, break_on_hyphens=False) if line.strip() else "")
        return "\n".join(out)
