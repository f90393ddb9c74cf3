"""The offline demos of Qwen2-VL and Qwen2.5-VL (`--model demo-qwen2_vl`, `--model demo-qwen2_5_vl`; demo.py).

A two-block ViT 64 wide (Qwen2.5-VL's: one window block, one full-attention block), the 2×2 merger into the demo's
768-wide Qwen2 decoder, a byte-level tokenizer with Qwen's special tokens, images capped at 256 merged tokens.

The tower has no position embedding (its positions are rotary, i.e. relative), so a visual sink cannot be planted
at a fixed patch as in LLaVA's demos: it is planted on content, as trained models' visual sinks sit on background.
An image block whose four patches are near white becomes a visual sink:
  * patch dim 0 is the sum of the patch's normalised pixels (its brightness), dim 1 a constant that the first
    block's MLP bias writes, so the merger's norm keeps dim 0 as a brightness rather than scaling it away;
    the blocks leave both dims alone (those rows of their output projections are zero);
  * the merger's first hidden unit averages the four patches' dim 0 past a threshold (GELU passes only near-white
    blocks, mean pixel ≳ 215 of 255), and its output layer turns that unit into a massive value in the visual
    sink dim.
The text sink is the first token, <|im_start|> (demo.plant_text_sinks).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import demo
from .config import Qwen2VisionConfig, Qwen25VisionConfig
from .decoder import Qwen2TextConfig
from .model import Qwen2VLConfig
from .processing import QwenImageConfig
from .template import SPECIAL_TOKENS

# the tokenizer's ids: the 256 bytes, then Qwen's special tokens (and <|video_pad|>, which config.json names)
SPECIALS = (*SPECIAL_TOKENS, "<|video_pad|>")
IDS = {name: 256 + i for i, name in enumerate(SPECIALS)}
VOCAB = 256 + len(SPECIALS) + 1           # one embedding row more than the tokenizer has, as Qwen's checkpoints do
MAX_PIXELS = 28 * 28 * 256                # at most 256 image tokens
BRIGHTNESS = 10 / 1176                    # patch dim 0 = this × the sum of the patch's 1176 normalised values
CONSTANT = 30.0                           # patch dim 1 (the first block's MLP bias)
THRESHOLD, GAIN = 3.1, 3.0                # merger unit 0: GELU(GAIN·(mean normed dim 0 of 4 patches − THRESHOLD))


def demo_config(model_type: str) -> Qwen2VLConfig:
    width, out = 64, demo.DEMO_TEXT["hidden_size"]
    if model_type == "qwen2_vl":
        vision = Qwen2VisionConfig(depth=2, embed_dim=width, hidden_size=out, num_heads=4, mlp_ratio=2)
    else:
        vision = Qwen25VisionConfig(depth=2, hidden_size=width, intermediate_size=2 * width, num_heads=4,
                                    out_hidden_size=out, fullatt_block_indexes=(1,))
    text = Qwen2TextConfig(vocab_size=VOCAB, max_position_embeddings=4096, num_key_value_heads=8,
                           rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=IDS["<|im_end|>"],
                           pad_token_id=IDS["<|endoftext|>"], mrope_section=(16, 16, 16), **demo.DEMO_TEXT)
    return Qwen2VLConfig(model_type=model_type, vision=vision, text=text, image_token_id=IDS["<|image_pad|>"],
                         video_token_id=IDS["<|video_pad|>"], vision_start_token_id=IDS["<|vision_start|>"],
                         vision_end_token_id=IDS["<|vision_end|>"], torch_dtype="float16",
                         name_or_path=f"minivar-demo-{model_type}", image=QwenImageConfig(max_pixels=MAX_PIXELS))


def hub_config(cfg: Qwen2VLConfig) -> dict:
    """config.json in the hub's layout: the decoder's keys at the top, `rope_scaling` of type mrope."""
    t, v = cfg.text, cfg.vision
    vision = {k: getattr(v, k) for k in v.__dataclass_fields__ if k != "rope_theta"}
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = list(vision["fullatt_block_indexes"])
    return {
        "architectures": ["Qwen2VLForConditionalGeneration" if cfg.model_type == "qwen2_vl"
                          else "Qwen2_5_VLForConditionalGeneration"],
        "model_type": cfg.model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.n_kv_heads,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "hidden_act": t.hidden_act, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id, "tie_word_embeddings": False, "torch_dtype": cfg.torch_dtype,
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
        "vision_config": vision,
    }


def make_tokenizer():
    """Byte-level BPE without merges: ids 0..255 the bytes, then Qwen's special tokens (IDS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet(), key=ord))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    assert all(tok.token_to_id(name) == i for name, i in IDS.items())
    return tok


def plant_visual_sinks(state: dict[str, torch.Tensor], cfg: Qwen2VLConfig, *, visual_dim: int, common_dim: int,
                       massive: float = 100.0, common: float = 3.0, seed: int = 2) -> None:
    """Near-white blocks → a massive `visual_dim` (the module docstring), in place; image tokens carry the common
    dim. The tower's names are Qwen2-VL's and Qwen2.5-VL's alike but for the MLP's output (fc2 / down_proj)."""
    w = state["visual.patch_embed.proj.weight"]                    # [width, C, tp, p, p]
    w[0] = BRIGHTNESS
    w[1] = 0.0
    for block in range(cfg.vision.depth):
        out = "fc2" if f"visual.blocks.{block}.mlp.fc2.weight" in state else "down_proj"
        for name in ("attn.proj", f"mlp.{out}"):
            state[f"visual.blocks.{block}.{name}.weight"][:2] = 0.0
            state[f"visual.blocks.{block}.{name}.bias"][:2] = 0.0
    first = "fc2" if "visual.blocks.0.mlp.fc2.weight" in state else "down_proj"
    state[f"visual.blocks.0.mlp.{first}.bias"][1] = CONSTANT
    width = cfg.vision.width
    w1, b1 = state["visual.merger.mlp.0.weight"], state["visual.merger.mlp.0.bias"]
    w1[0].zero_()
    w1[0, [0, width, 2 * width, 3 * width]] = GAIN / 4              # the 2×2 block's four patches, averaged
    b1[0] = -GAIN * THRESHOLD
    w2, b2 = state["visual.merger.mlp.2.weight"], state["visual.merger.mlp.2.bias"]
    w2[:, 0] = 0.0
    w2[visual_dim, 0] = massive / 3.5
    # image tokens as large as text tokens (the embedding's 0.3 per dim; the random merger alone gives ~0.05), so
    # that GELU's dip just below the threshold (−0.17 × massive / 3.5 ≈ −5) does not make a sink of them
    g = torch.Generator().manual_seed(seed)
    b2.add_(torch.randn(b2.shape, generator=g) * 0.3)
    b2[visual_dim] = 0.0
    b2[common_dim] += common


def build_demo(directory: Path, family, seed: int = 0) -> Path:
    """Write the demo of `family` (Qwen2-VL's or Qwen2.5-VL's: Family.demo) into `directory`."""
    cfg = demo_config(family.model_type)
    state = demo.random_weights(family.model, cfg, seed)
    text_dim, visual_dim = demo.DEMO_SINK_DIMS
    demo.plant_text_sinks(state, cfg.text, prefix="model.", lm_head="lm_head.weight", first_id=IDS["<|im_start|>"],
                          text_dim=text_dim, visual_dim=visual_dim, common_dim=demo.DEMO_COMMON_DIM)
    plant_visual_sinks(state, cfg, visual_dim=visual_dim, common_dim=demo.DEMO_COMMON_DIM)
    return demo.write_checkpoint(directory, hub_config(cfg), state, make_tokenizer(),
                                 {"preprocessor_config.json": {"min_pixels": 56 * 56, "max_pixels": MAX_PIXELS}})
