"""The released OPERA loop (shikiw/OPERA, transformers-4.29.2/src/transformers/generation/utils.py,
`opera_beam_search`, with 4.29's BeamSearchScorer / BeamHypotheses) transcribed statement by statement onto plain
tensors, for one sample. It drives a minivar model through plain forward calls that recompute the whole sequence
(no KV cache), reading the last layer's attention from a hook — what `outputs.attentions[-1]` is in the released
code. Lengths are the released LLaVA code's: its input_ids hold the image as one id (-200), so every length here
is the expanded sequence's minus (image tokens − 1).

Used by tests/test_opera.py against minivar.methods.opera (an independent restatement: no minivar OPERA code)."""
import copy

import torch

from minivar.methods.hooks import Hook
from minivar.models.llama import KVCache


class LastLayerProbs(Hook):
    def __init__(self, layer):
        self.layer, self.probs_ = layer, None

    def explicit_from(self, layer, rows):
        return rows.start if layer == self.layer else None

    def probs(self, layer, probs, rows, before):
        if layer == self.layer:
            self.probs_ = probs.clone()
        return probs


class Hyps:                                            # 4.29's BeamHypotheses (length_penalty 1, early_stopping False)
    def __init__(self, num_beams):
        self.num_beams, self.beams, self.worst_score, self.length_penalty = num_beams, [], 1e9, 1.0

    def __len__(self):
        return len(self.beams)

    def add(self, hyp, sum_logprobs):
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                sorted_next_scores = sorted([(s, idx) for idx, (s, _) in enumerate(self.beams)])
                del self.beams[sorted_next_scores[0][1]]
                self.worst_score = sorted_next_scores[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):
        if len(self) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


class Scorer:                                          # 4.29's BeamSearchScorer, batch size 1
    def __init__(self, num_beams):
        self.num_beams, self.group_size = num_beams, num_beams
        self._beam_hyps = [Hyps(num_beams)]
        self._done = torch.tensor([False])

    @property
    def is_done(self):
        return self._done.all()

    def process(self, input_ids, next_scores, next_tokens, next_indices, eos_token_id):
        cur_len = input_ids.shape[-1] + 1
        next_beam_scores = torch.zeros((1, self.group_size), dtype=next_scores.dtype)
        next_beam_tokens = torch.zeros((1, self.group_size), dtype=next_tokens.dtype)
        next_beam_indices = torch.zeros((1, self.group_size), dtype=next_indices.dtype)
        for batch_idx, beam_hyp in enumerate(self._beam_hyps):
            beam_idx = 0
            for beam_token_rank, (next_token, next_score, next_index) in enumerate(
                    zip(next_tokens[batch_idx], next_scores[batch_idx], next_indices[batch_idx])):
                batch_beam_idx = batch_idx * self.group_size + next_index
                if (eos_token_id is not None) and (next_token.item() in eos_token_id):
                    if beam_token_rank >= self.group_size:
                        continue
                    beam_hyp.add(input_ids[batch_beam_idx].clone(), next_score.item())
                else:
                    next_beam_scores[batch_idx, beam_idx] = next_score
                    next_beam_tokens[batch_idx, beam_idx] = next_token
                    next_beam_indices[batch_idx, beam_idx] = batch_beam_idx
                    beam_idx += 1
                if beam_idx == self.group_size:
                    break
            self._done[batch_idx] = self._done[batch_idx] or beam_hyp.is_done(next_scores[batch_idx].max().item(),
                                                                             cur_len)
        return next_beam_scores.view(-1), next_beam_tokens.view(-1), next_beam_indices.view(-1)

    def finalize(self, input_ids, final_beam_scores):
        for batch_idx, beam_hyp in enumerate(self._beam_hyps):
            if self._done[batch_idx]:
                continue
            for beam_id in range(self.num_beams):
                beam_hyp.add(input_ids[beam_id], final_beam_scores[beam_id].item())
        sorted_hyps = sorted(self._beam_hyps[0].beams, key=lambda x: x[0])
        return sorted_hyps.pop()


def released_opera(model, prompt, images, *, num_beams, max_new_tokens, eos_token_id, scale_factor=50.0,
                   threshold=15, num_attn_candidates=5, penalty_weights=1.0, window_size=512):
    """prompt [1, T] (minivar's expanded ids) → (generated ids, sequence score, number of rollbacks)."""
    image_pos = model.image_positions(prompt)[0].nonzero().flatten()
    n_img = len(image_pos)
    T = prompt.shape[1]
    key_position = {"image_start": int(image_pos[0]), "image_end": int(image_pos[-1]), "response_start": T}
    hook = LastLayerProbs(model.config.text.num_hidden_layers - 1)
    rel_prompt = torch.zeros(num_beams, T - n_img + 1, dtype=torch.long)    # the released input_ids' prompt part

    def forward(input_ids):              # recompute everything; the last row's logits, the last layer's probs
        R = input_ids.shape[0]
        length = T + max_new_tokens + 1
        cache = (model.new_cache(R, length, torch.float32, "cpu") if hasattr(model, "new_cache")   # M-RoPE's
                 else KVCache(model.config.text, R, length, torch.float32, "cpu"))
        logits = model(prompt.repeat(R, 1), [im for im in images for _ in range(R)], cache=cache, hooks=[hook],
                       output="last")
        generated = input_ids[:, rel_prompt.shape[1]:]
        if generated.shape[1]:           # generated ids are ordinary tokens (even the image id), as in decoding
            logits = model(generated, cache=cache, input_pos=T, hooks=[hook], output="last")
        return logits, hook.probs_

    eos_token_id = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    batch_size = 1
    beam_scorer = Scorer(num_beams)
    input_ids = rel_prompt.clone()
    cur_len = input_ids.shape[-1]
    beam_scores = torch.zeros((batch_size, num_beams), dtype=torch.float)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view((batch_size * num_beams,))
    history_states = []
    history_rollback_locs = None
    beam_next_tokens = None
    beam_idx = None
    rollback_pos = 0
    max_rollback_time = torch.zeros(window_size)
    history_length = window_size
    reject_token_pos_gather = [[] for _ in range(window_size)]
    first = True
    rollbacks = 0
    attn_previous = None
    vocab_size = None
    max_length = rel_prompt.shape[1] + max_new_tokens
    while True:
        current_state = {}
        current_state["input_ids"] = input_ids.clone()
        current_state["beam_scorer"] = copy.deepcopy(beam_scorer)
        current_state["cur_len"] = cur_len

        logits, probs = forward(input_ids)
        if first:
            attn_previous = probs.clone()                      # [K, H, q, kv]
            first = False
        else:
            attn_previous = torch.cat([attn_previous, torch.zeros_like(attn_previous).sum(-1, keepdim=True)], -1)
            attn_previous = torch.cat([attn_previous[beam_idx], probs[:, :, -1:].max(1, keepdim=True).values], -2)
        attn_previous = attn_previous.max(1, keepdim=True).values
        current_state["attn_previous"] = attn_previous.clone()

        next_token_logits = logits
        candidate_token_scores, candidate_tokens = torch.topk(next_token_logits, num_attn_candidates, dim=-1,
                                                              largest=True, sorted=True)
        current_state["candidate_tokens"] = candidate_tokens.clone()
        current_state["beam_scores"] = beam_scores.clone()
        current_state["beam_next_tokens"] = beam_next_tokens.clone() if beam_next_tokens is not None else None
        current_state["beam_idx"] = beam_idx.clone() if beam_idx is not None else None

        attn_last = []
        for candidate_id in range(num_attn_candidates):
            input_ids_tmp = torch.cat([input_ids, candidate_tokens[:, candidate_id].unsqueeze(-1)], dim=-1)
            _, probs_tmp = forward(input_ids_tmp)
            attn_output = probs_tmp[:, :, -1:].max(1, keepdim=True).values                   # [K, 1, 1, kv+1]
            attn_square = torch.cat([attn_previous, torch.zeros_like(attn_previous).sum(-1, keepdim=True)], -1)
            attn_square = torch.cat([attn_square, attn_output], -2)
            attn_last.append(attn_square)
        attn_last = torch.cat(attn_last, 1)
        attn_last = attn_last / attn_last.sum(-1, keepdim=True)

        attn_pos = key_position
        attn_local = attn_last[:, :, attn_pos["response_start"]:, attn_pos["response_start"]:]
        attn_local = scale_factor * attn_local
        attn_local_scores = torch.zeros((attn_local.shape[0], attn_local.shape[1], attn_local.shape[-1]),
                                        dtype=torch.float16)
        for j in range(attn_local.shape[-1]):
            local_score = 1e-7 * attn_local[..., j:, j].prod(-1).data
            attn_local_scores[..., j] = local_score.to(torch.float32)

        cur_response_lens = attn_local.shape[-1]
        attn_i = attn_last[:, :, -1, attn_pos["image_start"]:attn_pos["image_end"] + 1].sum(-1)
        attn_scores = attn_i

        rollback_scores, rollback_locs = attn_local_scores.max(-1)
        rollback_loc = rollback_locs.mode().values.data
        rollback_loc = rollback_loc.mode().values.data

        penalty_scores = -attn_scores if cur_response_lens <= 10 else rollback_scores

        if history_rollback_locs is None:
            history_rollback_locs = [rollback_locs.mode().values.data[:, None]]
        else:
            history_rollback_locs.append(rollback_locs.mode().values.data[:, None])
        rollback_loc_gathers = torch.cat(history_rollback_locs, -1)

        candidate_token_scores -= penalty_weights * penalty_scores
        current_state["candidate_token_scores"] = candidate_token_scores.clone()

        if len(history_states) >= history_length:
            history_states.pop(0)
        history_states.append(current_state)

        try:
            if all((rollback_loc_gather == rollback_loc).long().sum() > int(threshold)
                   for _, rollback_loc_gather in enumerate(rollback_loc_gathers)):
                if rollback_loc < 10:
                    assert False
                rollback_pos = rollback_loc + 1
                if max_rollback_time[rollback_pos] >= num_attn_candidates:
                    rollback_pos = rollback_pos - 1
                    if max_rollback_time[rollback_pos] >= num_attn_candidates:
                        assert False
                    else:
                        max_rollback_time[rollback_pos] += 1
                else:
                    max_rollback_time[rollback_pos] += 1
                if cur_response_lens - rollback_pos > history_length + 1:
                    rollback_pos = max(1, cur_response_lens - history_length - 1)

                for j in range(cur_response_lens - rollback_pos - 2):
                    history_states.pop(-1)
                    history_rollback_locs.pop(-1)
                    reject_token_pos_gather[-(j + 1)] = []

                input_ids = history_states[-2]["input_ids"]
                beam_scorer = history_states[-2]["beam_scorer"]
                cur_len = history_states[-2]["cur_len"]
                attn_previous = history_states[-2]["attn_previous"]
                candidate_token_scores = history_states[-2]["candidate_token_scores"]
                candidate_tokens = history_states[-2]["candidate_tokens"]
                beam_scores = history_states[-2]["beam_scores"]
                beam_next_tokens = history_states[-1]["beam_next_tokens"]
                beam_idx = history_states[-1]["beam_idx"]

                next_token_logits, _ = forward(input_ids)      # the two inferences: the whole sequence again

                history_states.pop(-1)
                history_rollback_locs.pop(-1)
                reject_token_pos_gather[rollback_pos + 1] = []

                next_token_logits -= 999. + next_token_logits.min(-1, keepdim=True).values.data
                next_token_logits = next_token_logits.view(batch_size, num_beams * vocab_size)
                beam_idx = beam_idx.view(batch_size, num_beams)
                beam_next_tokens = beam_next_tokens.view(batch_size, num_beams)
                reject_token_pos = beam_idx * vocab_size + beam_next_tokens
                if len(reject_token_pos_gather[rollback_pos]) > 0:
                    reject_token_pos = torch.cat([reject_token_pos_gather[rollback_pos], reject_token_pos], -1)
                reject_token_pos_gather[rollback_pos] = reject_token_pos
                next_token_logits = next_token_logits.scatter_(-1, reject_token_pos, -999.)
                next_token_logits = next_token_logits.view(batch_size * num_beams, vocab_size)
                rollbacks += 1
            else:
                assert False
        except (AssertionError, IndexError):
            next_token_logits.fill_(-999.)
            next_token_logits = next_token_logits.scatter_(-1, candidate_tokens, candidate_token_scores)

        next_token_scores = torch.nn.functional.log_softmax(next_token_logits, dim=-1)
        next_token_scores = next_token_scores + beam_scores[:, None].expand_as(next_token_scores)
        vocab_size = next_token_scores.shape[-1]
        next_token_scores = next_token_scores.view(batch_size, num_beams * vocab_size)
        next_token_scores, next_tokens = torch.topk(next_token_scores, 2 * num_beams, dim=1, largest=True,
                                                    sorted=True)
        next_indices = torch.div(next_tokens, vocab_size, rounding_mode="floor")
        next_tokens = next_tokens % vocab_size
        beam_scores, beam_next_tokens, beam_idx = beam_scorer.process(input_ids, next_token_scores, next_tokens,
                                                                      next_indices, eos_token_id)
        input_ids = torch.cat([input_ids[beam_idx, :], beam_next_tokens.unsqueeze(-1)], dim=-1)
        cur_len = cur_len + 1
        if beam_scorer.is_done or input_ids.shape[-1] >= max_length:
            break
    score, hyp = beam_scorer.finalize(input_ids, beam_scores)
    return hyp[rel_prompt.shape[1]:].tolist(), score, rollbacks
