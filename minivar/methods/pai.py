"""PAI (Liu, Zheng, Chen, ECCV 2024: "Paying More Attention to Image: A Training-Free Method for Alleviating
Hallucination in LVLMs"), as its released code computes it (github.com/LALBJ/PAI at 9bbd8bd: `attention.py`,
`CFG.py`, and the loop of `chair_eval.py` / `pope_eval.py` that calls them; docs/pai.md has every detail).

  1. the attention step   in layers start … end−1 (0-based, end exclusive: the released --start-layer 2
                          --end-layer 32), for the last query row of a forward call, every head, the image keys'
                          pre-softmax scores (scaled q·k, after the mask):  a ← |a|·α + a     (α 0.2)
  2. the logits step      (γ ≠ 1) a second branch, the same prompt without the image (its image tokens and the
                          family's wrappers around them removed), unedited, fed the same tokens; per step, on the
                          log-probabilities s (full branch) and u (no image):
                              cutoff = log 0.1 + max s
                              l      = γ·(s − u) + u                                         (γ 1.1)
                              l[v]   = −∞  where s[v] < cutoff
                          then the token choice (the released scripts: greedy). γ = 1: no branch, l = s.

Which rows the attention step edits (the released loop's quirk, `first_token`): `llama_modify` arms the layers
with its `use_cfg` flag set, and only `CFGLogits` — called after the prompt's forward, on its logits — clears it.
So with the logits step on, the prompt's forward is *not* edited: the first generated token is chosen from unedited
logits, and the edit acts from the first decode step on (every row at positions ≥ the prompt's length). This is
the default ("released"); `first_token="edited"` also edits the prompt's last row, as the paper describes the
method and as the released code does without its logits step. With γ = 1 (no logits step) the last prompt row is
always edited, as the released `--use-attn` run without `--use-cfg` does.

The branch runs as rows of the same batched forward as the full prompts (methods/method.py; VCD's way), so a
decode step reads the weights once for both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MinivarError
from .contrastive import CANDIDATES_K, call_rows, top_candidates
from .hooks import Hook
from .method import Branch, Method, MethodRun

FIRST_TOKEN = ("unedited", "edited")      # "unedited": the released loop's (with γ ≠ 1); "edited": the paper's
CUTOFF_BETA = 0.1                         # CFG.py's plausibility cutoff, a constant there


@dataclass(frozen=True)
class PAIConfig:
    """PAI's settings; the defaults are the released README's commands (--alpha 0.2 --gamma 1.1 --start-layer 2
    --end-layer 32; the scripts' argparse default γ is 2). layers: (start, end), 0-based, end exclusive, clipped to
    the model's depth."""
    alpha: float = 0.2
    layers: tuple[int, int] = (2, 32)
    gamma: float = 1.1
    first_token: str = "unedited"

    def validate(self, n_layers: int | None = None) -> "PAIConfig":
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or \
                not math.isfinite(self.alpha) or self.alpha < 0:
            raise MinivarError(f"`PAIConfig.alpha` must be a finite number ≥ 0, got {self.alpha!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or \
                not math.isfinite(self.gamma) or self.gamma < 1:
            raise MinivarError(f"`PAIConfig.gamma` must be a finite number ≥ 1 (below 1 it would favour the answer "
                               f"without the image), got {self.gamma!r}")
        lo_hi = tuple(self.layers) if isinstance(self.layers, (tuple, list)) else ()
        if len(lo_hi) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in lo_hi) or \
                not 0 <= lo_hi[0] < lo_hi[1]:
            raise MinivarError(f"`PAIConfig.layers` must be (start, end) with 0 ≤ start < end, got {self.layers!r}")
        if n_layers is not None and lo_hi[0] >= n_layers:
            raise MinivarError(f"`PAIConfig.layers` {lo_hi[0]}-{lo_hi[1]} starts past the model's {n_layers} layers "
                               f"(0..{n_layers - 1})")
        if self.first_token not in FIRST_TOKEN:
            raise MinivarError(f"`PAIConfig.first_token` must be one of {', '.join(FIRST_TOKEN)}, "
                               f"got {self.first_token!r}")
        return self

    def layer_set(self, n_layers: int) -> range:
        """The layers edited: start … min(end, n_layers) − 1."""
        return range(self.layers[0], min(self.layers[1], n_layers))

    @property
    def branch(self) -> bool:
        """γ ≠ 1: the logits step, and its branch without the image."""
        return self.gamma != 1

    def first_row(self, prompt_len: int) -> int:
        """The first position the attention step edits: the prompt's last row, or (the released loop with its
        logits step) the first generated token's row."""
        return prompt_len if self.branch and self.first_token == "unedited" else prompt_len - 1

    def settings(self) -> dict:
        return {"alpha": float(self.alpha), "layers": list(self.layers), "gamma": float(self.gamma),
                "first_token": self.first_token}


def parse_layers(text) -> tuple[int, int]:
    """'2-32' → (2, 32): the released --start-layer / --end-layer (0-based, end exclusive); '5' → (5, 6)."""
    if isinstance(text, (tuple, list)):
        return tuple(int(x) for x in text)
    parts = str(text).strip().split("-")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise MinivarError(f"`PAIConfig.layers` '{text}' is not a range like 2-32 (start-end, end exclusive)")
    lo, hi = int(parts[0]), int(parts[-1]) + (len(parts) == 1)
    if lo >= hi:
        raise MinivarError(f"`PAIConfig.layers` '{text}': the start must be below the end (end exclusive)")
    return lo, hi


def amplify(scores: torch.Tensor, keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """attention.py's step: scores [B, H, R, S] with a ← |a|·α + a where keys [B, S] (the image keys). A masked key
    (at the fp32 minimum: a key a sink mask removed) stays masked — the released code never masks an image key,
    and for α ≥ 1 its step would turn the minimum into a huge positive score."""
    visible = scores > torch.finfo(scores.dtype).min
    return torch.where(keys[:, None, None, :] & visible, scores.abs() * alpha + scores, scores)


def guidance(full: torch.Tensor, plain: torch.Tensor, gamma: float) -> torch.Tensor:
    """CFG.py's step on the two branches' next-token logits [B, V] (full: with the image; plain: without), in its
    order: log-softmax of each, the cutoff from the full branch, γ·(s − u) + u, −∞ below the cutoff."""
    scores = F.log_softmax(full, dim=-1)
    if gamma == 1:
        return scores
    unconditional = F.log_softmax(plain, dim=-1)
    cutoff = torch.log(torch.tensor(CUTOFF_BETA)) + scores.max(dim=-1, keepdim=True).values
    out = gamma * (scores - unconditional) + unconditional
    return out.masked_fill(scores < cutoff, -float("inf"))


def without_image(row: list[int], model) -> list[int]:
    """A prompt's ids with its image removed: the image tokens and the family's markers around them
    (Qwen2-VL's <|vision_start|> / <|vision_end|>; the released code drops MiniGPT-4's <Img></Img> and Shikra's
    <im_start><im_end> the same way). The text around stays as it was tokenized."""
    cfg = model.config
    ids = torch.tensor([row], dtype=torch.long)
    drop = model.image_positions(ids)[0].clone()
    for name in ("vision_start_token_id", "vision_end_token_id"):
        marker = getattr(cfg, name, None)
        if marker is not None:
            drop |= ids[0] == marker
    return [t for t, d in zip(row, drop.tolist()) if not d]


class PAIState(Hook):
    """The attention step for one call: in its layers, the rows from position `first` on, the image keys of the
    full branch's rows (image [R, T]: False on the contrast rows) get a ← |a|·α + a. keep: record sample 0's image
    scores before and after, per layer (the pictures)."""

    def __init__(self, alpha: float, layers, image: torch.Tensor, first: int, max_len: int, keep: bool = False):
        self.alpha, self.layers, self.first = float(alpha), frozenset(layers), first
        # the image keys, padded once to the cache length (keys past the prompt are never image keys)
        self.keys = F.pad(image.bool(), (0, max(0, max_len - image.shape[1])))
        self.kept: dict[int, dict[str, list]] | None = {} if keep else None
        self.image_columns = torch.nonzero(image[0]).flatten() if keep else None

    def explicit_from(self, layer, rows):
        return self.first if layer in self.layers and rows.stop > self.first else None

    def scores(self, layer, scores, rows):
        if layer not in self.layers or rows.stop <= self.first:
            return scores
        R, K = scores.shape[0], scores.shape[-1]
        keys = self.keys[::self.keys.shape[0] // R]     # a shared prefix's call: row g for the g-th group
        if keys.shape[1] < K:
            keys = F.pad(keys, (0, K - keys.shape[1]))
        i = max(self.first - rows.start, 0)             # the rows before `first` stay as they are
        edited = amplify(scores[:, :, i:], keys[:, :K], self.alpha)
        if self.kept is not None:
            cols = self.image_columns
            kept = self.kept.setdefault(layer, {"before": [], "after": []})
            kept["before"].append(scores[0, :, i:, cols].mean(0).cpu())      # [rows, N]: mean over heads
            kept["after"].append(edited[0, :, :, cols].mean(0).cpu())
        return edited if i == 0 else torch.cat([scores[:, :, :i], edited], dim=2)

    def pictures(self) -> dict:
        """Sample 0's image-key scores before and after the step, per layer: the mean over heads and the edited
        rows (one per generated token it acted on), JSON-ready."""
        out = {}
        for layer, kept in sorted((self.kept or {}).items()):
            before, after = torch.cat(kept["before"]), torch.cat(kept["after"])
            out[str(layer)] = {"before": [round(x, 5) for x in before.mean(0).tolist()],
                               "after": [round(x, 5) for x in after.mean(0).tolist()], "rows": before.shape[0]}
        return out


class PAI(Method):
    """PAI on minivar's generation: the attention step as a hook, the logits step on a contrast branch without the
    image (γ ≠ 1), batched with the full prompts."""
    name = "pai"

    def __init__(self, config: PAIConfig | None = None):
        self.config = PAIConfig() if config is None else config

    @property
    def adds_branch(self) -> bool:
        return self.config.branch

    def settings(self) -> dict:
        return self.config.settings()

    def check(self, pipeline) -> None:
        self.config.validate(pipeline.config.text.num_hidden_layers)

    def branch(self, call) -> list[Branch] | None:
        if not self.config.branch:
            return None
        rows = call_rows(call)
        plain = [without_image(r, call.model) for r in rows]
        for b, (r, p) in enumerate(zip(rows, plain)):
            if len(p) == len(r):
                raise MinivarError(f"PAI: prompt {b} has no image to pay attention to")
        return [Branch(p, None) for p in plain]

    def start(self, call) -> "PAIRun":
        cfg = self.config.validate(call.pipeline.config.text.num_hidden_layers)
        image = call.image_mask.clone()
        image[call.samples:] = False                     # the contrast rows (no image) are never edited
        state = PAIState(cfg.alpha, cfg.layer_set(call.pipeline.config.text.num_hidden_layers), image,
                         cfg.first_row(call.input_ids.shape[1]), call.max_len, keep=call.capture)
        return PAIRun(cfg, state)


class PAIRun(MethodRun):
    def __init__(self, config: PAIConfig, state: PAIState):
        self.config, self.state = config, state
        self.hooks = [state]
        # a capture reads the call (the pictures, the explorer): each step's top candidates per branch
        self.steps: list | None = [] if state.kept is not None and config.branch else None

    def choose(self, logits: torch.Tensor, contrast: torch.Tensor | None) -> torch.Tensor:
        if self.config.branch and contrast is None:
            raise MinivarError("PAI needs its branch without the image (γ ≠ 1), and this call has none")
        out = guidance(logits, contrast, self.config.gamma)
        if self.steps is not None:
            self.steps.append({name: top_candidates(x) for name, x in
                               (("full", logits), ("no image", contrast), ("guided", out))})
        return out

    def explorer(self, b: int) -> list[dict] | None:
        """The explorer's records (explorer.py): per edited layer the image keys' mean score before and after the
        step (sample 0, the rows it edited), and with γ ≠ 1 the top candidates of both branches and of the
        guidance per step."""
        if self.state.kept is None or b != 0:
            return None
        rows = [[int(layer), v["rows"], round(sum(v["before"]) / len(v["before"]), 5),
                 round(sum(v["after"]) / len(v["after"]), 5)] for layer, v in self.state.pictures().items()
                if v["before"]]
        records = [{"kind": "table", "title": f"PAI: image keys' mean pre-softmax score before → after a + α·|a| "
                    f"(α {self.config.alpha:g}), per edited layer",
                    "columns": ["layer", "rows edited", "before", "after"], "rows": rows}]
        if self.steps:
            records.append({"kind": "candidates", "title": f"PAI: top-{CANDIDATES_K} next tokens with and without "
                            f"the image and of the guidance (γ {self.config.gamma:g}), per step",
                            "steps": [{"branches": {n: c[b] for n, c in step.items()}} for step in self.steps]})
        return records

    def report(self, b: int, generated_rows: int) -> dict:
        layers = sorted(self.state.layers)
        report = self.config.settings() | {"layers_edited": [layers[0], layers[-1] + 1] if layers else []}
        if self.state.kept is not None and b == 0:       # a capture ran (the pictures): the scores it showed
            report["scores"] = self.state.pictures()
        return report


# The command lines' options (argparse dests), for flags.py: --pai [--pai-alpha A] [--pai-layers S-E]
# [--pai-gamma G] [--pai-first-token unedited|edited].
OPTIONS = ("pai_alpha", "pai_layers", "pai_gamma", "pai_first_token")
_FIELDS = {"alpha": "pai_alpha", "layers": "pai_layers", "gamma": "pai_gamma", "first_token": "pai_first_token"}


def from_options(opts: dict, spell) -> PAI | None:
    """The PAI method the options ask for (None without `pai`), its ranges checked now (the layers against the
    model's depth: Method.check, after the load). spell(dest) → how the caller writes an option in errors."""
    given = {k: v for k, v in opts.items() if v is not None and v is not False}
    if not given.get("pai"):
        stray = [k for k in OPTIONS if k in given]
        if stray:
            raise MinivarError(f"{spell(stray[0])} only applies with {spell('pai')}")
        return None
    try:
        fields = {f: given[d] for f, d in _FIELDS.items() if d in given}
        if "layers" in fields:
            fields["layers"] = parse_layers(fields["layers"])
        return PAI(PAIConfig(**fields).validate())
    except MinivarError as e:
        message = str(e)
        for field, dest in _FIELDS.items():
            message = message.replace(f"`PAIConfig.{field}`", spell(dest))
        raise MinivarError(message) from None
