"""The Python API: load once, then generate or score many times.

    import minivar
    llava = minivar.load("llava-hf/llava-1.5-7b-hf")          # or a local directory, "demo", "demo-qwen2_vl", ...
    out = llava.generate("cat.jpg", "What is in the image?")   # .text, .output_ids, .prompt_ids, .timing
    logits = llava.logits(input_ids, pixel_values)             # [B, T, V] fp32
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, processing
from .processing import left_pad  # noqa: F401  (the padding rule, for the callers of the API too)
from .defaults import DEFAULT_MODEL
from .errors import MinivarError
from .generate import Generation, check_context, generate, new_cache, prefill
from .methods import var as var_mod
from .methods.method import Branch, Call, Method, as_methods
from .models.images import ImageInput
from .models.llama import KVCache, SharedPrefixCache
from .models.registry import family_of

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
    """One answer: the ids, the text, where the time went, and each method's report."""
    text: str
    output_ids: list[int]
    prompt_ids: list[int]
    timing: dict
    finished: bool                       # stopped at EOS (False: hit max_new_tokens)
    reports: dict = field(default_factory=dict)   # method name → its report (VAR: sinks, image span, counts)
    extra: dict = field(default_factory=dict)

    @property
    def var(self) -> dict | None:
        """VAR's report when VAR ran."""
        return self.reports.get("var")


# the seeds torch's generators take: a 64-bit integer, signed or not
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)


def check_generation_args(max_new_tokens: int, temperature: float, top_p: float, seed: int | None = None) -> None:
    """The generation settings' types and ranges, one rule for the API and both command lines (which check them
    before loading the model): max_new_tokens a whole number ≥ 1, temperature finite and ≥ 0, top_p in (0, 1] and
    only when sampling (an option that would have no effect is an error), seed a 64-bit integer."""
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool):
        raise MinivarError(f"`max_new_tokens` must be an int, got {type(max_new_tokens).__name__} {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise MinivarError(f"`max_new_tokens` must be a whole number ≥ 1, got {max_new_tokens}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise MinivarError(f"`{name}` must be a number (int or float), got {type(value).__name__} {value!r}")
    if not 0 <= temperature < math.inf:   # also catches nan
        raise MinivarError(f"`temperature` must be finite and ≥ 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise MinivarError(f"`top_p` must be in (0, 1], got {top_p}")
    if top_p != 1.0 and temperature == 0:
        raise MinivarError(f"`top_p` {top_p:g} only applies with `temperature` > 0 (greedy decoding keeps the top "
                           f"token)")
    if seed is not None:
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise MinivarError(f"`seed` must be an int, got {type(seed).__name__} {seed!r}")
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise MinivarError(f"`seed` {seed} is outside the 64-bit range a generator takes "
                               f"({SEED_RANGE[0]} … {SEED_RANGE[1]})")


def check_prompts(prompts, name: str = "prompts") -> list[str]:
    """`prompts` as a list of strings, or a MinivarError naming the argument and the type expected (a lone string
    would otherwise be read as a list of one-letter prompts)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise MinivarError(f"`{name}` must be a list of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise MinivarError(f"`{name}`[{i}] must be a str, got {type(p).__name__}")
    return list(prompts)


def with_methods(methods, var) -> list[Method]:
    """The methods of a call: `methods` (a Method or a list), and `var=` (a VARConfig, True or a preset name: the
    VAR method, first) for the calls written before methods were objects."""
    methods = as_methods(methods)
    if var is not None and var is not False:
        if any(m.name == "var" for m in methods):
            raise MinivarError("VAR is given twice (var= and in methods=)")
        methods = [var_mod.VAR(var)] + methods
    return methods


@dataclass
class Request:
    """One call prepared once: prompt ids (padded to a common length; with a contrast branch, the full branch's rows
    then the contrast branch's), the images, and each method's per-call state with its hooks."""
    input_ids: torch.Tensor                       # [R, T], R = B · branches
    attention_mask: torch.Tensor | None           # [R, T], 0 on padding; None when nothing is padded
    images: list                                  # the B samples' ImageInputs
    prompt_ids: list[list[int]]                   # each sample's own ids, unpadded
    max_new_tokens: int                           # capped at the model's context
    branches: int = 1
    image_features: torch.Tensor | None = None    # feature rows of every row's image tokens (None: from images)
    row_images: list | None = None                # every row's image, where the family's positions need them
    runs: dict = field(default_factory=dict)      # method name → its MethodRun
    shared: dict = field(default_factory=dict)    # the sink sets VAR, the capture and masking share
    hooks: list = field(default_factory=list)     # in call order: the methods', masking, capture, then the caller's
    call: Call | None = None                      # what the methods see (methods/method.py)
    num_beams: int = 1                            # beam search: each sample's prompt is K rows (sample-major)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """The images' pixels stacked (LLaVA-1.5: [B, 3, S, S])."""
        return torch.stack([im.pixel_values for im in self.images]) if self.images else None

    @property
    def sinks(self):
        return self.shared.get("sinks")

    @property
    def var_state(self):
        return self.shared.get("var_state")

    @property
    def sink_dims_source(self):
        return self.shared.get("sink_dims_source")

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The token choice of the methods, in order: [branches, B, V] → [B, V]."""
        chosen, contrast = logits[0], (logits[1] if self.branches > 1 else None)
        for run in self.runs.values():
            chosen = run.choose(chosen, contrast)
        return chosen


class Pipeline:
    """A loaded model with its family, tokenizer and preprocessing."""

    def __init__(self, model, tokenizer: processing.Tokenizer, directory: Path, device: torch.device, dtype: torch.dtype,
                 load_s: float):
        self.model, self.tokenizer, self.directory = model, tokenizer, directory
        self.config = model.config
        self.family = family_of(model.config)
        self.device, self.dtype, self.load_s = device, dtype, load_s
        # sink dims the finder found, keyed by what it read (the prompt's text ids): no call depends on an earlier one
        self._found_dims: dict = {}

    @property
    def pad_id(self) -> int:
        return self.config.pad_token_id if self.config.pad_token_id is not None else 0

    @property
    def stop_ids(self):
        """The ids that end an answer: the tokenizer's (Qwen: <|im_end|>, <|endoftext|>), else its EOS."""
        return getattr(self.tokenizer, "stop_ids", None) or self.tokenizer.eos_id

    # -- inputs --------------------------------------------------------------------------------------------------
    def image(self, image, image_aspect_ratio: str | None = None) -> ImageInput:
        """Image path or PIL image → the family's ImageInput (pixels on the model's device, in its dtype).
        image_aspect_ratio: one of the family's image modes (None: its default, LLaVA's pad)."""
        img = processing.load_image(image) if isinstance(image, (str, Path)) else image   # preprocess makes it RGB
        mode = image_aspect_ratio or self.family.default_image_mode
        if mode not in self.family.image_modes:
            raise MinivarError(f"`image_aspect_ratio` '{mode}' is not one of {self.family.name}'s image modes "
                               f"({', '.join(self.family.image_modes)})")
        return self.family.images(img, self.config, mode).to(self.device, self.dtype)

    def pixels(self, image, image_aspect_ratio: str | None = None) -> torch.Tensor:
        """Image path or PIL image → pixel_values [1, ...] on the model's device, in the model's dtype."""
        return self.image(image, image_aspect_ratio).pixel_values[None]

    def prompt_ids(self, prompt: str, conv_mode: str | None = None, tokenization: str = "llava",
                   num_image_tokens: int | None = None) -> torch.Tensor:
        """User text → the full templated prompt ids [1, T] with the image placeholder expanded to
        `num_image_tokens` (default: the family's fixed count). tokenization: "llava" (BOS + the template tokenized
        as LLaVA does), "official" (as the VAR authors' released code does: segments, no BOS, one 29871; see
        processing.official_prompt_ids) or "damro" (as DAMRO's released scripts do: the slow tokenizer, no "▁"
        after a special token; processing.damro_prompt_ids)."""
        n = num_image_tokens if num_image_tokens is not None else getattr(self.config, "num_image_tokens", None)
        if n is None:
            raise MinivarError(f"{self.family.name}'s image token count depends on the image: give "
                               f"`num_image_tokens` (its ImageInput's num_tokens, from Pipeline.image)")
        conv_mode = conv_mode or self.family.conv_mode_for(self.config)
        if conv_mode not in self.family.conv_modes:
            raise MinivarError(f"`conv_mode` '{conv_mode}' is not one of {self.family.name}'s templates "
                               f"({', '.join(self.family.conv_modes)})")
        check_tokenization(tokenization, conv_mode)
        if tokenization == "official":
            ids = processing.official_prompt_ids(self.tokenizer, prompt, n, self.config.image_token_index)
        elif tokenization == "damro":
            ids = processing.damro_prompt_ids(self.tokenizer, prompt, conv_mode, n, self.config.image_token_index)
        else:
            ids = self.tokenizer.encode_prompt(prompt, conv_mode, n)
        check_context(len(ids), 1, self.config.text.max_position_embeddings)
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def sink_dims(self, var: var_mod.VARConfig, input_ids: torch.Tensor, warn=None) -> tuple[tuple[int, ...], str]:
        """The sink dims VAR (or the sink sets) use, and where they came from: the user's, the known ones of
        LLaVA-1.5-7B/13B, or the finder's (run on this prompt's text; kept for the same text). warn(message) receives
        what the finder reports (default: a warning)."""
        if var.sink_dims is not None:
            return var.sink_dims, "user"
        key = (var.find_sink_dims, tuple(input_ids[0].tolist()))
        if key not in self._found_dims:
            self._found_dims[key] = var_mod.resolve_sink_dims(self.config, var, self.model, input_ids, warn)
        return self._found_dims[key]

    def prepare(self, images, prompts, *, conv_mode: str | None = None, image_aspect_ratio: str | None = None,
                max_new_tokens: int = 128, var=None, methods=None, sink_config=None, capture=None, mask=None,
                warn=None, prompt_tokenization: str = "llava", num_beams: int = 1) -> Request:
        """Everything a generation needs, made once: ids left-padded to a common length, the images, each method's
        contrast branch (if any) and per-call state, the masking and the capture (bound to this prompt).
        methods: Method objects (methods/method.py); var: a VARConfig (True, a preset name) — the VAR method;
        sink_config: the τ and sink dims of the sink sets when VAR is off (default VARConfig()'s); capture: a
        probe.Capture; mask: a probe.KeyMask. num_beams K > 1: beam search; each sample's prompt becomes K rows
        (sample-major), which the methods see as K samples (VAR's state per row), the vision tower runs once per
        image."""
        if len(images) != len(prompts) or not prompts:
            raise MinivarError(f"generate_batch needs as many images as prompts (got {len(images)} and {len(prompts)})")
        if capture is not None and len(prompts) > 1:
            raise MinivarError("a capture records one sample: run it with a single prompt")
        methods = with_methods(methods, var)
        for m in methods:
            m.check(self)
        ims = [self.image(img, image_aspect_ratio) for img in images]
        rows = [self.prompt_ids(p, conv_mode, prompt_tokenization, im.num_tokens)[0].tolist()
                for p, im in zip(prompts, ims)]
        K = check_num_beams(num_beams)
        searchers = [m for m in methods if getattr(m, "num_beams", None)]     # a method with its own beam search
        if searchers:
            if K not in (1, searchers[0].num_beams):
                raise MinivarError(f"{searchers[0].name} runs its own beam search of {searchers[0].num_beams} beams; "
                                   f"num_beams {K} differs")
            if len(prompts) > 1:
                raise MinivarError(f"{searchers[0].name} runs one sample at a time (generate_batch does that)")
            K = searchers[0].num_beams
        check_beam_args(K, 0.0, capture, mask)
        if K > 1:
            request = self._request([r for r in rows for _ in range(K)], [im for im in ims for _ in range(K)],
                                    max_new_tokens, methods, warn, capture is not None)
            if request.branches > 1:
                if searchers:
                    raise MinivarError(f"{searchers[0].name} does not combine with a contrastive method (DAMRO, VCD, "
                                       f"PAI's guidance): its released code has no contrast branch")
                raise MinivarError("beam search (num_beams > 1) runs one branch: it does not combine with a "
                                   "contrastive method (DAMRO, VCD, PAI's guidance)")
            request.prompt_ids, request.num_beams = rows, K
            if request.image_features is None:        # the vision tower once per image, its rows given to K rows
                feats = self.model.image_features(ims)
                request.image_features = torch.cat([f for f in feats for _ in range(K)])
                if hasattr(self.model, "positions"):   # M-RoPE reads each row's grid
                    request.row_images = request.images
        else:
            request = self._request(rows, ims, max_new_tokens, methods, warn, capture is not None)
        self.add_hooks(request, methods=methods, sink_config=sink_config, capture=capture, mask=mask, warn=warn)
        return request

    def _request(self, rows, ims, max_new_tokens, methods, warn, capture: bool, length: int | None = None) -> Request:
        """The request of B prompt rows: with a method's contrast branch, its rows after the full branch's."""
        input_ids, attention_mask = left_pad(rows, self.pad_id, self.device)
        # never run past the context the model was trained for
        max_new_tokens = min(max_new_tokens, self.config.text.max_position_embeddings - input_ids.shape[1])
        request = Request(input_ids, attention_mask, ims, rows, max_new_tokens)
        call = Call(self, input_ids, attention_mask, ims, length or input_ids.shape[1] + max_new_tokens, len(rows),
                    warn=warn, capture=capture, shared=request.shared)
        branching = [m for m in methods if type(m).branch is not Method.branch]
        if len(branching) > 1:
            raise MinivarError(f"{' and '.join(m.name for m in branching)} each add a contrast branch; use one")
        branch = branching[0].branch(call) if branching else None
        if branch is not None:
            contrast = [b.input_ids for b in branch]
            ids, mask = left_pad(rows + contrast, self.pad_id, self.device)
            max_new_tokens = min(max_new_tokens, self.config.text.max_position_embeddings - ids.shape[1])
            feats = [f for f in call.image_features()] + [b.image_features for b in branch if b.image_features is not None]
            request = Request(ids, mask, ims, rows, max_new_tokens, branches=2, image_features=torch.cat(feats),
                              shared=request.shared)
            if hasattr(self.model, "positions") and all(b.image is not None or b.image_features is None
                                                        for b in branch):
                # M-RoPE reads the grids of the rows' images, in row order (PAI's branch has no image)
                request.row_images = list(ims) + [b.image for b in branch if b.image is not None]
            call = Call(self, ids, mask, ims, length or ids.shape[1] + max_new_tokens, len(rows), warn=warn,
                        capture=capture, shared=request.shared, features=call.features)
        elif call.features is not None:                 # a method computed the features already: keep them
            request.image_features = torch.cat(call.features)
        request.call = call
        return request

    def add_hooks(self, request: Request, *, methods=(), var=None, sink_config=None, capture=None, mask=None,
                  warn=None, length: int | None = None) -> None:
        """Start each method on the request (its hooks, in order), then the masking and the capture; the sink sets
        (when VAR, the capture or visual-sink masking reads them) are made once and shared.
        length: the cache length (default: the prompt plus max_new_tokens)."""
        call = request.call
        if length is not None:
            call.max_len = length
        call.warn = warn
        call.capture = capture is not None
        for m in with_methods(methods, var):
            run = m.start(call)
            request.runs[m.name] = run
            request.hooks.extend(run.hooks)
        t = self.config.text
        wants_sinks = (mask is not None and mask.kind == "visual_sinks") or capture is not None
        if wants_sinks and "sinks" not in request.shared:
            sinks, _ = var_mod.call_sinks(call, sink_config or var_mod.VARConfig())
            request.hooks.append(sinks)
        if mask is not None:
            request.hooks.append(mask.bind(call.image_mask, request.sinks))
        if capture is not None:
            request.hooks.append(capture.bind(call.image_mask, sinks=request.sinks, var_state=request.var_state,
                                              n_layers=t.num_hidden_layers, n_heads=t.num_attention_heads))

    # -- outputs -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, pixel_values=None, *, attention_mask=None, var=None, methods=None,
               hooks=()) -> torch.Tensor:
        """Logits [B, T, V] (fp32) for whole sequences, no cache; attention_mask [B, T] is 0 on left padding;
        var / methods: their hooks act (a fresh state for these ids; a method's token choice does not apply to
        scoring); hooks: more hooks of your own (after the methods')."""
        input_ids = input_ids.to(self.device)
        images = None
        if pixel_values is not None:
            images = pixel_values if isinstance(pixel_values, list) else \
                self.model.image_inputs(pixel_values.to(self.device, self.dtype))
        mask = attention_mask.to(self.device).bool() if attention_mask is not None else None
        request = Request(input_ids, mask, images or [], [], 0)
        request.call = Call(self, input_ids, mask, images or [], input_ids.shape[1], input_ids.shape[0],
                            shared=request.shared)
        methods = with_methods(methods, var)
        for m in methods:
            m.check(self)
        self.add_hooks(request, methods=methods, length=input_ids.shape[1])
        return self.model(input_ids, images, attention_mask=mask, hooks=request.hooks + list(hooks))

    def generate(self, image, prompt: str, **kwargs) -> Result:
        """Answer `prompt` about `image` (a path or PIL image); the options are generate_batch's."""
        if not isinstance(prompt, str):
            raise MinivarError(f"`prompt` must be a str, got {type(prompt).__name__}")
        return self.generate_batch([image], [prompt], **kwargs)[0]

    def generate_batch(self, images, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None, conv_mode: str | None = None,
                       image_aspect_ratio: str | None = None, var=None, methods=None, sink_config=None,
                       capture=None, mask=None, hooks=(), on_text=None, warn=None,
                       prompt_tokenization: str = "llava", num_beams: int = 1) -> list[Result]:
        """Several (image, prompt) pairs in one batch: prompts left-padded to a common length, each sample with its
        own method state (VAR: sinks, image span, counters). Greedy results equal running them one by one.

        methods: Method objects (VAR, your own; methods/method.py); var: a VARConfig (or True / a preset name) to
        apply Visual Attention Redistribution. capture (probe.Capture) and mask (probe.KeyMask): inspection, one
        sample only; sink_config: their τ / sink dims when VAR is off. hooks: hooks of your own, called after
        minivar's. on_text(str) receives the text as it is generated (a single prompt only). conv_mode /
        image_aspect_ratio: None → the family's own (LLaVA-1.5: vicuna_v1, pad; Qwen2-VL: qwen, smart_resize).
        prompt_tokenization: "llava", "official" or "damro" (see prompt_ids). num_beams K > 1: beam search as transformers'
        generate(num_beams=K) (length_penalty 1, early_stopping False; greedy only; the text comes at the end, not
        streamed); each Result's extra["sequence_score"] is transformers' sequences_scores."""
        check_generation_args(max_new_tokens, temperature, top_p, seed)
        prompts = check_prompts(prompts)
        check_beam_args(num_beams, temperature, capture, mask)
        if len(prompts) > 1 and any(getattr(m, "num_beams", None) for m in with_methods(methods, var)):
            # a method with its own search (OPERA) runs the samples one by one, as its released code did
            return [r for im, p in zip(images, prompts) for r in self.generate_batch(
                [im], [p], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                conv_mode=conv_mode, image_aspect_ratio=image_aspect_ratio, var=var, methods=methods,
                sink_config=sink_config, hooks=hooks, warn=warn, prompt_tokenization=prompt_tokenization,
                num_beams=num_beams)]
        request = self.prepare(images, prompts, conv_mode=conv_mode, image_aspect_ratio=image_aspect_ratio,
                               max_new_tokens=max_new_tokens, var=var, methods=methods, sink_config=sink_config,
                               capture=capture, mask=mask, warn=warn, prompt_tokenization=prompt_tokenization,
                               num_beams=num_beams)
        return self.run(request, temperature=temperature, top_p=top_p, seed=seed, hooks=hooks, on_text=on_text)

    def run(self, request: Request, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
            hooks=(), on_text=None) -> list[Result]:
        """Generate for a prepared request."""
        check_beam_args(request.num_beams, temperature)
        beams = request.num_beams > 1
        stream = (self.tokenizer.decode_token_stream()
                  if on_text is not None and len(request.prompt_ids) == 1 and not beams else None)

        def on_token(ids):
            if stream is not None and ids[0] is not None:
                piece = stream.push(ids[0])
                if piece:
                    on_text(piece)

        images = request.images if request.image_features is None else request.row_images
        search = next((r for r in request.runs.values() if hasattr(r, "search")), None)
        if search is not None:       # a method's own loop (OPERA)
            gen = search.search(self.model, request.input_ids, images=images, image_features=request.image_features,
                                max_new_tokens=request.max_new_tokens, stop_ids=self.stop_ids,
                                hooks=request.hooks + list(hooks))
        else:
            gen = generate(self.model, request.input_ids, images, image_features=request.image_features,
                           max_new_tokens=request.max_new_tokens, eos_token_id=self.stop_ids,
                           temperature=temperature, top_p=top_p, seed=seed,
                           attention_mask=request.attention_mask, hooks=request.hooks + list(hooks),
                           on_token=on_token, branches=request.branches, choose=request.choose,
                           num_beams=request.num_beams)
        if stream is not None:
            tail = stream.flush()        # bytes held back in case a multi-byte character was still incomplete
            if tail:
                on_text(tail)
        results = self._results(request, gen)
        if beams and on_text is not None and len(results) == 1:
            on_text(results[0].text)     # a beam's answer is known only at the end
        return results

    @torch.inference_mode()
    def generate_many(self, image, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int | None = None, conv_mode: str | None = None,
                      image_aspect_ratio: str | None = None, var=None, methods=None, warn=None,
                      prompt_tokenization: str = "llava", num_beams: int = 1) -> list[Result]:
        """Several prompts about one image, the shared prefix computed once; one Result per prompt, equal to
        running each prompt alone (greedy).

        The vision tower runs once. The prompts' common prefix (system text, image, and whatever follows that all
        prompts share) is prefilled once, as a batch of one, and its keys and values are stored once
        (llama.SharedPrefixCache: the attention reads them as a key segment every question shares). The questions' own
        tokens then run as one batch continuing at the same positions — the shorter ones padded between the prefix
        and their text, so every question's tokens keep the positions they have alone — and are decoded together.
        With VAR, each question has its own state; the prefix's sink sets are found once and shared (VAR's rows and
        the sink scores of prefix positions depend on the prefix alone: attention is causal).

        A method with a contrast branch (DAMRO, VCD) gets its branch once, for the image (Method.branch on a call of
        one sample): the contrast prompt's prefix (the same text with DAMRO's k image tokens, or VCD's noised image)
        is prefilled once beside the full one (a batch of two prefixes, the shorter left-padded), and both branches
        of every question decode together, one forward per step. Where the branch changes more than the shared
        prefix (an image after the questions' common part, a family whose positions read the image grid) the
        questions run as one batch (generate_batch: both branches, no shared prefix)."""
        check_generation_args(max_new_tokens, temperature, top_p, seed)
        prompts = check_prompts(prompts)
        if not prompts:
            raise MinivarError("generate_many needs at least one prompt")
        if check_beam_args(num_beams, temperature) > 1:       # beams reorder rows: no shared prefix, one batch
            return self.generate_batch([image] * len(prompts), list(prompts), max_new_tokens=max_new_tokens,
                                       conv_mode=conv_mode, image_aspect_ratio=image_aspect_ratio, var=var,
                                       methods=methods, warn=warn, prompt_tokenization=prompt_tokenization,
                                       num_beams=num_beams)
        methods = with_methods(methods, var)
        branching = [m for m in methods if type(m).branch is not Method.branch]
        if len(branching) > 1:
            raise MinivarError(f"{' and '.join(m.name for m in branching)} each add a contrast branch; use one")
        for m in methods:
            m.check(self)
        im = self.image(image, image_aspect_ratio)
        rows = [self.prompt_ids(p, conv_mode, prompt_tokenization, im.num_tokens)[0].tolist() for p in prompts]
        shortest = min(len(r) for r in rows)
        P = 0                    # the shared prefix; every prompt keeps at least one token of its own (its logits)
        while P < shortest - 1 and all(r[P] == rows[0][P] for r in rows):
            P += 1
        B = len(rows)
        t0 = time.perf_counter()
        shared: dict = {}
        prefixes = [rows[0][:P]]                       # one prefix per branch (G of them), each shared by B rows
        prefix_features = None                         # the prefixes' image feature rows, in token order
        call_features = None
        if branching:
            contrast = self._contrast_prefix(branching[0], rows, P, im, max_new_tokens, warn, shared)
            if contrast is None:
                return self.generate_batch([image] * B, list(prompts), max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p, seed=seed, conv_mode=conv_mode,
                                           image_aspect_ratio=image_aspect_ratio, methods=methods, warn=warn,
                                           prompt_tokenization=prompt_tokenization)
            contrast_prefix, contrast_features, call_features = contrast
            features = call_features[0]
            prefixes.append(contrast_prefix)
            feats = [features] + ([contrast_features] if contrast_features is not None else [])
            prefix_features, rest = torch.cat(feats), None
        else:
            features = self.model.image_features([im])[0]                              # [N, D], once
        G = len(prefixes)
        in_prefix = int(self.model.image_positions(torch.tensor([rows[0][:P]], dtype=torch.long)).sum())
        if not branching:
            prefix_features = features[:in_prefix] if in_prefix else None
            rest = features[in_prefix:].repeat(B, 1) if in_prefix < features.shape[0] else None
        # [prefix (left-padded to the longest of the G)][padding][own tokens]: the own tokens end at T − 1 for every
        # row; rows branch-major (branch g: rows g·B … g·B + B − 1), as generate's branches
        prefix_ids, prefix_mask = left_pad(prefixes, self.pad_id, self.device)           # [G, Pm]
        Pm = prefix_ids.shape[1] if P else 0
        own, own_mask = left_pad([r[P:] for r in rows] * G, self.pad_id, self.device)    # [G·B, Q]
        Q = own.shape[1]
        T = Pm + Q
        input_ids = torch.cat([prefix_ids[:, :Pm].repeat_interleave(B, 0), own], 1)     # [G·B, T]
        attention_mask = None
        if own_mask is not None or (prefix_mask is not None and Pm):
            ones = torch.ones(G * B, T, dtype=torch.bool, device=self.device)
            attention_mask = ones
            if prefix_mask is not None and Pm:
                attention_mask[:, :Pm] = prefix_mask.repeat_interleave(B, 0)
            if own_mask is not None:
                attention_mask[:, Pm:] = own_mask
        max_new_tokens = min(max_new_tokens, self.config.text.max_position_embeddings - T)
        request = Request(input_ids, attention_mask, [im] * B, rows, max_new_tokens, branches=G, shared=shared)
        request.call = Call(self, input_ids, attention_mask, [im] * B, T + max_new_tokens, B, warn=warn,
                            shared=request.shared, features=call_features)
        self.add_hooks(request, methods=methods, warn=warn)
        # the prefixes' keys and values are stored once (a batch of G), each question's own positions per row
        prefix = new_cache(self.model, G, max(Pm, 1), self.device, self.dtype, values_transposed=False)
        own_cache = new_cache(self.model, G * B, Q + max_new_tokens, self.device, self.dtype, values_transposed=False)
        cache = SharedPrefixCache(prefix, Pm, own_cache, self.config.text)
        # a family whose positions read the image's grid (Qwen2-VL's M-RoPE) gets each prefix's image with the
        # features (a contrast prefix's is the noised image: the same grid)
        grids = [im] * G if in_prefix and hasattr(self.model, "positions") else None
        if Pm:
            prefill(self.model, prefix_ids, grids, image_features=prefix_features, cache=prefix,
                    attention_mask=prefix_mask, hooks=request.hooks)                       # batch G, once
        prefix_s = time.perf_counter() - t0
        gen = generate(self.model, input_ids[:, Pm:], None, image_features=rest, cache=cache, input_pos=Pm,
                       max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids, temperature=temperature,
                       top_p=top_p, seed=seed, attention_mask=attention_mask, hooks=request.hooks,
                       branches=G, choose=request.choose)
        gen.prefill_s += prefix_s           # vision tower + shared prefix + the questions' own tokens
        results = self._results(request, gen)
        total = time.perf_counter() - t0
        for r in results:
            r.timing.update(prefix_tokens=P, questions=B, total_s=total)
        return results

    def _contrast_prefix(self, method: Method, rows, P: int, im: ImageInput, max_new_tokens: int, warn, shared):
        """The contrast branch of generate_many's image, made once (`method.branch` on a call of one sample, the
        first question): (the contrast prompt's part before the questions' own tokens, its image feature rows,
        the full branch's image features), or None where the branch cannot share a prefix — the image is not all
        in the shared prefix, the contrast prompt differs after it, or the family's positions read the image grid
        (Qwen2-VL's M-RoPE takes each row's image)."""
        image_rows = self.model.image_positions(torch.tensor([rows[0]], dtype=torch.long))[0]
        if hasattr(self.model, "positions") or not P or bool(image_rows[P:].any()):
            return None
        call = Call(self, torch.tensor([rows[0]], dtype=torch.long, device=self.device), None, [im],
                    len(rows[0]) + max_new_tokens, 1, warn=warn, shared=shared)
        (branch,) = method.branch(call)
        ids, own = list(branch.input_ids), rows[0][P:]
        P2 = len(ids) - len(own)                        # the contrast prompt's prefix: all but the own tokens
        in_prefix = int(self.model.image_positions(torch.tensor([ids[:P2]], dtype=torch.long)).sum()) if P2 > 0 else 0
        n_features = 0 if branch.image_features is None else branch.image_features.shape[0]
        in_all = int(self.model.image_positions(torch.tensor([ids], dtype=torch.long)).sum())
        if P2 < 1 or ids[P2:] != own or in_prefix != n_features or in_prefix != in_all:
            return None
        return ids[:P2], branch.image_features, call.image_features()

    def _results(self, request: Request, gen: Generation) -> list[Result]:
        timing = {"load_s": self.load_s, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s,
                  "decode_tokens": gen.decode_tokens, "decode_tokens_per_s": gen.decode_tokens_per_s}
        results = []
        K = request.num_beams
        for b, ids in enumerate(gen.output_ids):
            # the generated rows this sample fed to the model: each emitted token, except the last one when the
            # sample stopped at max_new_tokens (rows of a sample that stopped before its batch are not counted)
            fed = len(ids) if gen.finished[b] else max(len(ids) - 1, 0)
            reports = {}
            for name, run in request.runs.items():
                # beam search: the sample's first row, and the row each token of its answer was fed in
                report = run.report(b * K, fed, rows=gen.rows[b]) if K > 1 else run.report(b, fed)
                if report is not None:
                    reports[name] = report
            # the methods' panels of the attention explorer, when a capture read the call (one sample)
            captured = request.call is not None and request.call.capture
            panels = {name: recs for name, run in request.runs.items()
                      if captured and (recs := getattr(run, "explorer", lambda b: None)(b))}
            extra = ({"explorer": panels} if panels else {}) | (
                {"num_beams": K, "sequence_score": gen.scores[b]} if K > 1 else {})
            results.append(Result(self.tokenizer.decode(ids), ids, request.prompt_ids[b], dict(timing),
                                  gen.finished[b], reports, extra))
        return results

    def capture(self, image, prompt: str, *, layers=(), heads=None, attention=("before", "after"),
                residuals: bool = False, head_stats: bool = False, rows: str = "all", decode: bool = False,
                mask: str | None = None, mask_random: int = 0, mask_seed: int = 0, max_new_tokens: int = 1,
                var=None, **generate_kwargs):
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


def check_num_beams(num_beams) -> int:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise MinivarError(f"`num_beams` must be an integer ≥ 1, got {num_beams!r}")
    return num_beams


def check_beam_args(num_beams, temperature: float, capture=None, mask=None) -> int:
    """The settings beam search refuses: sampling, and the inspection hooks (they record one row per sample)."""
    K = check_num_beams(num_beams)
    if K > 1 and temperature > 0:
        raise MinivarError(f"beam search is greedy: num_beams {K} needs temperature 0, got {temperature}")
    if K > 1 and (capture is not None or mask is not None):
        raise MinivarError("the pictures and key masking record one row per sample: run them without beam search "
                           "(num_beams 1)")
    return K


def check_tokenization(tokenization: str, conv_mode: str) -> None:
    """The one check of `prompt_tokenization` (official rebuilds VAR's released vicuna_v1 prompt; damro tokenizes
    LLaVA's LLaMA templates as DAMRO's released scripts' slow tokenizer does)."""
    if tokenization not in processing.PROMPT_TOKENIZATIONS:
        raise MinivarError(f"`prompt_tokenization` must be {', '.join(processing.PROMPT_TOKENIZATIONS[:-1])} or "
                           f"{processing.PROMPT_TOKENIZATIONS[-1]}, got {tokenization!r}")
    if tokenization == "official" and conv_mode != "vicuna_v1":
        raise MinivarError("`prompt_tokenization` official rebuilds the released code's vicuna_v1 prompt; "
                           f"it needs --conv-mode vicuna_v1, got {conv_mode}")
    if tokenization == "damro" and conv_mode not in processing.DAMRO_TEMPLATES:
        raise MinivarError(f"`prompt_tokenization` damro tokenizes LLaVA's LLaMA templates "
                           f"({', '.join(processing.DAMRO_TEMPLATES)}; DAMRO's scripts use llava_v1), not {conv_mode}")


def load(model: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str | torch.dtype = "auto",
         weights_dir: str | Path | None = None, image_options: dict | None = None,
         contrastive: bool = False) -> Pipeline:
    """Resolve (and if needed download) a checkpoint, load it strictly, and return a ready Pipeline.
    image_options: the family's image settings to override (Qwen2-VL: min_pixels, max_pixels); None values keep
    the checkpoint's. contrastive: the pipeline will mostly run DAMRO or VCD (two rows per decode step): on a CPU
    in bf16 the decoder's weights are then packed as well (models/packed.py) — the same answers, faster for
    those runs, slower for plain single prompts."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    directory = checkpoint.resolve(model, Path(weights_dir) if weights_dir else None)
    t0 = time.perf_counter()
    cfg = checkpoint.read_config(directory)
    options = {k: v for k, v in (image_options or {}).items() if v is not None}
    if options:
        cfg = family_of(cfg).with_image_options(cfg, **options)
    tokenizer = family_of(cfg).make_tokenizer(directory, cfg)             # its tokenizer.json
    net = checkpoint.load_model(directory, dt, dev, cfg, pack_decoder=contrastive)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return Pipeline(net, tokenizer, directory, dev, dt, time.perf_counter() - t0)
