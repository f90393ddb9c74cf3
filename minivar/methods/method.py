"""What a method is: one object that plugs into the generation loop (VAR, DAMRO, VCD, or your own).

A `Method` holds settings only. For each generate call minivar gives it a `Call` (the prompt rows, their images,
the model) and the method may

  1. `branch(call)`: add a second branch per sample (contrastive decoding: the same prompt with a changed image);
     the branches of all samples then run as one batch, one forward per step, weights read once. Many questions
     about one image (Pipeline.generate_many) call it once, on a call of one sample (the first question): a branch
     that changes only the shared prefix (the image) is then every question's, its prefix computed once; what
     `branch` records in `call.shared` is then that one sample's (DAMRO's start gives it to every question);
  2. `start(call)` → a `MethodRun`, the call's state: `hooks` that act inside every forward call (methods/hooks.py)
     and `choose(logits, contrast)` that changes the next-token logits before the token is picked;
  3. `run.report(b, generated_rows)`: what it did for sample b (the `--json` key `method.name`).

Beam search (num_beams K) gives the methods K rows per sample (K copies of its prompt, sample-major): hooks act in
every beam; the rows of one sample share the prompt, and after each step a row may continue another row's beam.

`settings()` are the method's answer-changing settings: run.json records them and a resume must match them.
Methods compose in list order: VAR's hooks act in every branch; a decoding-level method combines the logits.
At most one method of a call may add a branch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import MinivarError


@dataclass
class Branch:
    """One sample's second branch: its prompt ids, the feature rows [N, D] of its image tokens (in order), and the
    image they came from when it is one (VCD's noised image: a family whose positions depend on the image's grid,
    Qwen2-VL's M-RoPE, reads it)."""
    input_ids: list[int]
    image_features: torch.Tensor | None
    image: object = None                 # models.images.ImageInput or None


class MethodRun:
    """One call's state of a method; the defaults do nothing."""
    hooks: list = []

    def choose(self, logits: torch.Tensor, contrast: torch.Tensor | None) -> torch.Tensor:
        """The next-token logits [B, V] (fp32) from the full branch's `logits` [B, V] and the contrast branch's
        [B, V] (None when no method added one)."""
        return logits

    def report(self, b: int, generated_rows: int, rows: list[int] | None = None) -> dict | None:
        """Sample b's report (JSON-ready), counting the first `generated_rows` generated rows; None: nothing.
        Under beam search (and only then) b is the sample's first row and `rows` the row each of its answer's
        generated tokens ran in: beams move between rows, so per-row state is read along these."""
        return None

    def explorer(self, b: int) -> list[dict] | None:
        """Sample b's panels for the attention explorer (explorer.py, docs/explorer.md "Records"): dicts with a
        "kind" ("patches", "candidates", "table") and a "title"; None: none (its report is still shown)."""
        return None


class Method:
    """A method with its settings. Subclass it and override what you need."""
    name = "method"
    adds_branch = False      # True where `branch` adds one (the loader may then lay weights out for two-row steps)

    def settings(self) -> dict:
        """The answer-changing settings, JSON-ready."""
        return {}

    def check(self, pipeline) -> None:
        """Check the settings against the loaded model (sizes, layers, tower); raise MinivarError."""

    def branch(self, call: "Call") -> list[Branch] | None:
        """A contrast branch per sample of `call`, or None."""
        return None

    def start(self, call: "Call") -> MethodRun:
        return MethodRun()


@dataclass
class Call:
    """What the methods of one generate call see: the model, the prompt rows (left-padded; with a contrast branch,
    the full branch's B rows then the contrast branch's B rows), each row's image tokens, the cache length."""
    pipeline: object
    input_ids: torch.Tensor                        # [R, T]
    attention_mask: torch.Tensor | None            # [R, T] (0 on padding) or None
    images: list                                   # the samples' ImageInputs (one per sample)
    max_len: int                                   # the cache length
    samples: int                                   # B: rows R = B · branches
    warn: object = None                            # warn(message): notes for the user (the finder's)
    capture: bool = False                          # a capture will read the methods' state
    shared: dict = field(default_factory=dict)     # state the methods and inspection share (the sink sets)
    features: list | None = None                   # the samples' projected image features, computed once

    @property
    def model(self):
        return self.pipeline.model

    @property
    def image_mask(self) -> torch.Tensor:
        """[R, T] bool: each row's image tokens (the family decides which ids they are)."""
        return self.model.image_positions(self.input_ids)

    def image_features(self) -> list[torch.Tensor]:
        """The samples' projected image features, one [N, D] per sample, computed once per call."""
        if self.features is None:
            self.features = self.model.image_features(self.images)
        return self.features


def as_methods(methods) -> list[Method]:
    """None, one Method or a list → a list of Method (a clear error for anything else)."""
    if methods is None:
        return []
    methods = list(methods) if isinstance(methods, (list, tuple)) else [methods]
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"`methods` must be minivar.methods.method.Method objects, got {type(m).__name__}")
    names = [m.name for m in methods]
    for n in names:
        if names.count(n) > 1:
            raise MinivarError(f"method '{n}' is given twice")
    return methods
