"""Qwen3-VL / Qwen3-VL-MoE: vision tower with DeepStack, interleaved M-RoPE, the Qwen3 decoder and its MoE block,
the joined model and its loading — parity with transformers' own Qwen3VLForConditionalGeneration and
Qwen3VLMoeForConditionalGeneration on tiny random checkpoints made here at test time, in the hub's layout, the
transformers 5.x save layout and the older flat one, tied and untied. Nothing is downloaded."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minivar.checkpoint import load_model, normalise_key as _normalise  # noqa: E402
from minivar.errors import MinivarError  # noqa: E402
from minivar.models.images import ImageInput  # noqa: E402
from minivar.models.qwen2_vl.rope import decode_positions  # noqa: E402
from minivar.models.qwen3_vl.family import KEY_RULES  # noqa: E402
from minivar.models.qwen3_vl.model import Qwen3VL, Qwen3VLConfig  # noqa: E402

IMAGE, VIDEO, START, END, PAD = 290, 291, 292, 293, 294
KINDS = ("dense", "moe")
PATCH = 3 * 2 * 16 * 16


def normalise_key(key: str) -> str:
    return _normalise(key, KEY_RULES)


def hf_config(kind: str = "dense", tied: bool = False, token_ids: dict | None = None, layers: int = 3):
    from transformers import Qwen3VLConfig as Dense, Qwen3VLMoeConfig as MoE
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4],
                                 "mrope_interleaved": True}, initializer_range=0.1)
    if kind == "moe":       # layer 1 dense (mlp_only_layers), the others sparse; experts 48 wide (2·I ≠ D)
        text |= dict(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1])
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 2], initializer_range=0.1)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
               tie_word_embeddings=tied) | (token_ids or {})
    return (MoE if kind == "moe" else Dense)(text_config=text, vision_config=vision, **ids)


def hf_model(kind: str = "dense", tied: bool = False, seed: int = 0, token_ids: dict | None = None):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
    cls = Qwen3VLMoeForConditionalGeneration if kind == "moe" else Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(hf_config(kind, tied, token_ids)).eval()
    with torch.no_grad():   # norms start at 1, biases at 0: give them values, so a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hub_config(nested: dict) -> dict:
    """config.json as the hub's Qwen3-VL files are (written by transformers 4.57): rope_scaling + rope_theta in
    text_config, `num_experts`, the vision config's model_type "qwen3_vl", torch_dtype."""
    d = {k: v for k, v in nested.items() if k != "dtype"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["rope_theta"]
    text["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "num_local_experts" in text:
        text["num_experts"] = text.pop("num_local_experts")
    d["text_config"] = text
    d["vision_config"] = dict(nested["vision_config"], model_type=nested["model_type"])
    d["torch_dtype"] = nested.get("dtype", "float32")
    return d


def write_checkpoint(model, directory: Path, layout: str) -> Path:
    """v5: transformers 5.x's save_pretrained (sharded). hub: the hub's files — the same names, the MoE experts
    as the hub stores them ([E, D, 2·I], [E, I, D]), hub_config, two shards and an index. flat: the older names
    (visual.*, model.layers.*), one file, the 5.x config."""
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    nested = model.config.to_dict()
    if layout == "v5":
        model.save_pretrained(directory, max_shard_size="200KB")
        assert (directory / "model.safetensors.index.json").is_file()
        return directory
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]                      # stored once, as the embedding
    if layout == "hub":
        state = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in state.items()}
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        weight_map = {}
        for name, names in shards.items():
            save_file({k: state[k] for k in names}, str(directory / name))
            weight_map.update({k: name for k in names})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (directory / "config.json").write_text(json.dumps(hub_config(nested)))
        return directory
    state = {normalise_key(k): v for k, v in state.items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(nested))
    return directory


def image(grid, seed=0) -> ImageInput:
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    return ImageInput(torch.randn(t * h * w, PATCH, generator=g), t * h * w // 4, (("image", h // 2, w // 2, False),),
                      {"grid_thw": grid})


def prompt_ids(images, seed=0, n_text=(3, 5)) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 250, (n_text[0],), generator=g).tolist()
    for im in images:
        ids += [START] + [IMAGE] * im.num_tokens + [END]
    return ids + torch.randint(1, 250, (n_text[1],), generator=g).tolist()


def left_pad(rows):
    T = max(map(len, rows))
    return (torch.tensor([[PAD] * (T - len(r)) + r for r in rows]),
            torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]))


def hf_inputs(ids, mask, images):
    """transformers 5.x needs mm_token_type_ids (1 at image tokens) for M-RoPE: without it its decode positions
    are wrong."""
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE).int(),
                pixel_values=torch.cat([im.pixel_values for im in images]),
                image_grid_thw=torch.tensor([im.meta["grid_thw"] for im in images]))


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(kind, transformers' model, ours loaded from its hub-layout files)."""
    hf = hf_model(request.param)
    return request.param, hf, load_model(write_checkpoint(hf, tmp_path_factory.mktemp(request.param), "hub"))


# ---------------------------------------------------------------------------------------------------------------
# The vision tower: learned positions resized, DeepStack

# 1×1 image's grid (2×2 patches), tall, wide, square beyond the 4×4 position table, one larger than the table
GRIDS = [(1, 2, 2), (1, 12, 2), (1, 2, 14), (1, 8, 8), (1, 6, 10)]


def test_vision_features_and_deepstack_equal_transformers(pair):
    kind, hf, ours = pair
    images = [image(g, seed=i) for i, g in enumerate(GRIDS)]
    with torch.no_grad():
        got = ours.image_features(images)
        ref = hf.model.get_image_features(torch.cat([im.pixel_values for im in images]),
                                          torch.tensor(GRIDS))
    assert [f.shape for f in got] == [(t * h * w // 4, 3, 64) for t, h, w in GRIDS]   # embedding + 2 DeepStack
    for i, f in enumerate(got):
        assert (f[:, 0] - ref.pooler_output[i]).abs().max().item() <= 1e-5
        for k in range(2):
            assert (f[:, 1 + k] - ref.deepstack_features[k][i]).abs().max().item() <= 1e-5


def test_position_table_resized_as_bilinear_interpolation_with_aligned_corners():
    """The 4-tap sum equals F.interpolate(bilinear, align_corners=True) of the table seen as an image."""
    import torch.nn.functional as F
    from minivar.models.qwen2_vl.vision import vision_positions
    from minivar.models.qwen3_vl.vision import position_embeddings
    torch.manual_seed(0)
    table = torch.nn.Embedding(36, 5)
    for h, w in [(2, 2), (4, 10), (12, 6), (6, 6)]:
        got = position_embeddings(table, [(1, h, w)], 2, 6)
        image_like = table.weight.T.reshape(1, 5, 6, 6)
        ref = F.interpolate(image_like, size=(h, w), mode="bilinear", align_corners=True)[0]   # [5, h, w]
        rc = vision_positions([(1, h, w)], 2)
        assert (got - ref[:, rc[:, 0], rc[:, 1]].T).abs().max().item() <= 1e-5      # F.interpolate's own rounding


# ---------------------------------------------------------------------------------------------------------------
# Interleaved M-RoPE

def test_interleaved_mrope_cos_sin_equal_transformers(pair):
    kind, hf, ours = pair
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 50, (3, 2, 7), generator=g)
    ref_cos, ref_sin = hf.model.language_model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = ours.model.rotary(positions, range(7), None, torch.float32)
    assert torch.allclose(cos, ref_cos, atol=1e-6) and torch.allclose(sin, ref_sin, atol=1e-6)
    # h and w really are interleaved: frequency 1 follows h, 2 follows w, 0 follows t
    from minivar.models.qwen3_vl.rope import interleaved_axis_of_dims
    assert interleaved_axis_of_dims((24, 20, 20), 128)[:7].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert interleaved_axis_of_dims((24, 20, 20), 128)[60:64].tolist() == [0, 0, 0, 0]


def test_positions_equal_get_rope_index_and_decode_continues_as_transformers(pair):
    kind, hf, ours = pair
    samples = [[image((1, 4, 6))], [image((1, 2, 2)), image((1, 8, 4))], [image((1, 12, 2))]]
    rows = [prompt_ids(ims, seed=i, n_text=(2 + i, 4)) for i, ims in enumerate(samples)]
    ids, mask = left_pad(rows)
    flat = [im for ims in samples for im in ims]
    ref, deltas = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == IMAGE).int(),
                                          image_grid_thw=torch.tensor([im.meta["grid_thw"] for im in flat]),
                                          attention_mask=mask)
    got = ours.positions(ids, flat, mask)
    assert torch.equal(got[:, mask.bool()], ref[:, mask.bool()])
    steps = 3
    full = torch.cat([mask, torch.ones(3, steps, dtype=mask.dtype)], 1)
    assert torch.equal(decode_positions(got, steps, mask), ((full.cumsum(-1) - 1)[:, -steps:] + deltas)[None]
                       .expand(3, -1, -1))


# ---------------------------------------------------------------------------------------------------------------
# Logits, tokens, layouts

@pytest.mark.parametrize("kind, layout, tied", [(k, lay, t) for k in KINDS for lay in ("hub", "v5", "flat")
                                                for t in (False, True)])
def test_logits_equal_transformers(tmp_path, kind, layout, tied):
    hf = hf_model(kind, tied)
    ours = load_model(write_checkpoint(hf, tmp_path, layout))
    assert ours.config.text.tie_word_embeddings == tied and ours.config.model_type == f"qwen3_vl{'_moe' * (kind == 'moe')}"
    if tied:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    images = [image((1, 4, 6)), image((1, 6, 10), seed=1)]
    ids = torch.tensor([prompt_ids(images)])
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, torch.ones_like(ids), images)).logits
        got = ours(ids, images)
    assert (got - ref).abs().max().item() <= 1e-4


def greedy(model, ids, mask, images, n, transposed=False):
    B, T = ids.shape
    cache = model.new_cache(B, T + n, torch.float32, "cpu", values_transposed=transposed)
    prompt_pos = model.positions(ids, images, mask)
    out = [model(ids, images, cache=cache, attention_mask=mask, output="last").argmax(-1)]
    for s in range(1, n):
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
        pos = decode_positions(prompt_pos, range(s - 1, s), mask[:, :T])
        out.append(model(out[-1][:, None], positions=pos, cache=cache, input_pos=T + s - 1, attention_mask=mask,
                         output="last").argmax(-1))
    return torch.stack(out, 1).tolist()


def test_greedy_tokens_of_a_padded_batch_equal_generate(pair):
    from minivar.generate import generate
    kind, hf, ours = pair
    images = [image((1, 4, 6)), image((1, 2, 2), seed=1), image((1, 6, 4), seed=2)]
    rows = [prompt_ids(images[:1]), prompt_ids(images[1:], seed=1, n_text=(6, 2))]
    ids, mask = left_pad(rows)
    n = 8
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(ids, mask, images), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=PAD)[:, ids.shape[1]:].tolist()
        explicit = greedy(ours, ids, mask, images, n)
        looped = generate(ours, ids, images, max_new_tokens=n, eos_token_id=None, attention_mask=mask).output_ids
        one = generate(ours, torch.tensor([rows[0]]), images[:1], max_new_tokens=n, eos_token_id=None).output_ids
    assert explicit == looped == ref and one == ref[:1]
    assert len(set(ref[0])) > 3                       # a real sequence, not one token repeated


def test_left_padded_batch_of_different_images_equals_one_by_one(pair):
    kind, hf, ours = pair
    samples = [[image((1, 4, 6))], [image((1, 10, 2), seed=1)], [image((1, 2, 2), seed=2), image((1, 4, 4), seed=3)]]
    rows = [prompt_ids(ims, seed=i) for i, ims in enumerate(samples)]
    ids, mask = left_pad(rows)
    flat = [im for ims in samples for im in ims]
    with torch.no_grad():
        batch = ours(ids, flat, attention_mask=mask, output="last")
        alone = torch.cat([ours(torch.tensor([r]), ims, output="last") for r, ims in zip(rows, samples)])
        batch_tokens = greedy(ours, ids, mask, flat, 5)
        alone_tokens = [greedy(ours, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), ims, 5, True)[0]
                        for r, ims in zip(rows, samples)]
    assert (batch - alone).abs().max().item() <= 1e-4
    assert batch_tokens == alone_tokens


def test_chunked_prefill_carries_each_tokens_deepstack_and_equals_one_call(pair):
    """Chunks cutting inside both images: each chunk gets the feature rows (embedding + DeepStack) of its own
    image tokens; generate.prefill's pieces too."""
    from minivar.generate import prefill
    kind, hf, ours = pair
    images = [image((1, 4, 6)), image((1, 6, 4), seed=1)]
    ids = torch.tensor([prompt_ids(images)])
    T = ids.shape[1]
    with torch.no_grad():
        whole = ours(ids, images)
        positions = ours.positions(ids, images)
        feats = torch.cat(ours.image_features(images))
        cache = ours.new_cache(1, T, torch.float32, "cpu")
        parts, used = [], 0
        for a, b in [(0, 7), (7, 20), (20, T)]:
            n_img = int((ids[:, a:b] == IMAGE).sum())
            parts.append(ours(ids[:, a:b], image_features=feats[used:used + n_img] if n_img else None,
                              positions=positions[:, :, a:b], cache=cache, input_pos=a))
            used += n_img
        calls = []
        with pytest.MonkeyPatch.context() as mp:           # generate.prefill: pieces of 9, decode after them
            real = Qwen3VL.forward
            mp.setattr(Qwen3VL, "forward", lambda self, ids_, *a, **k: calls.append(ids_.shape[1]) or real(self, ids_, *a, **k))
            cache = ours.new_cache(1, T + 2, torch.float32, "cpu")
            pieces = prefill(ours, ids, images, cache=cache, chunk=9)
            after = ours(pieces.argmax(-1)[:, None], cache=cache, input_pos=T, output="last")
        ref_after = ours(torch.cat([ids, whole[:, -1].argmax(-1)[:, None]], 1), images, output="last")
    assert (torch.cat(parts, 1) - whole).abs().max().item() <= 1e-5
    assert calls[:-1] == [9] * (T // 9) + [T % 9] * (T % 9 > 0)
    assert (pieces - whole[:, -1]).abs().max().item() <= 1e-5 and (after - ref_after).abs().max().item() <= 1e-5


def test_deepstack_is_added_after_the_first_layers_at_image_positions_only(pair):
    """Zeroing the DeepStack rows changes the logits (it is used), and the hooks' residual input of layer 1 is
    layer 0's output plus DeepStack level 0 at the image tokens."""
    from minivar.methods.hooks import Hook
    kind, hf, ours = pair
    images = [image((1, 4, 6))]
    ids = torch.tensor([prompt_ids(images)])

    class Residuals(Hook):
        def __init__(self):
            self.h = {}

        def residual(self, layer, h, rows):
            self.h[layer] = h.clone()

    positions = ours.positions(ids, images)
    with torch.no_grad():
        feats = torch.cat(ours.image_features(images))
        plain = ours(ids, image_features=feats, positions=positions)
        no_stack = feats.clone()
        no_stack[:, 1:] = 0
        assert (ours(ids, image_features=no_stack, positions=positions) - plain).abs().max().item() > 1e-3
        with_h, without_h = Residuals(), Residuals()
        ours(ids, image_features=feats, positions=positions, hooks=with_h)
        ours(ids, image_features=no_stack, positions=positions, hooks=without_h)
    diff = with_h.h[1] - without_h.h[1]
    is_image = ids == IMAGE
    assert diff[~is_image].abs().max().item() == 0
    assert (diff[is_image] - feats[:, 1]).abs().max().item() <= 1e-6


def test_router_choices_equal_transformers(tmp_path):
    """Every sparse layer's top-k experts and weights per token (from its MLP input) equal transformers' router's."""
    from minivar.models.qwen3_vl.moe import SparseMoeBlock, route
    hf = hf_model("moe")
    ours = load_model(write_checkpoint(hf, tmp_path, "hub"))
    images = [image((1, 4, 6))]
    ids = torch.tensor([prompt_ids(images)])
    theirs, mine = {}, {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: theirs.__setitem__(i, out))
             for i, m in enumerate(layer.mlp.gate for layer in hf.model.language_model.layers if hasattr(layer.mlp, "gate"))]
    hooks += [m.register_forward_hook(lambda mod, args, out, i=i: mine.__setitem__(
        i, route(mod.gate(args[0].flatten(0, 1)), mod.top_k)))
        for i, m in enumerate(mod for mod in ours.modules() if isinstance(mod, SparseMoeBlock))]
    with torch.no_grad():
        hf(**hf_inputs(ids, torch.ones_like(ids), images))
        ours(ids, images)
    for h in hooks:
        h.remove()
    assert sorted(theirs) == sorted(mine) == [0, 1]                       # layers 0 and 2 (layer 1 is dense)
    assert not isinstance(ours.model.layers[1].mlp, SparseMoeBlock)
    for i in theirs:
        _, ref_w, ref_e = theirs[i]
        e, w = mine[i]
        assert torch.equal(e, ref_e) and (w - ref_w).abs().max().item() <= 1e-6
        assert len(set(e.flatten().tolist())) > 2                       # several experts in use


def test_generate_many_style_shared_prefix_equals_one_by_one(pair):
    from minivar.models.llama import SharedPrefixCache
    kind, hf, ours = pair
    images = [image((1, 6, 4))]
    prefix = prompt_ids(images, n_text=(3, 0))
    questions = [[11, 12, 13, 14], [21, 22, 23, 24]]
    P = len(prefix)
    with torch.no_grad():
        alone = torch.cat([ours(torch.tensor([prefix + q]), images, output="last") for q in questions])
        prefix_cache = ours.new_cache(1, P, torch.float32, "cpu")
        ours(torch.tensor([prefix]), images, cache=prefix_cache)
        shared = SharedPrefixCache(prefix_cache, P, ours.new_cache(2, 4, torch.float32, "cpu"), ours.config.text)
        positions = ours.positions(torch.tensor([prefix + q for q in questions]), images * 2)[:, :, P:]
        got = ours(torch.tensor(questions), positions=positions, cache=shared, input_pos=P, output="last")
    assert (got - alone).abs().max().item() <= 1e-5


def test_bf16_close_to_transformers_in_bf16(tmp_path):
    hf = hf_model("moe")
    ours = load_model(write_checkpoint(hf, tmp_path, "hub"), dtype=torch.bfloat16)
    images = [image((1, 4, 6))]
    images = [ImageInput(im.pixel_values.bfloat16(), im.num_tokens, im.panels, im.meta) for im in images]
    ids = torch.tensor([prompt_ids(images)])
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(**hf_inputs(ids, torch.ones_like(ids), images)).logits.float()
        got = ours(ids, images)
    assert got.dtype == torch.float32 and (got - ref).abs().max().item() <= 0.1


# ---------------------------------------------------------------------------------------------------------------
# Configs and checkpoints

# The hub's config.json of three checkpoints (the keys that matter for shapes, ids and tying).
_TEXT = {"attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
         "max_position_embeddings": 262144, "rms_norm_eps": 1e-06, "rope_theta": 5000000, "vocab_size": 151936,
         "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}}
_VISION = {"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
           "in_channels": 3, "intermediate_size": 4304, "model_type": "qwen3_vl", "num_heads": 16,
           "num_position_embeddings": 2304, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}
_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653}
HUB_CONFIGS = {
    "Qwen3-VL-8B-Instruct": _IDS | {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "tie_word_embeddings": False,
        "text_config": _TEXT | {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
                                "num_hidden_layers": 36, "num_key_value_heads": 8, "tie_word_embeddings": False},
        "vision_config": _VISION | {"out_hidden_size": 4096}},
    "Qwen3-VL-2B-Instruct": _IDS | {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "tie_word_embeddings": True,
        "text_config": _TEXT | {"hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16,
                                "num_hidden_layers": 28, "num_key_value_heads": 8, "tie_word_embeddings": True},
        "vision_config": _VISION | {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                                    "deepstack_visual_indexes": [5, 11, 17], "out_hidden_size": 2048}},
    "Qwen3-VL-30B-A3B-Instruct": _IDS | {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
        "tie_word_embeddings": False,
        "text_config": _TEXT | {"hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 32,
                                "num_hidden_layers": 48, "num_key_value_heads": 4, "decoder_sparse_step": 1,
                                "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                                "mlp_only_layers": []},
        "vision_config": _VISION | {"model_type": "qwen3_vl_moe", "out_hidden_size": 2048}},
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_the_hub_configs_build_the_tensors_transformers_builds(name):
    """Each checkpoint's config.json gives, on the meta device, transformers' tensor names and shapes (after the
    key rules), its ids and its tying."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    d = HUB_CONFIGS[name]
    cfg = Qwen3VLConfig.from_hf(d, name)
    with torch.device("meta"):
        ours = Qwen3VL(cfg)
        ref = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**d))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {normalise_key(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    if ref.config.tie_word_embeddings:
        ref_shapes.setdefault("lm_head.weight", ref_shapes["model.embed_tokens.weight"])
    assert ours_shapes == ref_shapes
    assert cfg.text.tie_word_embeddings == ref.config.tie_word_embeddings == d["tie_word_embeddings"]
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.eos_token_ids) == (151655, 151652, (151645,))
    assert cfg.text.rope_theta == 5e6 and cfg.text.mrope_section == (24, 20, 20) and cfg.text.head_dim == 128
    assert (cfg.image.patch_size, cfg.image.factor, cfg.image.image_mean) == (16, 32, (0.5, 0.5, 0.5))


@pytest.mark.parametrize("kind", KINDS)
def test_config_defaults_are_transformers_defaults(kind):
    from transformers import Qwen3VLConfig as Dense, Qwen3VLMoeConfig as MoE
    d = {"model_type": f"qwen3_vl{'_moe' * (kind == 'moe')}",
         "vision_config": {"out_hidden_size": 4096 if kind == "dense" else 2048}}
    ours = Qwen3VLConfig.from_hf(d)
    ref = (MoE if kind == "moe" else Dense)(vision_config=d["vision_config"])
    t, v = ref.text_config, ref.vision_config
    assert (ours.text.hidden_size, ours.text.num_hidden_layers, ours.text.n_kv_heads, ours.text.head_dim,
            ours.text.intermediate_size, ours.text.rope_theta, ours.text.rms_norm_eps, ours.text.vocab_size) == \
        (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, t.intermediate_size,
         t.rope_parameters["rope_theta"], t.rms_norm_eps, t.vocab_size)
    if kind == "moe":
        assert (ours.text.num_experts, ours.text.num_experts_per_tok, ours.text.moe_intermediate_size) == \
            (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size)
    assert (ours.vision.depth, ours.vision.hidden_size, ours.vision.num_position_embeddings,
            ours.vision.deepstack_visual_indexes, ours.vision.patch_size) == \
        (v.depth, v.hidden_size, v.num_position_embeddings, tuple(v.deepstack_visual_indexes), v.patch_size)
    assert ours.text.tie_word_embeddings == ref.tie_word_embeddings is False


@pytest.mark.parametrize("change, message", [
    ({"model_type": "qwen2_vl"}, "model_type 'qwen2_vl'"),
    ({"text_config": {"rope_parameters": {"rope_type": "yarn"}}}, "rope type 'yarn'"),
    ({"text_config": {"num_attention_heads": 3}}, "num_attention_heads 3"),
    ({"vision_config": {"deepstack_visual_indexes": [1, 5]}}, "layer 5"),
    ({"vision_config": {"out_hidden_size": 32}}, "output width 32"),
    ({"text_config": 7}, "text_config is not a JSON object"),
])
def test_bad_configs_are_one_line(change, message):
    d = hf_config().to_dict()
    for key, value in change.items():
        d[key] = d[key] | value if isinstance(value, dict) and isinstance(d.get(key), dict) else value
    with pytest.raises(MinivarError, match=message) as e:
        Qwen3VLConfig.from_hf(d, "ckpt")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage, message", [
    ("missing", "tensor 'visual.deepstack_merger_list.1.norm.weight' is missing"),
    ("experts", "tensor 'model.layers.0.mlp.experts.down_proj' in .* has shape \\(6, 24, 63\\)"),
    ("extra", "unexpected tensor 'model.layers.0.extra.weight'"),
])
def test_bad_checkpoints_are_one_line(tmp_path, damage, message):
    from safetensors.torch import load_file, save_file
    d = write_checkpoint(hf_model("moe"), tmp_path / "ck", "flat")
    state = load_file(str(d / "model.safetensors"))
    if damage == "missing":
        del state["visual.deepstack_merger_list.1.norm.weight"]
    elif damage == "experts":
        state["model.layers.0.mlp.experts.down_proj"] = torch.zeros(6, 24, 63)
    else:
        state["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(MinivarError, match=message) as e:
        load_model(d)
    assert "\n" not in str(e.value)
