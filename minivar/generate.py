"""Token generation on the KV cache: one prefill over the prompt, then one token per step, each call told its
position. Everything that is only a speed trick lives here, not in the model: lm_head on the last row only, and
the CPU kernel choice of the decode loop (decode_kernels).

Greedy by default (the paper's evaluations use greedy, 128 new tokens); temperature / top-p sampling with a seeded
generator when asked. Each sample of a batch stops at its own EOS; the loop ends when all have stopped.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from .errors import MinivarError
from .methods.hooks import as_hooks
from .models.llama import KVCache


@dataclass
class Generation:
    output_ids: list[list[int]]           # per sample, EOS excluded
    prefill_s: float = 0.0                # vision tower + projector + decoder over the prompt + first token
    decode_s: float = 0.0                 # all later steps
    decode_tokens: int = 0                # tokens produced by those steps (per sample; the batch makes B× more)
    finished: list[bool] = field(default_factory=list)   # True where the sample stopped at EOS
    # beam search only: each answer's score (transformers' sequences_scores) and the cache row each of its fed
    # tokens ran in (a hook's per-row state is read along these rows)
    scores: list[float] | None = None
    rows: list[list[int]] | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids [B] from logits [B, V]: argmax when temperature is 0, else nucleus sampling — on the logits' device
    (no host copy of the probabilities)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def matrix_vector_decode(device: torch.device, batch: int) -> bool:
    """Does the decode loop run as matrix-vector products on ATen's own kernels? A single prompt on a CPU: each
    decode step multiplies every weight matrix by one vector, bound by memory bandwidth."""
    return device.type == "cpu" and batch == 1


def new_cache(model, batch: int, length: int, device: torch.device, dtype: torch.dtype | None = None,
              values_transposed: bool | None = None) -> KVCache:
    """The KV cache of a generation, its value layout matched to the decode loop's kernels (decode_kernels); a
    family with a cache of its own (Qwen2-VL's keeps the prompt's M-RoPE offsets) makes it (model.new_cache)."""
    dtype = dtype or next(model.parameters()).dtype
    transposed = matrix_vector_decode(device, batch) if values_transposed is None else values_transposed
    if hasattr(model, "new_cache"):
        return model.new_cache(batch, length, dtype, device, values_transposed=transposed)
    return KVCache(model.config.text, batch, length, dtype, device, values_transposed=transposed)


@contextlib.contextmanager
def decode_kernels(device: torch.device, batch: int = 1):
    """The one place minivar steers CPU kernels, around the decode loop of a single prompt. Each decode step
    multiplies every weight matrix by one vector (GEMV) and is bound by memory bandwidth; on AMD CPUs (Zen 4, where
    this was tuned) ATen's own bf16/fp16 GEMV streams the weights faster than oneDNN's, while oneDNN is far faster
    for matrix products (the prefill, the decode steps of a batch). On Intel Xeons oneDNN's GEMVs are faster too
    (decode +45 % in bench.py), but oneDNN then holds a transient reordered copy of lm_head, +0.26 GiB of peak
    memory: the switch stays, and docs/performance.md has the figures. torch exposes the choice only as the process-wide switch
    torch.backends.mkldnn.enabled: it is switched off here and restored on the way out, exceptions included — so
    do not run another model in another thread of this process meanwhile. GPUs ignore the switch."""
    active = matrix_vector_decode(device, batch)
    before = torch.backends.mkldnn.enabled
    if active:
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Prompt positions per prefill call. A longer prompt (LLaVA-NeXT's ≈ 2,900 tokens for a 672×672 image) runs in
# pieces of this many: each piece's activations, not the whole prompt's (its MLP's three [T, 11008] tensors alone are
# 0.2 GB at 7B size). Each piece reads the weights once more, yet on the CPUs measured the pieces were faster, their
# work staying in cache (docs/performance.md).
PREFILL_CHUNK = 512


def prefill(model, input_ids, images=None, *, image_features=None, cache=None, input_pos: int = 0,
            attention_mask=None, hooks=None, chunk: int | None = None) -> torch.Tensor:
    """The prompt (or its rest after a cached prefix): the next-token logits [R, V] (fp32). A prompt of more than
    `chunk` positions (default PREFILL_CHUNK) runs as consecutive calls of `chunk`, each attending to what the
    earlier ones stored in the cache, each given the feature rows of its own image tokens: the same numbers as one
    call (hooks see the same rows, hooks.py), less memory. A family whose positions depend on the whole prompt
    (Qwen2-VL's and Qwen3-VL's M-RoPE: model.prompt_positions) computes them once and gives each piece its slice;
    after a cached prefix (input_pos > 0) it runs the rest in one call."""
    R, T = input_ids.shape
    chunk = chunk or PREFILL_CHUNK
    mrope = hasattr(model, "prompt_positions")
    if cache is None or T <= chunk or (mrope and input_pos):
        return model(input_ids, images, image_features=image_features, cache=cache, input_pos=input_pos,
                     attention_mask=attention_mask, hooks=hooks, output="last")
    positions = model.prompt_positions(input_ids, images, attention_mask, cache) if mrope else None
    if image_features is None and images is not None and len(images):
        image_features = torch.cat(model.image_features(images))          # the vision tower once, for all pieces
    is_image = model.image_positions(input_ids)                                       # [R, T]
    feature_row = (is_image.flatten().cumsum(0) - 1).view(R, T)   # image token → its row of image_features
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        here = is_image[:, start:end]
        feats = image_features[feature_row[:, start:end][here]] if bool(here.any()) else None
        mask = attention_mask[:, :input_pos + end] if attention_mask is not None else None
        logits = model(input_ids[:, start:end], image_features=feats, cache=cache, input_pos=input_pos + start,
                       attention_mask=mask, hooks=hooks, output="last",
                       **({"positions": positions[:, :, start:end]} if mrope else {}))
    return logits


def decode_step(model, next_ids: torch.Tensor, *, cache, position: int, attention_mask=None, hooks=None) -> torch.Tensor:
    """One token per row, next_ids [R], at cache position `position`: the next logits [R, V] (fp32)."""
    return model(next_ids[:, None], cache=cache, input_pos=position, attention_mask=attention_mask, hooks=hooks,
                 output="last")


def branch_prefill_applies(model, cache, input_pos, images, image_features, padded, hooks) -> bool:
    """Whether the branches of a contrastive call may each be prefilled at their own length (prefill_branches):
    a fresh cache of addressable rows, feature rows given, 1-D positions (not M-RoPE), no hook (hooks see a call's
    rows as the first rows of their state) — and padding to skip."""
    return (padded and input_pos == 0 and isinstance(cache, KVCache) and not cache.values_transposed
            and images is None and image_features is not None and not hasattr(model, "positions")
            and not as_hooks(hooks))


def prefill_branches(model, input_ids, image_features, cache: KVCache, attention_mask, branches: int) -> torch.Tensor:
    """The prefill of a contrastive call, one branch at a time, each from the first position any of its rows uses:
    DAMRO's contrast prompt holds k image tokens instead of 576, so the joint, left-padded prefill would spend most
    of its work on padding. The same numbers as one joint call (positions count real tokens; the padding columns are
    zeros and masked); the decode steps then read every row together. Logits [R, V]."""
    R, T = input_ids.shape
    B = R // branches
    per_row = model.image_positions(input_ids).sum(-1).tolist()
    logits, used = [], 0
    for k in range(branches):
        rows = slice(k * B, (k + 1) * B)
        start = int(attention_mask[rows].any(0).int().argmax())          # the first column any row uses
        n = sum(per_row[rows])
        part = cache.rows(rows.start, rows.stop)
        part.clear(start)
        logits.append(model(input_ids[rows, start:], image_features=image_features[used:used + n] if n else None,
                            cache=part, input_pos=start, attention_mask=attention_mask[rows], output="last"))
        used += n
    return torch.cat(logits)


def plain_choice(logits: torch.Tensor) -> torch.Tensor:
    """The token choice without a decoding-level method: [branches, B, V] → the only branch's logits [B, V]."""
    return logits[0]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, images=None, *, max_new_tokens: int = 128,
             eos_token_id=2, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             attention_mask: torch.Tensor | None = None, hooks=None, on_token=None, cache: KVCache | None = None,
             input_pos: int = 0, image_features: torch.Tensor | None = None, branches: int = 1,
             choose=plain_choice, num_beams: int = 1) -> Generation:
    """Generate up to `max_new_tokens` for a batch of prompts `input_ids` [R, T] (padded where `attention_mask` is 0).

    images: the prompts' images (a list of ImageInput, or pixels [B, 3, S, S]), or their feature rows in
    `image_features`. hooks: per-call hooks (VAR, capture, masking) passed to every forward call (see hooks.py).
    branches / choose: the R = branches · B rows are B samples in `branches` branches (branch-major: rows
    k·B … k·B+B−1 are branch k); every step runs all rows in one forward, `choose(logits [branches, B, V])` makes
    one [B, V] per sample, and the token picked from it is fed to every branch of that sample.
    on_token(ids) is called after each step with a list of B ids (None for a sample that has finished), for
    streaming. cache / input_pos: continue after positions 0 … input_pos−1 already in `cache` (a shared prefix);
    attention_mask then covers them too ([R, input_pos + T]).
    num_beams K > 1: beam search (beam.py, transformers' arithmetic), the R = B·K rows being K copies of each of
    B prompts (sample-major: rows b·K … b·K+K−1 are sample b's); greedy only, one branch, no streaming.
    """
    if num_beams > 1:
        return beam_generate(model, input_ids, images, num_beams=num_beams, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_token_id, attention_mask=attention_mask, hooks=hooks, cache=cache,
                             input_pos=input_pos, image_features=image_features, branches=branches,
                             temperature=temperature)
    R, T = input_ids.shape
    if R % branches:
        raise MinivarError(f"{R} prompt rows do not split into {branches} branches")
    B = R // branches
    device = input_ids.device
    stop = stop_set(eos_token_id)
    prompt_end = input_pos + T
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    outputs: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B                 # per sample: stopped at EOS
    result = Generation(outputs)
    if max_new_tokens <= 0:
        result.finished = [False] * B
        return result
    check_context(prompt_end, max_new_tokens, model.config.text.max_position_embeddings)
    if cache is None:
        cache = new_cache(model, R, prompt_end + max_new_tokens, device)
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = torch.ones(R, prompt_end + max_new_tokens, dtype=torch.bool, device=device)   # preallocated, sliced
    if padded:
        mask[:, :prompt_end] = attention_mask.bool()

    def step_mask(length):               # None tells the model "no padding": plain causal attention
        return mask[:, :length] if padded else None

    _sync(device)
    t0 = time.perf_counter()
    if branches > 1 and branch_prefill_applies(model, cache, input_pos, images, image_features, padded, hooks):
        logits = prefill_branches(model, input_ids, image_features, cache, mask[:, :prompt_end], branches)
    else:
        logits = prefill(model, input_ids, images, image_features=image_features, cache=cache, input_pos=input_pos,
                         attention_mask=step_mask(prompt_end), hooks=hooks)
    step = 0
    t_decode = None
    with decode_kernels(device, R):
        while True:
            check_finite(logits, step)
            chosen = choose(logits.view(branches, B, -1))                                # [B, V]
            next_ids = sample_next(chosen, temperature, top_p, generator)                # [B]
            # None for a sample that had finished or finishes now (EOS is never part of the output)
            emitted = [None if finished[b] or t in stop else t for b, t in enumerate(next_ids.tolist())]
            for b, t in enumerate(emitted):
                if t is None:
                    finished[b] = True
                else:
                    outputs[b].append(t)
            if on_token is not None:
                on_token(emitted)
            step += 1
            if t_decode is None:
                _sync(device)
                result.prefill_s = time.perf_counter() - t0
                t_decode = time.perf_counter()
            if all(finished) or step >= max_new_tokens:
                break
            position = prompt_end + step - 1           # where the token just sampled goes
            logits = decode_step(model, next_ids.repeat(branches), cache=cache, position=position,
                                 attention_mask=step_mask(position + 1), hooks=hooks)
    _sync(device)
    result.decode_s = time.perf_counter() - t_decode
    result.decode_tokens = step - 1
    result.finished = finished
    return result


def check_finite(logits: torch.Tensor, step: int) -> None:
    """Refuse non-finite logits before a token is chosen from them: argmax over NaN picks an arbitrary id, so a
    checkpoint holding a NaN or Inf weight would answer garbage with no sign of it. One reduction per step, on the
    step's [R, V] logits (the weights are never scanned)."""
    if not bool(torch.isfinite(logits).all()):
        raise MinivarError(f"the model's logits are not finite (NaN or Inf) at generated token {step + 1}: the "
                           f"checkpoint's weights likely hold NaN or Inf values (or `dtype` float16 overflowed: "
                           f"try bfloat16 or float32)")


def stop_set(eos_token_id) -> set[int]:
    """The ids that end a sample: one EOS (LLaMA's 2), several (Qwen's <|im_end|>, <|endoftext|>) or none."""
    return set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def beam_generate(model, input_ids, images=None, *, num_beams: int, max_new_tokens: int, eos_token_id=2,
                  attention_mask=None, hooks=None, cache=None, input_pos: int = 0, image_features=None,
                  branches: int = 1, temperature: float = 0.0, length_penalty: float = 1.0,
                  early_stopping: bool = False) -> Generation:
    """Beam search of width num_beams over R = B·K prompt rows (K copies of each prompt, sample-major): one prefill,
    then one forward of the K running beams of every sample per step; after each step the cache rows (and so every
    hook's rows) are reordered to follow the beams that run on (beam.py)."""
    from .beam import BeamSearch
    if branches != 1:
        raise MinivarError("beam search runs one branch: a contrastive method (DAMRO, VCD) cannot run with num_beams > 1")
    if temperature > 0:
        raise MinivarError("beam search is greedy: give temperature 0 with num_beams > 1")
    R, T = input_ids.shape
    K = num_beams
    if R % K:
        raise MinivarError(f"{R} prompt rows do not split into beams of {K}")
    B = R // K
    device = input_ids.device
    prompt_end = input_pos + T
    result = Generation([[] for _ in range(B)], finished=[False] * B)
    if max_new_tokens <= 0:
        return result
    check_context(prompt_end, max_new_tokens, model.config.text.max_position_embeddings)
    if cache is None:
        cache = new_cache(model, R, prompt_end + max_new_tokens, device, values_transposed=False)
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = torch.ones(R, prompt_end + max_new_tokens, dtype=torch.bool, device=device)
    if padded:
        mask[:, :prompt_end] = attention_mask.bool()
    search = BeamSearch(B, K, max_new_tokens, stop_set(eos_token_id), device, length_penalty, early_stopping)
    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, input_ids, images, image_features=image_features, cache=cache, input_pos=input_pos,
                     attention_mask=mask[:, :prompt_end] if padded else None, hooks=hooks)
    t_decode = None
    steps = 0
    while True:
        check_finite(logits, steps)
        next_ids, parents, more = search.step(logits)
        steps += 1
        if t_decode is None:
            _sync(device)
            result.prefill_s = time.perf_counter() - t0
            t_decode = time.perf_counter()
        if not more:
            break
        position = prompt_end + steps - 1             # where the tokens just chosen go
        reorder_rows(cache, parents, prompt_end, position)
        logits = decode_step(model, next_ids, cache=cache, position=position,
                             attention_mask=mask[:, :position + 1] if padded else None, hooks=hooks)
    _sync(device)
    result.decode_s = time.perf_counter() - t_decode
    result.decode_tokens = steps - 1
    best = search.best()
    result.output_ids = [h["tokens"] for h in best]
    result.finished = [h["finished"] for h in best]
    result.scores = [h["score"] for h in best]
    result.rows = [h["rows"] for h in best]
    return result


def reorder_rows(cache, rows: torch.Tensor, start: int, end: int) -> None:
    """Row i of `cache` continues row rows[i] from now on. Beams move only among the rows of one sample, which hold
    the same prompt: only the generated positions start … end−1 are copied (transformers copies the whole cache)."""
    if not isinstance(cache, KVCache):
        raise MinivarError(f"beam search cannot reorder a {type(cache).__name__}")
    if end > start:
        cache.k[:, :, :, start:end] = cache.k[:, rows, :, start:end]
        if cache.values_transposed:
            cache.v[..., start:end] = cache.v[:, rows, ..., start:end]
        else:
            cache.v[:, :, :, start:end] = cache.v[:, rows, :, start:end]
    deltas = getattr(cache, "rope_deltas", None)              # Qwen2-VL's M-RoPE offsets, one per row
    if deltas is not None:
        cache.rope_deltas = deltas[rows]


def check_context(prompt_len: int, max_new_tokens: int, limit: int) -> None:
    """The one context-limit rule: a prompt of `prompt_len` tokens and `max_new_tokens` new ones (the last new token
    is never fed back) must fit in the model's `limit` positions."""
    if prompt_len >= limit:
        raise MinivarError(f"the prompt is {prompt_len} tokens, over the model's context of {limit} "
                           f"(max_position_embeddings)")
    if prompt_len + max_new_tokens - 1 > limit:
        raise MinivarError(f"the prompt ({prompt_len} tokens) and {max_new_tokens} new tokens would go past the "
                           f"model's context of {limit} positions (max_position_embeddings)")
