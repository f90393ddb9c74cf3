"""The offline demo checkpoint: a tiny random-weight LLaVA with real shapes where it matters, made on the spot.

It lets anyone run the whole pipeline (image → CLIP at 336 px → 576 image tokens → decoder → text, VAR included)
without 14 GB of weights or a network. Its text is noise: the weights are random. What it shows is that every step
runs, and — because visual and text sinks are planted into it like those of a trained LLaVA — what VAR does.

`plant_sinks` is also what the tests use to give tiny models sinks:
  * the BOS embedding gets a massive value in the sink dims (a text sink, like LLaMA's BOS);
  * a few chosen image patches get a massive value through CLIP → projector (visual sinks): their CLIP position
    embedding is marked in one CLIP dim, which the projector turns into a massive value in a sink dim;
  * a constant "common" dim in every token plus matching q/k columns makes queries attend to sinks, as real heads do.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .models.config import LlavaConfig, TextConfig, VisionConfig

DEMO_SINK_DIMS = (37, 301)       # (text sink dim, visual sink dim) planted into the demo model
DEMO_SINK_PATCHES = (27, 100, 290, 455)   # patch indices (row-major on the 24×24 grid) made into visual sinks
DEMO_COMMON_DIM = 5


def demo_config() -> LlavaConfig:
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=336, patch_size=14)
    # hidden 768 > τ² = 400: massive dims can push φ up to √768 ≈ 27.7 ≥ τ = 20 (φ: the README's VAR table)
    text = TextConfig(vocab_size=261, hidden_size=768, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, max_position_embeddings=2048, rms_norm_eps=1e-5)
    return LlavaConfig(vision=vision, text=text, image_token_index=259, pad_token_id=260, torch_dtype="float16",
                       name_or_path="minivar-demo")


def random_state_dict(cfg: LlavaConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights for every parameter of a minivar Llava with this config, in minivar's names (fp32)."""
    from .models.llava import Llava
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llava(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, shape, g, std) for name, shape in sorted(shapes.items())}


def random_tensor(name: str, shape, generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """One parameter's random value (fp32): norms at weight 1 / bias 0, other biases 0, weights N(0, std²)."""
    if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name or "pre_layrnorm" in name:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name.endswith("embed_tokens.weight"):
        # token embeddings well above what the random layers add, so each token's identity survives to the
        # output and the demo's noise at least varies with the input
        return torch.randn(shape, generator=generator) * 0.3
    return torch.randn(shape, generator=generator) * std


def plant_sinks(state: dict[str, torch.Tensor], cfg: LlavaConfig, *, text_dim: int, visual_dim: int, common_dim: int,
                patches=(), bos_id: int = 1, massive: float = 100.0, common: float = 3.0, focus=(0.05, 0.3),
                seed: int = 1) -> None:
    """Give a random model text and visual sinks, in place (see the module docstring). `focus` spans the per-head
    strength of attention to sinks, so some heads are sink-heavy and others are not."""
    g = torch.Generator().manual_seed(seed)
    t = cfg.text
    emb = state["language_model.model.embed_tokens.weight"]
    emb[:, common_dim] += common                                     # every text token carries the common dim
    # ... which must not decide the next token by itself (it would, being the largest dim of every hidden state)
    state["language_model.lm_head.weight"][:, common_dim] = 0.0
    emb[bos_id, text_dim] = massive                                  # BOS: a text sink in both sink dims
    emb[bos_id, visual_dim] = massive / 2
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
    # queries read the common dim, keys read the sink dims: q·k is large exactly for sink keys
    hd = t.head_dim
    for layer in range(t.num_hidden_layers):
        wq = state[f"language_model.model.layers.{layer}.self_attn.q_proj.weight"]
        wk = state[f"language_model.model.layers.{layer}.self_attn.k_proj.weight"]
        # only queries read the common dim; anything else reading it would add the same vector to every token
        for name in ("self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            state[f"language_model.model.layers.{layer}.{name}.weight"][:, common_dim] = 0.0
        for head in range(t.num_attention_heads):
            u = torch.randn(hd, generator=g)
            u = u / u.norm()
            strength = focus[0] + (focus[1] - focus[0]) * torch.rand((), generator=g).item()
            rows = slice(head * hd, (head + 1) * hd)
            wq[rows, common_dim] = u * strength ** 0.5
            if head < t.n_kv_heads:
                # BOS draws much attention, visual sinks less (so image attention is mostly non-sink, r ≥ ρ):
                # the pattern the paper reports for LLaVA's image-centric heads
                wk[rows, text_dim] = u * strength ** 0.5
                wk[rows, visual_dim] = 0.3 * u * strength ** 0.5


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


def build(directory: Path, seed: int = 0) -> Path:
    """Write the demo checkpoint (config.json, model.safetensors in fp16, tokenizer.json) into `directory`."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = demo_config()
    state = random_state_dict(cfg, seed)
    plant_sinks(state, cfg, text_dim=DEMO_SINK_DIMS[0], visual_dim=DEMO_SINK_DIMS[1], common_dim=DEMO_COMMON_DIM,
                patches=DEMO_SINK_PATCHES)
    # write to temporary names, then rename, so an interrupted build never leaves a half checkpoint behind
    tmp = directory / "model.safetensors.tmp"
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    make_tokenizer().save(str(directory / "tokenizer.json"))
    tmp.replace(directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    return directory


def ensure(directory: Path) -> Path:
    """The demo checkpoint in `directory`, built on first use."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        build(directory)
    return directory
