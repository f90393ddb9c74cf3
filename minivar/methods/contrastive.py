"""Contrastive decoding: the rule DAMRO and VCD share, and a plain two-branch generation loop.

Both methods run each sample twice: the *full* branch (the prompt with the image) and a *contrast* branch (DAMRO:
the image replaced by its k ViT outlier tokens; VCD: the image noised). At every step the two next-token logits are
combined (`combine`), and the token is chosen from the result. The rule, as both released codes write it
(coder-gx/DAMRO `sample_method/sample.py`, DAMO-NLP-SG/VCD `vcd_utils/vcd_sample.py`), on the *raw* logits (not
log-probabilities; no temperature or other processor before it):

    cutoff = log β + max_v l_full[v]                 (the adaptive plausibility constraint)
    l      = (1 + α) · l_full − α · l_contrast
    l[v]   = −∞  where l_full[v] < cutoff            (tokens the full branch finds implausible)

then `softmax(l)` + multinomial (both released codes sample), or argmax here by default. `l_full < log β + max l_full`
is `p_full < β · max p_full` — the same set whether it is computed on logits or probabilities. α = 0 gives back the
full branch's logits wherever the token survives the cutoff, and its argmax always survives, so greedy α = 0 equals
the base model.

`ContrastiveRun` is the token choice both methods plug into minivar's generation (methods/method.py): the contrast
branch's rows run in the same batched forward as the full branch's, and `choose` combines the two.
`contrastive_generate` is the loop the released codes run — two forwards per step, two KV caches — written on
minivar's model: the reference the batched generation is checked against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MinivarError
from ..generate import decode_step, new_cache, prefill, sample_next
from ..processing import left_pad  # noqa: F401  (the one padding rule; damro and the tests read it here too)
from .method import MethodRun


def check_alpha_beta(alpha: float, beta: float, owner: str) -> None:
    """α ≥ 0 (α < 0 would *favour* what the contrast branch predicts), β in (0, 1] (log β ≤ 0; β = 1 keeps only the
    full branch's top token). `owner` names the config in the message ("DAMROConfig", "VCDConfig")."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise MinivarError(f"`{owner}.alpha` must be a finite number ≥ 0, got {alpha}")
    if not (isinstance(beta, (int, float)) and 0.0 < beta <= 1.0):
        raise MinivarError(f"`{owner}.beta` must be in (0, 1], got {beta}")


def combine(full: torch.Tensor, contrast: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The contrastive logits [..., V] from the two branches' next-token logits [..., V] (same shape), in the
    order the released code computes them: cutoff from the full logits, the difference, then the mask."""
    # torch.log(torch.tensor(beta)) as released: a float32 scalar (a 0-dim tensor keeps the logits' dtype)
    cutoff = torch.log(torch.tensor(beta, dtype=torch.float32)) + full.max(dim=-1, keepdim=True).values
    diffs = (1 + alpha) * full - alpha * contrast
    return diffs.masked_fill(full < cutoff, -float("inf"))


class ContrastiveRun(MethodRun):
    """One call of a contrastive method: the combination rule as its token choice (needs the contrast branch)."""

    def __init__(self, alpha: float, beta: float, name: str, keep_candidates: bool = False):
        """keep_candidates: record each step's top-k of both branches and of the combination (the explorer's panel;
        set when a capture reads the call)."""
        self.alpha, self.beta, self.name = alpha, beta, name
        self.hooks = []
        self.steps: list[dict] | None = [] if keep_candidates else None

    def choose(self, logits: torch.Tensor, contrast: torch.Tensor | None) -> torch.Tensor:
        if contrast is None:
            raise MinivarError(f"{self.name} needs its contrast branch, and this call has none")
        out = combine(logits, contrast, self.alpha, self.beta)
        if self.steps is not None:
            self.steps.append({name: top_candidates(x) for name, x in
                               (("full", logits), ("contrast", contrast), ("combined", out))})
        return out

    def explorer(self, b: int) -> list[dict] | None:
        """The explorer's record (explorer.py, kind "candidates"): sample b's top-k per step and branch."""
        if self.steps is None:
            return None
        return [{"kind": "candidates", "title": f"{self.name}: top-{CANDIDATES_K} next tokens of each branch and of "
                 f"the combination (α {self.alpha:g}, β {self.beta:g}), per step",
                 "steps": [{"branches": {name: cands[b] for name, cands in step.items()}} for step in self.steps]}]


CANDIDATES_K = 5


def top_candidates(logits: torch.Tensor, k: int = CANDIDATES_K) -> list[list[dict]]:
    """Per row of logits [B, V]: its k largest finite logits as [{"id", "logit", "prob"}] (prob: softmax of the
    row — for the combination, the distribution the token is drawn from)."""
    probs = torch.softmax(logits.float(), -1)
    values, ids = logits.float().topk(min(k, logits.shape[-1]), -1)
    return [[{"id": int(i), "logit": float(v), "prob": float(p)} for i, v, p in zip(ir, vr, pr[ir]) if math.isfinite(v)]
            for ir, vr, pr in zip(ids.tolist(), values.tolist(), probs)]


@dataclass
class PromptBranch:
    """One branch of a batch of samples: its prompt ids [B, T] (left-padded where attention_mask [B, T] is 0), and
    its images (pixels [B, 3, S, S] or a list of ImageInput) or their projected features (a list of [N_b, D], one
    per image, N_b = that row's image tokens; or the rows [ΣN, D] in token order)."""
    input_ids: torch.Tensor
    images: object = None
    image_features: object = None
    attention_mask: torch.Tensor | None = None
    hooks: object = None                           # per-call hooks of this branch (VAR's state is per branch)


@torch.inference_mode()
def contrastive_generate(model, full: PromptBranch, contrast: PromptBranch, *, alpha: float, beta: float,
                         max_new_tokens: int = 128, eos_token_id: int | None = 2, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int | None = None) -> list[list[int]]:
    """Generate with the contrastive rule, the released codes' way: each branch its own KV cache and its own
    forward per step, both fed the token chosen from `combine`. Returns the new ids per sample (EOS excluded).

    temperature 0 = argmax of the combined logits; otherwise minivar's sampler (generate.sample_next) on them:
    temperature 1, top_p 1 is the released setting (softmax + multinomial, nothing else)."""
    B = full.input_ids.shape[0]
    if contrast.input_ids.shape[0] != B:
        raise MinivarError(f"the contrast branch has {contrast.input_ids.shape[0]} rows for {B} samples")
    device = full.input_ids.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    branches = []
    for br in (full, contrast):
        T = br.input_ids.shape[1]
        cache = new_cache(model, B, T + max_new_tokens, device)
        mask = None
        if br.attention_mask is not None and not bool(br.attention_mask.all()):
            mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
            mask[:, :T] = br.attention_mask.bool()
        branches.append((br, cache, mask, T))

    def forward(i, ids, pos):
        br, cache, mask, _ = branches[i]
        attention_mask = None if mask is None else mask[:, :pos + ids.shape[1]]
        if pos == 0:
            feats = br.image_features
            feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
            return prefill(model, ids, br.images, image_features=feats, cache=cache, attention_mask=attention_mask,
                           hooks=br.hooks)
        return decode_step(model, ids[:, 0], cache=cache, position=pos, attention_mask=attention_mask,
                           hooks=br.hooks)

    outputs: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    if max_new_tokens <= 0:
        return outputs
    l_full, l_cd = forward(0, full.input_ids, 0), forward(1, contrast.input_ids, 0)
    for step in range(max_new_tokens):
        next_ids = sample_next(combine(l_full, l_cd, alpha, beta), temperature, top_p, generator)   # [B]
        for b, t in enumerate(next_ids.tolist()):
            if finished[b] or t == eos_token_id:
                finished[b] = True
            else:
                outputs[b].append(t)
        if all(finished) or step + 1 >= max_new_tokens:
            break
        ids = next_ids[:, None]
        l_full = forward(0, ids, branches[0][3] + step)
        l_cd = forward(1, ids, branches[1][3] + step)
    return outputs


def call_rows(call) -> list[list[int]]:
    """The full branch's prompts of a method call (methods/method.py's Call), without their padding."""
    ids, mask = call.input_ids[:call.samples], call.attention_mask
    if mask is None:
        return ids.tolist()
    return [row[m].tolist() for row, m in zip(ids, mask[:call.samples].bool())]
