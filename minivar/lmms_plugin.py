"""minivar as an lmms-eval model, so lmms-eval's benchmarks (GQA, VizWiz, TextVQA, MME, MMBench, SEED, MM-Vet, ...)
run on minivar, with or without VAR:

    python -m lmms_eval --model minivar --model_args pretrained=llava-hf/llava-1.5-7b-hf,var=true,var_preset=general \
        --tasks gqa --batch_size 8 --log_samples --output_path out/

lmms-eval (0.7.3) finds plugin models through the Python entry-point group `lmms_eval.models`: minivar's package
metadata declares `minivar = "minivar.lmms_plugin:manifest"` there, and lmms-eval calls `manifest()` for the
ModelManifest that points at the `Minivar` class below. No fork of lmms-eval, no environment variable.

What the model does with each request (the LLaVA-1.5 evaluation protocol unless a model arg says otherwise; other
families get their own template and image mode by default, `conv_mode` / `image_aspect_ratio` unset — Qwen2-VL /
Qwen2.5-VL: `qwen`, `smart_resize`; LLaVA-NeXT: `vicuna_v1` (Mistral: `mistral_instruct`), `anyres`; these two
give each image its own token count):
  * prompt: the task's context as the user turn of the `vicuna_v1` template, image first
    ("{system} USER: <image>\\n{context} ASSISTANT:"); `<image>` placeholders inside the context are removed, since
    LLaVA-1.5 takes one image and minivar always puts it first (as LLaVA's own evaluation scripts do);
  * image: exactly one per request, padded to a square (`image_aspect_ratio=pad`); a request with no image or with
    several (text-only questions, multi-image or video tasks) is refused with a MinivarError naming task and doc;
  * generation (generate_until), from the task's generation_kwargs:
      - greedy unless `do_sample` is true (without `do_sample`, temperature > 0 samples, as in LLaVA's scripts);
        sampling uses `temperature` (default 1.0) and `top_p` (default 1.0), seeded by `seed` if given;
      - `max_new_tokens`: the task's, else the model arg `max_new_tokens` (default 128, LLaVA's);
      - it always stops at EOS (or after max_new_tokens). `until`: by default *not* applied, like LLaVA's own
        evaluation and lmms-eval's llava / llava_hf models — lmms-eval gives every task that names no stop string
        until=["\\n\\n"], which would cut MM-Vet's multi-paragraph answers. With the model arg `apply_until=true`,
        the text is cut before the first occurrence of any `until` string (the same text stopping there would give,
        since decoding is left to right);
      - `num_beams` K > 1: beam search as transformers' generate(num_beams=K) (greedy only); with the model arg
        `opera=true` (and opera_scale, opera_threshold, opera_candidates, opera_penalty, opera_rule, and
        `num_beams`, default 5: the command line's --opera flags) OPERA's beam search of that width answers, and a
        task's num_beams must be 1 or the same;
      - `top_k` / `repetition_penalty` other than off are refused; a task's
        `image_aspect_ratio` is ignored (the model arg decides); any other key is refused;
      - the answer is decoded without special tokens and stripped, as LLaVA's model_vqa_loader does;
  * loglikelihood: (context, continuation) → (−Σ log p(continuation tokens | prompt, image), whether greedy
    decoding would give exactly those tokens), from one forward pass over prompt + continuation. The first number
    is the continuation's negative log-likelihood, a loss, not the log-likelihood lmms-eval's docstring asks for:
    lmms-eval 0.7.3's own models return a loss and its multiple_choice scoring picks the choice with the *smallest*
    value (np.argmin), so a log-likelihood would pick the least likely choice. With the summed loss, `acc` is
    lm-evaluation-harness's (most likely choice) and `acc_norm` divides by the choice's length in characters.
    The continuation is tokenized as part of the whole text after "ASSISTANT:" (" yes" becomes "▁yes");
  * VAR: `var=true` applies Visual Attention Redistribution to both; `var_preset=general|hallucination|vision` sets ρ
    (0.8 / 0.5 / 0.9), and every VARConfig field can be set by name: `tau`, `rho`, `p`, `min_image_attention`,
    `sink_dims` (`[1415,2533]`, `1415;2533` or `auto`), `layers` (`[0,1,2]` or `0;1;2`), and any field VARConfig
    gains later. VAR args without var=true are an error;
  * DAMRO, VCD, PAI: `damro=true`, `vcd=true`, `pai=true` with their command-line settings by name (`pai_alpha`,
    `pai_layers` as `2-32`, `pai_gamma`, `pai_first_token`; docs/pai.md); generation only;
  * prompt ids: `prompt_tokenization=llava` (default), `official` (VAR's released code; vicuna_v1) or `damro`
    (DAMRO's released scripts: their slow tokenizer; LLaVA's LLaMA templates), as `--prompt-tokenization`;
  * batching: `--batch_size N` runs N requests with the same generation settings together (left-padded, each with
    its own VAR state; greedy answers equal those run one by one). One process: no multi-GPU data parallelism.
"""
from __future__ import annotations

import dataclasses
import re
import sys

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from .defaults import DEFAULT_MODEL
from .errors import MinivarError

MODEL_ID = "minivar"
DEFAULT_MAX_NEW_TOKENS = 128            # LLaVA-1.5's model_vqa_loader default, used by the VAR paper
IGNORED_GEN_KWARGS = {"image_aspect_ratio", "use_cache", "skip_special_tokens"}


def manifest():
    """The entry point lmms-eval calls (group `lmms_eval.models`): register `--model minivar`."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_ID, simple_class_path="minivar.lmms_plugin.Minivar")


# ---------------------------------------------------------------------------------------------------------------
# Model args → settings (plain functions: testable without a model)

def _int_list(name: str, value) -> tuple[int, ...] | str:
    """`[1,2]`, `1;2`, `1 2` or a single number (lmms-eval has already turned "7" into 7) → (1, 2)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MinivarError(f"--model_args {name}={value!r} is not a list of integers like [1415,2533] or 1415;2533")
    text = str(value).strip().strip("[]()")
    if name == "sink_dims" and text == "auto":
        return "auto"
    parts = [x for x in re.split(r"[,;\s]+", text) if x]
    if not parts or not all(re.fullmatch(r"\d+", x) for x in parts):
        raise MinivarError(f"--model_args {name}={value!r} is not a list of integers like [1415,2533] or 1415;2533")
    return tuple(sorted({int(x) for x in parts}))


# model arg → the option name the command line's flag has (flags.py); both spellings are accepted
MODEL_ARG_OPTIONS = {"rule": "var_rule", "heads": "var_heads", "layers": "var_layers"}


def var_config(var=False, var_preset=None, **fields):
    """The VARConfig the model args ask for, or None without var=true. `fields` are VARConfig fields by name (or the
    command line's option names: var_rule, var_heads, var_layers); the translation is the command line's."""
    from .flags import VAR_OPTIONS, methods_from_options, var_of
    from .methods.var import VARConfig
    known = {f.name for f in dataclasses.fields(VARConfig)} | set(MODEL_ARG_OPTIONS.values())
    unknown = sorted(set(fields) - known)
    if unknown:
        raise MinivarError(f"--model_args {unknown[0]}: not a minivar model arg or VAR setting "
                           f"(VAR settings: {', '.join(sorted(known))})")
    if not isinstance(var, bool):
        raise MinivarError(f"--model_args var={var!r} must be true or false")
    opts = {"var": var, "var_preset": var_preset}
    for name, value in fields.items():
        name = MODEL_ARG_OPTIONS.get(name, name)
        if name in ("sink_dims", "var_layers") and value is not None:
            value = _int_list(name, value) if not (name == "var_layers" and _is_range(value)) else str(value)
        if name == "find_sink_dims":             # find_sink_dims=true is --sink-dims auto
            name, value = "sink_dims", ("auto" if value else None)
        opts[name] = value
    if not var:
        stray = [k for k in VAR_OPTIONS if opts.get(k) is not None]
        if stray:
            raise MinivarError(f"--model_args {stray[0]} only applies with var=true")
        return None
    methods, _ = methods_from_options(opts, spell=lambda k: f"--model_args {k}")
    return var_of(methods)


def _is_range(value) -> bool:
    """The command line's layer syntax, A-B (or one layer)."""
    return isinstance(value, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", value) is not None


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """One request's generation settings, resolved from the task's generation_kwargs (requests with equal settings
    are batched together)."""
    max_new_tokens: int
    temperature: float                  # 0: greedy
    top_p: float
    seed: int | None
    until: tuple[str, ...]              # cut the text at these (only with apply_until=true)
    num_beams: int = 1                  # > 1: beam search


def gen_settings(gen_kwargs: dict | None, task: str, default_max_new_tokens: int, apply_until: bool) -> GenSettings:
    """Read lmms-eval generation_kwargs the way the module docstring says; refuse what minivar cannot honour."""
    kw = dict(gen_kwargs or {})
    for key in IGNORED_GEN_KWARGS:
        kw.pop(key, None)
    until = kw.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    if not all(isinstance(u, str) for u in until):
        raise MinivarError(f"task {task}: generation_kwargs until={until!r} must be a string or a list of strings")
    num_beams = kw.pop("num_beams", None)
    num_beams = 1 if num_beams is None else num_beams
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise MinivarError(f"task {task}: num_beams={num_beams!r} must be a whole number ≥ 1")
    top_k = kw.pop("top_k", None)
    if top_k not in (None, 0):
        raise MinivarError(f"task {task}: top_k={top_k} is not supported (minivar samples with temperature and top_p)")
    penalty = kw.pop("repetition_penalty", None)
    if penalty not in (None, 1, 1.0):
        raise MinivarError(f"task {task}: repetition_penalty={penalty} is not supported by minivar")
    temperature = kw.pop("temperature", None)
    temperature = 0.0 if temperature is None else float(temperature)
    do_sample = kw.pop("do_sample", None)
    # transformers' rule when do_sample is given (False: greedy whatever the temperature); LLaVA's when it is not
    sample = bool(do_sample) if do_sample is not None else temperature > 0
    if sample and temperature <= 0:
        temperature = 1.0               # do_sample=true without a temperature: transformers' default
    top_p = kw.pop("top_p", None)
    max_new_tokens = kw.pop("max_new_tokens", None)
    seed = kw.pop("seed", None)
    if kw:
        raise MinivarError(f"task {task}: generation_kwargs {sorted(kw)[0]}={kw[sorted(kw)[0]]!r} is not supported by "
                           f"minivar's lmms-eval model")
    return GenSettings(max_new_tokens=int(default_max_new_tokens if max_new_tokens is None else max_new_tokens),
                       temperature=temperature if sample else 0.0,
                       top_p=1.0 if (top_p is None or not sample) else float(top_p),
                       seed=None if seed is None else int(seed),
                       until=tuple(u for u in until if u) if apply_until else (), num_beams=num_beams)


def cut_at_until(text: str, until) -> str:
    """The text before the first occurrence of any stop string."""
    end = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=len(text))
    return text[:end]


def user_text(context: str) -> str:
    """The task's context as minivar's user text: LLaVA-1.5 takes one image, always first, so `<image>`
    placeholders in the context (with the newline after one) are removed."""
    return re.sub(r"<image>\n?", "", context)


def batches(keys: list, sizes: list[int], batch_size: int) -> list[list[int]]:
    """Request indices in batches of at most batch_size, each batch one key (equal settings), longest prompts
    first (a batch pads to its longest prompt; similar lengths waste least)."""
    order = sorted(range(len(keys)), key=lambda i: -sizes[i])
    groups: dict = {}
    for i in order:
        groups.setdefault(keys[i], []).append(i)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


class ContinuationEncoder:
    """(user text, continuation) → (prompt ids with the image expanded, continuation ids) for loglikelihood.

    The continuation's ids are those the tokenizer gives the prompt's text after the image *followed by* the
    continuation, past the prompt's own ids: a continuation is tokenized as in running text (" yes" after
    "ASSISTANT:" is "▁yes"), as lm-evaluation-harness does it — under `tokenization` "damro" by the released
    scripts' slow tokenizer (the text after the image is a piece after a special token), under "official" as part
    of the released VAR code's last segment ("ASSISTANT:" + continuation, every lone "▁" dropped).
    """

    def __init__(self, tokenizer, conv_mode: str, num_image_tokens: int | None = None, tokenization: str = "llava",
                 image_token_id: int | None = None):
        """num_image_tokens: the family's fixed count (LLaVA-1.5's 576); None where each image has its own (Qwen2-VL:
        give it per call)."""
        from tokenizers import Tokenizer
        self.tokenizer, self.conv_mode, self.num_image_tokens = tokenizer, conv_mode, num_image_tokens
        self.tokenization = tokenization
        self.image_token_id = tokenizer.image_token_id if image_token_id is None else image_token_id
        # our own handle on the same tokenizer.json, set up as minivar's Tokenizer sets up its own
        self.raw = Tokenizer.from_file(str(tokenizer.path))
        self.raw.encode_special_tokens = True

    def prompt(self, text: str, n: int) -> list[int]:
        from . import processing
        if self.tokenization == "damro":
            return processing.damro_prompt_ids(self.tokenizer, text, self.conv_mode, n, self.image_token_id)
        if self.tokenization == "official":
            return processing.official_prompt_ids(self.tokenizer, text, n, self.image_token_id)
        return self.tokenizer.encode_prompt(text, self.conv_mode, n)

    def running_text(self, text: str, continuation: str = "") -> list[int]:
        """The ids of the prompt's end followed by the continuation, as this tokenization tokenizes them."""
        from . import processing
        if self.tokenization == "official":
            role_1 = processing.official_segments(text)[-1][1]
            specials = processing.special_tokens(self.tokenizer, processing.SENTENCEPIECE_SPECIALS)
            return [t for t in processing.slow_llama_ids(self.tokenizer, role_1 + continuation, specials)
                    if t != processing.SPACE_ID]              # the system segment's "▁" came first
        if hasattr(self.tokenizer, "prompt_tail"):      # a template with special tokens after the image (Qwen2-VL)
            after = self.tokenizer.prompt_tail(text, self.conv_mode)
        else:
            after = processing.build_prompt(text, self.conv_mode).split(processing.IMAGE_PLACEHOLDER, 1)[1]
        if self.tokenization == "damro":                # the text after the image, a piece after a special token
            image = processing.IMAGE_PLACEHOLDER
            return processing.slow_llama_ids(self.tokenizer, image + after + continuation,
                                             processing.special_tokens(self.tokenizer))[1:]
        return self.raw.encode(after + continuation, add_special_tokens=False).ids

    def __call__(self, text: str, continuation: str,
                 num_image_tokens: int | None = None) -> tuple[list[int], list[int]]:
        if not continuation:
            raise MinivarError("loglikelihood with an empty continuation")
        n = self.num_image_tokens if num_image_tokens is None else num_image_tokens
        prompt = self.prompt(text, n)
        tail, whole = self.running_text(text), self.running_text(text, continuation)
        if prompt[len(prompt) - len(tail):] != tail or whole[:len(tail)] != tail or len(whole) == len(tail):
            raise MinivarError(f"continuation {continuation!r} does not tokenize apart from its prompt")
        return prompt, whole[len(tail):]


# ---------------------------------------------------------------------------------------------------------------
# The model

class Minivar(lmms):
    """lmms-eval "simple" model: minivar's LLaVA-1.5 pipeline, optionally with VAR (see the module docstring)."""
    is_simple = True

    def __init__(self, pretrained: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
                 weights_dir: str | None = None, batch_size=1, max_batch_size=None, conv_mode: str | None = None,
                 image_aspect_ratio: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 apply_until: bool = False, var: bool = False, var_preset: str | None = None,
                 prompt_tokenization: str = "llava", **var_fields) -> None:
        super().__init__()
        try:
            self._setup(pretrained, device, dtype, weights_dir, batch_size, conv_mode, image_aspect_ratio,
                        max_new_tokens, apply_until, var, var_preset, prompt_tokenization, var_fields)
        except MinivarError as e:
            # lmms-eval 0.7.3 catches this, prints its traceback and exits with code 0: one line of our own first,
            # in the command lines' form, says what was refused (docs/lmms-eval.md: how a script detects it)
            print(f"minivar: error: {e}", file=sys.stderr, flush=True)
            raise

    def _setup(self, pretrained, device, dtype, weights_dir, batch_size, conv_mode, image_aspect_ratio,
               max_new_tokens, apply_until, var, var_preset, prompt_tokenization, var_fields) -> None:
        from .flags import CONV_MODES, IMAGE_MODES, PROMPT_TOKENIZATIONS
        from .pipeline import check_tokenization, load
        # everything checkable before the (slow) load is checked first (None: the model family's own, after it)
        if conv_mode is not None and conv_mode not in CONV_MODES:
            raise MinivarError(f"--model_args conv_mode={conv_mode!r} is not one of {', '.join(CONV_MODES)}")
        if image_aspect_ratio is not None and image_aspect_ratio not in IMAGE_MODES:
            raise MinivarError(f"--model_args image_aspect_ratio={image_aspect_ratio!r} is not one of "
                               f"{', '.join(IMAGE_MODES)}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise MinivarError(f"--batch_size {batch_size!r}: minivar needs a whole number ≥ 1 (no 'auto')")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise MinivarError(f"--model_args max_new_tokens={max_new_tokens!r} must be a whole number ≥ 1")
        if not isinstance(apply_until, bool):
            raise MinivarError(f"--model_args apply_until={apply_until!r} must be true or false")
        if prompt_tokenization not in PROMPT_TOKENIZATIONS:
            raise MinivarError(f"--model_args prompt_tokenization={prompt_tokenization!r} is not one of "
                               f"{', '.join(PROMPT_TOKENIZATIONS)}")
        self.prompt_tokenization = prompt_tokenization
        from .flags import (DAMRO_OPTIONS, OPERA_OPTIONS, PAI_OPTIONS, VCD_OPTIONS, contrastive_load,
                            contrastive_methods, num_beams_of, opera_methods)
        contrastive = {k: var_fields.pop(k) for k in list(var_fields)
                       if k in DAMRO_OPTIONS + VCD_OPTIONS + PAI_OPTIONS + ("seed",)}
        opera = {k: var_fields.pop(k) for k in list(var_fields) if k in OPERA_OPTIONS + ("num_beams",)}
        self.var = var_config(var, var_preset, **var_fields)
        # DAMRO / VCD / PAI (damro=true damro_preset=pope ..., vcd=true ..., pai=true pai_gamma=1.1 ...) and OPERA
        # (opera=true ...): the command line's translation
        spell = lambda k: f"--model_args {k}"        # noqa: E731
        self.methods = contrastive_methods(contrastive, spell=spell) + opera_methods(opera | contrastive, spell)
        self.num_beams = num_beams_of(opera, spell)       # 1, or OPERA's width (a task's num_beams when 1)
        self.max_new_tokens, self.apply_until = max_new_tokens, apply_until
        self.batch_size_per_gpu = int(batch_size)      # max_batch_size is only for batch_size=auto: unused
        self.pipeline = load(str(pretrained), device=str(device), dtype=str(dtype), weights_dir=weights_dir,
                             contrastive=contrastive_load(self.methods))
        cfg, family = self.pipeline.config, self.pipeline.family
        # the family's own template and image mode unless given (LLaVA-1.5: vicuna_v1, pad; Qwen2-VL: qwen,
        # smart_resize), and a given one must be the family's
        self.conv_mode = conv_mode or family.conv_mode_for(cfg)
        self.image_aspect_ratio = image_aspect_ratio or family.default_image_mode
        for name, value, allowed in (("conv_mode", self.conv_mode, family.conv_modes),
                                     ("image_aspect_ratio", self.image_aspect_ratio, family.image_modes)):
            if value not in allowed:
                raise MinivarError(f"--model_args {name}={value!r} is not one of {family.name}'s "
                                   f"({', '.join(allowed)})")
        try:
            check_tokenization(prompt_tokenization, self.conv_mode)
        except MinivarError as e:
            raise MinivarError(f"--model_args prompt_tokenization={prompt_tokenization}: "
                               f"{str(e).replace('`prompt_tokenization` ', '')}") from None
        if self.var is not None:
            self.var.validate(cfg.text.hidden_size, cfg.text.num_hidden_layers)
        # a fixed image token count where the family has one; loglikelihood gives each image's own
        try:
            fixed = getattr(cfg, "num_image_tokens", None)
        except MinivarError:          # LLaVA-NeXT's config refuses the question: its count depends on the image
            fixed = None
        self.encode_pair = ContinuationEncoder(self.pipeline.tokenizer, self.conv_mode, fixed, prompt_tokenization,
                                               cfg.image_token_index)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- the calls into the pipeline (the only two: a shared-prefix path can replace them) ----------------------
    def _generate(self, images, prompts, s: GenSettings):
        """Questions of the batch about the same picture (equal pixels) share its image prefix (generate_many:
        vision tower and prefix once); the others run as one left-padded batch (generate_batch)."""
        import hashlib
        num_beams = s.num_beams
        if self.num_beams > 1:        # the model args' beam search (OPERA's)
            if num_beams not in (1, self.num_beams):
                raise MinivarError(f"a task asks for num_beams={num_beams}, the model args give "
                                   f"{self.num_beams} beams (--model_args num_beams, or OPERA's default 5)")
            num_beams = self.num_beams
        kwargs = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                      conv_mode=self.conv_mode, image_aspect_ratio=self.image_aspect_ratio, var=self.var,
                      methods=self.methods, prompt_tokenization=self.prompt_tokenization,
                      num_beams=num_beams)
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault((img.size, img.mode, hashlib.sha1(img.tobytes()).hexdigest()), []).append(i)
        out = [None] * len(images)
        singles = [ix[0] for ix in groups.values() if len(ix) == 1]
        if singles:
            done = self.pipeline.generate_batch([images[i] for i in singles], [prompts[i] for i in singles], **kwargs)
            for i, r in zip(singles, done):
                out[i] = r
        for ix in (ix for ix in groups.values() if len(ix) > 1):
            for i, r in zip(ix, self.pipeline.generate_many(images[ix[0]], [prompts[i] for i in ix], **kwargs)):
                out[i] = r
        return out

    def _logits(self, rows: list[list[int]], images) -> torch.Tensor:
        """Logits [B, T, V] (fp32) of left-padded id rows, one image each."""
        from .pipeline import left_pad
        ids, mask = left_pad(rows, self.pipeline.pad_id, "cpu")
        # ImageInputs, not stacked pixels: images of different sizes (Qwen2-VL) each keep their own grid
        return self.pipeline.logits(ids, list(images), attention_mask=mask, var=self.var)

    # -- request plumbing ---------------------------------------------------------------------------------------
    def _image(self, doc_to_visual, doc_id, task, split):
        """The request's one PIL image (LLaVA-1.5 takes exactly one)."""
        from PIL import Image
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            kinds = ", ".join(type(v).__name__ for v in visuals) or "none"
            raise MinivarError(f"task {task}, doc {doc_id}: minivar's LLaVA-1.5 takes exactly one image per question, "
                               f"got {len(visuals)} visual(s) ({kinds})")
        return visuals[0]

    def _progress(self, total: int, what: str):
        from tqdm import tqdm
        return tqdm(total=total, desc=f"minivar {what}", disable=self.rank != 0)

    def generate_until(self, requests) -> list:
        jobs = []                                     # (user text, image, settings) per request
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            jobs.append((user_text(context), self._image(doc_to_visual, doc_id, task, split),
                         gen_settings(gen_kwargs, task, self.max_new_tokens, self.apply_until)))
        out = [None] * len(jobs)
        bar = self._progress(len(jobs), "generate_until")
        for batch in batches([j[2] for j in jobs], [len(j[0]) for j in jobs], self.batch_size):
            settings = jobs[batch[0]][2]
            results = self._generate([jobs[i][1] for i in batch], [jobs[i][0] for i in batch], settings)
            for i, r in zip(batch, results):
                text = cut_at_until(r.text, settings.until).strip()
                out[i] = GenerationResult(text, TokenCounts(input_tokens=len(r.prompt_ids),
                                                            output_tokens=len(r.output_ids)))
                self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
            bar.update(len(batch))
        bar.close()
        return out

    def loglikelihood(self, requests) -> list:
        if self.methods:          # DAMRO / VCD change how a token is chosen, not a continuation's likelihood
            raise MinivarError(f"{' and '.join(m.name.upper() for m in self.methods)} act on generation only: "
                               f"this task's loglikelihood requests would be scored without them; drop "
                               f"{', '.join(m.name + '=true' for m in self.methods)} for it")
        jobs = []                                     # (prompt ids, continuation ids, image) per request
        for req in requests:
            if len(req.args) != 6:
                raise MinivarError(f"task {req.task_name}: this loglikelihood request carries no image "
                                   f"(acc_mutual_info?): not supported by minivar")
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            if not isinstance(continuation, str):
                raise MinivarError(f"task {task}, doc {doc_id}: loglikelihood target {continuation!r} is not a string")
            image = self.pipeline.image(self._image(doc_to_visual, doc_id, task, split), self.image_aspect_ratio)
            prompt, cont = self.encode_pair(user_text(context), continuation, image.num_tokens)   # its own count
            limit = self.pipeline.config.text.max_position_embeddings
            if len(prompt) + len(cont) > limit:
                raise MinivarError(f"task {task}, doc {doc_id}: prompt + continuation are {len(prompt) + len(cont)} "
                                   f"tokens, over the model's context of {limit}")
            jobs.append((prompt, cont, image))
        out = [None] * len(jobs)
        bar = self._progress(len(jobs), "loglikelihood")
        for batch in batches([0] * len(jobs), [len(p) + len(c) for p, c, _ in jobs], self.batch_size):
            rows = [jobs[i][0] + jobs[i][1] for i in batch]
            logits = self._logits(rows, [jobs[i][2] for i in batch])
            T = logits.shape[1]
            for b, i in enumerate(batch):
                n = len(jobs[i][1])
                cont = torch.tensor(jobs[i][1], device=logits.device)
                # rows are left-padded: the continuation is the last n tokens, predicted by the n positions before
                logp = torch.log_softmax(logits[b, T - n - 1:T - 1], dim=-1)
                pair = (-float(logp.gather(-1, cont[:, None]).sum()), bool((logp.argmax(-1) == cont).all()))
                self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], pair)
                # lmms-eval 0.7.3's evaluator turns any response but a str or a GenerationResult into its str()
                # (api/instance.py, unwrap_generation_output), so a bare tuple would reach the task's scorer as the
                # text "(2.3, False)"; inside a GenerationResult the pair reaches it as a pair.
                out[i] = GenerationResult(pair, TokenCounts(input_tokens=len(jobs[i][0]) + len(jobs[i][1])))
            bar.update(len(batch))
        bar.close()
        return out

    def generate_until_multi_round(self, requests):
        raise MinivarError("multi-round generation (generate_until_multi_round) is not supported by minivar")
