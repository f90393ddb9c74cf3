"""Beam search's bookkeeping, as transformers' `generate(num_beams=K)` does it (its defaults: length_penalty 1.0,
early_stopping False, no sampling): per sample K running beams and K finished hypotheses, all tensors [B, K, ...].

Each step (BeamSearch.step) takes the K beams' next-token logits and
  1. adds each beam's log-softmax to its running score and keeps the top (1 + #EOS ids, at least 2)·K of the K·V
     continuations of the sample (spares, so K beams survive even if the best ones end);
  2. a continuation ends when its token is an EOS id or it reaches max_new_tokens; the K best that do not end run on
     (the cache rows and the hooks' rows follow them: `parents`);
  3. an ended continuation among the top K is a hypothesis, scored (running score) / (generated length, its EOS
     included)^length_penalty; the K best hypotheses so far are kept;
  4. a sample stops taking hypotheses once all K slots hold one and its best running beam's score over its length
     so far cannot beat the worst of them ("early stop heuristic"); the search ends when no sample can improve or
     every continuation ended.
The answer is the best hypothesis (its EOS dropped) and its score (transformers' sequences_scores).

The arithmetic follows transformers 5.23's `_beam_search` operation for operation (the same −1e9 masks, the same
topk calls), so that ties break the same way.
"""
from __future__ import annotations

import torch

NEG = -1.0e9            # transformers' "never pick this" score


class BeamSearch:
    def __init__(self, batch: int, num_beams: int, max_new_tokens: int, stop_ids, device,
                 length_penalty: float = 1.0, early_stopping: bool = False):
        B, K, N = batch, num_beams, max(max_new_tokens, 1)
        self.B, self.K, self.N = B, K, N
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.keep = max(2, 1 + len(stop_ids)) * K          # continuations kept per step
        self.top = torch.zeros(self.keep, dtype=torch.bool, device=device)
        self.top[:K] = True                                  # only the top K may become hypotheses
        self.tokens = torch.full((B, K, N), -1, dtype=torch.long, device=device)     # running beams' tokens
        self.parents = torch.full((B, K, N), -1, dtype=torch.long, device=device)    # row that chose each token
        self.scores = torch.zeros(B, K, device=device)
        self.scores[:, 1:] = NEG            # the K rows start equal: only the first one's continuations count
        self.done_tokens = self.tokens.clone()               # finished hypotheses
        self.done_parents = self.parents.clone()
        self.done_scores = torch.full((B, K), NEG, device=device)
        self.done = torch.zeros(B, K, dtype=torch.bool, device=device)
        self.open = torch.ones(B, 1, dtype=torch.bool, device=device)   # the early-stop heuristic unsatisfied
        self.offset = torch.arange(B, device=device)[:, None] * K
        self.length = 0                                      # tokens generated so far

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """logits [B·K, V] of the running beams → (next tokens [B·K], the row each new beam continues [B·K],
        whether the search goes on)."""
        B, K, cur = self.B, self.K, self.length
        V = logits.shape[-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1).view(B, K, V) + self.scores[:, :, None]
        top_scores, top_index = torch.topk(log_probs.reshape(B, K * V), k=self.keep)
        beam = top_index // V
        token = top_index % V
        top_tokens = take(self.tokens, beam)
        top_tokens[:, :, cur] = token
        top_parents = take(self.parents, beam)
        top_parents[:, :, cur] = beam + self.offset
        ends = torch.isin(token, self.stop) | (cur + 1 >= self.N)                  # [B, keep]

        # the K best continuations that do not end run on
        running = top_scores + ends.to(torch.float32) * NEG
        pick = torch.topk(running, k=K)[1]
        self.tokens, self.scores, self.parents = take(top_tokens, pick), take(running, pick), take(top_parents, pick)

        # ended continuations among the top K become hypotheses if they beat the kept ones
        just_done = ends & self.top[None, :]
        scored = top_scores / ((cur + 1) ** self.length_penalty)
        scored += (self.done.all(-1, keepdim=True) & (self.early_stopping is True)).to(torch.float32) * NEG
        scored += (~self.open).to(torch.float32) * NEG
        scored += (~just_done) * NEG
        merged_scores = torch.cat((self.done_scores, scored), 1)
        best = torch.topk(merged_scores, k=K)[1]
        self.done_tokens = take(torch.cat((self.done_tokens, top_tokens), 1), best)
        self.done_parents = take(torch.cat((self.done_parents, top_parents), 1), best)
        self.done_scores = take(merged_scores, best)
        self.done = take(torch.cat((self.done, just_done), 1), best)

        self.length = cur = cur + 1
        best_running = self.scores[:, :1] / (cur ** self.length_penalty)
        worst_done = torch.where(self.done, self.done_scores.min(-1, keepdim=True)[0], NEG)
        self.open = self.open & (best_running > worst_done).any(-1, keepdim=True)
        more = bool(self.open.any()) and not (bool(self.done.all()) and self.early_stopping is True) \
            and not bool(ends.all())
        return self.tokens[:, :, cur - 1].reshape(-1), self.parents[:, :, cur - 1].reshape(-1), more

    def best(self) -> list[dict]:
        """Per sample, its best hypothesis: tokens (EOS dropped), whether it ended at an EOS, its score, and the
        row each of its tokens was fed in (the rows the hooks' per-row state is read along)."""
        out = []
        for b in range(self.B):
            parents = self.done_parents[b, 0]
            n = int((parents >= 0).sum())
            tokens = self.done_tokens[b, 0, :n].tolist()
            eos = n > 0 and tokens[-1] in set(self.stop.tolist())
            # token i is chosen from row parents[i], the row that fed token i − 1: token i is fed in parents[i + 1]
            rows = parents[1:n].tolist()
            out.append({"tokens": tokens[:-1] if eos else tokens, "finished": eos,
                        "score": float(self.done_scores[b, 0]), "rows": rows})
        return out


def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, K', ...] gathered along dim 1 by index [B, K] (transformers' _gather_beams)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)
