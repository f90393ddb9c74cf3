"""Token generation on the KV cache: one prefill over the whole prompt, then one token per step.

Greedy by default (the paper's evaluations use greedy, 128 new tokens); temperature / top-p sampling with a seeded
generator when asked. Each sample of a batch stops at its own EOS; the loop ends when all have stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .llama import KVCache, without_onednn


@dataclass
class Generation:
    output_ids: list[list[int]]           # per sample, EOS excluded
    prefill_s: float = 0.0                # vision tower + projector + decoder over the prompt + first token
    decode_s: float = 0.0                 # all later steps
    decode_tokens: int = 0                # tokens produced by those steps (per sample; the batch makes B× more)
    finished: list[bool] = field(default_factory=list)   # True where the sample stopped at EOS

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids [B] from logits [B, V]: argmax when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def decode_kernels(device: torch.device, batch: int = 1):
    """Decode steps of a single prompt multiply each weight matrix by one vector (GEMV) and are bound by memory
    bandwidth. On CPUs, ATen's own bf16/fp16 GEMV streams the weights 1.5-2x faster than oneDNN's, while oneDNN is
    far faster for matrix products — the prefill, and decode steps of a batch; so oneDNN is switched off for
    single-prompt decode steps only (the attention of every decode step sees to its own products)."""
    return without_onednn(device.type == "cpu" and batch == 1)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *, max_new_tokens: int = 128,
             eos_token_id: int | None = 2, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             attention_mask: torch.Tensor | None = None, var=None, probe=None, on_token=None) -> Generation:
    """Generate up to `max_new_tokens` for a batch of prompts `input_ids` [B, T] (left-padded where `attention_mask` is 0).

    var / probe: per-call state objects (VAR, capture) passed down to every layer; see var.py and probe.py.
    on_token(ids) is called after each step with a list of B ids (None for a sample that has finished), for
    streaming.
    """
    B, T = input_ids.shape
    device = input_ids.device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    outputs: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B                 # per sample: stopped at EOS
    result = Generation(outputs)
    if max_new_tokens <= 0:
        result.finished = [False] * B
        return result
    cache = KVCache(model.config.text, B, T + max_new_tokens, model.language_model.lm_head.weight.dtype, device)
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)   # preallocated, sliced per step
    if padded:
        mask[:, :T] = attention_mask.bool()

    def step_mask(length):               # None tells the model "no padding": plain causal attention
        return mask[:, :length] if padded else None

    _sync(device)
    t0 = time.perf_counter()
    h = model(input_ids, pixel_values, cache=cache, attention_mask=step_mask(T), var=var, probe=probe, last_only=True,
              return_hidden=True)
    with decode_kernels(device, B):     # one row through lm_head: a GEMV like the decode steps
        logits = model.language_model.lm_head(h).float()
    if var is not None:
        var.start_decoding()             # sinks found in the prefill are kept; generated tokens are never sinks
    step = 0
    t_decode = None
    with decode_kernels(device, B):
        while True:
            next_ids = sample_next(logits[:, -1], temperature, top_p, generator)        # [B]
            # None for a sample that had finished or finishes now (EOS is never part of the output)
            emitted = [None if finished[b] or t == eos_token_id else t for b, t in enumerate(next_ids.tolist())]
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
            logits = model(next_ids[:, None], cache=cache, attention_mask=step_mask(T + step), var=var, probe=probe,
                           last_only=True)
    _sync(device)
    result.decode_s = time.perf_counter() - t_decode
    result.decode_tokens = step - 1
    result.finished = finished
    return result
