"""Qwen2-VL / Qwen2.5-VL decoder, M-RoPE, the joined model, loading, template and tokenizer: parity with
transformers' own classes on tiny random checkpoints made here at test time (hub and 5.x layouts, tied and untied
heads). Nothing is downloaded: the tokenizer is a small byte-level BPE built here with Qwen's special tokens."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minivar.errors import MinivarError  # noqa: E402
from minivar.checkpoint import load_model, normalise_key as _normalise  # noqa: E402
from minivar.models.qwen2_vl.family import KEY_RULES  # noqa: E402
from minivar.models.qwen2_vl.model import Qwen2VLConfig  # noqa: E402
from minivar.models.qwen2_vl.processing import ImageInput, preprocess_image  # noqa: E402
from minivar.models.qwen2_vl.rope import decode_positions, rope_index  # noqa: E402
from minivar.models.qwen2_vl.template import QwenTokenizer, build_prompt  # noqa: E402


def load_qwen2_vl(directory, dtype=torch.float32, device="cpu"):
    """minivar's strict loader on a Qwen2-VL / Qwen2.5-VL checkpoint (the family's key rules and tied head)."""
    return load_model(directory, dtype, device)


def normalise_key(key: str) -> str:
    return _normalise(key, KEY_RULES)


IMAGE, VIDEO, START, END, PAD = 290, 291, 292, 293, 294
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def hf_config(family: str, tied: bool = False, token_ids: dict | None = None):
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=299,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                initializer_range=0.1)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
               tie_word_embeddings=tied) | (token_ids or {})
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as C
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, initializer_range=0.1)
    else:
        from transformers import Qwen2_5_VLConfig as C
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      window_size=56, fullatt_block_indexes=[1], initializer_range=0.1)
    return C(text_config=text, vision_config=vision, **ids)


def hf_model(family: str, tied: bool = False, seed: int = 0, token_ids: dict | None = None):
    from transformers import Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(hf_config(family, tied, token_ids)).eval()
    with torch.no_grad():   # the norms start at 1 and the biases at 0: give them values, so a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def flat_hub_config(nested: dict) -> dict:
    """A config.json as the hub's Qwen2-VL files are: the decoder's keys at the top, `rope_scaling` with type
    "mrope", `rope_theta` beside it, `torch_dtype`."""
    d = {k: v for k, v in nested.items() if k not in ("text_config", "dtype")}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    d.update(text)
    d["rope_theta"] = rope["rope_theta"]
    d["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    d["torch_dtype"] = nested.get("dtype", "float32")
    d["model_type"] = nested["model_type"]
    return d


def write_checkpoint(model, directory: Path, layout: str) -> Path:
    """hub: save_pretrained's files (hub key names, sharded) with a flat hub config.json; v5-save: the same files
    with the nested config.json 5.x writes; v5: the in-memory
    (5.x) names, two shards and an index, the nested config.json."""
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    nested = model.config.to_dict()
    if layout in ("hub", "v5-save"):
        model.save_pretrained(directory, max_shard_size="100KB")
        assert (directory / "model.safetensors.index.json").is_file()          # sharded
        if layout == "hub":
            (directory / "config.json").write_text(json.dumps(flat_hub_config(nested)))
        return directory
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]         # stored once, as the embedding
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(directory / name))
        weight_map.update({k: name for k in names})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(nested))
    return directory


def image(grid, seed=0) -> ImageInput:
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    return ImageInput(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g), t * h * w // 4,
                      (("image", h // 2, w // 2, False),), {"grid_thw": grid})


def prompt_ids(images, seed=0, n_text=(3, 5)) -> list[int]:
    """Text, then each image as <|vision_start|> pads <|vision_end|>, then text (ids below the specials)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 250, (n_text[0],), generator=g).tolist()
    for im in images:
        ids += [START] + [IMAGE] * im.num_tokens + [END]
    return ids + torch.randint(1, 250, (n_text[1],), generator=g).tolist()


def left_pad(rows: list[list[int]]):
    T = max(map(len, rows))
    ids = torch.tensor([[PAD] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def hf_inputs(ids, mask, images):
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE).int(),
                pixel_values=torch.cat([im.pixel_values for im in images]),
                image_grid_thw=torch.tensor([im.meta["grid_thw"] for im in images]))


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, transformers' model, ours loaded from its hub-layout save)."""
    hf = hf_model(request.param)
    ours = load_qwen2_vl(write_checkpoint(hf, tmp_path_factory.mktemp(request.param), "hub"))
    return request.param, hf, ours


# ---------------------------------------------------------------------------------------------------------------
# M-RoPE positions

GRIDS = [(1, 4, 6), (1, 8, 4), (1, 2, 2), (1, 6, 10), (1, 2, 14)]


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_index_equals_get_rope_index(family):
    hf = hf_model(family)
    cases = [[[image(g)] for g in GRIDS],                                   # one image of several shapes
             [[image((1, 4, 6)), image((1, 6, 2))]],                        # two images in one prompt
             [[image((1, 4, 6))], [image((1, 2, 2)), image((1, 8, 4))], [image((1, 6, 10))]]]   # a padded batch
    for batch in cases:
        for per_sample in ([[ims] for ims in batch] if len(batch) == 5 else [batch]):
            rows = [prompt_ids(ims, seed=i, n_text=(2 + i, 4)) for i, ims in enumerate(per_sample)]
            ids, mask = left_pad(rows)
            flat = [im for ims in per_sample for im in ims]
            grids = torch.tensor([im.meta["grid_thw"] for im in flat])
            ref, deltas = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == IMAGE).int(), image_grid_thw=grids,
                                                  attention_mask=mask)
            ours = rope_index(ids, [im.meta["grid_thw"] for im in flat], IMAGE, 2, mask)
            assert torch.equal(ours[:, mask.bool()], ref[:, mask.bool()])
            # decode: max(prompt positions) + 1 + step on every axis = transformers' cumsum(mask) − 1 + rope_deltas
            steps = 4
            full_mask = torch.cat([mask, torch.ones(len(rows), steps, dtype=mask.dtype)], dim=1)
            hf_decode = (full_mask.cumsum(-1) - 1)[:, -steps:] + deltas                  # [B, steps]
            ours_decode = decode_positions(ours, steps, mask)
            assert torch.equal(ours_decode, hf_decode[None].expand(3, -1, -1))


def test_rope_index_text_only_counts_real_tokens():
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    pos = rope_index(ids, [], IMAGE, 2, mask)
    assert pos[:, 1].tolist() == [[0, 0, 0, 1]] * 3 and pos[:, 0].tolist() == [[0, 1, 2, 3]] * 3


def test_rope_index_refuses_grids_that_do_not_fit():
    ids = torch.tensor([prompt_ids([image((1, 4, 6))])])
    with pytest.raises(MinivarError, match="gives 4 tokens"):
        rope_index(ids, [(1, 4, 4)], IMAGE, 2)
    with pytest.raises(MinivarError, match="more images"):
        rope_index(ids, [], IMAGE, 2)
    with pytest.raises(MinivarError, match="2 image grid"):
        rope_index(ids, [(1, 4, 6), (1, 4, 6)], IMAGE, 2)


# ---------------------------------------------------------------------------------------------------------------
# Logits and greedy tokens

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["hub", "v5-save", "v5"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_transformers(tmp_path, family, layout, tied):
    hf = hf_model(family, tied)
    ours = load_qwen2_vl(write_checkpoint(hf, tmp_path, layout))
    assert ours.config.text.tie_word_embeddings == tied and ours.config.model_type == family
    if tied:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    images = [image((1, 4, 6)), image((1, 6, 10), seed=1)]
    ids = torch.tensor([prompt_ids(images)])
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, torch.ones_like(ids), images)).logits
        got = ours(ids, images)
        feats = ours.image_features(images)
        ref_feats = hf.model.get_image_features(torch.cat([im.pixel_values for im in images]),
                                                torch.tensor([im.meta["grid_thw"] for im in images])).pooler_output
    assert [f.shape[0] for f in feats] == [6, 15]
    assert max((a - b).abs().max().item() for a, b in zip(feats, ref_feats)) <= 1e-5
    assert (got - ref).abs().max().item() <= 1e-4


def test_decoder_alone_with_spliced_image_features(pair):
    """The decoder (vision=False) fed the features transformers' tower makes equals transformers' whole model."""
    from minivar.models.qwen2_vl.model import Qwen2VL
    family, hf, ours = pair
    decoder = Qwen2VL(ours.config, vision=False)
    decoder.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("visual.")})
    images = [image((1, 8, 4))]
    ids = torch.tensor([prompt_ids(images)])
    with torch.no_grad():
        ref_out = hf(**hf_inputs(ids, torch.ones_like(ids), images))
        feats = hf.model.get_image_features(images[0].pixel_values, torch.tensor([[1, 8, 4]])).pooler_output[0]
        positions = decoder.positions(ids, images)
        got = decoder(ids, image_features=feats, positions=positions, output="last")
    assert (got - ref_out.logits[:, -1]).abs().max().item() <= 1e-4


def greedy(model, ids, mask, images, n: int, transposed: bool = False) -> list[list[int]]:
    """Our greedy loop: prefill (default positions) then n−1 decode steps on the KV cache."""
    B, T = ids.shape
    cache = model.new_cache(B, T + n, torch.float32, "cpu", values_transposed=transposed)
    prompt_pos = model.positions(ids, images, mask)
    logits = model(ids, images, cache=cache, attention_mask=mask, output="last")
    out = [logits.argmax(-1)]
    for s in range(1, n):
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        pos = decode_positions(prompt_pos, range(s - 1, s), mask[:, :T])
        logits = model(out[-1][:, None], positions=pos, cache=cache, input_pos=T + s - 1, attention_mask=mask,
                       output="last")
        out.append(logits.argmax(-1))
    return torch.stack(out, dim=1).tolist()


def test_greedy_tokens_equal_generate(pair):
    family, hf, ours = pair
    images = [image((1, 4, 6)), image((1, 2, 2), seed=1), image((1, 6, 4), seed=2)]
    rows = [prompt_ids(images[:1], seed=0), prompt_ids(images[1:], seed=1, n_text=(6, 2))]
    ids, mask = left_pad(rows)
    n = 10
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(ids, mask, images), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=PAD)[:, ids.shape[1]:].tolist()
        got = greedy(ours, ids, mask, images, n)
    assert got == ref
    assert all(len(set(r)) > 2 for r in got)          # real sequences, not one token repeated


def test_single_prompt_decode_on_transposed_values_equals_the_repeated_heads(pair):
    """CPU decode rows read each of the 2 key/value heads once for its 2 query heads, without repeating the cache per
    head, on either value layout (a single prompt's transposed values, a batch's row-wise ones): the same logits at
    every step as the reference attention on heads repeated (attention.attention), and transformers' greedy
    tokens."""
    from minivar.models import attention_fast
    family, hf, ours = pair
    images = [image((1, 4, 6))]
    ids = torch.tensor([prompt_ids(images)])
    T, n = ids.shape[1], 8
    assert ours.config.text.n_kv_heads < ours.config.text.num_attention_heads       # grouped-query attention
    grouped = []
    real = attention_fast.written_out

    def spy(q, k, v, *args, **kwargs):
        grouped.append(k.shape[1] < q.shape[1])
        return real(q, k, v, *args, **kwargs)

    def run(transposed: bool):
        cache = ours.new_cache(1, T + n, torch.float32, "cpu", values_transposed=transposed)
        logits = [ours(ids, images, cache=cache, output="last")]
        for s in range(1, n):
            logits.append(ours(logits[-1].argmax(-1)[:, None], cache=cache, input_pos=T + s - 1, output="last"))
        return torch.stack(logits, dim=1)                                             # [1, n, V]

    from minivar.models import llama
    from minivar.models.attention import attention

    def reference_attend(self, q, kv, mask, rows, hooks=None):                        # heads repeated, written out
        kv = llama.repeat_kv(kv, q.shape[1] // kv.k.shape[1])
        return attention(q, kv.k, kv.v, mask, self.layer_idx, rows, hooks)

    with torch.no_grad():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llama.LlamaAttention, "attend", reference_attend)
            repeated = run(False)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(attention_fast, "written_out", spy)
            layouts = [run(False), run(True)]
        ref = hf.generate(**hf_inputs(ids, torch.ones_like(ids), images), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=PAD)[0, T:].tolist()
    assert len(grouped) == 2 * (n - 1) * ours.config.text.num_hidden_layers and all(grouped)   # every decode row
    for one_row in layouts:
        assert (one_row - repeated).abs().max().item() <= 1e-5
    assert one_row.argmax(-1)[0].tolist() == ref


def test_left_padded_batch_of_different_images_equals_one_by_one(pair):
    family, hf, ours = pair
    images = [[image((1, 4, 6))], [image((1, 10, 2), seed=1)], [image((1, 2, 2), seed=2), image((1, 4, 4), seed=3)]]
    rows = [prompt_ids(ims, seed=i) for i, ims in enumerate(images)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch = ours(ids, [im for ims in images for im in ims], attention_mask=mask, output="last")
        alone = torch.cat([ours(torch.tensor([r]), ims, output="last") for r, ims in zip(rows, images)])
        batch_tokens = greedy(ours, ids, mask, [im for ims in images for im in ims], 6)
        # one by one as a single prompt decodes on CPU: transposed cached values, matrix-vector products
        alone_tokens = [greedy(ours, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), ims, 6, True)[0]
                        for r, ims in zip(rows, images)]
    assert (batch - alone).abs().max().item() <= 1e-4
    assert batch_tokens == alone_tokens


def test_chunked_prefill_equals_one_call(pair):
    family, hf, ours = pair
    images = [image((1, 4, 6)), image((1, 6, 4), seed=1)]
    ids = torch.tensor([prompt_ids(images)])
    T = ids.shape[1]
    with torch.no_grad():
        whole = ours(ids, images)
        positions = ours.positions(ids, images)
        feats = torch.cat(ours.image_features(images))
        cache = ours.new_cache(1, T, torch.float32, "cpu")
        parts, used = [], 0
        for a, b in [(0, 7), (7, 20), (20, T)]:           # cuts inside the first and the second image
            n_img = int((ids[:, a:b] == IMAGE).sum())
            parts.append(ours(ids[:, a:b], image_features=feats[used:used + n_img] if n_img else None,
                              positions=positions[:, :, a:b], cache=cache, input_pos=a))
            used += n_img
    assert (torch.cat(parts, dim=1) - whole).abs().max().item() <= 1e-5


def test_a_later_call_needs_explicit_positions(pair):
    family, hf, ours = pair
    cache = ours.new_cache(1, 8, torch.float32, "cpu")
    with pytest.raises(MinivarError, match="explicit `positions`"):
        ours(torch.tensor([[5]]), cache=cache, input_pos=3)


def test_hooks_see_every_layer_and_the_explicit_path_gives_the_same_numbers(pair):
    from minivar.methods.hooks import Hook

    class Record(Hook):
        def __init__(self):
            self.layers, self.rows = [], []

        def residual(self, layer, h, rows):
            self.layers.append(layer)

        def explicit_from(self, layer, rows):
            return rows.start               # every row through the written-out attention

        def probs(self, layer, probs, rows, before):
            self.rows.append((layer, rows, tuple(probs.shape)))
            return probs

    family, hf, ours = pair
    images = [image((1, 4, 6))]
    ids = torch.tensor([prompt_ids(images)])
    hook = Record()
    with torch.no_grad():
        plain = ours(ids, images)
        hooked = ours(ids, images, hooks=hook)
    assert hook.layers == [0, 1, 2]
    assert [r[0] for r in hook.rows] == [0, 1, 2] and hook.rows[0][2] == (1, 4, ids.shape[1], ids.shape[1])
    assert (plain - hooked).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Config and checkpoints

@pytest.mark.parametrize("family", FAMILIES)
def test_config_from_the_flat_hub_file_equals_the_nested_5x_file(family):
    nested = hf_config(family, tied=True).to_dict()
    a = Qwen2VLConfig.from_hf(nested)
    b = Qwen2VLConfig.from_hf(flat_hub_config(nested))
    assert a == b
    assert (a.image_token_id, a.vision_start_token_id, a.vision_end_token_id, a.eos_token_ids) == \
        (IMAGE, START, END, (299,))
    assert a.text.mrope_section == (2, 3, 3) and a.text.rope_theta == 10000.0 and a.text.tie_word_embeddings
    assert a.text.head_dim == 16 and a.text.n_kv_heads == 2 and a.spatial_merge_size == 2


def test_config_defaults_are_transformers_defaults():
    from transformers import Qwen2VLConfig as C
    d = {"model_type": "qwen2_vl", "vision_config": {"hidden_size": 8192}}   # (its defaults: a 3584-wide merger)
    ours, ref = Qwen2VLConfig.from_hf(d), C(**{k: v for k, v in d.items() if k != "model_type"})
    t = ref.text_config
    assert (ours.text.hidden_size, ours.text.num_hidden_layers, ours.text.n_kv_heads, ours.text.vocab_size,
            ours.text.rms_norm_eps, ours.text.rope_theta, ours.text.mrope_section) == \
        (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.vocab_size, t.rms_norm_eps,
         t.rope_parameters["rope_theta"], (16, 24, 24))
    assert (ours.image_token_id, ours.vision_start_token_id, ours.vision_end_token_id) == \
        (ref.image_token_id, ref.vision_start_token_id, ref.vision_end_token_id)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llava"}, "model_type 'llava'"),
    ({"rope_scaling": {"type": "yarn", "mrope_section": [2, 3, 3]}}, "rope type 'yarn'"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 4]}}, "mrope_section"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"vision_config": 3}, "vision_config is not a JSON object"),
])
def test_bad_configs_are_one_line(change, message):
    d = flat_hub_config(hf_config("qwen2_vl").to_dict()) | change
    with pytest.raises(MinivarError, match=message) as e:
        Qwen2VLConfig.from_hf(d, "ckpt")
    assert "\n" not in str(e.value)


def test_key_rules_map_5x_names_onto_the_hub_names():
    hf = hf_model("qwen2_vl")
    hub = {normalise_key(k) for k in hf.state_dict()}
    assert "model.layers.0.self_attn.q_proj.bias" in hub and "visual.blocks.0.attn.qkv.weight" in hub
    assert "lm_head.weight" in hub and "model.embed_tokens.weight" in hub
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in hub)


def tensors(directory):
    from safetensors.torch import load_file
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def rewrite(directory, state):
    from safetensors.torch import save_file
    for f in directory.glob("model*.safetensors*"):
        f.unlink()
    save_file(state, str(directory / "model.safetensors"))


@pytest.mark.parametrize("damage, message", [
    ("missing", "tensor 'model.layers.1.self_attn.k_proj.bias' is missing"),
    ("shape", "tensor 'model.layers.0.mlp.up_proj.weight' in .* has shape \\(128, 65\\), config.json implies"),
    ("extra", "unexpected tensor 'model.layers.0.extra.weight'"),
    ("lm_head", "tensor 'lm_head.weight' is missing"),
])
def test_bad_checkpoints_are_one_line(tmp_path, damage, message):
    directory = write_checkpoint(hf_model("qwen2_vl"), tmp_path / "ck", "hub")
    state = tensors(directory)
    if damage == "missing":
        del state["model.layers.1.self_attn.k_proj.bias"]
    elif damage == "shape":
        state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(128, 65)
    elif damage == "extra":
        state["model.layers.0.extra.weight"] = torch.zeros(3)
    else:                                   # an untied config without lm_head.weight
        del state["lm_head.weight"]
    rewrite(directory, state)
    with pytest.raises(MinivarError, match=message) as e:
        load_qwen2_vl(directory)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Template and tokenizer

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
# Qwen2-VL-7B-Instruct's chat template (chat_template.json), restated for the image-then-text messages used here.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(directory: Path) -> Path:
    """A small byte-level BPE laid out as Qwen2's tokenizer.json (NFC, Qwen's split regex, byte-level), trained on
    a few sentences, with Qwen's special tokens after its 256 + merges entries (ids 266 … 279), and its
    tokenizer_config.json, written into `directory` (bench/bench_qwen.py makes its checkpoint's with it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is in the image? Describe it.", "You are a helpful assistant.", "system user assistant"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=266, initial_alphabet=pre_tokenizers.ByteLevel
                                                        .alphabet(), show_progress=False))
    assert tok.get_vocab_size() == 266
    tok.add_special_tokens(QWEN_SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "model_max_length": 32768}))
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The small Qwen-like tokenizer of write_tokenizer, in a directory of its own."""
    return write_tokenizer(tmp_path_factory.mktemp("qwen-tokenizer"))


def tokenizer_config(directory):
    """A Qwen2VLConfig whose token ids are the test tokenizer's."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    d = flat_hub_config(hf_config("qwen2_vl").to_dict())
    d.update(image_token_id=tok.token_to_id("<|image_pad|>"), vision_start_token_id=tok.token_to_id("<|vision_start|>"),
             vision_end_token_id=tok.token_to_id("<|vision_end|>"), eos_token_id=tok.token_to_id("<|im_end|>"))
    return Qwen2VLConfig.from_hf(d)


@pytest.mark.parametrize("question", ["What is in the image?", "Describe it.\nIn detail, please: 3 things!",
                                      "Spell <|im_end|> and <|image_pad|>, then café."])
@pytest.mark.parametrize("size", [(56, 56), (100, 60)])
def test_prompt_ids_equal_the_transformers_processor(tokenizer_dir, question, size):
    """transformers' Qwen2VLProcessor steps (its class needs a video processor this machine lacks): the chat
    template, `<|image_pad|>` repeated grid.prod() / 4 times (its replace_image_token), the tokenizer."""
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    hf_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = hf_tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert text == build_prompt(question)
    if "<|" in question:
        return      # transformers' tokenizer turns typed special tokens into special ids; ours keeps them text
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    grid = processor(images=[Image.new("RGB", size, (120, 30, 200))], return_tensors="pt")["image_grid_thw"][0]
    n = int(grid.prod()) // 4
    expected = hf_tok(text.replace("<|image_pad|>", "<|image_pad|>" * n))["input_ids"]
    ours = QwenTokenizer(tokenizer_dir, tokenizer_config(tokenizer_dir)).encode_prompt(question, num_image_tokens=n)
    assert n > 1 and ours == expected


def test_typed_special_tokens_stay_text(tokenizer_dir):
    cfg = tokenizer_config(tokenizer_dir)
    tok = QwenTokenizer(tokenizer_dir, cfg)
    ids = tok.encode_prompt("Spell <|im_end|> and <|image_pad|>", num_image_tokens=[2, 3])
    assert ids.count(cfg.image_token_id) == 5 and ids.count(tok.ids["<|im_end|>"]) == 2   # system's and user's
    assert ids.count(cfg.vision_start_token_id) == 2


def test_stop_ids_and_decoding_past_the_tokenizer(tokenizer_dir):
    cfg = tokenizer_config(tokenizer_dir)
    tok = QwenTokenizer(tokenizer_dir, cfg)
    assert tok.stop_ids == (tok.ids["<|im_end|>"], tok.ids["<|endoftext|>"])
    text_ids = tok._tok.encode("What is in the image? café", add_special_tokens=False).ids
    beyond = [tok.vocab_size, 299]                    # embedding rows the tokenizer does not have
    ids = text_ids[:3] + beyond + text_ids[3:] + [tok.ids["<|im_end|>"]]
    stream = tok.decode_token_stream()
    streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    assert streamed == tok.decode(ids) == "What is in the image? café"


def test_tokenizer_that_disagrees_with_config_json_is_one_line(tokenizer_dir):
    cfg = tokenizer_config(tokenizer_dir)
    import dataclasses
    with pytest.raises(MinivarError, match="image_token_id is 1"):
        QwenTokenizer(tokenizer_dir, dataclasses.replace(cfg, image_token_id=1))


def test_shared_prefix_cache_equals_one_by_one(pair):
    """Several questions about one image: the prefix (text + image) stored once (llama.SharedPrefixCache), each
    question at the M-RoPE positions it has in its whole prompt."""
    from minivar.models.llama import SharedPrefixCache
    family, hf, ours = pair
    images = [image((1, 6, 4))]
    prefix = prompt_ids(images, n_text=(3, 0))
    questions = [[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]]
    P = len(prefix)
    with torch.no_grad():
        alone = torch.cat([ours(torch.tensor([prefix + q]), images, output="last") for q in questions])
        prefix_cache = ours.new_cache(1, P, torch.float32, "cpu")
        ours(torch.tensor([prefix]), images, cache=prefix_cache)
        shared = SharedPrefixCache(prefix_cache, P, ours.new_cache(3, 4, torch.float32, "cpu"), ours.config.text)
        ids = torch.tensor([prefix + q for q in questions])
        positions = ours.positions(ids, images * 3)[:, :, P:]
        got = ours(torch.tensor(questions), positions=positions, cache=shared, input_pos=P, output="last")
    assert (got - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pil_images_and_text_to_tokens_equals_transformers(tmp_path, tokenizer_dir, family):
    """End to end: PIL images (smaller than min_pixels, wide, tall) through processing.py and the qwen template,
    against transformers' PIL image processor, tokenizer and model: ids, logits, greedy tokens."""
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from tokenizers import Tokenizer
    tok_ids = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    hf = hf_model(family, token_ids={k: tok_ids.token_to_id(v) for k, v in names.items()})
    ours = load_qwen2_vl(write_checkpoint(hf, tmp_path, "hub"))
    tok = QwenTokenizer(tokenizer_dir, ours.config)
    hf_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf_proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 40)
    g = torch.Generator().manual_seed(0)
    rows, all_images, ref_ids = [], [], []
    for size in [(30, 40), (200, 60), (50, 300)]:
        pil = Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())
        im = preprocess_image(pil, min_pixels=56 * 56, max_pixels=28 * 28 * 40)
        ref = hf_proc(images=[pil], return_tensors="pt")
        assert list(im.meta["grid_thw"]) == ref["image_grid_thw"][0].tolist()
        assert torch.equal(im.pixel_values, ref["pixel_values"])
        rows.append(tok.encode_prompt("What is in the image?", num_image_tokens=im.num_tokens))
        ref_ids.append(hf_tok(build_prompt("What is in the image?").replace(
            "<|image_pad|>", "<|image_pad|>" * im.num_tokens))["input_ids"])
        all_images.append(im)
    assert rows == ref_ids
    pad = tok.ids["<|endoftext|>"]
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = (torch.arange(T)[None] >= torch.tensor([T - len(r) for r in rows])[:, None]).long()
    inputs = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == ours.config.image_token_id).int(),
                  pixel_values=torch.cat([im.pixel_values for im in all_images]),
                  image_grid_thw=torch.tensor([im.meta["grid_thw"] for im in all_images]))
    with torch.no_grad():
        ref_logits = hf(**inputs).logits[:, -1]
        got_logits = ours(ids, all_images, attention_mask=mask, output="last")
        ref_tokens = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                 pad_token_id=pad)[:, T:].tolist()
        got_tokens = greedy(ours, ids, mask, all_images, 8)
    assert (got_logits - ref_logits).abs().max().item() <= 1e-4
    assert got_tokens == ref_tokens


def test_a_key_masking_hook_builds_the_mask_and_a_full_cache_is_one_line(pair):
    from minivar.methods.hooks import Hook

    class NoOpMask(Hook):
        masks_keys = True

        def __init__(self):
            self.shapes = []

        def key_mask(self, layer, mask, rows):
            self.shapes.append(tuple(mask.shape))
            return mask

    family, hf, ours = pair
    images = [image((1, 4, 6))]
    ids = torch.tensor([prompt_ids(images)])
    T = ids.shape[1]
    hook = NoOpMask()
    with torch.no_grad():
        assert (ours(ids, images, hooks=hook) - ours(ids, images)).abs().max().item() <= 1e-5
        assert hook.shapes == [(1, 1, T, T)] * 3
        with pytest.raises(MinivarError, match="KV cache full"):
            ours(ids, images, cache=ours.new_cache(1, T - 1, torch.float32, "cpu"))


# The hub's config.json of the four checkpoints (flat; the keys that matter for shapes and ids).
_QWEN2_VL = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "bos_token_id": 151643,
             "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
             "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
             "max_position_embeddings": 32768, "max_window_layers": 28, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
             "torch_dtype": "bfloat16", "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
HUB_CONFIGS = {
    "Qwen2-VL-7B-Instruct": _QWEN2_VL | {
        "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "tie_word_embeddings": False, "vocab_size": 152064,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2}},
    "Qwen2-VL-2B-Instruct": _QWEN2_VL | {
        "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12, "num_hidden_layers": 28,
        "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 151936,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2}},
    "Qwen2.5-VL-7B-Instruct": _QWEN2_VL | {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "tie_word_embeddings": False, "vocab_size": 152064,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}},
    "Qwen2.5-VL-3B-Instruct": _QWEN2_VL | {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16, "num_hidden_layers": 36,
        "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 151936,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}},
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_the_hub_configs_build_the_tensors_transformers_builds(name):
    """Each real checkpoint's config.json gives, on the meta device, exactly transformers' tensor names and shapes
    (after the key rules), and its token ids and tying."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from minivar.models.qwen2_vl.model import Qwen2VL
    d = HUB_CONFIGS[name]
    cfg = Qwen2VLConfig.from_hf(d, name)
    with torch.device("meta"):
        ours = Qwen2VL(cfg)
        ref = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**d))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {normalise_key(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.eos_token_ids) == \
        (151655, 151652, 151653, (151645,))
    assert cfg.text.tie_word_embeddings == d["tie_word_embeddings"] == ref.config.tie_word_embeddings
    assert cfg.text.rope_theta == 1e6 and cfg.text.mrope_section == (16, 24, 24) and cfg.text.head_dim == 128


def test_generate_without_positions_uses_the_rope_deltas_of_the_cache(pair):
    """minivar.generate's loop passes no positions: the prompt's call keeps its rope deltas in model.new_cache's
    cache, and later calls place text at (index among real tokens) + delta — transformers' generate's tokens."""
    from minivar.generate import generate
    family, hf, ours = pair
    images = [image((1, 4, 6)), image((1, 2, 2), seed=1), image((1, 6, 4), seed=2)]
    rows = [prompt_ids(images[:1], seed=0), prompt_ids(images[1:], seed=1, n_text=(6, 2))]
    ids, mask = left_pad(rows)
    n = 8
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(ids, mask, images), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=PAD)[:, ids.shape[1]:].tolist()
        got = generate(ours, ids, images, max_new_tokens=n, eos_token_id=None, attention_mask=mask,
                       cache=ours.new_cache(2, ids.shape[1] + n, torch.float32, "cpu")).output_ids
        one = generate(ours, torch.tensor([rows[0]]), images[:1], max_new_tokens=n, eos_token_id=None,
                       cache=ours.new_cache(1, len(rows[0]) + n, torch.float32, "cpu", True)).output_ids
    assert got == ref and one == ref[:1]


def test_the_family_entries_and_the_image_config_beside_config_json(tmp_path):
    from PIL import Image
    from minivar.models.qwen2_vl import family  # noqa: F401  (registers both)
    from minivar.models.registry import family_for
    for model_type in FAMILIES:
        entry = family_for(model_type)
        assert entry.default_conv_mode == "qwen" and not entry.has_cls and entry.key_rules[0][1] == "model."
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 28 * 28 * 4}))
    cfg = Qwen2VLConfig.from_hf(flat_hub_config(hf_config("qwen2_vl").to_dict()), str(tmp_path))
    im = family_for("qwen2_vl").images(Image.new("RGB", (400, 300)), cfg, None)
    assert im.num_tokens <= 4 and im.meta["grid_thw"][0] == 1
    with pytest.raises(MinivarError, match="`image_aspect_ratio` 'pad'"):
        family_for("qwen2_vl").images(Image.new("RGB", (40, 30)), cfg, "pad")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_close_to_transformers_in_bf16(tmp_path, family):
    """Loaded in bf16 (the checkpoints' dtype): within bf16 rounding of transformers' own bf16 run (logits ~3)."""
    hf = hf_model(family)
    ours = load_qwen2_vl(write_checkpoint(hf, tmp_path, "hub"), dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    images = [image((1, 4, 6))]
    images = [ImageInput(im.pixel_values.bfloat16(), im.num_tokens, im.panels, im.meta) for im in images]
    ids = torch.tensor([prompt_ids(images)])
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(**hf_inputs(ids, torch.ones_like(ids), images)).logits.float()
        got = ours(ids, images)
    assert got.dtype == torch.float32 and (got - ref).abs().max().item() <= 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_packed_tower_gives_the_same_features_and_tokens(tmp_path, family):
    """On a CPU in bf16 the loader packs the ViT's Linear weights (models/packed.py): the same numbers as plain."""
    from minivar.generate import generate
    from minivar.models import packed
    if not packed.available():
        pytest.skip("oneDNN does not run bf16 on this CPU")
    d = write_checkpoint(hf_model(family), tmp_path, "hub")
    plain, fast = load_model(d, torch.bfloat16, pack=False), load_model(d, torch.bfloat16)
    assert any(isinstance(m, packed.PackedLinear) for m in fast.visual.modules())
    assert not any(isinstance(m, packed.PackedLinear) for m in fast.model.modules())
    images = [image((1, 4, 6)), image((1, 6, 4), seed=1)]
    images = [ImageInput(im.pixel_values.bfloat16(), im.num_tokens, im.panels, im.meta) for im in images]
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(plain.image_features(images), fast.image_features(images)))
        ids = torch.tensor([prompt_ids(images[:1])])
        runs = [generate(m, ids, images[:1], max_new_tokens=5, eos_token_id=None).output_ids for m in (plain, fast)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_packed_decoder_gives_the_same_batched_tokens(tmp_path, tied):
    """pack_decoder (a contrastive run's load): the decoder's Linears packed too, except a head tied to the
    embedding, which stays that one shared matrix; a batch's several-row steps give plain weights' numbers."""
    from minivar.generate import generate
    from minivar.models import packed
    if not packed.available():
        pytest.skip("oneDNN does not run bf16 on this CPU")
    d = write_checkpoint(hf_model("qwen2_vl", tied), tmp_path, "hub")
    plain, fast = load_model(d, torch.bfloat16), load_model(d, torch.bfloat16, pack_decoder=True)
    assert all(isinstance(layer.mlp.down_proj, packed.PackedLinear) for layer in fast.model.layers)
    assert not any(isinstance(m, packed.PackedLinear) for m in plain.model.modules())
    if tied:
        assert type(fast.lm_head) is torch.nn.Linear   # still the very storage of the embedding
        assert fast.lm_head.weight.data_ptr() == fast.model.embed_tokens.weight.data_ptr()
    else:
        assert isinstance(fast.lm_head, packed.PackedLinear)
    images = [image((1, 4, 6)), image((1, 6, 4), seed=1)]
    images = [ImageInput(im.pixel_values.bfloat16(), im.num_tokens, im.panels, im.meta) for im in images]
    rows = [prompt_ids(images[:1]), prompt_ids(images[1:])]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.inference_mode():
        runs = [generate(m, ids, images, attention_mask=mask, max_new_tokens=5, eos_token_id=None).output_ids
                for m in (plain, fast)]
    assert runs[0] == runs[1]
