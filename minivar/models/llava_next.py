"""LLaVA-NeXT (v1.6): LLaVA-1.5's CLIP tower, projector and LLaMA/Mistral decoder, with images cut into tiles.

An image becomes 1 + gh·gw CLIP crops (anyres.py makes them): the whole image squashed to 336×336 (the "base") and
the gh×gw tiles of the image resized and padded to the best of the config's `image_grid_pinpoints`. Each crop gives
P×P = 24×24 projected features. The tiles' features are laid out as one (gh·P)×(gw·P) grid, the rows/columns that
cover the padding are cut away again ("unpadding", back to the image's aspect ratio), and the learned `image_newline`
vector is appended after every row. Token order: the base's 576 features (row-major, no newline), then the grid
row by row, each row followed by its newline. This is transformers' LlavaNextModel.pack_image_features /
unpad_image / get_anyres_image_grid_shape, restated; parity with it is what the tests check.

Module names equal the HF checkpoint names after the loader's normalisation (`vision_tower.*`,
`multi_modal_projector.*`, `image_newline`, `language_model.model.*`, `language_model.lm_head.*`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import MinivarError
from ..methods.hooks import as_hooks
from . import llava
from .clip import CLIPVisionTower
from .config import LlavaConfig
from .llama import KVCache, LlamaForCausalLM
from .llava import LlavaMultiModalProjector, positions_and_mask
from .anyres import anyres_layout, count_image_tokens, process_image, select_best_resolution, tile_view, unpadded_span  # noqa: F401
from .demo import build_llava_next
from .family import Family

# OpenAI CLIP's normalisation (LlavaNextImageProcessor's defaults, and what llava-hf's preprocessor configs hold)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' MistralConfig defaults where they differ from LlamaConfig's (TextConfig holds LLaMA's): a config.json
# written by transformers lists only what differs from its own class's defaults
MISTRAL_TEXT_DEFAULTS = {"intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32}
MISTRAL_SLIDING_WINDOW = 4096
TEXT_MODEL_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    """LLaVA-1.5's settings plus the anyres grid, the decoder kind and the image processor's settings."""
    model_type = "llava_next"     # the family (models/registry.py); a class attribute, not a config field
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()   # (height, width) pairs, multiples of the CLIP image size
    text_model_type: str = "llama"                           # "llama" (vicuna variants) or "mistral"
    sliding_window: int | None = None                        # Mistral's attention window (None: unlimited)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def patches_per_side(self) -> int:
        """P: one crop gives a P×P grid of features (24 for CLIP-L/14 at 336 px)."""
        return self.vision.image_size // self.vision.patch_size

    @property
    def default_conv_mode(self) -> str:
        """The template a variant was evaluated with: mistral_instruct for Mistral, vicuna_v1 for the vicuna ones."""
        return "mistral_instruct" if self.text_model_type == "mistral" else "vicuna_v1"

    @property
    def num_image_tokens(self) -> int:
        raise MinivarError("a LLaVA-NeXT image's token count depends on its size: use the ImageInput's num_tokens "
                           "(minivar.models.anyres.process_image)")

    def to_hf(self) -> dict:
        """A 5.x-style config.json dict (for writing checkpoints, e.g. a demo); from_hf reads it back unchanged."""
        plain = LlavaConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LlavaConfig)})
        d = plain.to_hf() | {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
                             "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
                             "image_seq_length": self.patches_per_side ** 2}
        if self.text_model_type == "mistral":
            d["text_config"] = {k: v for k, v in d["text_config"].items() if k not in ("attention_bias", "mlp_bias")}
            d["text_config"].update(model_type="mistral", sliding_window=self.sliding_window)
        return d

    def to_hf_preprocessor(self) -> dict:
        """The matching preprocessor_config.json dict (LlavaNextImageProcessor's fields)."""
        S = self.vision.image_size
        return {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": S},
                "crop_size": {"height": S, "width": S}, "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "rescale_factor": self.rescale_factor, "resample": 3, "do_resize": True, "do_center_crop": True,
                "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "do_pad": True}

    @staticmethod
    def from_hf(d: dict, name_or_path: str = "", preprocessor: dict | None = None) -> "LlavaNextConfig":
        """From config.json's dict and, when the checkpoint has one, preprocessor_config.json's (image settings)."""
        where = f"config.json of '{name_or_path}'"
        if not isinstance(d, dict):
            raise MinivarError(f"{where} is not a JSON object")
        if d.get("model_type") != "llava_next":
            raise MinivarError(f"{where} has model_type '{d.get('model_type')}', expected 'llava_next'")
        text_d = d.get("text_config")
        if text_d is not None and not isinstance(text_d, dict):
            raise MinivarError(f"{where}: text_config is not a JSON object")
        text_d = dict(text_d or {})
        kind = text_d.get("model_type", "llama")
        if kind not in TEXT_MODEL_TYPES:
            raise MinivarError(f"{where}: text_config model_type '{kind}' is not supported "
                               f"(LLaVA-NeXT in minivar: {', '.join(TEXT_MODEL_TYPES)})")
        sliding_window = None
        if kind == "mistral":
            # Mistral's decoder is LLaMA's with other defaults (and no bias options); its window is a mask rule
            text_d = MISTRAL_TEXT_DEFAULTS | {k: v for k, v in text_d.items() if k not in ("attention_bias", "mlp_bias")}
            sliding_window = text_d.get("sliding_window", MISTRAL_SLIDING_WINDOW)
            if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
                raise MinivarError(f"{where}: text_config sliding_window {sliding_window!r} is not a positive integer")
        # everything LLaVA-1.5 shares (vision tower, decoder, projector, feature layer) is read by its own reader
        base = LlavaConfig.from_hf(d | {"model_type": "llava", "text_config": text_d}, name_or_path)
        if base.vision_feature_select_strategy != "default":
            # transformers' pack_image_features reshapes each tile's features to P×P: with CLS kept (577) it fails
            raise MinivarError(f"{where}: vision_feature_select_strategy '{base.vision_feature_select_strategy}' "
                               f"does not work with anyres tiles; LLaVA-NeXT uses 'default'")
        if d.get("use_image_newline_parameter", True) is not True:
            raise MinivarError(f"{where}: use_image_newline_parameter is {d['use_image_newline_parameter']!r}; "
                               f"LLaVA-NeXT (as transformers runs it) always appends image_newline after each row")
        pre = preprocessor if preprocessor is not None else {}
        if not isinstance(pre, dict):
            raise MinivarError(f"preprocessor_config.json of '{name_or_path}' is not a JSON object")
        pinpoints = _pinpoints(d, pre, base.vision.image_size, name_or_path)
        settings = _image_settings(pre, base.vision.image_size, name_or_path)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlavaConfig)}
        if fields["pad_token_id"] is None:     # 5.x keeps it in the text config only
            fields["pad_token_id"] = text_d.get("pad_token_id")
        return LlavaNextConfig(**fields, image_grid_pinpoints=pinpoints, text_model_type=kind,
                               sliding_window=sliding_window, **settings)


def _pinpoints(d: dict, pre: dict, crop: int, name_or_path: str) -> tuple[tuple[int, int], ...]:
    """image_grid_pinpoints from config.json, else from preprocessor_config.json; both given must agree (the
    processor counts tokens with its own, the model packs with the config's)."""
    found = {}
    for file, src in (("config.json", d), ("preprocessor_config.json", pre)):
        raw = src.get("image_grid_pinpoints")
        if raw is None:
            continue
        ok = isinstance(raw, list) and len(raw) > 0 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(type(x) is int and x > 0 and x % crop == 0 for x in p)
            for p in raw)
        if not ok:
            raise MinivarError(f"{file} of '{name_or_path}': image_grid_pinpoints {str(raw)[:80]} is malformed "
                               f"(expected a non-empty list of [height, width] pairs, multiples of {crop})")
        found[file] = tuple((int(h), int(w)) for h, w in raw)
    if not found:
        raise MinivarError(f"config.json of '{name_or_path}' has no image_grid_pinpoints (nor does a "
                           f"preprocessor_config.json): a LLaVA-NeXT checkpoint needs them")
    if len(set(found.values())) > 1:
        raise MinivarError(f"'{name_or_path}': image_grid_pinpoints differ between config.json and "
                           f"preprocessor_config.json")
    return next(iter(found.values()))


def _image_settings(pre: dict, image_size: int, name_or_path: str) -> dict:
    """Mean, std and rescale factor; the settings anyres.py hard-wires (bicubic, squash/crop sizes) are checked."""
    where = f"preprocessor_config.json of '{name_or_path}'"
    size = pre.get("size", {"shortest_edge": image_size})
    crop = pre.get("crop_size", {"height": image_size, "width": image_size})
    if size != {"shortest_edge": image_size} or crop != {"height": image_size, "width": image_size}:
        raise MinivarError(f"{where}: size {size} / crop_size {crop} must be {{'shortest_edge': {image_size}}} / "
                           f"{image_size}×{image_size}, the vision tower's image_size")
    if pre.get("resample", 3) != 3:
        raise MinivarError(f"{where}: resample {pre['resample']!r} is not supported (only 3, bicubic)")
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
        if pre.get(flag, True) is not True:
            raise MinivarError(f"{where}: {flag} {pre[flag]!r} is not supported (only true)")
    out = {}
    for key, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        value = pre.get(key, default)
        if not (isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(x, int | float) for x in value)):
            raise MinivarError(f"{where}: {key} {value!r} is not three numbers")
        out[key] = tuple(float(x) for x in value)
    factor = pre.get("rescale_factor", 1 / 255)
    if not isinstance(factor, int | float) or factor <= 0:
        raise MinivarError(f"{where}: rescale_factor {factor!r} is not a positive number")
    out["rescale_factor"] = float(factor)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The model

class LlavaNext(nn.Module):
    """Vision tower, projector, image_newline and decoder (with its lm_head)."""

    def __init__(self, cfg: LlavaNextConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.vision_layers_used)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))
        self.language_model = LlamaForCausalLM(cfg.text)

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device, values_transposed: bool = False) -> KVCache:
        """A KV cache for `batch` samples of up to `length` positions (LLaMA's layout)."""
        return KVCache(self.config.text, batch, length, dtype, device, values_transposed)

    def crop_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Crops [C, 3, S, S] → projected features [C, P², D_text] (CLS dropped), as LLaVA-1.5 computes them."""
        indices = self.config.feature_indices          # HF indexes the full stack; we run only what is read
        hidden_states = self.vision_tower(pixel_values, keep=indices)
        feats = torch.cat([hidden_states[k][:, 1:] for k in indices], dim=-1)
        return self.multi_modal_projector(feats.to(self.multi_modal_projector.linear_1.weight.dtype))

    def pack(self, crops: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """One image's crop features [1 + gh·gw, P², D] → its token rows [N, D]: base, then the unpadded tile grid
        row by row with image_newline after each row."""
        P = self.config.patches_per_side
        (gh, gw), (rows, cols) = anyres_layout(image_size, self.config)
        if crops.shape[0] != 1 + gh * gw:
            raise MinivarError(f"an image of size {tuple(image_size)} needs 1 + {gh}×{gw} crops, its pixel_values "
                               f"have {crops.shape[0]}")
        D = crops.shape[-1]
        grid = crops[1:].view(gh, gw, P, P, D).permute(0, 2, 1, 3, 4)     # [gh, P, gw, P, D]: tile row, y, tile col, x
        grid = grid.reshape(gh * P, gw * P, D)[rows, cols]                 # [H', W', D]: the image's part only
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, D)
        grid = torch.cat([grid, newline], dim=1)                           # [H', W' + 1, D]
        return torch.cat([crops[0], grid.reshape(-1, D)])                  # [P² + H'·(W'+1), D]

    def image_features(self, images) -> list[torch.Tensor]:
        """ImageInputs (pixel_values [1 + tiles, 3, S, S], meta["image_size"] = (h, w)) → token rows [N_i, D_text]
        per image, in token order. All crops of all images go through CLIP as one batch."""
        if not images:
            return []
        device = self.image_newline.device
        counts = [img.pixel_values.shape[0] for img in images]
        crops = self.crop_features(torch.cat([img.pixel_values for img in images]).to(device))
        out = []
        for img, feats in zip(images, crops.split(counts)):
            rows = self.pack(feats, tuple(img.meta["image_size"]))
            if rows.shape[0] != img.num_tokens:
                raise MinivarError(f"an image of size {tuple(img.meta['image_size'])} packs to {rows.shape[0]} "
                                   f"tokens but its ImageInput says num_tokens={img.num_tokens}")
            out.append(rows)
        return out

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: where the image tokens sit, base, tiles and newlines alike (what VAR and pictures read)."""
        return input_ids == self.config.image_token_index

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, T, D], the image-token positions replaced in order by the rows `image_features`
        [N, D] (exactly as many rows as this call has image tokens)."""
        embed_tokens = self.language_model.model.embed_tokens
        if image_features is None:
            return embed_tokens(input_ids)       # no image in this call: every id is an ordinary row
        is_image = self.image_positions(input_ids)
        x = embed_tokens(input_ids.masked_fill(is_image, 0))   # the image id may lie outside a small vocab
        if int(is_image.sum()) != image_features.shape[0]:
            raise MinivarError(f"the prompt has {int(is_image.sum())} image tokens but the images give "
                               f"{image_features.shape[0]} feature rows")
        return x.masked_scatter(is_image[..., None], image_features.to(x.dtype))

    def forward(self, input_ids, images=None, *, image_features=None, positions=None, cache: KVCache | None = None,
                input_pos: int = 0, attention_mask=None, hooks=None, output: str = "logits") -> torch.Tensor:
        """Logits [B, T, V] fp32 for `input_ids` [B, T] at cache positions input_pos … input_pos+T−1
        (output="hidden": final-normed hidden states [B, T, D]; "last": fp32 logits of the last row, [B, V]).

        images: ImageInputs for this call's image tokens (or `image_features` [N, D], rows in token order, for a call
        that holds only some of them). positions [B, T]: explicit RoPE positions; None counts real tokens per
        `attention_mask` [B, input_pos+T] (1 = real, 0 = padding; None = no padding). hooks: see hooks.py.
        """
        hooks = as_hooks(hooks)
        B, T = input_ids.shape
        rows = range(input_pos, input_pos + T)
        window = self.config.sliding_window
        if window is not None and rows.stop > window:
            # within the window Mistral's sliding-window mask is the causal mask; past it minivar has no rule
            raise MinivarError(f"position {rows.stop - 1} is past the Mistral decoder's sliding_window of {window}")
        if images:
            if image_features is not None:
                raise MinivarError("give `images` or `image_features`, not both")
            image_features = torch.cat(self.image_features(images))
        x = self.embed(input_ids, image_features)
        positions, mask = positions_and_mask(B, T, input_pos, attention_mask, positions, hooks, x.device)
        h = self.language_model.model(x, positions, rows, mask, cache, hooks)
        if output == "hidden":
            return h
        if output == "last":
            return self.language_model.lm_head(h[:, -1]).float()
        if output != "logits":
            raise ValueError(f"output must be 'logits', 'hidden' or 'last', got {output!r}")
        return self.language_model.lm_head(h).float()


# ---------------------------------------------------------------------------------------------------------------
# The family: checkpoint names, config files, images, templates (models/registry.py)

# LLaVA-1.5's rules cover every layout's prefixes but the newline's (5.x in memory: model.image_newline). Layouts:
# the hub's language_model.model.*, language_model.lm_head.weight, vision_tower.vision_model.*,
# multi_modal_projector.*, image_newline; 5.x in memory model.language_model.*, lm_head.weight, model.vision_tower.*,
# model.multi_modal_projector.*, model.image_newline; 5.x save_pretrained: the hub's without vision_model.
KEY_RULES = ((r"^model\.image_newline$", "image_newline"),) + llava.KEY_RULES
is_unused_key = llava.is_unused_key      # the same unread tensors as LLaVA-1.5's (CLIP's last layer, post_layernorm)


def config_from_checkpoint(d: dict, name_or_path: str = "") -> LlavaNextConfig:
    """config.json's dict, with the image settings of the checkpoint directory's preprocessor_config.json when
    `name_or_path` is a directory that has one (the registry's `config` entry: checkpoint.read_config calls it)."""
    path = Path(name_or_path) / "preprocessor_config.json" if name_or_path else None
    pre = None
    if path is not None and path.is_file():
        try:
            pre = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MinivarError(f"'{path}' is not valid JSON ({e})") from None
    return LlavaNextConfig.from_hf(d, name_or_path, preprocessor=pre)


def next_image(img, cfg: LlavaNextConfig, image_aspect_ratio: str = "anyres"):
    """A PIL image → its ImageInput (anyres.process_image); anyres is LLaVA-NeXT's only image mode."""
    if image_aspect_ratio != "anyres":
        raise MinivarError(f"LLaVA-NeXT's images are 'anyres', not '{image_aspect_ratio}'")
    return process_image(img, cfg)


def next_view(img, cfg: LlavaNextConfig, image_aspect_ratio: str, image_input):
    """Family.view: the base crop (the whole image squashed to S×S) and the tiles' canvas cut to the unpadded region
    the tile grid's tokens cover (anyres.tile_view)."""
    return tile_view(img, cfg)


# The vicuna variants' decoders are LLaMA-2-7B/13B-shaped Vicuna-1.5, LLaVA-1.5's own base LLMs: the same massive
# dims (the VAR paper's). The Mistral variant has none known: VAR's sink-dim finder has to find them.
KNOWN_SINK_DIMS = {
    "llava-v1.6-vicuna-7b": ((4096, 32, 32, 11008), (1415, 2533)),
    "llava-v1.6-vicuna-13b": ((5120, 40, 40, 13824), (2100, 4743)),
}

FAMILY = Family(
    model_type="llava_next", name="LLaVA-NeXT", config=config_from_checkpoint, model=LlavaNext, key_rules=KEY_RULES,
    unused_key=is_unused_key, images=next_image, conv_modes=("vicuna_v1", "llava_hf", "llava_v1", "mistral_instruct"),
    # per checkpoint: LlavaNextConfig.default_conv_mode (mistral_instruct for the Mistral variant)
    default_conv_mode="vicuna_v1", image_modes=("anyres",), known_sink_dims=KNOWN_SINK_DIMS, view=next_view,
    demo=build_llava_next)
