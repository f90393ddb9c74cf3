"""The one seam into a forward call: hooks that read or change the decoder's internals, passed per call.

A hook is an object handed to `model(..., hooks=...)` (or `generate(..., hooks=...)`) for one call; it is never
stored on the model. VAR's per-call state (var_state.VARState), the sink sets it reads (var_state.Sinks), the
recording capture (probe.Capture), key masking (probe.KeyMask) and PAI's attention step (pai.PAIState) are hooks.
Subclass `Hook` and override what you need; its defaults do nothing. For each layer of each forward call the decoder
asks, in this order:

    residual(layer, h, rows)                h [B, T, D]: the layer's residual input, before its input_layernorm
    key_mask(layer, mask, rows) -> mask     mask [B, 1, T, S] bool (True = may attend); only when masks_keys is True
    explicit_from(layer, rows) -> int|None  the first position of this call whose attention scores or
                                            probabilities the hook needs (None: none); rows before it may go
                                            through the fused kernel
    scores(layer, scores, rows) -> scores   fp32 pre-softmax scores [B, H, R, S] of positions `rows` (scaled q·k,
                                            masked keys already at the fp32 minimum), after the hooks listed
                                            before this one: what PAI edits (|a| is not recoverable from the
                                            probabilities)
    probs(layer, probs, rows, before)       fp32 probabilities [B, H, R, S] of positions `rows`, after the hooks
        -> probs                            listed before this one; `before` = the softmax output itself

`rows` is always a `range` of absolute positions (cache slots) — the rows of `h`, of the mask, or of `probs`. A call
that starts at position 0 with a row past the prompt does not exist; everything about prefill or decode follows from
those positions, so a prompt fed in several chunks behaves as one call. `scores` and `probs` see the same rows:
those from explicit_from on (every row of the call when a path writes them all out).
"""
from __future__ import annotations

import torch


class Hook:
    """The interface with do-nothing defaults."""

    # True when key_mask may remove key columns: the model then builds an explicit mask even for a call without
    # padding (otherwise the fused kernel keeps its faster causal mode).
    masks_keys = False

    def residual(self, layer: int, h: torch.Tensor, rows: range) -> None:
        pass

    def key_mask(self, layer: int, mask: torch.Tensor, rows: range) -> torch.Tensor:
        return mask

    def explicit_from(self, layer: int, rows: range) -> int | None:
        return None

    def scores(self, layer: int, scores: torch.Tensor, rows: range) -> torch.Tensor:
        return scores

    def probs(self, layer: int, probs: torch.Tensor, rows: range, before: torch.Tensor) -> torch.Tensor:
        return probs


class Hooks(Hook):
    """Several hooks as one, called in list order (VAR before a capture: the capture then sees VAR's output)."""

    def __init__(self, hooks):
        self.hooks = [h for h in hooks if h is not None]
        for h in self.hooks:
            if not isinstance(h, Hook):
                raise TypeError(f"hooks must subclass minivar.methods.hooks.Hook, got {type(h).__name__}")
        self.masks_keys = any(h.masks_keys for h in self.hooks)

    def residual(self, layer, h, rows):
        for hook in self.hooks:
            hook.residual(layer, h, rows)

    def key_mask(self, layer, mask, rows):
        for hook in self.hooks:
            if hook.masks_keys:
                mask = hook.key_mask(layer, mask, rows)
        return mask

    def explicit_from(self, layer, rows):
        firsts = [f for f in (h.explicit_from(layer, rows) for h in self.hooks) if f is not None]
        return min(firsts) if firsts else None

    def scores(self, layer, scores, rows):
        for hook in self.hooks:
            scores = hook.scores(layer, scores, rows)
        return scores

    def probs(self, layer, probs, rows, before):
        for hook in self.hooks:
            probs = hook.probs(layer, probs, rows, before)
        return probs


def as_hooks(hooks) -> Hooks | None:
    """None, one hook, or a list of hooks → one Hooks object (None when there is nothing to call)."""
    if hooks is None or isinstance(hooks, Hooks):
        return hooks
    hooks = Hooks(hooks if isinstance(hooks, (list, tuple)) else [hooks])
    return hooks if hooks.hooks else None
