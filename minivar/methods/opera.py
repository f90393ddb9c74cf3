"""OPERA (Huang et al., CVPR 2024: "OPERA: Alleviating Hallucination in Multi-Modal Large Language Models via
Over-Trust Penalty and Retrospection-Allocation"), as its released code computes it: the `opera_beam_search` of
github.com/shikiw/OPERA, `transformers-4.29.2/src/transformers/generation/utils.py`, with that transformers'
BeamSearchScorer (`generation/beam_search.py`). docs/opera.md states every step and quirk.

Each step of a beam search of K beams (one sample at a time, as the released evaluation ran):

  1. the K beams' next-token logits; each beam keeps its C = candidates highest logits (its candidates);
  2. each candidate is fed (one forward per candidate, as released) and the LAST layer's attention row of it is
     read (through a hook), its max over heads; with the max-over-heads rows of the generated tokens so far this
     is the "attention square" of the response: rows and columns from the first generated position on, each row
     divided by its sum over all keys, times `scale` (50);
  3. per column j the product of its entries from row j down, times 1e−7, stored in float16: the over-trust score
     of j; per candidate the max over j (rollback score) and its argmax (rollback location);
  4. penalty: while the response (with the candidate) is ≤ 10 tokens, −(the candidate row's attention to the image
     tokens), afterwards the rollback score; candidate logit −= penalty_weight · penalty;
  5. retrospection: the location most candidates of most beams agree on (mode of modes) — when, for every beam,
     it was that beam's location more than `threshold` times so far (the per-beam history is not reordered with
     the beams), and it is ≥ 10: roll back to the state just after it (at most `candidates` times per position,
     else one position earlier, else no rollback), re-run, and exclude the tokens chosen there before;
  6. the beam scores: log-softmax of each beam's row in which every non-candidate logit is −999 (so over that
     beam's candidates only) — or, right after a rollback, of the raw logits with the excluded tokens at the row's
     minimum; then transformers 4.29's beam bookkeeping, whose hypotheses are scored sum / (whole sequence
     length)^1, the prompt counted with its image as one token (the released LLaVA prompt holds one image id).

OPERA reads the attention of the last layer only, through `LastLayer` (hooks.py: explicit_from / probs); the
other layers keep the fused kernel.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from ..errors import MinivarError
from .hooks import Hook
from .method import Method, MethodRun

RULES = ("released", "fixed")


@dataclass(frozen=True)
class OPERAConfig:
    """OPERA's settings; the defaults are the released chair_eval.py's (scale_factor 50, threshold 15,
    num_attn_candidates 5, penalty_weights 1, beam 5) and opera_beam_search's window_size 512 (the history kept).
    rule: "released" (default) or "fixed" — the released loop, except that a rollback forgets the excluded tokens
    of the positions it discards (the released code clears list entries counted from the end of its 512-entry
    list instead: docs/opera.md)."""
    scale: float = 50.0
    threshold: int = 15
    candidates: int = 5
    penalty: float = 1.0
    num_beams: int = 5
    window: int = 512
    rule: str = "released"

    def validate(self) -> "OPERAConfig":
        for name in ("threshold", "candidates", "num_beams", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise MinivarError(f"`OPERAConfig.{name}` must be an integer, got {v!r}")
        if self.candidates < 1:
            raise MinivarError(f"`OPERAConfig.candidates` must be ≥ 1, got {self.candidates}")
        if self.num_beams < 2:
            raise MinivarError(f"`OPERAConfig.num_beams` must be ≥ 2 (the released OPERA is a beam search; it has "
                               f"no greedy mode), got {self.num_beams}")
        if self.window < 2:
            raise MinivarError(f"`OPERAConfig.window` must be ≥ 2, got {self.window}")
        if not self.scale > 0:
            raise MinivarError(f"`OPERAConfig.scale` must be > 0, got {self.scale}")
        if not self.penalty >= 0:
            raise MinivarError(f"`OPERAConfig.penalty` must be ≥ 0, got {self.penalty}")
        if self.rule not in RULES:
            raise MinivarError(f"`OPERAConfig.rule` must be one of {', '.join(RULES)}, got {self.rule!r}")
        return self


class LastLayer(Hook):
    """The max over heads of the last layer's attention probabilities of a call's rows (after the hooks before
    this one, VAR's redistribution included), for the calls past the prompt: [R, T_call, S]."""

    def __init__(self, n_layers: int, prompt_len: int):
        self.layer, self.prompt_len = n_layers - 1, prompt_len
        self.rows = None

    def explicit_from(self, layer, rows):
        return rows.start if layer == self.layer and rows.start >= self.prompt_len else None

    def probs(self, layer, probs, rows, before):
        if layer == self.layer and rows.start >= self.prompt_len:
            self.rows = probs.amax(1)
        return probs


class OPERA(Method):
    name = "opera"

    def __init__(self, config: OPERAConfig | None = None, **settings):
        if config is not None and settings:
            raise MinivarError("give OPERA a config or settings, not both")
        self.config = (config or OPERAConfig(**settings)).validate()

    @property
    def num_beams(self) -> int:
        return self.config.num_beams

    def settings(self) -> dict:
        return asdict(self.config)

    def check(self, pipeline) -> None:
        self.config.validate()

    def start(self, call) -> "OPERARun":
        return OPERARun(self.config, LastLayer(call.model.config.text.num_hidden_layers, call.input_ids.shape[1]))


class OPERARun(MethodRun):
    """One call of OPERA: its hook, the search (generate.py's loop is replaced: `search`) and each sample's
    report."""

    def __init__(self, config: OPERAConfig, hook: LastLayer):
        self.config, self.hook = config, hook
        self.hooks = [hook]
        self.reports: list[dict] = []

    def search(self, model, input_ids, *, images=None, image_features=None, max_new_tokens: int, stop_ids,
               hooks=None):
        """OPERA on one sample whose prompt is the K rows of `input_ids` [K, T] (K = num_beams): a Generation."""
        from ..generate import Generation
        gen, report = opera_search(model, input_ids, self.config, self.hook, images=images,
                                   image_features=image_features, max_new_tokens=max_new_tokens,
                                   stop_ids=stop_ids, hooks=hooks)
        self.reports.append(report)
        return gen

    def report(self, b, generated_rows, rows=None):
        return self.reports[b // self.config.num_beams if rows is not None else b]


# ---------------------------------------------------------------------------------------------------------------
# transformers 4.29's beam bookkeeping (BeamSearchScorer / BeamHypotheses), for one sample

class Hypotheses429:
    """The finished hypotheses of one sample, as 4.29 keeps them: score = sum of log-probs / length^1, length the
    whole sequence (prompt + generated, EOS not included)."""

    def __init__(self, num_beams: int, prompt_len: int, stop_ids: set[int]):
        self.K, self.prompt_len, self.stop = num_beams, prompt_len, stop_ids
        self.beams: list[tuple[float, list[int], bool]] = []     # (score, generated tokens, ended at EOS)
        self.worst = 1e9
        self.done = False

    def add(self, tokens: list[int], sum_logprobs: float, eos: bool) -> None:
        score = sum_logprobs / ((self.prompt_len + len(tokens)) ** 1.0)
        if len(self.beams) < self.K or score > self.worst:
            self.beams.append((score, tokens, eos))
            if len(self.beams) > self.K:
                ranked = sorted([(s, i) for i, (s, _, _) in enumerate(self.beams)])
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.K:
            return False
        return self.worst >= best_sum_logprobs / cur_len ** 1.0          # early_stopping False

    def process(self, seqs: list[list[int]], scores: torch.Tensor, tokens: torch.Tensor, beams: torch.Tensor):
        """The 2K best continuations (scores, tokens, beams [2K], descending) → (next beam scores, tokens, the beam
        each continues [K])."""
        K = self.K
        cur_len = self.prompt_len + len(seqs[0]) + 1
        next_scores = torch.zeros(K, dtype=scores.dtype)
        next_tokens = torch.zeros(K, dtype=torch.long)
        next_beams = torch.zeros(K, dtype=torch.long)
        k = 0
        for rank, (token, score, beam) in enumerate(zip(tokens.tolist(), scores.tolist(), beams.tolist())):
            if token in self.stop:
                if rank >= K:
                    continue
                self.add(list(seqs[beam]), score, True)
            else:
                next_scores[k], next_tokens[k], next_beams[k] = score, token, beam
                k += 1
            if k == K:
                break
        self.done = self.done or self.is_done(float(scores.max()), cur_len)
        return next_scores, next_tokens, next_beams

    def finalize(self, seqs: list[list[int]], scores: torch.Tensor) -> tuple[float, list[int], bool]:
        if not self.done:
            for k in range(self.K):
                self.add(list(seqs[k]), float(scores[k]), False)
        return sorted(self.beams, key=lambda x: x[0]).pop()


# ---------------------------------------------------------------------------------------------------------------
# The loop

def over_trust(prev: torch.Tensor, prev_sum: torch.Tensor, cand: torch.Tensor, scale: float) -> torch.Tensor:
    """The over-trust scores [K, C, W] (float16) of the response's W columns for each beam's C candidates.
    prev [K, W−1, W−1]: the generated rows' max-over-heads attention to the generated columns; prev_sum [K, W−1]:
    those rows' sums over all keys; cand [K, C, S]: each candidate's row over all S = T + W keys."""
    K, C, S = cand.shape
    W = prev.shape[-1] + 1
    T = S - W
    top = torch.cat([prev / prev_sum[..., None], prev.new_zeros(K, W - 1, 1)], -1)                # [K, W−1, W]
    last = cand[..., T:] / cand.sum(-1, keepdim=True)                                               # [K, C, W]
    square = torch.cat([top[:, None].expand(K, C, W - 1, W), last[:, :, None]], 2) * scale        # [K, C, W, W]
    below = torch.ones(W, W, dtype=torch.bool, device=square.device).tril()                        # i ≥ j
    prod = torch.where(below, square, square.new_ones(())).prod(2)                                 # [K, C, W]
    return (1e-7 * prod).to(torch.float16)


@torch.inference_mode()
def opera_search(model, input_ids: torch.Tensor, cfg: OPERAConfig, hook: LastLayer, *, images=None,
                 image_features=None, max_new_tokens: int, stop_ids, hooks=None):
    """OPERA's beam search over the K identical prompt rows of one sample: (a Generation, OPERA's report)."""
    from ..generate import Generation, decode_step, new_cache, prefill, stop_set
    from ..models.llama import KVCache
    K, T = input_ids.shape
    C, V = cfg.candidates, None
    device = input_ids.device
    stop = stop_set(stop_ids)
    image = model.image_positions(input_ids[:1])[0].nonzero().flatten().tolist()
    img_start, img_end = (image[0], image[-1]) if image else (T, T - 1)      # the image span (end inclusive)
    ids_len = T - len(image) + (1 if image else 0)      # the released LLaVA prompt: its image is one id
    # C scratch positions after the last one: the candidates of a step are fed together, candidate c in slot p + c
    cache = new_cache(model, K, T + max_new_tokens + C, device, values_transposed=False)
    if not isinstance(cache, KVCache):
        raise MinivarError("OPERA needs an addressable KV cache")

    def forward(tokens, position):       # one token per row at `position`: logits [K, V], last-layer rows [K, S]
        hook.rows = None
        logits = decode_step(model, tokens, cache=cache, position=position, hooks=hooks)
        return logits, hook.rows[:, -1].float()

    scratch = ScratchSlots(C)

    def candidates(tokens, p):           # the C candidates of every row at position p, in one call (ScratchSlots)
        scratch.position = p
        hook.rows = None
        at = torch.full((K, C), p, dtype=torch.long, device=device)
        deltas = getattr(cache, "rope_deltas", None)         # M-RoPE: text continues at index + delta
        if deltas is not None:
            at = at + deltas[:, None].to(device)
        logits = model(tokens, cache=cache, input_pos=p, positions=at, hooks=list(as_list(hooks)) + [scratch],
                       output="logits")                                                     # [K, C, V]
        rows = hook.rows.float()                                                            # [K, C, p + C]
        own = rows[..., p:].diagonal(dim1=1, dim2=2)[..., None]                             # [K, C, 1]
        return logits, torch.cat([rows[..., :p], own], -1)                                  # [K, C, p + 1]

    def rerun(seqs):                     # the generated tokens of `seqs` at positions T … (a rollback): logits
        if not seqs[0]:
            return prompt_logits
        ids = torch.tensor(seqs, dtype=torch.long, device=device)
        return model(ids, cache=cache, input_pos=T, hooks=hooks, output="last")

    t_start = _now(device)
    logits = prompt_logits = prefill(model, input_ids, images, image_features=image_features, cache=cache, hooks=hooks)
    V = logits.shape[-1]
    scorer = Hypotheses429(K, ids_len, stop)
    seqs: list[list[int]] = [[] for _ in range(K)]
    beam_scores = torch.zeros(K, device=device)
    beam_scores[1:] = -1e9
    prev = torch.zeros(K, 0, 0, device=device)     # attn_previous, generated rows × generated columns
    prev_sum = torch.zeros(K, 0, device=device)    # and each of those rows' sum over all keys
    history: list[dict] = []
    history_locs: list[torch.Tensor] = []
    beam_next_tokens = beam_idx = None
    max_rollback_time = torch.zeros(cfg.window)
    rejected: list = [[] for _ in range(cfg.window)]
    report = {"rollbacks": 0, "penalised_steps": 0, "steps": []}
    t_prefill = None
    pending = None
    cur_len = ids_len
    while True:
        state = {"seqs": [list(s) for s in seqs], "scorer": copy.deepcopy(scorer), "cur_len": cur_len}
        s = len(seqs[0])                    # tokens generated so far
        if s > 0:                           # the main forward: the tokens chosen last step, at T + s − 1
            if pending is not None:         # they were candidates: their forward ran already (same numbers)
                logits, row = pending
            else:
                logits, row = forward(beam_next_tokens, T + s - 1)
            pad = torch.cat([prev, prev.new_zeros(K, prev.shape[1], 1)], -1)[beam_idx]
            prev = torch.cat([pad, row[:, None, T:T + s]], 1)
            prev_sum = torch.cat([prev_sum[beam_idx], row.sum(-1, keepdim=True)], 1)
        if t_prefill is None:
            t_prefill = _now(device) - t_start
            t_decode = _now(device)
        state["prev"], state["prev_sum"] = prev.clone(), prev_sum.clone()
        cand_scores, cand_tokens = torch.topk(logits.float(), C, dim=-1, largest=True, sorted=True)   # [K, C]
        state["cand_tokens"] = cand_tokens.clone()
        state["beam_scores"] = beam_scores.clone()
        state["beam_next_tokens"] = beam_next_tokens.clone() if beam_next_tokens is not None else None
        state["beam_idx"] = beam_idx.clone() if beam_idx is not None else None
        # each candidate's last-layer row at T + s: the released code runs one forward per candidate
        cand_logits, cand = candidates(cand_tokens, T + s)                              # [K, C, T + s + 1]
        pending = None
        scores16 = over_trust(prev, prev_sum, cand, cfg.scale)                          # [K, C, W]
        W = s + 1                                                                       # cur_response_lens
        attn_i = (cand / cand.sum(-1, keepdim=True))[..., img_start:img_end + 1].sum(-1)            # [K, C]
        rollback_scores, rollback_locs = scores16.max(-1)
        rollback_loc = rollback_locs.mode().values.mode().values
        penalty = -attn_i if W <= 10 else rollback_scores
        history_locs.append(rollback_locs.mode().values)
        gathers = torch.stack(history_locs, -1)                                         # [K, steps]
        cand_scores -= cfg.penalty * penalty
        state["cand_scores"] = cand_scores.clone()
        if len(history) >= cfg.window:
            history.pop(0)
        history.append(state)
        step = {"response_length": W, "candidates": cand_tokens.tolist(),
                "penalty": (cfg.penalty * penalty).float().tolist(), "rollback_to": None}

        pos = rollback_target(gathers, int(rollback_loc), cfg, max_rollback_time, W)
        if pos is not None:
            for j in range(W - pos - 2):            # the states after the rollback position are discarded
                history.pop(-1)
                history_locs.pop(-1)
                if cfg.rule == "released":
                    rejected[-(j + 1)] = []
                else:
                    rejected[pos + 2 + j] = []
            back, after = history[-2], history[-1]
            seqs = [list(q) for q in back["seqs"]]
            scorer = back["scorer"]
            cur_len = back["cur_len"]
            prev, prev_sum = back["prev"], back["prev_sum"]
            beam_scores = back["beam_scores"]
            beam_next_tokens, beam_idx = after["beam_next_tokens"], after["beam_idx"]
            logits = rerun(seqs)
            history.pop(-1)
            history_locs.pop(-1)
            rejected[pos + 1] = []
            next_logits = logits.float() - (999. + logits.float().min(-1, keepdim=True).values)
            next_logits = next_logits.view(1, K * V)
            reject = beam_idx.view(1, K) * V + beam_next_tokens.view(1, K)
            if len(rejected[pos]) > 0:
                reject = torch.cat([rejected[pos], reject], -1)
            rejected[pos] = reject
            next_logits = next_logits.scatter_(-1, reject, -999.).view(K, V)
            report["rollbacks"] += 1
            step["rollback_to"] = pos
            step["penalty"] = None
        else:
            next_logits = torch.full((K, V), -999., device=device).scatter_(-1, cand_tokens, cand_scores)
            if cfg.penalty != 0:
                report["penalised_steps"] += 1
        report["steps"].append(step)

        scores = torch.log_softmax(next_logits, dim=-1) + beam_scores[:, None]
        top_scores, top = torch.topk(scores.view(1, K * V), 2 * K, dim=1, largest=True, sorted=True)
        next_beams = torch.div(top, V, rounding_mode="floor")[0]
        next_tokens = (top % V)[0]
        beam_scores, beam_next_tokens, beam_idx = (t.to(device) for t in scorer.process(
            seqs, top_scores[0].cpu(), next_tokens.cpu(), next_beams.cpu()))
        seqs = [seqs[i] + [t] for i, t in zip(beam_idx.tolist(), beam_next_tokens.tolist())]
        s = len(seqs[0])
        if s > 1:                                  # the cache rows follow the beams (generated positions only)
            cache.k[:, :, :, T:T + s - 1] = cache.k[:, beam_idx, :, T:T + s - 1]
            cache.v[:, :, :, T:T + s - 1] = cache.v[:, beam_idx, :, T:T + s - 1]
        if pos is None:
            # a chosen token that was its beam's candidate has its keys, values, logits and attention row already:
            # its slot is copied to position T + s − 1 and the next step's forward is skipped
            match = cand_tokens[beam_idx] == beam_next_tokens[:, None]                  # [K, C]
            if bool(match.any(-1).all()):
                c = match.int().argmax(-1)
                p = T + s - 1
                k_new, v_new = cache.k[:, beam_idx, :, p + c], cache.v[:, beam_idx, :, p + c]   # [K, L, H, hd]
                cache.k[:, :, :, p], cache.v[:, :, :, p] = k_new.transpose(0, 1), v_new.transpose(0, 1)
                pending = cand_logits[beam_idx, c], cand[beam_idx, c]
        cur_len += 1
        if scorer.done or s >= max_new_tokens:
            break
    score, tokens, eos = scorer.finalize(seqs, beam_scores)
    gen = Generation([tokens], prefill_s=t_prefill, decode_s=_now(device) - t_decode,
                     decode_tokens=len(report["steps"]) - 1, finished=[eos], scores=[score], rows=[[]])
    return gen, report


class ScratchSlots(Hook):
    """The C candidates of a step fed in one call at cache slots p … p+C−1, all at RoPE position p: candidate c may
    attend to positions 0 … p−1 and to its own slot only — the keys a forward of it alone at p would see."""
    masks_keys = True

    def __init__(self, C: int):
        self.C, self.position = C, 0

    def key_mask(self, layer, mask, rows):
        p, C = self.position, self.C
        mask = mask.clone()
        mask[..., p:p + C] = torch.eye(C, dtype=torch.bool, device=mask.device)
        return mask


def as_list(hooks):
    return [] if hooks is None else list(hooks) if isinstance(hooks, (list, tuple)) else [hooks]


def rollback_target(gathers: torch.Tensor, loc: int, cfg: OPERAConfig, max_rollback_time: torch.Tensor,
                    W: int) -> int | None:
    """The released rule for whether and where to roll back (None: not now); updates max_rollback_time as
    released (a position is rolled back to at most `candidates` times; then the one before it)."""
    if not all(int((g == loc).long().sum()) > int(cfg.threshold) for g in gathers):
        return None
    if loc < 10:
        return None
    pos = loc + 1
    if pos >= len(max_rollback_time):        # the released code's index error, caught as "no rollback"
        return None
    if max_rollback_time[pos] >= cfg.candidates:
        pos = pos - 1
        if max_rollback_time[pos] >= cfg.candidates:
            return None
        max_rollback_time[pos] += 1
    else:
        max_rollback_time[pos] += 1
    if W - pos > cfg.window + 1:
        pos = max(1, W - cfg.window - 1)
    return pos


def _now(device):
    import time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# The command lines' options (argparse dests), for flags.py: --opera [--opera-scale S] [--opera-threshold N]
# [--opera-candidates C] [--opera-penalty P] [--opera-rule R]; the beam width is --num-beams (default 5 here).
OPTIONS = ("opera_scale", "opera_threshold", "opera_candidates", "opera_penalty", "opera_rule")


def from_options(opts: dict, spell) -> OPERA | None:
    """The OPERA method the options ask for (None without `opera`), its ranges checked now."""
    given = {k: v for k, v in opts.items() if v is not None and v is not False}
    if not given.get("opera"):
        stray = [k for k in OPTIONS if k in given]
        if stray:
            raise MinivarError(f"{spell(stray[0])} only applies with {spell('opera')}")
        return None
    fields = {"scale": "opera_scale", "threshold": "opera_threshold", "candidates": "opera_candidates",
              "penalty": "opera_penalty", "rule": "opera_rule", "num_beams": "num_beams"}
    try:
        return OPERA(OPERAConfig(**{f: given[d] for f, d in fields.items() if d in given}))
    except MinivarError as e:
        message = str(e)
        for f, d in fields.items():
            message = message.replace(f"`OPERAConfig.{f}`", spell(d))
        raise MinivarError(message) from None
