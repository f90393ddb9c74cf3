"""The Python API: load once, then generate or score many times.

    import minivar
    llava = minivar.load("llava-hf/llava-1.5-7b-hf")          # or a local directory, or "demo"
    out = llava.generate("cat.jpg", "What is in the image?")   # .text, .output_ids, .prompt_ids, .timing
    logits = llava.logits(input_ids, pixel_values)             # [B, T, V] fp32
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, processing
from .methods import var as var_mod
from .errors import MinivarError
from .generate import Generation, generate
from .models.llama import KVCache, SharedPrefixCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MinivarError(f"`device` '{device}' is not one of auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MinivarError(f"`device` {device} was asked for but this torch has no usable CUDA device")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # fp16 is the checkpoint's own dtype and fast on GPUs; on CPUs bf16 is fast (AVX-512 BF16/AMX) and does not
        # overflow, and a 7B in fp32 would need 28 GB.
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if dtype not in DTYPES:
        raise MinivarError(f"`dtype` '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Result:
    """One answer: the ids, the text, and where the time went."""
    text: str
    output_ids: list[int]
    prompt_ids: list[int]
    timing: dict
    finished: bool                       # stopped at EOS (False: hit max_new_tokens)
    var: dict | None = None              # VAR report (sinks, image span, redistribution counts) when VAR ran
    extra: dict = field(default_factory=dict)


def check_generation_args(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The generation settings' ranges (run.py checks them before loading the model too)."""
    if max_new_tokens < 0:
        raise MinivarError(f"`max_new_tokens` must be ≥ 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise MinivarError(f"`top_p` must be in (0, 1], got {top_p}")
    if not temperature >= 0:   # also catches nan
        raise MinivarError(f"`temperature` must be ≥ 0, got {temperature}")


@dataclass
class Request:
    """One call prepared once: prompt ids (padded to a common length), pixels, and the hooks with their state."""
    input_ids: torch.Tensor                       # [B, T]
    attention_mask: torch.Tensor | None           # [B, T], 0 on padding; None when nothing is padded
    pixel_values: torch.Tensor                    # [B, 3, S, S]
    prompt_ids: list[list[int]]                   # each prompt's own ids, unpadded
    max_new_tokens: int                           # capped at the model's context
    sinks: var_mod.Sinks | None = None            # the call's sink sets (VAR's, the capture's, the masking's)
    var_state: var_mod.VARState | None = None
    sink_dims_source: str | None = None           # "user", "known:<model>" or "finder"
    hooks: list = field(default_factory=list)     # in call order: VAR, masking, capture, then the caller's


class Pipeline:
    """A loaded LLaVA model with its tokenizer and preprocessing."""

    def __init__(self, model, tokenizer: processing.Tokenizer, directory: Path, device: torch.device, dtype: torch.dtype,
                 load_s: float):
        self.model, self.tokenizer, self.directory = model, tokenizer, directory
        self.config = model.config
        self.device, self.dtype, self.load_s = device, dtype, load_s
        self._found_dims: dict = {}      # sink dims resolved for this model, by VARConfig.find_sink_dims

    # -- inputs --------------------------------------------------------------------------------------------------
    def pixels(self, image, image_aspect_ratio: str = "pad") -> torch.Tensor:
        """Image path or PIL image → pixel_values [1, 3, S, S] on the model's device, in the model's dtype."""
        img = processing.load_image(image) if isinstance(image, (str, Path)) else image   # preprocess makes it RGB
        px = processing.preprocess(img, self.config.vision.image_size, image_aspect_ratio)
        return px[None].to(self.device, self.dtype)

    def prompt_ids(self, prompt: str, conv_mode: str = "vicuna_v1", tokenization: str = "llava") -> torch.Tensor:
        """User text → the full templated prompt ids [1, T] with the image placeholder expanded. tokenization:
        "llava" (BOS + the template tokenized as LLaVA does) or "official" (as the VAR authors' released code does:
        segments, no BOS, one 29871; see official.official_prompt_ids)."""
        if tokenization == "official":
            if conv_mode != "vicuna_v1":
                raise MinivarError("`prompt_tokenization` official rebuilds the released code's vicuna_v1 prompt; "
                                   f"it needs --conv-mode vicuna_v1, got {conv_mode}")
            from .methods.var_official import official_prompt_ids
            ids = official_prompt_ids(self.tokenizer, prompt, self.config.num_image_tokens,
                                      self.config.image_token_index)
        elif tokenization == "llava":
            ids = self.tokenizer.encode_prompt(prompt, conv_mode, self.config.num_image_tokens)
        else:
            raise MinivarError(f"`prompt_tokenization` must be llava or official, got {tokenization!r}")
        limit = self.config.text.max_position_embeddings
        if len(ids) >= limit:
            raise MinivarError(f"the prompt is {len(ids)} tokens (incl. {self.config.num_image_tokens} image tokens), "
                               f"over the model's context of {limit} (max_position_embeddings)")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def sink_dims(self, var: var_mod.VARConfig, input_ids: torch.Tensor, warn=None) -> tuple[tuple[int, ...], str]:
        """The sink dims VAR (or the sink sets) use, and where they came from: the user's, the known ones of
        LLaVA-1.5-7B/13B, or the finder's (run once per model, then kept). warn(message) receives what the finder
        reports (default: printed on stderr)."""
        if var.sink_dims is not None:
            return var.sink_dims, "user"
        if var.find_sink_dims not in self._found_dims:
            self._found_dims[var.find_sink_dims] = var_mod.resolve_sink_dims(self.config, var, self.model, input_ids,
                                                                             warn)
        return self._found_dims[var.find_sink_dims]

    def prepare(self, images, prompts, *, conv_mode: str = "vicuna_v1", image_aspect_ratio: str = "pad",
                max_new_tokens: int = 128, var: var_mod.VARConfig | None = None, sink_config=None, capture=None,
                mask=None, warn=None, prompt_tokenization: str = "llava") -> Request:
        """Everything a generation needs, made once: ids left-padded to a common length, pixels, and the hooks —
        the sink sets (when VAR, the capture or visual-sink masking reads them), VAR's state, the masking, the
        capture (bound to this prompt). var: a VARConfig (None: plain LLaVA); sink_config: the τ and sink dims of the
        sink sets when VAR is off (default VARConfig()'s); capture: a probe.Capture; mask: a probe.KeyMask."""
        if len(images) != len(prompts) or not prompts:
            raise MinivarError(f"generate_batch needs as many images as prompts (got {len(images)} and {len(prompts)})")
        if capture is not None and len(prompts) > 1:
            raise MinivarError("a capture records one sample: run it with a single prompt")
        rows = [self.prompt_ids(p, conv_mode, prompt_tokenization)[0] for p in prompts]
        T = max(len(r) for r in rows)
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros(len(rows), T, dtype=torch.bool, device=self.device)
        for b, r in enumerate(rows):                 # left padding keeps every prompt's last token at position T-1
            input_ids[b, T - len(r):] = r
            attention_mask[b, T - len(r):] = True
        attention_mask = None if bool(attention_mask.all()) else attention_mask
        pixel_values = torch.cat([self.pixels(img, image_aspect_ratio) for img in images])
        # never run past the context the model was trained for
        max_new_tokens = min(max_new_tokens, self.config.text.max_position_embeddings - T)
        request = Request(input_ids, attention_mask, pixel_values, [r.tolist() for r in rows], max_new_tokens)
        self.add_hooks(request, var=var, sink_config=sink_config, capture=capture, mask=mask, warn=warn)
        return request

    def add_hooks(self, request: Request, *, var=None, sink_config=None, capture=None, mask=None, warn=None,
                  length: int | None = None) -> None:
        """Make the request's hooks for its ids: Sinks, VARState, KeyMask, Capture (each only where asked for).
        length: the cache length (default: the prompt plus max_new_tokens)."""
        t = self.config.text
        ids, attention_mask = request.input_ids, request.attention_mask
        image_mask = ids == self.config.image_token_index
        wants_sinks = (var is not None or (mask is not None and mask.kind == "visual_sinks")
                       or capture is not None)
        if wants_sinks:
            cfg = var if var is not None else (sink_config or var_mod.VARConfig())
            cfg.validate(t.hidden_size, t.num_hidden_layers)
            first = ids[:1] if attention_mask is None else ids[:1, attention_mask[0]]     # sample 0, unpadded
            dims, request.sink_dims_source = self.sink_dims(cfg, first, warn)
            request.sinks = var_mod.Sinks(dims, cfg.tau, t.num_hidden_layers, image_mask, attention_mask,
                                          strict=cfg.rule == "official", layers=cfg.sink_layers(t.num_hidden_layers))
        if var is not None:
            length = length or ids.shape[1] + request.max_new_tokens
            request.var_state = var_mod.VARState(var, request.sinks, max_len=length,
                                                 keep_selections=capture is not None)
            request.hooks.append(request.var_state)        # it updates the sink sets it shares with the others
        elif request.sinks is not None:
            request.hooks.append(request.sinks)
        if mask is not None:
            request.hooks.append(mask.bind(image_mask, request.sinks))
        if capture is not None:
            request.hooks.append(capture.bind(image_mask, sinks=request.sinks, var_state=request.var_state,
                                              n_layers=t.num_hidden_layers, n_heads=t.num_attention_heads))

    # -- outputs -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *, attention_mask=None,
               var: var_mod.VARConfig | None = None, hooks=()) -> torch.Tensor:
        """Logits [B, T, V] (fp32) for whole sequences, no cache; attention_mask [B, T] is 0 on left padding;
        var: a VARConfig (a fresh VAR state is made for these ids); hooks: more hooks of your own (after VAR)."""
        input_ids = input_ids.to(self.device)
        px = pixel_values.to(self.device, self.dtype) if pixel_values is not None else None
        mask = attention_mask.to(self.device).bool() if attention_mask is not None else None
        request = Request(input_ids, mask, px, [], 0)
        if var is not None:
            self.add_hooks(request, var=var, length=input_ids.shape[1])
        return self.model(input_ids, px, attention_mask=mask, hooks=request.hooks + list(hooks))

    def generate(self, image, prompt: str, **kwargs) -> Result:
        """Answer `prompt` about `image` (a path or PIL image); the options are generate_batch's."""
        return self.generate_batch([image], [prompt], **kwargs)[0]

    def generate_batch(self, images, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None, conv_mode: str = "vicuna_v1",
                       image_aspect_ratio: str = "pad", var: var_mod.VARConfig | None = None, sink_config=None,
                       capture=None, mask=None, hooks=(), on_text=None, warn=None,
                       prompt_tokenization: str = "llava") -> list[Result]:
        """Several (image, prompt) pairs in one batch: prompts left-padded to a common length, each sample with its
        own VAR state (sinks, image span, counters). Greedy results equal running them one by one.

        var: a VARConfig to apply Visual Attention Redistribution (None: plain LLaVA). capture (probe.Capture) and
        mask (probe.KeyMask): inspection, one sample only; sink_config: their τ / sink dims when VAR is off.
        hooks: hooks of your own, called after minivar's. on_text(str) receives the text as it is generated
        (a single prompt only). prompt_tokenization: "llava" or "official" (see prompt_ids)."""
        check_generation_args(max_new_tokens, temperature, top_p)
        request = self.prepare(images, prompts, conv_mode=conv_mode, image_aspect_ratio=image_aspect_ratio,
                               max_new_tokens=max_new_tokens, var=var, sink_config=sink_config, capture=capture,
                               mask=mask, warn=warn, prompt_tokenization=prompt_tokenization)
        return self.run(request, temperature=temperature, top_p=top_p, seed=seed, hooks=hooks, on_text=on_text)

    def run(self, request: Request, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
            hooks=(), on_text=None) -> list[Result]:
        """Generate for a prepared request."""
        stream = self.tokenizer.decode_token_stream() if on_text is not None and len(request.prompt_ids) == 1 else None

        def on_token(ids):
            if stream is not None and ids[0] is not None:
                piece = stream.push(ids[0])
                if piece:
                    on_text(piece)

        gen: Generation = generate(self.model, request.input_ids, request.pixel_values,
                                   max_new_tokens=request.max_new_tokens, eos_token_id=self.tokenizer.eos_id,
                                   temperature=temperature, top_p=top_p, seed=seed,
                                   attention_mask=request.attention_mask, hooks=request.hooks + list(hooks),
                                   on_token=on_token)
        if stream is not None:
            tail = stream.flush()        # bytes held back in case a multi-byte character was still incomplete
            if tail:
                on_text(tail)
        return self._results(request, gen)

    @torch.inference_mode()
    def generate_many(self, image, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int | None = None, conv_mode: str = "vicuna_v1",
                      image_aspect_ratio: str = "pad", var: var_mod.VARConfig | None = None, warn=None,
                      prompt_tokenization: str = "llava") -> list[Result]:
        """Several prompts about one image, the shared prefix computed once; one Result per prompt, equal to
        running each prompt alone (greedy).

        The vision tower runs once. The prompts' common prefix (system text, image, and whatever follows that all
        prompts share) is prefilled once, as a batch of one, and its keys and values are stored once
        (llama.SharedPrefixCache: the attention reads them as a key segment every question shares). The questions' own
        tokens then run as one batch continuing at the same
        positions — the shorter ones padded between the prefix and their text, so every question's tokens keep the
        positions they have alone — and are decoded together. With VAR, each question has its own state; the prefix's
        sink sets are found once and shared (VAR's rows and the sink scores of prefix positions depend on the prefix
        alone: attention is causal)."""
        check_generation_args(max_new_tokens, temperature, top_p)
        if not prompts:
            raise MinivarError("generate_many needs at least one prompt")
        rows = [self.prompt_ids(p, conv_mode, prompt_tokenization)[0].tolist() for p in prompts]
        shortest = min(len(r) for r in rows)
        P = 0                    # the shared prefix; every prompt keeps at least one token of its own (its logits)
        while P < shortest - 1 and all(r[P] == rows[0][P] for r in rows):
            P += 1
        Q = max(len(r) for r in rows) - P
        T = P + Q
        B = len(rows)
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        input_ids = torch.full((B, T), pad_id, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros(B, T, dtype=torch.bool, device=self.device)
        for b, r in enumerate(rows):   # [prefix][padding][own tokens]: the own tokens end at T − 1 for everyone
            input_ids[b, :P], input_ids[b, T - (len(r) - P):] = torch.tensor(r[:P]), torch.tensor(r[P:])
            attention_mask[b, :P] = True
            attention_mask[b, T - (len(r) - P):] = True
        attention_mask = None if bool(attention_mask.all()) else attention_mask
        max_new_tokens = min(max_new_tokens, self.config.text.max_position_embeddings - T)
        request = Request(input_ids, attention_mask, self.pixels(image, image_aspect_ratio), rows, max_new_tokens)
        self.add_hooks(request, var=var, warn=warn)
        t0 = time.perf_counter()
        features = self.model.image_features(request.pixel_values)                     # [1, N, D], once
        in_prefix = int((input_ids[0, :P] == self.config.image_token_index).sum())
        # the prefix's keys and values are stored once (a batch of one), each question's own positions per question
        prefix = KVCache(self.config.text, 1, max(P, 1), self.dtype, self.device)
        cache = SharedPrefixCache(prefix, P, KVCache(self.config.text, B, Q + max_new_tokens, self.dtype, self.device),
                                  self.config.text)
        if P:
            self.model(input_ids[:1, :P], image_features=features[:, :in_prefix] if in_prefix else None, cache=prefix,
                       hooks=request.hooks, output="hidden")                          # batch 1, once
        prefix_s = time.perf_counter() - t0
        rest = features[:, in_prefix:].expand(B, -1, -1) if in_prefix < features.shape[1] else None
        gen = generate(self.model, input_ids[:, P:], None, image_features=rest, cache=cache, input_pos=P,
                       max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_id, temperature=temperature,
                       top_p=top_p, seed=seed, attention_mask=attention_mask, hooks=request.hooks)
        gen.prefill_s += prefix_s           # vision tower + shared prefix + the questions' own tokens
        results = self._results(request, gen)
        total = time.perf_counter() - t0
        for r in results:
            r.timing.update(prefix_tokens=P, questions=B, total_s=total)
        return results

    def _results(self, request: Request, gen: Generation) -> list[Result]:
        timing = {"load_s": self.load_s, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s,
                  "decode_tokens": gen.decode_tokens, "decode_tokens_per_s": gen.decode_tokens_per_s}
        results = []
        for b, ids in enumerate(gen.output_ids):
            report = None
            if request.var_state is not None:
                # the generated rows this sample fed to the model: each emitted token, except the last one when the
                # sample stopped at max_new_tokens (rows of a sample that stopped before its batch are not counted)
                fed = len(ids) if gen.finished[b] else max(len(ids) - 1, 0)
                report = request.var_state.report(b, fed) | {"sink_dims_source": request.sink_dims_source}
            results.append(Result(self.tokenizer.decode(ids), ids, request.prompt_ids[b], dict(timing),
                                  gen.finished[b], report))
        return results

    def capture(self, image, prompt: str, *, layers=(), heads=None, attention=("before", "after"),
                residuals: bool = False, head_stats: bool = False, rows: str = "all", decode: bool = False,
                mask: str | None = None, mask_random: int = 0, mask_seed: int = 0, max_new_tokens: int = 1,
                var: var_mod.VARConfig | None = None, **generate_kwargs):
        """Run `prompt` on `image` and return a probe.Capture holding only what was asked for (see probe.py):
        attention probabilities before/after VAR of `layers` × `heads` for `rows`, residual inputs, the sink sets
        of every layer (always); `.result` is the generation Result, `.masked` the KeyMask (if any). Nothing is
        attached to the model.

            cap = llava.capture("cat.jpg", "What is this?", layers=[10, 11], heads=[0, 5], var=VARConfig())
            cap.attention_probs[10]["after"]     # fp32 [1, 2, T, T]
        """
        from .probe import Capture, KeyMask
        if mask is not None and mask_random:
            raise MinivarError("mask the visual sinks or random image tokens, not both")
        if mask not in (None, "visual_sinks"):
            raise MinivarError(f"mask '{mask}' is not None or 'visual_sinks'")
        key_mask = (KeyMask("visual_sinks") if mask is not None else
                    KeyMask("random", mask_random, mask_seed) if mask_random else None)
        cap = Capture(layers, heads, attention=attention, residuals=residuals, head_stats=head_stats, rows=rows,
                      decode=decode)
        cap.masked = key_mask
        cap.result = self.generate(image, prompt, max_new_tokens=max_new_tokens, var=var, capture=cap, mask=key_mask,
                                   **generate_kwargs)
        return cap


def load(model: str = checkpoint.DEFAULT_MODEL, *, device: str = "auto", dtype: str | torch.dtype = "auto",
         weights_dir: str | Path | None = None) -> Pipeline:
    """Resolve (and if needed download) a checkpoint, load it strictly, and return a ready Pipeline."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    directory = checkpoint.resolve(model, Path(weights_dir) if weights_dir else None)
    t0 = time.perf_counter()
    cfg = checkpoint.read_config(directory)
    tokenizer = processing.Tokenizer(directory, cfg.image_token_index)      # its tokenizer.json
    net = checkpoint.load_model(directory, dt, dev, cfg)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return Pipeline(net, tokenizer, directory, dev, dt, time.perf_counter() - t0)
