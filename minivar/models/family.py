"""What minivar knows about one model family (models/registry.py lists them): a plain record, importing no model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import MinivarError


# which families take each image option (the command lines' --min-pixels, --max-pixels, --max-patches)
_QWEN = "Qwen2-VL / Qwen2.5-VL / Qwen3-VL"
IMAGE_OPTION_FAMILIES = {"min_pixels": _QWEN, "max_pixels": _QWEN, "max_patches": "InternVL"}


@dataclass(frozen=True)
class Family:
    model_type: str                        # config.json's model_type
    name: str                              # for messages and the README's model table
    config: Callable                       # (config.json dict, name_or_path) → config
    model: Callable                        # config → the nn.Module (built on the meta device by the loader)
    key_rules: tuple                       # (regex, replacement) pairs: checkpoint names → the module's
    unused_key: Callable                   # (normalised key, config) → True for tensors the model never reads
    images: Callable                       # (PIL image, config, image_aspect_ratio) → models.images.ImageInput
    conv_modes: tuple[str, ...]            # prompt templates (processing.py)
    default_conv_mode: str
    image_modes: tuple[str, ...] = ("pad", "crop")
    # massive-activation dims VAR knows: {name: ((hidden, layers, heads, intermediate), dims)}
    known_sink_dims: dict = field(default_factory=dict)
    has_cls: bool = True                   # the vision tower has a CLS token (DAMRO reads its attention)
    # (directory, config) → the tokenizer (encode_prompt, decode, decode_token_stream, eos_id; stop_ids if several);
    # None: processing.Tokenizer, the LLaMA tokenizer.json with the image token
    tokenizer: Callable | None = None
    # a checkpoint with tied embeddings stores one matrix: (the lm_head's name, the embedding's name it copies)
    tied: tuple[str, str] = ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight")
    # (config, **options) → the config with the user's image settings (--min-pixels / --max-pixels); None: none
    image_options: Callable | None = None
    # (PIL image, config, image_aspect_ratio, its ImageInput) → one PIL image per panel: the pixels that panel's
    # tokens cover, as the model saw them (None: a panel not drawn); the pictures draw each panel over its view
    view: Callable | None = None
    # (normalised key, tensor, config) → the tensor in the module's layout (Qwen3-VL-MoE's experts); None: as stored
    convert: Callable | None = None
    # the model's vision tower (its attribute): on a CPU in bf16 the loader packs its Linear weights (models/packed.py)
    vision_module: str = "vision_tower"
    # the decoder's layers and head (module paths): packed too when every decode step runs several rows (pack_decoder)
    decoder_modules: tuple[str, ...] = ("language_model.model.layers", "language_model.lm_head")
    # (directory, this Family) → writes this family's offline demo there: a tiny random checkpoint with planted
    # sinks, which `--model demo-<model_type>` builds on first use and loads (LLaVA-1.5's is `--model demo`);
    # models/demo.py says how to write one. None: the family has no demo
    demo: Callable | None = None

    def with_image_options(self, cfg, **options):
        """The config with the user's image settings; an option this family does not take is one error naming
        the families that do (IMAGE_OPTION_FAMILIES: a plain table, since this record imports no registry)."""
        import inspect
        takes = set(inspect.signature(self.image_options).parameters) if self.image_options is not None else set()
        wrong = [k for k in options if k not in takes]
        if wrong:
            owners = " / ".join(dict.fromkeys(IMAGE_OPTION_FAMILIES.get(k, "no family") for k in wrong))
            names = ", ".join(f"--{k.replace('_', '-')}" for k in wrong)
            raise MinivarError(f"{names} applies to {owners}, not to {self.name}")
        return self.image_options(cfg, **options)

    def conv_mode_for(self, cfg) -> str:
        """The template a checkpoint speaks by default (LLaVA-NeXT's Mistral variant: its own, from the config)."""
        return getattr(cfg, "default_conv_mode", None) or self.default_conv_mode

    def eval_settings(self, cfg, conv_mode: str, image_mode: str) -> tuple[str, str]:
        """A benchmark's LLaVA-1.5 evaluation template and image mode, for this checkpoint: kept where the model
        speaks them as its own (LLaVA, LLaVA-NeXT's vicuna variants), else the model's own (Qwen2-VL: qwen,
        smart_resize; LLaVA-NeXT-Mistral: mistral_instruct)."""
        own = self.conv_mode_for(cfg)
        conv = conv_mode if own == "vicuna_v1" and conv_mode in self.conv_modes else own
        return conv, image_mode if image_mode in self.image_modes else self.default_image_mode

    @property
    def default_image_mode(self) -> str:
        return self.image_modes[0]

    def make_tokenizer(self, directory, cfg):
        if self.tokenizer is not None:
            return self.tokenizer(directory, cfg)
        from ..processing import Tokenizer
        return Tokenizer(directory, cfg.image_token_index)
