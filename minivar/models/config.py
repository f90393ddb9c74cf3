"""Model configuration: frozen dataclasses filled from a llava-hf config.json.

llava-hf's config.json is sparse: the text config lists only what differs from transformers' `LlamaConfig`
defaults, and the vision config only what differs from `CLIPVisionConfig` defaults. So every field below carries
the default transformers uses, and `from_hf` fills whatever the file leaves out. Two generations of the format
exist: 4.x writes `rope_theta` / `torch_dtype`, 5.x writes `rope_parameters: {"rope_theta": ...}` / `dtype`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import MinivarError


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower. Defaults are `CLIPVisionConfig`'s (ViT-B/32), not LLaVA's ViT-L/14-336."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """LLaMA decoder. Defaults are `LlamaConfig`'s: note rms_norm_eps 1e-6 and 2048 positions, which llava-hf overrides."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None means "same as num_attention_heads" (no grouped-query attention)
    head_dim_: int | None = None            # config key "head_dim"; None means hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden_size // self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads


# transformers' LlavaConfig builds this vision config when config.json has none
LLAVA_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                         "num_attention_heads": 16, "image_size": 336, "patch_size": 14}


@dataclass(frozen=True)
class LlavaConfig:
    """The whole model: vision tower, projector settings, decoder, and the image-token conventions."""
    model_type = "llava"           # the family (models/registry.py); a class attribute, not a config field
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 32000
    pad_token_id: int | None = None
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    torch_dtype: str | None = None  # the dtype the checkpoint says it is stored in, for information only
    name_or_path: str = ""         # where the config came from (a hub id or a directory), used to recognise models

    @property
    def num_image_tokens(self) -> int:
        """How many features the vision tower yields per image (576 for ViT-L/14 at 336 px)."""
        n = self.vision.num_patches
        return n + 1 if self.vision_feature_select_strategy == "full" else n

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """vision_feature_layer as non-negative indices into the hidden states [embeddings, after layer 0, ...]: HF
        counts −2 from the end of the *full* CLIP stack, which has one more layer than minivar runs."""
        layers = self.vision_feature_layer if isinstance(self.vision_feature_layer, tuple) else (self.vision_feature_layer,)
        total = self.vision.num_hidden_layers + 1
        return tuple(k % total for k in layers)

    @property
    def vision_layers_used(self) -> int:
        """How many CLIP layers must run: hidden_states[k] is the output of layer k-1 (index 0 is the embeddings)."""
        return max(self.feature_indices)

    @staticmethod
    def from_hf(d: dict, name_or_path: str = "") -> "LlavaConfig":
        if not isinstance(d, dict):
            raise MinivarError(f"config.json of '{name_or_path}' is not a JSON object")
        model_type = d.get("model_type", "llava")
        if model_type != "llava":
            raise MinivarError(f"config.json of '{name_or_path}' has model_type '{model_type}', minivar reads 'llava'")
        # Like transformers' LlavaConfig: no vision_config at all means LLaVA's CLIP ViT-L/14-336, while a vision_config
        # that is given fills what it leaves out from CLIPVisionConfig's own (ViT-B/32) defaults.
        vision_d = d.get("vision_config")
        for key in ("vision_config", "text_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise MinivarError(f"config.json of '{name_or_path}': {key} is not a JSON object")
        vision = _fill(VisionConfig, LLAVA_VISION_DEFAULTS if vision_d is None else vision_d, {})
        text_d = dict(d.get("text_config") or {})
        if "tie_word_embeddings" in d and "tie_word_embeddings" not in text_d:   # some configs keep it at the top
            text_d["tie_word_embeddings"] = d["tie_word_embeddings"]
        # 5.x keeps rope settings in rope_parameters; 4.x keeps rope_theta at the top of the text config.
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise MinivarError(f"config.json of '{name_or_path}': rope_parameters / rope_scaling is not a JSON object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise MinivarError(f"config.json of '{name_or_path}': rope type '{rope_type}' is not supported")
        if "rope_theta" in rope and "rope_theta" not in text_d:
            text_d["rope_theta"] = rope["rope_theta"]
        text = _fill(TextConfig, text_d, {"head_dim": "head_dim_"})
        if text.hidden_act != "silu":
            raise MinivarError(f"config.json of '{name_or_path}': text hidden_act '{text.hidden_act}' is not supported")
        if vision.hidden_act != "quick_gelu":
            raise MinivarError(f"config.json of '{name_or_path}': vision hidden_act '{vision.hidden_act}' is not supported")
        layer = d.get("vision_feature_layer", -2)
        layer = tuple(layer) if isinstance(layer, list) else int(layer)
        cfg = LlavaConfig(
            vision=vision,
            text=text,
            image_token_index=int(d.get("image_token_index", d.get("image_token_id", 32000))),
            pad_token_id=d.get("pad_token_id"),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=bool(d.get("multimodal_projector_bias", True)),
            vision_feature_layer=layer,
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            torch_dtype=d.get("dtype") or d.get("torch_dtype"),
            name_or_path=name_or_path,
        )
        if cfg.projector_hidden_act != "gelu":
            raise MinivarError(f"config.json of '{name_or_path}': projector_hidden_act '{cfg.projector_hidden_act}' is not supported")
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise MinivarError(f"config.json of '{name_or_path}': unknown vision_feature_select_strategy "
                               f"'{cfg.vision_feature_select_strategy}'")
        return cfg

    def to_hf(self) -> dict:
        """A 5.x-style config.json dict (used to write the demo checkpoint)."""
        v, t = self.vision, self.text
        text = {k: getattr(t, k) for k in (f.name for f in dataclasses.fields(t)) if k not in ("head_dim_", "rope_theta")}
        text.update(model_type="llama", head_dim=t.head_dim, rope_parameters={"rope_theta": t.rope_theta, "rope_type": "default"})
        vision = dataclasses.asdict(v) | {"model_type": "clip_vision_model"}
        return {
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": self.image_token_index, "pad_token_id": self.pad_token_id,
            "projector_hidden_act": self.projector_hidden_act, "multimodal_projector_bias": self.projector_bias,
            "vision_feature_layer": list(self.vision_feature_layer) if isinstance(self.vision_feature_layer, tuple)
            else self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "image_seq_length": self.num_image_tokens, "tie_word_embeddings": t.tie_word_embeddings,
            "dtype": self.torch_dtype or "float32", "text_config": text, "vision_config": vision,
        }


def _fill(cls, d: dict, renames: dict):
    """Build dataclass `cls` from the keys of `d` it knows, leaving the rest at transformers' defaults."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        name = renames.get(key, key)
        if name in known and value is not None:
            kwargs[name] = value
    return cls(**kwargs)          # every field has a default: the keys not given keep it
