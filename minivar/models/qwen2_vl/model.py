"""Qwen2-VL / Qwen2.5-VL: vision tower (patches → merged 2×2 tokens) → spliced into the Qwen2 decoder's input
embeddings at the `<|image_pad|>` tokens → M-RoPE decoder → logits.

Module names equal the hub checkpoint's (`visual.*`, `model.embed_tokens`, `model.layers.N.*`, `model.norm`,
`lm_head`); the loader (checkpoint.py here) maps transformers 5.x's names onto them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ...errors import MinivarError
from ...methods.hooks import as_hooks
from ..attention import causal_mask
from ..config import _fill
from ..llama import KVCache
from .config import Qwen2VisionConfig, Qwen25VisionConfig, vision_config_from_hf
from .decoder import Qwen2Model, Qwen2TextConfig
from .processing import QwenImageConfig
from .rope import rope_index
from .vision_2_5 import build_vision_tower

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class Qwen2VLConfig:
    """The whole model: vision tower config (config.py), the Qwen2 decoder's, and the special token ids."""
    model_type: str
    vision: Qwen2VisionConfig | Qwen25VisionConfig      # by model_type: qwen2_vl / qwen2_5_vl
    text: Qwen2TextConfig
    image_token_id: int = 151655         # transformers' Qwen2VLConfig defaults; config.json gives them
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    torch_dtype: str | None = None
    name_or_path: str = ""
    image: QwenImageConfig = QwenImageConfig()   # preprocessor_config.json beside config.json (else its defaults)

    @property
    def image_token_index(self) -> int:
        return self.image_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.text.pad_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.text.eos_token_id
        return () if eos is None else tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)

    @property
    def spatial_merge_size(self) -> int:
        return self.vision.spatial_merge_size

    @staticmethod
    def from_hf(d: dict, name_or_path: str = "") -> "Qwen2VLConfig":
        """config.json → config: the hub's flat layout (decoder keys at the top, `rope_scaling`) or transformers
        5.x's nested `text_config` (`rope_parameters`), filling what the file leaves out as transformers does.
        When name_or_path is a checkpoint directory, its preprocessor_config.json (if any) gives `image`."""
        where = f"config.json of '{name_or_path}'"
        if not isinstance(d, dict):
            raise MinivarError(f"{where} is not a JSON object")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise MinivarError(f"{where} has model_type '{model_type}', expected one of {', '.join(MODEL_TYPES)}")
        for key in ("vision_config", "text_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise MinivarError(f"{where}: {key} is not a JSON object")
        # As transformers' Qwen2VLConfig: a text_config, when present, is the whole decoder config; without one
        # (the hub's files) the decoder's keys sit at the top level.
        text_d = dict(d["text_config"]) if d.get("text_config") is not None else dict(d)
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise MinivarError(f"{where}: rope_parameters / rope_scaling is not a JSON object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):          # the hub writes "mrope", 5.x "default": the same rotary
            raise MinivarError(f"{where}: rope type '{rope_type}' is not supported")
        if "rope_theta" in rope:
            text_d["rope_theta"] = rope["rope_theta"]
        text_d["mrope_section"] = tuple(int(n) for n in rope.get("mrope_section", (16, 24, 24)))
        eos = text_d.get("eos_token_id")
        if isinstance(eos, list):
            text_d["eos_token_id"] = tuple(eos)
        # tied when either level says so (pre-5.x saves put it in text_config, 5.x at the top)
        text_d["tie_word_embeddings"] = bool(d.get("tie_word_embeddings") or text_d.get("tie_word_embeddings"))
        text_d.pop("head_dim", None)                          # ignored by transformers' Qwen2-VL attention
        text = _fill(Qwen2TextConfig, text_d, {})
        if text.hidden_act != "silu":
            raise MinivarError(f"{where}: text hidden_act '{text.hidden_act}' is not supported")
        if text.use_sliding_window:
            raise MinivarError(f"{where}: use_sliding_window is true; sliding-window attention is not supported")
        if text.hidden_size % text.num_attention_heads or text.num_attention_heads % text.n_kv_heads:
            raise MinivarError(f"{where}: hidden_size {text.hidden_size}, num_attention_heads "
                               f"{text.num_attention_heads}, num_key_value_heads {text.n_kv_heads} do not divide")
        if sum(text.mrope_section) != text.head_dim // 2:
            raise MinivarError(f"{where}: mrope_section {list(text.mrope_section)} sums to "
                               f"{sum(text.mrope_section)}, expected head_dim / 2 = {text.head_dim // 2}")
        vision = vision_config_from_hf(d.get("vision_config") or {}, model_type, name_or_path)
        if vision.out_dim != text.hidden_size:
            raise MinivarError(f"{where}: the vision merger's output width {vision.out_dim} is not the decoder's "
                               f"hidden_size {text.hidden_size}")
        ids = {k: int(d[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id") if d.get(k) is not None}
        return Qwen2VLConfig(model_type=model_type, vision=vision, text=text, **ids,
                             torch_dtype=d.get("dtype") or d.get("torch_dtype"), name_or_path=name_or_path,
                             image=read_image_config(name_or_path))


def read_image_config(directory: str, defaults: QwenImageConfig = QwenImageConfig()) -> QwenImageConfig:
    """A checkpoint directory's preprocessor_config.json (min/max pixels, mean/std ...) over `defaults` (the
    family's: Qwen2-VL's are transformers' class defaults), or the defaults."""
    path = Path(directory) / "preprocessor_config.json" if directory else None
    if path is None or not path.is_file():
        return defaults
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinivarError(f"'{path}' is not valid JSON ({e})") from None
    return QwenImageConfig.from_hf(d, directory, defaults)


class Qwen2VL(nn.Module):
    """The whole model: vision tower, Qwen2 decoder, lm_head (tied to the embedding in the 2B/3B checkpoints)."""

    def __init__(self, cfg: Qwen2VLConfig, vision: bool = True):
        super().__init__()
        self.config = cfg
        if vision:   # vision=False: the decoder alone, for callers that bring their own image features
            self.visual = build_vision_tower(cfg.vision)     # Qwen2-VL's or Qwen2.5-VL's ViT
        self.model = Qwen2Model(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device,
                  values_transposed: bool = False) -> "MRopeKVCache":
        """A KV cache for `batch` rows of `length` positions (LLaMA's layout: keys/values per layer; transposed
        values for a single prompt's CPU decode, see llama.KVCache), which also keeps the prompt's rope deltas."""
        return MRopeKVCache(self.config.text, batch, length, dtype, device, values_transposed)

    def image_features(self, images) -> list[torch.Tensor]:
        """ImageInputs → their merged, projected tokens, one [N_i, D_text] tensor per image (N_i = t·h·w / 4)."""
        if not images:
            return []
        pixels = torch.cat([im.pixel_values for im in images]).to(self.lm_head.weight.device)
        grids = [tuple(int(x) for x in im.meta["grid_thw"]) for im in images]
        feats = self.visual(pixels, grids)                                             # [Σ N_i, D_text]
        m2 = self.config.spatial_merge_size ** 2
        return list(feats.split([t * h * w // m2 for t, h, w in grids]))

    def positions(self, input_ids: torch.Tensor, images=None, attention_mask=None) -> torch.Tensor:
        """M-RoPE positions [3, B, T] of a whole prompt (transformers' get_rope_index): images give the grids of
        the image-token runs, in token order; attention_mask [B, T] leaves padding out."""
        grids = [tuple(int(x) for x in im.meta["grid_thw"]) for im in (images or [])]
        return rope_index(input_ids, grids, self.config.image_token_id, self.config.spatial_merge_size,
                          attention_mask)

    def prompt_positions(self, input_ids: torch.Tensor, images, attention_mask, cache) -> torch.Tensor:
        """The positions [3, B, T] of a whole prompt (image tokens need `images`' grids), its rope deltas kept in
        the cache for the text after it: what a prompt's first call uses, or a prompt prefilled in pieces."""
        positions = self.positions(input_ids, images, attention_mask)
        if isinstance(cache, MRopeKVCache):
            cache.rope_deltas = rope_deltas(positions, attention_mask)
        return positions

    def text_positions(self, input_ids, cache, input_pos: int, attention_mask, image_features) -> torch.Tensor:
        """Positions [3, B, T] of text after a prompt whose rope deltas the cache keeps (transformers' decode
        arithmetic): the token's index among its sample's real tokens + the sample's delta, on every axis."""
        deltas = None
        for c in (cache, getattr(cache, "prefix", None)):      # a SharedPrefixCache: the prefix's own cache
            deltas = getattr(c, "rope_deltas", None) if deltas is None else deltas
        if deltas is None or image_features is not None:
            raise MinivarError("a call after the prompt's first (input_pos > 0) needs explicit `positions` unless "
                               "it is text after a prompt run on a model.new_cache cache (M-RoPE positions depend "
                               "on the whole prompt: model.positions, rope.decode_positions)")
        B, T = input_ids.shape
        if attention_mask is not None:
            index = (attention_mask.long().cumsum(-1) - 1)[:, input_pos:]                  # [B, T]
        else:
            index = torch.arange(input_pos, input_pos + T, device=input_ids.device).expand(B, T)
        return (index + deltas.to(index.device)[:, None]).expand(3, -1, -1)

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: the image-pad tokens (VAR's image span I; vision_start / vision_end are text)."""
        return input_ids == self.config.image_token_id

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the image-token rows replaced, in order, by image_features [N, D]."""
        if image_features is None:
            # no image in this call (a decode step): every id is an ordinary row, the image id too
            return self.model.embed_tokens(input_ids)
        is_image = self.image_positions(input_ids)
        x = self.model.embed_tokens(input_ids.masked_fill(is_image, 0))   # the image id need not be a row
        n_slots, n_feats = int(is_image.sum()), image_features.shape[0]
        if n_slots != n_feats:
            raise MinivarError(f"the prompt has {n_slots} image tokens but {n_feats} image feature rows are given")
        return x.masked_scatter(is_image[..., None], image_features.to(x.dtype))

    def decoder_inputs(self, input_ids: torch.Tensor, image_features) -> dict:
        """What else the decoder takes besides the embeddings (Qwen3-VL: its DeepStack features); none here."""
        return {}

    def forward(self, input_ids, images=None, *, image_features=None, positions=None, cache: KVCache | None = None,
                input_pos: int = 0, attention_mask=None, hooks=None, output: str = "logits") -> torch.Tensor:
        """Logits [B, T, V] fp32 for `input_ids` [B, T] at cache positions input_pos … input_pos+T−1
        (output="hidden": final-normed hidden states [B, T, D]; "last": fp32 logits of the last row, [B, V]).

        images: the prompt's ImageInputs (their features fill this call's image tokens, and their grids give the
        default positions); image_features [N, D]: the rows for this call's image tokens instead (a chunk of a
        prompt may hold only some). positions [3, B, T] (or [B, T]: text, the same on every axis); None → the
        prompt's M-RoPE positions (only for a call from position 0: a later call needs them given, see
        rope.decode_positions). attention_mask [B, input_pos+T] (1 = real token) covers cached + new positions.
        """
        hooks = as_hooks(hooks)
        B, T = input_ids.shape
        rows = range(input_pos, input_pos + T)
        if images is not None and image_features is None:
            feats = self.image_features(images)
            image_features = torch.cat(feats) if feats else None
        x = self.embed(input_ids, image_features)
        if positions is None and input_pos == 0:
            positions = self.prompt_positions(input_ids, images, attention_mask, cache)
        elif positions is None:
            positions = self.text_positions(input_ids, cache, input_pos, attention_mask, image_features)
        elif positions.dim() == 2:
            positions = positions[None].expand(3, -1, -1)                             # text: one position, 3 axes
        if tuple(positions.shape) != (3, B, T):
            raise MinivarError(f"`positions` has shape {tuple(positions.shape)}, expected {(3, B, T)}")
        positions = positions.to(x.device)
        mask = padding_mask(attention_mask, B, T, input_pos, x.device,
                            force=hooks is not None and hooks.masks_keys)
        h = self.model(x, positions, rows, mask, cache, hooks, **self.decoder_inputs(input_ids, image_features))
        if output == "hidden":
            return h
        if output == "last":
            return self.lm_head(h[:, -1]).float()
        if output != "logits":
            raise ValueError(f"output must be 'logits', 'hidden' or 'last', got {output!r}")
        return self.lm_head(h).float()


class MRopeKVCache(KVCache):
    """LLaMA's KV cache, plus the rope deltas of the prompt its first call ran (set by that call): per sample,
    max(M-RoPE positions) + 1 − real tokens, so text after the prompt is at (its index among real tokens) + delta —
    max + 1 + step while decoding. A call's state, kept with the cache it belongs to, never on the model."""
    rope_deltas: torch.Tensor | None = None            # [B] long


def rope_deltas(positions: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """[B]: max(prompt positions) + 1 − the number of real tokens, per sample (transformers' rope_deltas)."""
    _, B, T = positions.shape
    if attention_mask is None:
        return positions.amax(dim=(0, 2)) + 1 - T
    real = attention_mask.bool().to(positions.device)
    return positions.masked_fill(~real[None], 0).amax(dim=(0, 2)) + 1 - real.sum(-1)


def padding_mask(attention_mask, B: int, T: int, input_pos: int, device, force: bool = False):
    """[B, 1, T, S] bool attention mask (causal and no padding keys), or None for plain causal attention (no
    padding, no hook removing keys: the fused kernel then uses its faster causal mode)."""
    if attention_mask is None and not force:
        return None
    S = input_pos + T
    if attention_mask is None:
        attention_mask = torch.ones(B, S, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != (B, S):
        raise MinivarError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} "
                           f"(cached + new positions)")
    keep = attention_mask.to(device).bool()
    mask = causal_mask(T, S, device) & keep[:, None, None, :]                          # [B, 1, T, S]
    # A padding row would see no key at all (softmax of nothing); let it see itself. Its output is unused.
    diagonal = torch.arange(S, device=device)[None, :] == torch.arange(input_pos, S, device=device)[:, None]
    return mask | diagonal[None, None]
