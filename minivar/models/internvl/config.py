"""InternVL's config.json (model_type `internvl`) as frozen dataclasses, every default transformers' own
(`InternVLConfig`, `InternVLVisionConfig`, and `Qwen2Config` / `Qwen3Config` for the decoder), so a sparse file means
what it means to transformers.

InternVL3 (-hf) has a Qwen2 decoder (q/k/v biases); InternVL3.5 (-HF) a Qwen3 one (no biases, q/k RMSNorm per head,
an explicit head_dim). Both use plain 1-D RoPE: the image tokens are ordinary positions.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import MinivarError
from ..config import TextConfig, _fill
from .processing import TileConfig, read_tile_config

TEXT_TYPES = ("qwen2", "qwen3")
NORM_TYPES = ("layer_norm", "rms_norm")


@dataclass(frozen=True)
class InternVisionConfig:
    """InternViT. Defaults are transformers' `InternVLVisionConfig`'s (InternViT-300M, 448 px tiles of 14 px)."""
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    attention_bias: bool = False
    use_qk_norm: bool = False             # RMSNorm over the full width of q and k (InternViT-6B)
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"         # or "rms_norm" (InternViT-6B)
    layer_norm_eps: float = 1e-6
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    use_absolute_position_embeddings: bool = True
    use_mean_pooling: bool = True         # False: a final LayerNorm on the last layer's output (`layernorm`)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per side of a tile (32 for 448 / 14)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class InternTextConfig(TextConfig):
    """The decoder: transformers' Qwen2Config / Qwen3Config defaults (Qwen3: head_dim 128)."""
    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    use_sliding_window: bool = False


@dataclass(frozen=True)
class InternVLConfig:
    """The whole model. Defaults: transformers' InternVLConfig (tied head unless the file says otherwise)."""
    model_type = "internvl"          # the family (models/registry.py); a class attribute, not a field
    vision: InternVisionConfig
    text: InternTextConfig
    image_token_id: int = 151667
    image_seq_length: int = 256
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    torch_dtype: str | None = None
    name_or_path: str = ""
    image: TileConfig = TileConfig()  # preprocessor_config.json beside config.json (processing.py)

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
    def shuffle(self) -> int:
        """The pixel shuffle's side: 1 / downsample_ratio (2: each 2×2 block of patches becomes one token)."""
        return int(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per 448 px tile: (32 / 2)² = 256."""
        return (self.vision.grid // self.shuffle) ** 2

    @property
    def feature_index(self) -> int:
        """vision_feature_layer as an index into the hidden states [embeddings, after layer 0, …, after layer L−1]."""
        return self.vision_feature_layer % (self.vision.num_hidden_layers + 1)

    @property
    def vision_layers_used(self) -> int:
        """How many InternViT layers run: hidden_states[k] is the output of layer k−1."""
        return self.feature_index

    @staticmethod
    def from_hf(d: dict, name_or_path: str = "") -> "InternVLConfig":
        where = f"config.json of '{name_or_path}'"
        if not isinstance(d, dict):
            raise MinivarError(f"{where} is not a JSON object")
        if d.get("model_type") != "internvl":
            raise MinivarError(f"{where} has model_type '{d.get('model_type')}', expected 'internvl'")
        for key in ("vision_config", "text_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise MinivarError(f"{where}: {key} is not a JSON object")
        vision = vision_from_hf(dict(d.get("vision_config") or {}), where)
        text = text_from_hf(dict(d.get("text_config") or {}), d, where)
        layer = d.get("vision_feature_layer", -1)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise MinivarError(f"{where}: vision_feature_layer {layer!r} is not supported (one layer index)")
        if not -(vision.num_hidden_layers + 1) <= layer <= vision.num_hidden_layers or layer == 0:
            raise MinivarError(f"{where}: vision_feature_layer {layer} is outside the "
                               f"{vision.num_hidden_layers} vision layers")
        cfg = InternVLConfig(
            vision=vision, text=text, image_token_id=int(d.get("image_token_id", 151667)),
            image_seq_length=int(d.get("image_seq_length", 256)),
            downsample_ratio=float(d.get("downsample_ratio", 0.5)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"), vision_feature_layer=layer,
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            torch_dtype=d.get("dtype") or d.get("torch_dtype"), name_or_path=name_or_path,
            image=read_tile_config(name_or_path, vision.image_size))
        if cfg.projector_hidden_act != "gelu":
            raise MinivarError(f"{where}: projector_hidden_act '{cfg.projector_hidden_act}' is not supported")
        if cfg.vision_feature_select_strategy != "default":
            raise MinivarError(f"{where}: vision_feature_select_strategy '{cfg.vision_feature_select_strategy}' "
                               f"is not supported (InternVL drops the CLS token: 'default')")
        s = 1 / cfg.downsample_ratio
        if s != int(s) or vision.grid % int(s):
            raise MinivarError(f"{where}: downsample_ratio {cfg.downsample_ratio} does not divide the "
                               f"{vision.grid}×{vision.grid} patch grid")
        if cfg.image_seq_length != cfg.tokens_per_tile:
            raise MinivarError(f"{where}: image_seq_length {cfg.image_seq_length} is not the "
                               f"{cfg.tokens_per_tile} tokens a tile gives")
        return cfg


def vision_from_hf(d: dict, where: str) -> InternVisionConfig:
    for key in ("image_size", "patch_size"):       # transformers keeps (h, w); the tiles are square
        if isinstance(d.get(key), (list, tuple)):
            if len(set(d[key])) != 1:
                raise MinivarError(f"{where}: vision_config.{key} {d[key]} is not supported (square tiles only)")
            d[key] = d[key][0]
    v = _fill(InternVisionConfig, d, {})
    if v.norm_type not in NORM_TYPES:
        raise MinivarError(f"{where}: vision_config.norm_type '{v.norm_type}' is not one of {', '.join(NORM_TYPES)}")
    if v.hidden_act != "gelu":
        raise MinivarError(f"{where}: vision_config.hidden_act '{v.hidden_act}' is not supported")
    if not v.use_absolute_position_embeddings:
        raise MinivarError(f"{where}: vision_config.use_absolute_position_embeddings false is not supported")
    if v.hidden_size % v.num_attention_heads or v.image_size % v.patch_size:
        raise MinivarError(f"{where}: vision_config sizes do not divide (hidden_size {v.hidden_size}, "
                           f"{v.num_attention_heads} heads, image_size {v.image_size}, patch_size {v.patch_size})")
    return v


def text_from_hf(t: dict, d: dict, where: str) -> InternTextConfig:
    kind = t.get("model_type", "qwen2")
    if kind not in TEXT_TYPES:
        raise MinivarError(f"{where}: text_config.model_type '{kind}' is not supported (one of {', '.join(TEXT_TYPES)})")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise MinivarError(f"{where}: text_config.rope_parameters is not a JSON object")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise MinivarError(f"{where}: rope type '{rope.get('rope_type', rope.get('type'))}' is not supported")
    if "rope_theta" in rope and "rope_theta" not in t:
        t["rope_theta"] = rope["rope_theta"]
    if isinstance(t.get("eos_token_id"), list):
        t["eos_token_id"] = tuple(t["eos_token_id"])
    # the head is tied as transformers 5.x decides it: the top-level key (InternVLConfig's default: True)
    t["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", True))
    if kind == "qwen3":
        t.setdefault("head_dim", 128)              # Qwen3Config's default; Qwen2's is hidden / heads
        t.setdefault("attention_bias", False)
    else:
        t["attention_bias"] = True                 # Qwen2: q/k/v biases (o_proj has none: see model.py)
    text = _fill(InternTextConfig, t, {"head_dim": "head_dim_"})
    if text.hidden_act != "silu":
        raise MinivarError(f"{where}: text hidden_act '{text.hidden_act}' is not supported")
    if text.use_sliding_window:
        raise MinivarError(f"{where}: use_sliding_window is true; sliding-window attention is not supported")
    if text.num_attention_heads % text.n_kv_heads:
        raise MinivarError(f"{where}: {text.num_attention_heads} attention heads do not divide into "
                           f"{text.n_kv_heads} key/value heads")
    return text
