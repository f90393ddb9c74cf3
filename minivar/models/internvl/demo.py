"""InternVL's offline demo (`--model demo-internvl`): a tiny random InternVL3 (InternViT → pixel shuffle →
projector → Qwen2 decoder 768 wide) with planted sinks, its tokenizer, chat template and tiling, made on first use.

Tiles of 224 px (16×16 patches → 8×8 = 64 tokens each, at most 6 tiles + the thumbnail) keep it quick on a CPU;
the released models' are 448 px. The weights are random, so its text is noise; what it shows is that every step
runs, and what VAR does:
  * text sink: the first token, <|im_start|>, carries a massive value in the sink dims (models/demo.py's rule);
  * visual sinks: InternViT has absolute position embeddings, so two patches are marked in dim 0 through theirs —
    patches (2·r, 2·c) of every tile, the first patch of token (r, c) after the pixel shuffle — and the projector
    turns a large dim 0 of a token's first patch into a massive value in the visual sink dim: tokens (1, 2) and
    (5, 5) of every tile and of the thumbnail are visual sinks, whatever the picture;
  * a constant common dim in every token plus matching q/k columns makes queries attend to sinks.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import demo as base
from .config import InternTextConfig, InternVisionConfig, InternVLConfig
from .model import InternVL
from .processing import TileConfig
from .template import CHAT_TEMPLATE, IMAGE_TOKENS

TILE = 224
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
IDS = {name: 256 + i for i, name in enumerate(SPECIALS)}
VOCAB = 256 + len(SPECIALS) + 1            # one embedding row more than the tokenizer has, as Qwen's do
SINK_TOKENS = ((1, 2), (5, 5))             # (row, col) of the 8×8 tokens of each tile
TEXT_DIM, VISUAL_DIM, COMMON_DIM = base.DEMO_SINK_DIMS + (base.DEMO_COMMON_DIM,)


def demo_config() -> InternVLConfig:
    vision = InternVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                image_size=TILE)
    text = InternTextConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=768, intermediate_size=1536,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                            max_position_embeddings=4096, rope_theta=1000000.0, attention_bias=True,
                            eos_token_id=IDS["<|im_end|>"], pad_token_id=IDS["<|endoftext|>"],
                            tie_word_embeddings=False)
    return InternVLConfig(vision=vision, text=text, image_token_id=IDS["<IMG_CONTEXT>"], image_seq_length=64,
                          torch_dtype="float16", name_or_path="minivar-demo-internvl",
                          image=TileConfig(tile=TILE, max_patches=6))


def hf_config(cfg: InternVLConfig) -> dict:
    """config.json as transformers 5.x writes it (nested text_config / vision_config)."""
    v, t = cfg.vision, cfg.text
    vision = {k: getattr(v, k) for k in v.__dataclass_fields__} | {
        "model_type": "internvl_vision", "image_size": [v.image_size] * 2, "patch_size": [v.patch_size] * 2}
    text = {"model_type": "qwen2", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.n_kv_heads,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta}, "hidden_act": "silu",
            "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id, "tie_word_embeddings": False}
    return {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
            "image_token_id": cfg.image_token_id, "image_seq_length": cfg.image_seq_length,
            "downsample_ratio": cfg.downsample_ratio, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default", "tie_word_embeddings": False, "dtype": cfg.torch_dtype,
            "text_config": text, "vision_config": vision}


def make_tokenizer():
    """Byte-level BPE without merges: ids 0..255 the bytes, then Qwen's and InternVL's special tokens (IDS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet(), key=ord))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    assert all(tok.token_to_id(name) == i for name, i in IDS.items())
    return tok


def planted_state(cfg: InternVLConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (models/demo.py's rule) with the sinks of the module docstring planted."""
    state = base.random_weights(InternVL, cfg, seed)
    grid = cfg.vision.grid
    pos = state["vision_tower.embeddings.position_embeddings"]
    for r, c in SINK_TOKENS:
        pos[0, 1 + (2 * r) * grid + 2 * c, 0] = 30.0       # the token's first patch, marked in dim 0
    w1, b1 = state["multi_modal_projector.linear_1.weight"], state["multi_modal_projector.linear_1.bias"]
    w1[0].zero_(); w1[0, 0] = 1.0; b1[0] = -6.0             # after the LayerNorm: ≈ 15 marked, ≲ 3 otherwise
    w2, b2 = state["multi_modal_projector.linear_2.weight"], state["multi_modal_projector.linear_2.bias"]
    w2[:, 0] = 0.0; w2[VISUAL_DIM, 0] = 12.0
    b2[COMMON_DIM] += 3.0                                   # image tokens carry the common dim too
    base.plant_text_sinks(state, cfg.text, prefix="language_model.model.", lm_head="language_model.lm_head.weight",
                          first_id=IDS["<|im_start|>"], text_dim=TEXT_DIM, visual_dim=VISUAL_DIM,
                          common_dim=COMMON_DIM)
    return state


def build_demo(directory: Path, family=None, seed: int = 0) -> Path:
    """Write the demo's files into `directory` (Family.demo): model.safetensors (fp16), tokenizer.json,
    tokenizer_config.json, preprocessor_config.json, chat_template.jinja, and config.json last (models/demo.py's
    write_checkpoint: a half-built demo is never taken for one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = demo_config()
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tokenizer_config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                        "extra_special_tokens": dict(IMAGE_TOKENS, video_token="<video>")}
    preprocessor = {"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": False, "min_patches": 1,
                    "max_patches": cfg.image.max_patches, "size": {"height": TILE, "width": TILE},
                    "image_mean": list(cfg.image.image_mean), "image_std": list(cfg.image.image_std), "resample": 3}
    return base.write_checkpoint(directory, hf_config(cfg), planted_state(cfg, seed), make_tokenizer(),
                                 {"tokenizer_config.json": tokenizer_config, "preprocessor_config.json": preprocessor})
