"""Qwen3-VL's configs: frozen dataclasses of the vision tower (config.json's `vision_config`) and of the decoder
(`text_config`; model.py reads the file into them).

Every default is transformers' (`Qwen3VLVisionConfig`: a 27-layer, 1152-wide ViT; `Qwen3VLTextConfig`), so a sparse
config means what it means to transformers. The vision config's `hidden_size` is the ViT's width, `out_hidden_size`
the mergers' output (the decoder's width). The MoE models use the same tower (`Qwen3VLMoeVisionConfig` adds
nothing); their decoder defaults differ (model.MOE_TEXT_DEFAULTS).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...errors import MinivarError
from ..config import TextConfig
from ..qwen2_vl.config import VISION_ACTS


@dataclass(frozen=True)
class Qwen3VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304      # a square table: 48 × 48 learned positions, resized to each image
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0              # the 2-D rotary base (vision_config.rope_parameters.rope_theta)

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
    def grid_side(self) -> int:
        """The side of the learned position table (transformers' num_grid_per_side: int(√num_position_embeddings))."""
        return int(self.num_position_embeddings ** 0.5)

    @staticmethod
    def from_hf(d: dict | None, name_or_path: str = "") -> "Qwen3VisionConfig":
        where = f"config.json of '{name_or_path}': vision_config"
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise MinivarError(f"{where} is not a JSON object")
        known = {f.name for f in dataclasses.fields(Qwen3VisionConfig)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise MinivarError(f"{where}.rope_parameters is not a JSON object")
        if rope.get("rope_type", "axial") != "axial":
            raise MinivarError(f"{where}: rope type '{rope.get('rope_type')}' is not supported (the tower uses 'axial')")
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        for key in ("patch_size", "temporal_patch_size"):    # transformers' type allows a pair; squares only here
            if isinstance(kwargs.get(key), (list, tuple)):
                values = set(kwargs[key])
                if len(values) != 1:
                    raise MinivarError(f"{where}.{key} {kwargs[key]} is not supported (one size for every axis)")
                kwargs[key] = values.pop()
        if "deepstack_visual_indexes" in kwargs:
            if not isinstance(kwargs["deepstack_visual_indexes"], (list, tuple)):
                raise MinivarError(f"{where}.deepstack_visual_indexes must be a list of layer indices")
            kwargs["deepstack_visual_indexes"] = tuple(int(i) for i in kwargs["deepstack_visual_indexes"])
        try:
            cfg = Qwen3VisionConfig(**kwargs)
        except TypeError as e:
            raise MinivarError(f"{where}: {e}") from None
        if cfg.hidden_act not in VISION_ACTS:
            raise MinivarError(f"{where}.hidden_act '{cfg.hidden_act}' is not supported (one of {', '.join(VISION_ACTS)})")
        for key in ("depth", "num_heads", "patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels",
                    "num_position_embeddings"):
            if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
                raise MinivarError(f"{where}.{key} must be a positive integer, got {getattr(cfg, key)!r}")
        if cfg.width % cfg.num_heads or cfg.head_dim % 4:
            raise MinivarError(f"{where}: width {cfg.width} over {cfg.num_heads} heads must give a head_dim divisible by 4")
        if cfg.grid_side < 2:
            raise MinivarError(f"{where}.num_position_embeddings {cfg.num_position_embeddings} holds no 2×2 table")
        if len(set(cfg.deepstack_visual_indexes)) != len(cfg.deepstack_visual_indexes):
            raise MinivarError(f"{where}.deepstack_visual_indexes {list(cfg.deepstack_visual_indexes)} repeats a layer")
        bad = [i for i in cfg.deepstack_visual_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise MinivarError(f"{where}.deepstack_visual_indexes {list(cfg.deepstack_visual_indexes)}: layer {bad[0]} "
                               f"is not one of the tower's 0 … {cfg.depth - 1}")
        return cfg


@dataclass(frozen=True)
class Qwen3TextConfig(TextConfig):
    """Qwen3 decoder; defaults are transformers' `Qwen3VLTextConfig`'s (the MoE's differ: model.py fills them).
    num_experts 0: the dense model; otherwise the MoE fields say which layers are sparse and how they route."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    head_dim_: int | None = 128
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    mrope_section: tuple[int, ...] = (24, 20, 20)     # frequency pairs turned by h and w: rope.py
    num_experts: int = 0                              # MoE (moe.py): experts per sparse layer
    num_experts_per_tok: int = 0                      # top-k
    moe_intermediate_size: int = 0                    # each expert's SwiGLU width
    decoder_sparse_step: int = 1                      # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()             # ... and i is not listed here

    def is_sparse(self, layer: int) -> bool:
        """Does layer `layer` route its tokens to experts (transformers' Qwen3MoeDecoderLayer rule)?"""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)
