"""The offline demos of Qwen3-VL and Qwen3-VL-MoE (`--model demo-qwen3_vl`, `--model demo-qwen3_vl_moe`): tiny
random checkpoints under the hub's tensor names, with planted sinks, written on first use.

A two-block ViT 64 wide with DeepStack after both blocks, a 768-wide Qwen3 decoder of 4 layers (the MoE's: 8
experts, 2 per token, layer 1 dense), a byte-level tokenizer with Qwen's special tokens, the Instruct chat template,
images capped at 256 merged tokens (32×32 px each).

Sinks are planted as in the other demos: the first token, <|im_start|>, is a text sink, queries read a common dim
that keys of sinks answer. Visual sinks sit on content — an image block whose four 16-px patches are near white:
  * patch dim 0 is the patch's brightness (the sum of its normalised pixels), dim 1 a constant (the patch
    embedding's bias) that keeps the merger's LayerNorm from scaling dim 0 away; the learned positions and the
    blocks leave both dims alone (those entries are zero);
  * the merger's first hidden unit averages the four patches' dim 0 past a threshold (GELU passes only near-white
    blocks), and its output layer turns that unit into a massive value in the visual sink dim.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..qwen2_vl.template import SPECIAL_TOKENS
from .model import Qwen3VL, Qwen3VLConfig

SPECIALS = (*SPECIAL_TOKENS, "<|video_pad|>")
IDS = {name: 256 + i for i, name in enumerate(SPECIALS)}
VOCAB = 256 + len(SPECIALS) + 1          # one embedding row more than the tokenizer has, as Qwen's checkpoints do
SINK_DIMS = (37, 301)                    # (text sink dim, visual sink dim)
COMMON_DIM = 5
MAX_PIXELS = 32 * 32 * 256
PATCH_VALUES = 3 * 2 * 16 * 16
BRIGHTNESS = 10 / PATCH_VALUES           # patch dim 0 = this × the sum of the patch's normalised values (≈ 10 white)
CONSTANT = 30.0                          # patch dim 1
THRESHOLD, GAIN = 1.5, 3.0               # merger unit 0 = GELU(GAIN·(mean normed dim 0 of the 4 patches − THRESHOLD))
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
            "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
            "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def demo_config(model_type: str) -> dict:
    """The demo's config.json (the hub's layout)."""
    text = {"vocab_size": VOCAB, "hidden_size": 768, "intermediate_size": 1536, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 96, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_theta": 5000000, "hidden_act": "silu", "bos_token_id": None,
            "eos_token_id": IDS["<|im_end|>"], "tie_word_embeddings": False,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [16, 16, 16], "rope_type": "default"}}
    if model_type == "qwen3_vl_moe":
        text |= {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 384, "decoder_sparse_step": 1,
                 "mlp_only_layers": [1]}
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 768,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1], "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "gelu_pytorch_tanh",
              "model_type": model_type}
    return {"architectures": ["Qwen3VLMoeForConditionalGeneration" if model_type == "qwen3_vl_moe"
                              else "Qwen3VLForConditionalGeneration"],
            "model_type": model_type, "text_config": text, "vision_config": vision, "tie_word_embeddings": False,
            "image_token_id": IDS["<|image_pad|>"], "video_token_id": IDS["<|video_pad|>"],
            "vision_start_token_id": IDS["<|vision_start|>"], "vision_end_token_id": IDS["<|vision_end|>"],
            "torch_dtype": "float16"}


def random_tensor(name: str, shape, generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """One parameter's random value (demo.py's rule): norms at 1 / biases 0, embeddings N(0, 0.3²), else N(0, std²)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=generator) * 0.3       # each token's identity survives the layers
    return torch.randn(shape, generator=generator) * std


def make_tokenizer():
    """Byte-level BPE without merges: ids 0..255 the bytes, then Qwen's special tokens (IDS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet(), key=ord))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    assert all(tok.token_to_id(name) == i for name, i in IDS.items())
    return tok


def plant(state: dict, cfg: Qwen3VLConfig, seed: int = 1, massive: float = 100.0, common: float = 3.0) -> None:
    """The text sink, the common dim and the visual sinks (the module docstring), in place, in minivar's names."""
    g = torch.Generator().manual_seed(seed)
    text_dim, visual_dim = SINK_DIMS
    t = cfg.text
    emb = state["model.embed_tokens.weight"]
    emb[:, COMMON_DIM] += common
    state["lm_head.weight"][:, COMMON_DIM] = 0.0
    emb[IDS["<|im_start|>"], text_dim] = massive
    emb[IDS["<|im_start|>"], visual_dim] = massive / 2
    for layer in range(t.num_hidden_layers):
        p = f"model.layers.{layer}."
        for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight",
                     "mlp.up_proj.weight", "mlp.gate.weight"):
            if p + name in state:
                state[p + name][:, COMMON_DIM] = 0.0
        if p + "mlp.experts.gate_up_proj" in state:
            state[p + "mlp.experts.gate_up_proj"][:, :, COMMON_DIM] = 0.0     # [E, 2I, D]: no expert reads it
        wq, wk = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        for head in range(t.num_attention_heads):
            u = torch.randn(t.head_dim, generator=g)
            u = u / u.norm()
            strength = 0.05 + 0.25 * torch.rand((), generator=g).item()
            rows = slice(head * t.head_dim, (head + 1) * t.head_dim)
            wq[rows, COMMON_DIM] = u * strength ** 0.5
            if head < t.n_kv_heads:
                wk[rows, text_dim] = u * strength ** 0.5
                wk[rows, visual_dim] = 0.3 * u * strength ** 0.5
    # the tower: brightness in dim 0, a constant in dim 1, left alone by the positions and the blocks
    state["visual.patch_embed.proj.weight"][0] = BRIGHTNESS
    state["visual.patch_embed.proj.weight"][1] = 0.0
    state["visual.patch_embed.proj.bias"][:2] = torch.tensor([0.0, CONSTANT])
    state["visual.pos_embed.weight"][:, :2] = 0.0
    for block in range(cfg.vision.depth):
        for name in ("attn.proj", "mlp.linear_fc2"):
            state[f"visual.blocks.{block}.{name}.weight"][:2] = 0.0
            state[f"visual.blocks.{block}.{name}.bias"][:2] = 0.0
    width = cfg.vision.hidden_size
    w1, b1 = state["visual.merger.linear_fc1.weight"], state["visual.merger.linear_fc1.bias"]
    w1[0].zero_()
    w1[0, [0, width, 2 * width, 3 * width]] = GAIN / 4
    b1[0] = -GAIN * THRESHOLD
    w2, b2 = state["visual.merger.linear_fc2.weight"], state["visual.merger.linear_fc2.bias"]
    w2[:, 0] = 0.0
    w2[visual_dim, 0] = massive / 3.5
    b2.add_(torch.randn(b2.shape, generator=g) * 0.3)     # image tokens as large as text tokens
    b2[visual_dim] = 0.0
    b2[COMMON_DIM] += common
    for k in range(len(cfg.vision.deepstack_visual_indexes)):   # DeepStack adds nothing to the sink dims
        state[f"visual.deepstack_merger_list.{k}.linear_fc2.weight"][list(SINK_DIMS)] = 0.0


def build_demo(directory: Path, family, seed: int = 0) -> Path:
    """Family.demo: write the demo of `family` (Qwen3-VL's or Qwen3-VL-MoE's) into `directory`; config.json last,
    so a half-built demo is never taken for one."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = demo_config(family.model_type)
    cfg = Qwen3VLConfig.from_hf(config, str(directory))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen3VL(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {k: random_tensor(k, s, g) for k, s in sorted(shapes.items())}
    plant(state, cfg)
    hub = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else
           ("model." + k) if k.startswith("visual.") else k: v.half().contiguous() for k, v in state.items()}
    tmp = directory / "model.safetensors.tmp"
    save_file(hub, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")
    make_tokenizer().save(str(directory / "tokenizer.json"))
    files = {"chat_template.json": {"chat_template": TEMPLATE},
             "generation_config.json": {"eos_token_id": [IDS["<|im_end|>"], IDS["<|endoftext|>"]]},
             "preprocessor_config.json": {"size": {"shortest_edge": 32 * 32, "longest_edge": MAX_PIXELS},
                                          "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                                          "image_mean": [0.5] * 3, "image_std": [0.5] * 3}}
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory

