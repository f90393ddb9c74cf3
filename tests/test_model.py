"""Model behaviour that parity files cannot show: the KV cache, the unused CLIP layer, left-padding, and a live
comparison with transformers when it is installed."""
from pathlib import Path

import pytest
import torch

from conftest import build_model, write_checkpoint
from minivar.checkpoint import load_model
from minivar.models.config import LlavaConfig, TextConfig, VisionConfig
from minivar.demo import random_state_dict
from minivar.generate import generate
from minivar.models.llava import Llava

REPO = Path(__file__).resolve().parents[1]
CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=56, patch_size=14),
    text=TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    max_position_embeddings=256, rms_norm_eps=1e-5),
    image_token_index=290, pad_token_id=291)


def tiny_model(cfg=CFG, seed=0, std=0.2) -> Llava:
    return build_model(cfg, random_state_dict(cfg, seed, std=std))


def prompt(cfg=CFG, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = cfg.num_image_tokens
    ids = torch.cat([torch.tensor([1]), torch.randint(3, 280, (4,), generator=g), torch.full((n,), cfg.image_token_index),
                     torch.randint(3, 280, (6,), generator=g)])[None]
    return ids, torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)


def test_cached_decoding_equals_recomputation():
    model = tiny_model()
    ids, px = prompt()
    cached = generate(model, ids, px, max_new_tokens=12, eos_token_id=None).output_ids[0]
    seq = ids
    recomputed = []
    with torch.inference_mode():
        for _ in range(12):
            logits = model(seq, px)                      # no cache: the whole sequence every step
            nxt = int(logits[0, -1].argmax())
            recomputed.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    assert cached == recomputed
    assert len(set(cached)) > 3                          # a real sequence, not one token repeated


def test_cached_logits_equal_uncached_logits():
    model = tiny_model()
    ids, px = prompt()
    from minivar.models.llama import KVCache
    with torch.inference_mode():
        full = model(ids, px)
        cache = KVCache(CFG.text, 1, ids.shape[1], torch.float32, "cpu")
        split = ids.shape[1] - 3
        a = model(ids[:, :split], px, cache=cache)
        b = model(ids[:, split:split + 1], cache=cache, input_pos=split)
        c = model(ids[:, split + 1:], cache=cache, input_pos=split + 1)
    stepwise = torch.cat([a, b, c], dim=1)
    assert (stepwise - full).abs().max().item() <= 1e-5


def test_grouped_query_attention_with_the_cache_equals_recomputation():
    """Fewer key/value heads than query heads: the cached keys and (transposed) values are shared by head groups."""
    import dataclasses
    from minivar.models.llama import KVCache
    cfg = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, num_key_value_heads=2))
    model = tiny_model(cfg)
    ids, px = prompt(cfg)
    ids, px = ids.repeat(2, 1), px.repeat(2, 1, 1, 1)
    with torch.inference_mode():
        full = model(ids, px)
        cache = KVCache(cfg.text, 2, ids.shape[1], torch.float32, "cpu")
        split = ids.shape[1] - 4
        parts = [model(ids[:, :split], px, cache=cache)]
        parts += [model(ids[:, i:i + 1], cache=cache, input_pos=i) for i in range(split, ids.shape[1])]   # decode-like
    assert model.language_model.model.layers[0].self_attn.k_proj.weight.shape[0] == 2 * cfg.text.head_dim
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_vision_tower_never_runs_its_last_layer(tmp_path):
    model = tiny_model()
    # LLaVA reads hidden_states[-2]: of 3 CLIP layers only 2 exist in the model at all
    assert len(model.vision_tower.encoder.layers) == CFG.vision.num_hidden_layers - 1
    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in model.vision_tower.encoder.layers]
    ids, px = prompt()
    with torch.inference_mode():
        model(ids, px)
    for h in hooks:
        h.remove()
    assert len(calls) == CFG.vision.num_hidden_layers - 1
    # and a checkpoint whose last CLIP layer is garbage (NaN) loads and gives finite, identical logits
    state = {k: v for k, v in model.state_dict().items()}
    last = CFG.vision.num_hidden_layers - 1
    for name in list(state):
        if name.startswith("vision_tower.encoder.layers.0."):
            state[name.replace("layers.0.", f"layers.{last}.")] = torch.full_like(state[name], float("nan"))
    state["vision_tower.post_layernorm.weight"] = torch.full((CFG.vision.hidden_size,), float("nan"))
    state["vision_tower.post_layernorm.bias"] = torch.full((CFG.vision.hidden_size,), float("nan"))
    write_checkpoint(tmp_path, state, CFG)
    reloaded = load_model(tmp_path, torch.float32)
    with torch.inference_mode():
        a, b = model(ids, px), reloaded(ids, px)
    assert torch.isfinite(b).all() and torch.equal(a, b)


def test_left_padded_batch_equals_one_by_one():
    model = tiny_model()
    (ids_a, px_a), (ids_b, px_b) = prompt(seed=1), prompt(seed=2)
    ids_b = torch.cat([ids_b[:, :3], ids_b[:, 5:]], dim=1)        # a shorter prompt: it gets left padding
    pad = ids_a.shape[1] - ids_b.shape[1]
    batch = torch.cat([ids_a, torch.cat([torch.zeros(1, pad, dtype=torch.long), ids_b], 1)])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[1, :pad] = False
    both = generate(model, batch, torch.cat([px_a, px_b]), max_new_tokens=8, eos_token_id=None, attention_mask=mask)
    one_a = generate(model, ids_a, px_a, max_new_tokens=8, eos_token_id=None).output_ids[0]
    one_b = generate(model, ids_b, px_b, max_new_tokens=8, eos_token_id=None).output_ids[0]
    assert both.output_ids == [one_a, one_b]


def test_generation_stops_at_eos_and_respects_max_new_tokens():
    model = tiny_model()
    ids, px = prompt()
    free = generate(model, ids, px, max_new_tokens=10, eos_token_id=None).output_ids[0]
    # declare the 4th generated token to be EOS: generation must stop before it and not include it
    stopped = generate(model, ids, px, max_new_tokens=10, eos_token_id=free[3])
    assert stopped.output_ids[0] == free[:free.index(free[3])]
    assert stopped.finished == [True]
    assert generate(model, ids, px, max_new_tokens=0).output_ids == [[]]


def test_sampling_is_seeded():
    model = tiny_model()
    ids, px = prompt()
    a = generate(model, ids, px, max_new_tokens=8, eos_token_id=None, temperature=1.0, top_p=0.9, seed=3).output_ids
    b = generate(model, ids, px, max_new_tokens=8, eos_token_id=None, temperature=1.0, top_p=0.9, seed=3).output_ids
    assert a == b
    others = [generate(model, ids, px, max_new_tokens=8, eos_token_id=None, temperature=1.0, top_p=0.9, seed=s).output_ids
              for s in (4, 5, 6)]
    assert any(o != a for o in others)


def test_top_p_keeps_only_the_nucleus():
    from minivar.generate import sample_next
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert seen == {0, 1}          # 0.5 + 0.3 ≥ 0.7: tokens 2 and 3 are never drawn


# ---------------------------------------------------------------------------------------------------------------
# Live parity: runs when transformers is installed (CI installs it).

@pytest.mark.parametrize("dtype,shard", [(torch.float32, None), (torch.float16, "200KB")])
def test_live_parity_with_transformers(tmp_path, dtype, shard):
    pytest.importorskip("transformers")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration
    hf_cfg = HFLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=56, patch_size=14),
        text_config=LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
                                initializer_range=0.2),
        image_token_index=290, image_seq_length=16)
    torch.manual_seed(0)
    ref = LlavaForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():                                  # non-trivial norms and biases
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    ref = ref.to(dtype)
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    ref = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    mine = load_model(tmp_path, torch.float32)
    ids, px = prompt()
    with torch.inference_mode():
        expected = ref(input_ids=ids, pixel_values=px).logits
        got = mine(ids, px)
    assert (got - expected).abs().max().item() <= 1e-4
    hf_tokens = ref.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=16, min_new_tokens=16)[0, ids.shape[1]:].tolist()
    ours = generate(mine, ids, px, max_new_tokens=16, eos_token_id=None).output_ids[0]
    assert ours == hf_tokens


def test_pipeline_batch_equals_one_by_one_with_and_without_var(demo_pipe):
    from minivar.methods.var import VARConfig
    llava = demo_pipe
    from PIL import Image
    image_a = str(REPO / "assets" / "example.jpg")
    image_b = Image.open(str(REPO / "assets" / "example.jpg")).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    prompts = ["What is in the image?", "Describe the picture in a few words, please."]   # different lengths
    for var in (None, VARConfig(sink_dims=(37, 301))):
        batch = llava.generate_batch([image_a, image_b], prompts, max_new_tokens=6, var=var)
        single = [llava.generate(img, p, max_new_tokens=6, var=var) for img, p in zip([image_a, image_b], prompts)]
        for b, s in zip(batch, single):
            assert b.output_ids == s.output_ids
            assert b.prompt_ids == s.prompt_ids
            if var is not None:
                assert b.var["sinks"] == s.var["sinks"]
                assert b.var["image_span"] == s.var["image_span"]
                assert b.var["redistributed"] == s.var["redistributed"]


def test_fast_attention_path_equals_explicit_path():
    """The fused SDPA path (used when nothing needs probabilities) gives the explicit path's numbers."""
    from minivar.methods.hooks import Hook

    class ExplicitEverywhere(Hook):    # a hook that asks for every row's probabilities and changes nothing
        def explicit_from(self, layer, rows):
            return rows.start

    model = tiny_model()
    ids, px = prompt()
    with torch.inference_mode():
        fast = model(ids, px)
        explicit = model(ids, px, hooks=ExplicitEverywhere())
    assert (fast - explicit).abs().max().item() <= 1e-5
    a = generate(model, ids, px, max_new_tokens=10, eos_token_id=None).output_ids
    b = generate(model, ids, px, max_new_tokens=10, eos_token_id=None, hooks=ExplicitEverywhere()).output_ids
    assert a == b


def test_a_generated_image_token_id_is_an_ordinary_token():
    """Decode steps carry no image: if the model emits the image id, it is embedded like any other token."""
    from minivar.models.llama import KVCache
    model = tiny_model()
    ids, px = prompt()
    cache = KVCache(CFG.text, 1, ids.shape[1] + 2, torch.float32, "cpu")
    with torch.inference_mode():
        model(ids, px, cache=cache)
        logits = model(torch.tensor([[CFG.image_token_index]]), cache=cache, input_pos=ids.shape[1])
    assert torch.isfinite(logits).all()


def test_pipeline_logits_take_a_var_config_and_padding(demo_pipe):
    from minivar.methods.var import VARConfig
    llava = demo_pipe
    ids, px = llava.prompt_ids("What is in the image?"), llava.pixels(str(REPO / "assets" / "example.jpg"))
    plain = llava.logits(ids, px)
    with_var = llava.logits(ids, px, var=VARConfig(sink_dims=(37, 301)))
    assert not torch.equal(plain, with_var)                       # VAR changed the rows after the image
    image_end = int((ids[0] == llava.config.image_token_index).nonzero().max()) + 1
    assert torch.equal(plain[:, :image_end], with_var[:, :image_end])   # ... and nothing before them
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool)], 1)
    torch.testing.assert_close(llava.logits(padded, px, attention_mask=mask)[:, 3:], plain, atol=1e-4, rtol=0)
