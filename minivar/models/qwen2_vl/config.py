"""Vision-tower configs of Qwen2-VL and Qwen2.5-VL: frozen dataclasses filled from config.json's `vision_config`.

Every default is the one transformers' `Qwen2VLVisionConfig` / `Qwen2_5_VLVisionConfig` uses, so a sparse
`vision_config` means what it means to transformers. Beware the two families name the widths differently:
  Qwen2-VL:   `embed_dim` = the ViT width, `hidden_size` = the merger's output (the LLM's width);
  Qwen2.5-VL: `hidden_size` = the ViT width, `out_hidden_size` = the merger's output.
Both dataclasses expose the same derived names (`width`, `out_dim`, `head_dim`) so code and tests need not care.
Hub configs also carry `in_chans` and `spatial_patch_size`; transformers ignores them (it reads `in_channels`,
`patch_size`), and so do we.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...errors import MinivarError

# The activations the towers may name (transformers' ACT2FN names) — checked at config time, applied in the models.
VISION_ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu")


@dataclass(frozen=True)
class Qwen2VisionConfig:
    """Qwen2-VL's ViT: LayerNorm blocks, an fc1/fc2 MLP of width embed_dim·mlp_ratio, a LayerNorm 2×2 merger."""
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584          # the merger's output width (= the decoder's hidden size)
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0      # the 2-D rotary base (config key rope_parameters.rope_theta)

    @property
    def width(self) -> int:
        return self.embed_dim

    @property
    def out_dim(self) -> int:
        return self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)   # int(), as transformers: a float ratio truncates

    @staticmethod
    def from_hf(d: dict, name_or_path: str = "") -> "Qwen2VisionConfig":
        return _from_hf(Qwen2VisionConfig, d, name_or_path)


@dataclass(frozen=True)
class Qwen25VisionConfig:
    """Qwen2.5-VL's ViT: RMSNorm blocks, SwiGLU MLP with biases, window attention except in `fullatt_block_indexes`."""
    depth: int = 32
    hidden_size: int = 3584          # the ViT width (1280 in every released checkpoint; the file always says so)
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 4       # video only (temporal positions); kept for the decoder's get_rope_index
    window_size: int = 112           # in pixels: 112 px = 8 patches = 4 merged tokens per window side
    out_hidden_size: int = 3584      # the merger's output width (= the decoder's hidden size)
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def out_dim(self) -> int:
        return self.out_hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window_tokens(self) -> int:
        """A window's side in merged tokens (transformers' vit_merger_window_size)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @staticmethod
    def from_hf(d: dict, name_or_path: str = "") -> "Qwen25VisionConfig":
        return _from_hf(Qwen25VisionConfig, d, name_or_path)


def _from_hf(cls, d, name_or_path: str):
    where = f"config.json of '{name_or_path}': vision_config"
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise MinivarError(f"{where} is not a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in known and v is not None}
    # transformers 5.x: rope_parameters {"rope_theta": ..., "rope_type": "axial"}; older files carry nothing (10000).
    rope = d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise MinivarError(f"{where}.rope_parameters is not a JSON object")
    if rope.get("rope_type", "axial") != "axial":
        raise MinivarError(f"{where}: rope type '{rope.get('rope_type')}' is not supported (the towers use 'axial')")
    if "rope_theta" in rope:
        kwargs["rope_theta"] = rope["rope_theta"]
    for key in ("patch_size", "temporal_patch_size"):   # transformers' type allows a pair; the towers use squares
        if isinstance(kwargs.get(key), (list, tuple)):
            values = set(kwargs[key])
            if len(values) != 1:
                raise MinivarError(f"{where}.{key} {kwargs[key]} is not supported (one size for every axis)")
            kwargs[key] = values.pop()
    if "fullatt_block_indexes" in kwargs:
        kwargs["fullatt_block_indexes"] = tuple(int(i) for i in kwargs["fullatt_block_indexes"])
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise MinivarError(f"{where}: {e}") from None
    if cfg.hidden_act not in VISION_ACTS:
        raise MinivarError(f"{where}.hidden_act '{cfg.hidden_act}' is not supported (one of {', '.join(VISION_ACTS)})")
    for key in ("depth", "num_heads", "patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
            raise MinivarError(f"{where}.{key} must be a positive integer, got {getattr(cfg, key)!r}")
    if cfg.width % cfg.num_heads or cfg.head_dim % 4:
        # The 2-D rotary splits each head into (h, w) halves of rotated pairs, so head_dim must divide by 4.
        raise MinivarError(f"{where}: width {cfg.width} over {cfg.num_heads} heads must give a head_dim divisible by 4")
    if isinstance(cfg, Qwen25VisionConfig):
        if cfg.window_tokens < 1:
            raise MinivarError(f"{where}.window_size {cfg.window_size} is smaller than one merged token "
                               f"({cfg.patch_size * cfg.spatial_merge_size} px)")
    return cfg


def vision_config_from_hf(d: dict, model_type: str, name_or_path: str = "") -> Qwen2VisionConfig | Qwen25VisionConfig:
    """config.json's `vision_config` → the tower config of the family `model_type` names (qwen2_vl / qwen2_5_vl)."""
    if model_type == "qwen2_vl":
        return Qwen2VisionConfig.from_hf(d, name_or_path)
    if model_type == "qwen2_5_vl":
        return Qwen25VisionConfig.from_hf(d, name_or_path)
    raise MinivarError(f"config.json of '{name_or_path}' has model_type '{model_type}', not qwen2_vl or qwen2_5_vl")
