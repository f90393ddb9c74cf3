"""The offline demos' makings: tiny random weights with planted sinks, and the builders of LLaVA-1.5's and
LLaVA-NeXT's demos (minivar/demo.py finds and builds them by name; each family registers its builder as
`Family.demo`).

Every demo's decoder is 768 wide: φ (the VAR table's sink score) of one massive dim can reach √768 ≈ 27.7 ≥
τ = 20.
How the sinks are planted (`plant_text_sinks` for any LLaMA-style decoder, `plant_sinks` for LLaVA's CLIP towers):
  * the first token's embedding (LLaMA's BOS, Qwen's <|im_start|>) gets a massive value in the sink dims (a text
    sink, like LLaMA's BOS);
  * some image tokens get a massive value through the vision tower and projector (visual sinks): with a CLIP tower
    (absolute position embeddings), a few chosen patches are marked in one CLIP dim by their position embedding;
    a tower without position embeddings (Qwen2-VL's) marks content instead — near-white image blocks, where
    trained models' visual sinks sit on background too (models/qwen2_vl/demo.py);
  * a constant "common" dim in every token plus matching q/k columns makes queries attend to sinks, as real heads do.
`plant_sinks` is also what the tests use to give tiny models sinks.

Adding a family's demo (a few lines, in the family's own folder):
  1. write `build_demo(directory, family)` that writes the checkpoint's files into `directory` — typically a
     config.json dict of your family with a 768-wide decoder (DEMO_TEXT), `cfg = family.config(that_dict, "")`,
     `random_weights(family.model, cfg)`, `plant_text_sinks(...)` on the decoder and a visual-sink plant for your
     tower, your tokenizer (`make_tokenizer` is a byte-level one with <image>), then
     `write_checkpoint(directory, config_dict, state, tokenizer, {other json files})`, which writes config.json last
     so a half-built demo is never taken for a whole one;
  2. set `demo=build_demo` on your Family (models/family.py).
`--model demo-<model_type>` then builds and loads it, `minivar --help` names it, and tests/test_demos.py checks it
(it loads, answers, its planted sinks are found on `demo.sink_picture()` and VAR changes its attention).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import LlavaConfig, TextConfig, VisionConfig

DEMO_SINK_DIMS = (37, 301)       # (text sink dim, visual sink dim) planted into every demo's decoder
DEMO_SINK_PATCHES = (27, 100, 290, 455)   # patch indices (row-major on the 24×24 grid) made into visual sinks
DEMO_COMMON_DIM = 5
DEMO_TEXT = dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8)


def random_weights(model_cls, cfg, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights for every parameter of `model_cls(cfg)` (a minivar model), in its names (fp32)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model_cls(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, shape, g, std) for name, shape in sorted(shapes.items())}


NORMS = re.compile(r"(norm\d?|ln_q)\.(weight|bias)$")     # Qwen's norm1/norm2/ln_q (LLaVA's match the rule below)


def random_tensor(name: str, shape, generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """One parameter's random value (fp32): norms at weight 1 / bias 0, other biases 0, weights N(0, std²)."""
    if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name or "pre_layrnorm" in name \
            or NORMS.search(name):
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name.endswith("embed_tokens.weight"):
        # token embeddings well above what the random layers add, so each token's identity survives to the
        # output and the demo's noise at least varies with the input
        return torch.randn(shape, generator=generator) * 0.3
    return torch.randn(shape, generator=generator) * std


def plant_text_sinks(state: dict[str, torch.Tensor], text: TextConfig, *, prefix: str, lm_head: str, first_id: int,
                     text_dim: int, visual_dim: int, common_dim: int, massive: float = 100.0, common: float = 3.0,
                     focus=(0.05, 0.3), seed: int = 1) -> None:
    """The decoder's part, in place, for any LLaMA-style decoder whose layers are `{prefix}layers.N.*` and embedding
    `{prefix}embed_tokens.weight`: token `first_id` becomes a text sink, every token carries the common dim, and
    each head's queries (reading the common dim) meet keys that read the sink dims. `focus` spans the per-head
    strength of attention to sinks, so some heads are sink-heavy and others are not. The image tokens' common dim
    and their massive visual dim are the vision side's to add (`plant_sinks`)."""
    g = torch.Generator().manual_seed(seed)
    emb = state[f"{prefix}embed_tokens.weight"]
    emb[:, common_dim] += common                                     # every text token carries the common dim
    # ... which must not decide the next token by itself (it would, being the largest dim of every hidden state)
    state[lm_head][:, common_dim] = 0.0
    emb[first_id, text_dim] = massive                                # the first token: a text sink in both sink dims
    emb[first_id, visual_dim] = massive / 2
    # queries read the common dim, keys read the sink dims: q·k is large exactly for sink keys
    hd = text.head_dim
    for layer in range(text.num_hidden_layers):
        wq = state[f"{prefix}layers.{layer}.self_attn.q_proj.weight"]
        wk = state[f"{prefix}layers.{layer}.self_attn.k_proj.weight"]
        # only queries read the common dim; anything else reading it would add the same vector to every token
        for name in ("self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            state[f"{prefix}layers.{layer}.{name}.weight"][:, common_dim] = 0.0
        for head in range(text.num_attention_heads):
            u = torch.randn(hd, generator=g)
            u = u / u.norm()
            strength = focus[0] + (focus[1] - focus[0]) * torch.rand((), generator=g).item()
            rows = slice(head * hd, (head + 1) * hd)
            wq[rows, common_dim] = u * strength ** 0.5
            if head < text.n_kv_heads:
                # the first token draws much attention, visual sinks less (so image attention is mostly non-sink,
                # r ≥ ρ): the pattern the paper reports for LLaVA's image-centric heads
                wk[rows, text_dim] = u * strength ** 0.5
                wk[rows, visual_dim] = 0.3 * u * strength ** 0.5


def plant_sinks(state: dict[str, torch.Tensor], cfg: LlavaConfig, *, text_dim: int, visual_dim: int, common_dim: int,
                patches=(), bos_id: int = 1, massive: float = 100.0, common: float = 3.0, focus=(0.05, 0.3),
                seed: int = 1) -> None:
    """Give a random LLaVA (LLaVA-1.5 or LLaVA-NeXT: CLIP, the two-layer projector, LLaMA) text and visual sinks,
    in place (see the module docstring); `patches` are the CLIP patches made visual sinks, in every crop."""
    plant_text_sinks(state, cfg.text, prefix="language_model.model.", lm_head="language_model.lm_head.weight",
                     first_id=bos_id, text_dim=text_dim, visual_dim=visual_dim, common_dim=common_dim,
                     massive=massive, common=common, focus=focus, seed=seed)
    # visual sinks: mark the chosen patches in CLIP dim 0 via their position embeddings ...
    pos = state["vision_tower.embeddings.position_embedding.weight"]
    for patch in patches:
        pos[1 + patch, 0] = 30.0          # ≈ 8 after pre_layrnorm, where other tokens have |x| ≲ 3 in this dim
    # ... the projector turns CLIP dim 0 into hidden unit 0, and hidden unit 0 into the massive visual dim
    w1, b1 = state["multi_modal_projector.linear_1.weight"], state["multi_modal_projector.linear_1.bias"]
    w1[0].zero_(); w1[0, 0] = 1.0; b1[0] = -4.0          # GELU passes only the marked patches
    w2, b2 = state["multi_modal_projector.linear_2.weight"], state["multi_modal_projector.linear_2.bias"]
    w2[:, 0] = 0.0; w2[visual_dim, 0] = massive / 3.5
    b2[common_dim] += common                                         # image tokens carry the common dim too


def write_checkpoint(directory: Path, config: dict, state: dict[str, torch.Tensor], tokenizer,
                     files: dict[str, dict] | None = None) -> Path:
    """A demo's files: model.safetensors (fp16), tokenizer.json (a `tokenizers.Tokenizer`), the other JSON `files`
    ({name: dict}), then config.json. The weights go to a temporary name first and config.json comes last, so an
    interrupted build never leaves something that looks like a checkpoint."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "model.safetensors.tmp"
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    tokenizer.save(str(directory / "tokenizer.json"))
    for name, content in (files or {}).items():
        (directory / name).write_text(json.dumps(content, indent=2))
    tmp.replace(directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory



# ---------------------------------------------------------------------------------------------------------------
# LLaVA-1.5 (`--model demo`) and LLaVA-NeXT (`--model demo-llava_next`)

def make_tokenizer():
    """A byte-level tokenizer (no merges): ids 3..258 are the 256 bytes, then <image>, <pad>. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c))):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    assert tok.token_to_id("<image>") == 259 and tok.token_to_id("<pad>") == 260
    return tok


def demo_config() -> LlavaConfig:
    """`--model demo`: CLIP at LLaVA-1.5's 336 px (576 image tokens), a 768-wide LLaMA decoder."""
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=336, patch_size=14)
    text = TextConfig(vocab_size=261, max_position_embeddings=2048, rms_norm_eps=1e-5, **DEMO_TEXT)
    return LlavaConfig(vision=vision, text=text, image_token_index=259, pad_token_id=260, torch_dtype="float16",
                       name_or_path="minivar-demo")


def planted_llava(cfg, model_cls, patches=DEMO_SINK_PATCHES, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LLaVA's random weights with the demo's sinks: `patches` of every crop become visual sinks."""
    state = random_weights(model_cls, cfg, seed)
    plant_sinks(state, cfg, text_dim=DEMO_SINK_DIMS[0], visual_dim=DEMO_SINK_DIMS[1], common_dim=DEMO_COMMON_DIM,
                patches=patches)
    return state


def build_llava(directory: Path, family, seed: int = 0) -> Path:
    """Write LLaVA-1.5's demo (config.json, model.safetensors in fp16, tokenizer.json) into `directory`."""
    cfg = demo_config()
    return write_checkpoint(directory, cfg.to_hf(), planted_llava(cfg, family.model, DEMO_SINK_PATCHES, seed),
                            make_tokenizer())


NEXT_IMAGE_SIZE = 112                          # CLIP crops of 112 px: 8×8 tokens each, at most 336 per image
NEXT_SINK_PATCHES = (9, 20, 43, 62)            # on the 8×8 grid of every crop (the base and each tile)


def next_demo_config_json() -> dict:
    """`--model demo-llava_next`'s config.json: LLaVA-NeXT's anyres tiling (base + up to 2×2 tiles of 112 px) with
    the demo's decoder."""
    base = demo_config()
    S = NEXT_IMAGE_SIZE
    plain = LlavaConfig(vision=VisionConfig(**{**base.vision.__dict__, "image_size": S}), text=base.text,
                        image_token_index=259, pad_token_id=260, torch_dtype="float16")
    return plain.to_hf() | {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
                            "image_grid_pinpoints": [[S, 2 * S], [2 * S, S], [2 * S, 2 * S]],
                            "image_seq_length": (S // 14) ** 2}


def build_llava_next(directory: Path, family, seed: int = 0) -> Path:
    """Write LLaVA-NeXT's demo (config.json, preprocessor_config.json, model.safetensors, tokenizer.json)."""
    d = next_demo_config_json()
    cfg = family.config(d, "minivar-demo-llava_next")
    state = planted_llava(cfg, family.model, NEXT_SINK_PATCHES, seed)
    return write_checkpoint(directory, d, state, make_tokenizer(),
                            {"preprocessor_config.json": cfg.to_hf_preprocessor()})
