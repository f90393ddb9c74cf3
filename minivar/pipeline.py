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
from . import var as var_mod
from .errors import MinivarError
from .generate import Generation, generate

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MinivarError(f"--device '{device}' is not one of auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MinivarError(f"--device {device} was asked for but this torch has no usable CUDA device")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # fp16 is the checkpoint's own dtype and fast on GPUs; on CPUs bf16 is fast (AVX-512 BF16/AMX) and does not
        # overflow, and a 7B in fp32 would need 28 GB.
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if dtype not in DTYPES:
        raise MinivarError(f"--dtype '{dtype}' is not one of auto, {', '.join(DTYPES)}")
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
        raise MinivarError(f"--max-new-tokens must be ≥ 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise MinivarError(f"--top-p must be in (0, 1], got {top_p}")
    if not temperature >= 0:   # also catches nan
        raise MinivarError(f"--temperature must be ≥ 0, got {temperature}")


class Pipeline:
    """A loaded LLaVA model with its tokenizer and preprocessing."""

    def __init__(self, model, tokenizer: processing.Tokenizer, directory: Path, device: torch.device, dtype: torch.dtype,
                 load_s: float):
        self.model, self.tokenizer, self.directory = model, tokenizer, directory
        self.config = model.config
        self.device, self.dtype, self.load_s = device, dtype, load_s
        self._dims: dict = {}            # sink dims found for this model, by request kind ("default" / "auto")
        self._dims_source = None

    # -- inputs --------------------------------------------------------------------------------------------------
    def pixels(self, image, image_aspect_ratio: str = "pad") -> torch.Tensor:
        """Image path or PIL image → pixel_values [1, 3, S, S] on the model's device, in the model's dtype."""
        img = processing.load_image(image) if isinstance(image, (str, Path)) else image   # preprocess makes it RGB
        px = processing.preprocess(img, self.config.vision.image_size, image_aspect_ratio)
        return px[None].to(self.device, self.dtype)

    def prompt_ids(self, prompt: str, conv_mode: str = "vicuna_v1") -> torch.Tensor:
        """User text → the full templated prompt ids [1, T] with the image placeholder expanded."""
        ids = self.tokenizer.encode_prompt(prompt, conv_mode, self.config.num_image_tokens)
        limit = self.config.text.max_position_embeddings
        if len(ids) >= limit:
            raise MinivarError(f"the prompt is {len(ids)} tokens (incl. {self.config.num_image_tokens} image tokens), "
                               f"over the model's context of {limit} (max_position_embeddings)")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    # -- outputs -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *, attention_mask=None,
               var: var_mod.VARConfig | None = None, probe=None) -> torch.Tensor:
        """Logits [B, T, V] (fp32) for whole sequences, no cache; attention_mask [B, T] is 0 on left padding;
        var: a VARConfig (a fresh VAR state is made for these ids)."""
        input_ids = input_ids.to(self.device)
        px = pixel_values.to(self.device, self.dtype) if pixel_values is not None else None
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        state = self.var_state(var, input_ids, mask) if var is not None else None
        return self.model(input_ids, px, attention_mask=mask, var=state, probe=probe)

    def generate(self, image, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, conv_mode: str = "vicuna_v1", image_aspect_ratio: str = "pad",
                 var: var_mod.VARConfig | None = None, probe=None, on_text=None) -> Result:
        """Answer `prompt` about `image` (a path or PIL image). on_text(str) receives the text as it is generated.

        var: a VARConfig to apply Visual Attention Redistribution (None: plain LLaVA).
        probe: a per-call probe (e.g. probe.Capture) passed down to every layer; bound here to this prompt.
        """
        return self.generate_batch([image], [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed, conv_mode=conv_mode, image_aspect_ratio=image_aspect_ratio,
                                   var=var, probe=probe, on_text=on_text)[0]

    def generate_batch(self, images, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None, conv_mode: str = "vicuna_v1",
                       image_aspect_ratio: str = "pad", var: var_mod.VARConfig | None = None, probe=None,
                       on_text=None) -> list[Result]:
        """Several (image, prompt) pairs in one batch: prompts left-padded to a common length, each sample with its
        own VAR state (sinks, image span, counters). Greedy results equal running them one by one."""
        if len(images) != len(prompts) or not prompts:
            raise MinivarError(f"generate_batch needs as many images as prompts (got {len(images)} and {len(prompts)})")
        check_generation_args(max_new_tokens, temperature, top_p)
        if probe is not None and len(prompts) > 1:
            raise MinivarError("a probe captures one sample: run it with a single prompt")
        rows = [self.prompt_ids(p, conv_mode)[0] for p in prompts]
        T = max(len(r) for r in rows)
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros(len(rows), T, dtype=torch.bool, device=self.device)
        for b, r in enumerate(rows):                 # left padding keeps every prompt's last token at position T-1
            input_ids[b, T - len(r):] = r
            attention_mask[b, T - len(r):] = True
        pixel_values = torch.cat([self.pixels(img, image_aspect_ratio) for img in images])
        # never run past the context the model was trained for
        max_new_tokens = min(max_new_tokens, self.config.text.max_position_embeddings - T)
        var_state = self.var_state(var, input_ids, attention_mask) if var is not None else None
        self.bind_probe(probe, input_ids, var)
        stream = self.tokenizer.decode_token_stream() if on_text is not None and len(rows) == 1 else None

        def on_token(ids):
            if stream is not None and ids[0] is not None:
                piece = stream.push(ids[0])
                if piece:
                    on_text(piece)

        gen: Generation = generate(self.model, input_ids, pixel_values, max_new_tokens=max_new_tokens,
                                   eos_token_id=self.tokenizer.eos_id, temperature=temperature, top_p=top_p, seed=seed,
                                   attention_mask=None if bool(attention_mask.all()) else attention_mask,
                                   var=var_state, probe=probe, on_token=on_token)
        if stream is not None:
            tail = stream.flush()        # bytes held back in case a multi-byte character was still incomplete
            if tail:
                on_text(tail)
        timing = {"load_s": self.load_s, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s,
                  "decode_tokens": gen.decode_tokens, "decode_tokens_per_s": gen.decode_tokens_per_s}
        results = []
        for b, ids in enumerate(gen.output_ids):
            report = var_state.report(b) | {"sink_dims_source": self._dims_source} if var_state is not None else None
            results.append(Result(self.tokenizer.decode(ids), ids, rows[b].tolist(), dict(timing), gen.finished[b],
                                  report))
        return results

    def capture(self, image, prompt: str, *, layers=(), heads=None, attention=("before", "after"),
                residuals: bool = False, head_stats: bool = False, rows: str = "all", decode: bool = False,
                mask: str | None = None, mask_random: int = 0, mask_seed: int = 0, max_new_tokens: int = 1,
                var: var_mod.VARConfig | None = None, **generate_kwargs):
        """Run `prompt` on `image` and return a probe.Capture holding only what was asked for (see probe.py):
        attention probabilities before/after VAR of `layers` × `heads` for `rows`, residual inputs, the sink sets
        of every layer (always); `.result` is the generation Result. Nothing is attached to the model.

            cap = llava.capture("cat.jpg", "What is this?", layers=[10, 11], heads=[0, 5], var=VARConfig())
            cap.attention_probs[10]["after"]     # fp32 [1, 2, T, T]
        """
        from .probe import Capture
        probe = Capture(layers, heads, attention=attention, residuals=residuals, head_stats=head_stats, rows=rows,
                        decode=decode, mask=mask, mask_random=mask_random, mask_seed=mask_seed)
        probe.result = self.generate(image, prompt, max_new_tokens=max_new_tokens, var=var, probe=probe,
                                     **generate_kwargs)
        return probe

    def bind_probe(self, probe, input_ids: torch.Tensor, var: var_mod.VARConfig | None = None, warn=None) -> None:
        """Tell a probe with a bind() method where the image tokens are, and the sink dims / τ VAR uses (resolved
        as for VAR, with VAR's defaults when var is None)."""
        if probe is None or not hasattr(probe, "bind"):
            return
        cfg = var if var is not None else var_mod.VARConfig()
        dims = self.sink_dims(cfg, input_ids, warn) if probe.needs_sink_dims else None
        t = self.config.text
        probe.bind(input_ids == self.config.image_token_index, n_layers=t.num_hidden_layers,
                   n_heads=t.num_attention_heads, sink_dims=dims, tau=cfg.tau)

    def sink_dims(self, var: var_mod.VARConfig, input_ids: torch.Tensor, warn=None) -> tuple[int, ...]:
        """The sink dims VAR uses: the user's, the known ones of LLaVA-1.5-7B/13B, or the finder's (run once, then kept).
        warn(message) receives what the finder reports (default: printed on stderr)."""
        requested = var.sink_dims
        if requested not in (None, "auto"):
            self._dims_source = "user"
            return tuple(requested)
        key = "auto" if requested == "auto" else "default"
        if key not in self._dims:
            self._dims[key] = var_mod.resolve_sink_dims(self.config, var, requested, self.model, input_ids, warn)
        dims, self._dims_source = self._dims[key]
        return dims

    def var_state(self, var: var_mod.VARConfig, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, warn=None) -> var_mod.VARState:
        """Fresh per-call VAR state for these (left-padded) prompt ids, never reused across calls. warn: as for
        sink_dims."""
        var.validate(self.config.text.hidden_size, self.config.text.num_hidden_layers)
        first = input_ids[:1] if attention_mask is None else input_ids[:1, attention_mask[0]]   # sample 0, unpadded
        dims = self.sink_dims(var, first, warn)
        return var_mod.VARState(var, dims, self.config.text.num_hidden_layers,
                                input_ids == self.config.image_token_index, attention_mask)


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
