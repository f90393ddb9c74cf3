"""DAMRO: outliers, contrast prompt and contrastive decoding against a loop-level re-statement of the released code
(coder-gx/DAMRO 03008ac: modeling_llava.py's hooks + top-k, sample_method/sample.py's two-cache loop) on
transformers' own LlavaForConditionalGeneration, tiny random checkpoints; and DAMRO's bad inputs."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_llava_config
from minivar.errors import MinivarError
from minivar.generate import generate
from minivar.methods import damro
from minivar.methods.contrastive import PromptBranch, combine, contrastive_generate
from minivar.methods.damro import DAMROConfig

VOCAB, IMAGE_ID, PAD_ID = 261, 259, 260       # the demo's byte-level tokenizer


# ---------------------------------------------------------------------------------------------------------------
# The reference: transformers' LLaVA, and DAMRO restated on it as released


def hf_tiny(seed=0, image_size=84, strategy="default"):
    """A tiny eager fp32 transformers LLaVA (CLIP 3 layers, feature layer −2; LLaMA 2 layers) with weights
    redrawn from a seeded generator so logits are well separated (as tests/make_golden.py builds them)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    n = (image_size // 14) ** 2
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=image_size, patch_size=14),
        text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5),
        image_token_index=IMAGE_ID, pad_token_id=PAD_ID, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy=strategy, image_seq_length=n + (strategy == "full"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim == 1:
                p.copy_(1 + 0.2 * r)
            elif "embed" in name and "patch" not in name:
                p.copy_(r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()) * (3.0 if name == "lm_head.weight" else 1.0))
    return model


def released_outliers(ref, pixel_values, topk):
    """modeling_llava.py (DAMRO) restated: forward hooks on encoder.layers[vision_feature_layer]'s q_proj/k_proj,
    the tower with all hidden states, full-width CLS attention, topk, gather, projector."""
    tower = ref.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[ref.config.vision_feature_layer]
    seen = {}
    handles = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
               layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))]
    try:
        out = tower(pixel_values, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    selected = out.hidden_states[ref.config.vision_feature_layer]
    if ref.config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    B, N, C = selected.shape
    attn = F.softmax((seen["q"] @ seen["k"].transpose(-2, -1)) * C ** -0.5, dim=-1)
    _, idx = torch.topk(attn[:, 0, 1:], topk, dim=1, largest=True)
    gathered = torch.gather(selected, 1, idx.unsqueeze(-1).expand(-1, -1, C))
    return idx, ref.model.multi_modal_projector(gathered)


@torch.inference_mode()
def released_generate(ref, ids, pixel_values, cd_ids, alpha, beta, topk, steps, seed=None):
    """sample_method/sample.py restated on transformers 5.x: the full branch and the contrast branch (the prompt
    with k outlier features as its image), two forwards and two caches per step, combined on the raw logits,
    argmax (seed None) or softmax + multinomial (the released scripts' do_sample=True, no warpers)."""
    idx, feats = released_outliers(ref, pixel_values, topk)
    is_image = cd_ids == IMAGE_ID
    embeds = ref.get_input_embeddings()(cd_ids.masked_fill(is_image, 0))
    embeds = embeds.masked_scatter(is_image[..., None], feats.to(embeds.dtype))
    full = ref(input_ids=ids, pixel_values=pixel_values, use_cache=True)
    cd = ref(inputs_embeds=embeds, use_cache=True)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = []
    for _ in range(steps):
        l_full, l_cd = full.logits[:, -1, :], cd.logits[:, -1, :]
        cutoff = torch.log(torch.tensor(beta)) + l_full.max(dim=-1, keepdim=True).values
        diffs = (1 + alpha) * l_full - alpha * l_cd
        scores = diffs.masked_fill(l_full < cutoff, -float("inf"))
        if seed is None:
            nxt = torch.argmax(scores, dim=-1)
        else:
            nxt = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
        tokens.append(int(nxt))
        full = ref(input_ids=nxt[:, None], past_key_values=full.past_key_values, use_cache=True)
        cd = ref(input_ids=nxt[:, None], past_key_values=cd.past_key_values, use_cache=True)
    return idx[0].tolist(), tokens


# ---------------------------------------------------------------------------------------------------------------
# minivar's side


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, minivar Pipeline) on the same saved checkpoint (+ the demo's byte tokenizer)."""
    pytest.importorskip("transformers")
    import minivar
    from minivar.demo import make_tokenizer
    d = tmp_path_factory.mktemp("damro_tiny")
    ref = hf_tiny()
    ref.save_pretrained(d)
    make_tokenizer().save(str(d / "tokenizer.json"))
    return ref, minivar.load(str(d), device="cpu", dtype="float32")


def image(seed=0, size=(120, 80)):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def minivar_damro(pipe, prompt, img, conv_mode, mode, cfg: DAMROConfig, steps, seed=None):
    ids = pipe.prompt_ids(prompt, conv_mode)
    px = pipe.pixels(img, mode)
    out = damro.outlier_image(pipe.model, px, cfg.topk)
    cd_ids, _ = damro.left_pad(damro.contrast_rows(ids.tolist(), IMAGE_ID, cfg.topk), PAD_ID)
    tokens = contrastive_generate(pipe.model, PromptBranch(ids, image_features=out.features),
                                  PromptBranch(cd_ids, image_features=out.outlier_features), alpha=cfg.alpha,
                                  beta=cfg.beta, max_new_tokens=steps, eos_token_id=None,
                                  temperature=0.0 if seed is None else 1.0, seed=seed)
    return ids, px, cd_ids, out, tokens[0]


CASES = [  # (alpha, beta, topk, conv_mode, image mode, seed: None = greedy, else the released sampling)
    (0.5, 0.1, 4, "vicuna_v1", "pad", None),
    (1.5, 0.1, 4, "llava_hf", "crop", None),
    (2.0, 0.1, 10, "vicuna_v1", "crop", None),
    (1.0, 0.5, 36, "llava_hf", "pad", None),
    (2.0, 0.1, 10, "vicuna_v1", "pad", 42),
    (0.5, 0.1, 4, "llava_hf", "crop", 42),
    (0.5, 0.1, 4, "llava_v1", "crop", 42),     # the released POPE script: its template, pixels and sampling
    (2.0, 0.1, 10, "llava_v1", "crop", None),
]


@pytest.mark.parametrize("alpha,beta,topk,conv_mode,mode,seed", CASES)
def test_damro_equals_the_released_arithmetic_on_transformers(pair, alpha, beta, topk, conv_mode, mode, seed):
    ref, pipe = pair
    cfg = DAMROConfig(alpha=alpha, beta=beta, topk=topk).validate(pipe.config)
    ids, px, cd_ids, out, tokens = minivar_damro(pipe, "What is in the image?", image(topk), conv_mode, mode, cfg,
                                                 12, seed)
    ref_idx, ref_tokens = released_generate(ref, ids, px, cd_ids, alpha, beta, topk, 12, seed)
    assert out.outliers[0].tolist() == ref_idx
    assert len(set(ref_idx)) == topk and cd_ids.shape[1] == ids.shape[1] - 36 + topk
    assert tokens == ref_tokens                                   # the two-cache loop on minivar's model
    # and the method on minivar's generation: both branches in one batched forward per step
    result = pipe.generate(image(topk), "What is in the image?", methods=[damro.DAMRO(cfg)], conv_mode=conv_mode,
                           image_aspect_ratio=mode, max_new_tokens=12, temperature=0.0 if seed is None else 1.0,
                           seed=seed)
    eos = pipe.tokenizer.eos_id
    assert result.output_ids == (ref_tokens[:ref_tokens.index(eos)] if eos in ref_tokens else ref_tokens)
    assert result.reports["damro"] == {"outliers": ref_idx, "alpha": alpha, "beta": beta, "topk": topk}


def test_outlier_scores_and_projected_features_equal_transformers(pair):
    ref, pipe = pair
    px = torch.cat([pipe.pixels(image(s), "pad") for s in range(3)])
    out = damro.outlier_image(pipe.model, px, 5)
    idx, feats = released_outliers(ref, px, 5)
    assert torch.equal(out.outliers, idx)
    assert (torch.stack(out.outlier_features) - feats).abs().max() <= 1e-5
    # the full branch's features are exactly what the model uses, from the same single tower run
    assert all(torch.equal(a, b) for a, b in zip(out.features, pipe.model.image_features(px), strict=True))
    assert torch.equal(out.outliers, out.scores.topk(5, dim=1).indices)
    assert torch.allclose(out.scores.sum(-1), 1 - ref_cls_column(ref, px), atol=1e-5)


def ref_cls_column(ref, px):
    """The CLS row's attention to CLS itself (scores over the patches sum to 1 minus it)."""
    tower = ref.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    seen = {}
    hs = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
          layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))]
    with torch.inference_mode():
        tower(px)
    for h in hs:
        h.remove()
    attn = F.softmax(seen["q"] @ seen["k"].transpose(-2, -1) * seen["q"].shape[-1] ** -0.5, dim=-1)
    return attn[:, 0, 0]


def test_alpha_zero_is_the_base_model(pair):
    ref, pipe = pair
    cfg = DAMROConfig(alpha=0.0, beta=0.1, topk=4)
    ids, px, _, _, tokens = minivar_damro(pipe, "Describe it.", image(5), "vicuna_v1", "pad", cfg, 12)
    base = generate(pipe.model, ids, px, max_new_tokens=12, eos_token_id=None).output_ids[0]
    with torch.inference_mode():
        hf = ref.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=12, min_new_tokens=12)[0, ids.shape[1]:].tolist()
    assert tokens == base == hf


def test_a_strong_contrast_changes_the_answer(pair):
    """The test above must be able to fail: with α large the contrast branch does steer the tokens."""
    _, pipe = pair
    ids, px, _, _, strong = minivar_damro(pipe, "Describe it.", image(5), "vicuna_v1", "pad",
                                          DAMROConfig(alpha=8.0, beta=1e-4, topk=4), 12)
    base = generate(pipe.model, ids, px, max_new_tokens=12, eos_token_id=None).output_ids[0]
    assert strong != base


# ---------------------------------------------------------------------------------------------------------------
# Plain functions


def test_the_outlier_layer_is_the_one_whose_output_llava_reads():
    cfg = tiny_llava_config()                      # CLIP with 3 layers, feature layer −2
    assert damro.outlier_layer(cfg) == 1           # layers[-2]; its output is hidden_states[2] = hidden_states[-2]
    assert cfg.vision_layers_used == 2             # minivar runs layers 0 and 1: the hooked layer is among them
    from minivar.models.config import LLAVA_VISION_DEFAULTS, VisionConfig
    real = SimpleNamespace(vision=VisionConfig(**LLAVA_VISION_DEFAULTS), vision_feature_layer=-2)
    assert damro.outlier_layer(real) == 22         # LLaVA-1.5: CLIP layer 22 of 0..23, input hidden_states[22]


def test_cls_attention_is_the_full_width_softmax_row():
    torch.manual_seed(0)
    from minivar.models.clip import CLIPEncoderLayer
    cfg = tiny_llava_config().vision
    layer = CLIPEncoderLayer(cfg).eval()
    x = torch.randn(2, 17, cfg.hidden_size)
    with torch.no_grad():
        h = layer.layer_norm1(x)
        q, k = layer.self_attn.q_proj(h), layer.self_attn.k_proj(h)
        want = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(cfg.hidden_size), -1)[:, 0, 1:]
        got = damro.cls_attention(layer, x)
        heads = damro.head_cls_attention(layer, x)
    assert torch.allclose(got, want, atol=1e-6)
    assert heads.shape == (2, cfg.num_attention_heads, 16)
    hd = cfg.head_dim
    qh, kh = q.view(2, 17, -1, hd).transpose(1, 2), k.view(2, 17, -1, hd).transpose(1, 2)
    want_heads = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(hd), -1)[:, :, 0, 1:]
    assert torch.allclose(heads, want_heads, atol=1e-6)
    assert not torch.allclose(heads.mean(1), got, atol=1e-3)      # the two are different scores


def test_vision_cls_attention_per_layer(demo_pipe):
    px = demo_pipe.pixels(image(1), "pad")
    maps = damro.vision_cls_attention(demo_pipe.model, px)
    n = demo_pipe.config.vision.num_patches
    assert sorted(maps) == list(range(demo_pipe.config.vision_layers_used))
    L = damro.outlier_layer(demo_pipe.config)
    out = damro.outlier_image(demo_pipe.model, px, 3)
    assert torch.equal(maps[L], out.scores) and maps[L].shape == (1, n)
    heads = damro.vision_cls_attention(demo_pipe.model, px, layers=[0], heads=True)
    assert heads[0].shape == (1, demo_pipe.config.vision.num_attention_heads, n)
    with pytest.raises(MinivarError, match="vision layer 99"):
        damro.vision_cls_attention(demo_pipe.model, px, layers=[99])


def test_contrast_rows_keep_the_text_and_shorten_the_image():
    rows = [[1, 5, IMAGE_ID, IMAGE_ID, IMAGE_ID, IMAGE_ID, 7, 8], [1, IMAGE_ID, IMAGE_ID, IMAGE_ID, IMAGE_ID, 9]]
    assert damro.contrast_rows(rows, IMAGE_ID, 2) == [[1, 5, IMAGE_ID, IMAGE_ID, 7, 8], [1, IMAGE_ID, IMAGE_ID, 9]]
    ids, mask = damro.left_pad(damro.contrast_rows(rows, IMAGE_ID, 2), PAD_ID)
    assert ids.tolist() == [[1, 5, IMAGE_ID, IMAGE_ID, 7, 8], [PAD_ID, PAD_ID, 1, IMAGE_ID, IMAGE_ID, 9]]
    assert mask.tolist() == [[True] * 6, [False, False] + [True] * 4]
    with pytest.raises(MinivarError, match="contiguous"):
        damro.contrast_rows([[1, IMAGE_ID, 3, IMAGE_ID]], IMAGE_ID, 1)
    with pytest.raises(MinivarError, match="fewer"):
        damro.contrast_rows([[1, IMAGE_ID, 3]], IMAGE_ID, 2)


def test_llava_next_contrast_image_is_the_base_tiles_outliers_and_one_newline():
    g = torch.Generator().manual_seed(0)
    tiles = torch.randn(5, 4, 8, generator=g)           # 5 tiles (base image first), k = 4, D = 8
    newline = torch.randn(8, generator=g)
    got = damro.next_contrast_features(tiles, newline)
    assert got.shape == (5, 8)
    assert torch.equal(got[:4], tiles[0]) and torch.equal(got[4], newline)
    with pytest.raises(MinivarError, match="tiles"):
        damro.next_contrast_features(tiles[0], newline)


def test_combine_is_the_released_rule():
    g = torch.Generator().manual_seed(3)
    full, cd = torch.randn(2, 50, generator=g) * 3, torch.randn(2, 50, generator=g) * 3
    got = combine(full, cd, 1.5, 0.1)
    keep = torch.softmax(full, -1) >= 0.1 * torch.softmax(full, -1).max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(got), keep)
    assert torch.allclose(got[keep], (2.5 * full - 1.5 * cd)[keep])
    assert torch.equal(combine(full, cd, 0.0, 1.0).isfinite().sum(-1), torch.tensor([1, 1]))   # β 1: top-1 only


# ---------------------------------------------------------------------------------------------------------------
# Settings and bad inputs


def test_presets_are_the_released_settings():
    assert DAMROConfig.preset("pope").settings() == {"alpha": 0.5, "beta": 0.1, "topk": 4}
    assert DAMROConfig.preset("chair").settings() == {"alpha": 1.5, "beta": 0.1, "topk": 4}
    assert DAMROConfig.preset("mme").settings() == {"alpha": 2.0, "beta": 0.1, "topk": 10}
    assert DAMROConfig().settings() == DAMROConfig.preset("mme").settings()
    assert DAMROConfig.preset("chair", topk=8, alpha=None).settings() == {"alpha": 1.5, "beta": 0.1, "topk": 8}
    with pytest.raises(MinivarError, match=r"`DAMROConfig.preset` name 'vqa'"):
        DAMROConfig.preset("vqa")


@pytest.mark.parametrize("kwargs,name", [
    ({"topk": 17}, "DAMROConfig.topk"), ({"topk": 0}, "DAMROConfig.topk"), ({"topk": 2.5}, "DAMROConfig.topk"),
    ({"beta": 0.0}, "DAMROConfig.beta"), ({"beta": 1.5}, "DAMROConfig.beta"), ({"beta": -0.1}, "DAMROConfig.beta"),
    ({"alpha": -0.5}, "DAMROConfig.alpha"), ({"alpha": float("nan")}, "DAMROConfig.alpha"),
])
def test_bad_settings_are_one_error_naming_the_parameter(kwargs, name):
    cfg = tiny_llava_config()                                  # 16 patches
    with pytest.raises(MinivarError, match=f"`{name}`") as e:
        DAMROConfig(**kwargs).validate(cfg)
    assert "\n" not in str(e.value)
    DAMROConfig(topk=16, beta=1.0, alpha=0.0).validate(cfg)    # the edges are allowed


def test_a_family_without_a_cls_token_is_refused():
    with pytest.raises(MinivarError, match="CLS token"):
        DAMROConfig().validate(SimpleNamespace(vision=SimpleNamespace(num_patches=1024), vision_feature_layer=-2))
    import dataclasses
    multi = dataclasses.replace(tiny_llava_config(), vision_feature_layer=(-2, -1))
    with pytest.raises(MinivarError, match="single vision feature layer"):
        DAMROConfig(topk=4).validate(multi)
    with pytest.raises(MinivarError, match="vision_feature_layer=1"):
        DAMROConfig(topk=4).validate(dataclasses.replace(tiny_llava_config(), vision_feature_layer=1))


def test_the_contrast_image_is_one_row_of_k_tokens_in_topk_order():
    from minivar.models.images import token_layout
    im = damro.contrast_image(torch.zeros(3, 56, 56), torch.tensor([7, 2, 11]))
    assert im.num_tokens == 3 and im.meta["outliers"] == [7, 2, 11]
    assert token_layout(im.panels) == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]


@pytest.mark.parametrize("seed", [None, 42])
def test_batched_branches_equal_the_branches_one_after_the_other(demo_pipe, seed):
    """The method on minivar's generation (both branches of two samples, prompts of different lengths, in one
    forward per step) == each branch with its own cache, one forward each (contrastive_generate)."""
    pipe, cfg = demo_pipe, DAMROConfig.preset("mme")
    prompts = ["What is in the image?", "Describe the picture in detail, please."]
    imgs = [image(s) for s in (1, 2)]
    kw = dict(max_new_tokens=8, temperature=0.0 if seed is None else 1.0, seed=seed)
    batched = pipe.generate_batch(imgs, prompts, methods=[damro.DAMRO(cfg)], **kw)
    rows = [pipe.prompt_ids(p)[0].tolist() for p in prompts]
    px = torch.cat([pipe.pixels(im, "pad") for im in imgs])
    out = damro.outlier_image(pipe.model, px, cfg.topk)
    image_id, pad = pipe.config.image_token_index, pipe.config.pad_token_id
    ids, mask = damro.left_pad(rows, pad)
    cd_ids, cd_mask = damro.left_pad(damro.contrast_rows(rows, image_id, cfg.topk), pad)
    sequential = contrastive_generate(pipe.model, PromptBranch(ids, image_features=out.features, attention_mask=mask),
                                      PromptBranch(cd_ids, image_features=out.outlier_features, attention_mask=cd_mask),
                                      alpha=cfg.alpha, beta=cfg.beta, eos_token_id=pipe.tokenizer.eos_id, **kw)
    assert [r.output_ids for r in batched] == sequential
    assert [r.reports["damro"]["outliers"] for r in batched] == out.outliers.tolist()
    if seed is None:                          # and each sample as it would run alone
        for b in range(2):
            assert pipe.generate(imgs[b], prompts[b], methods=[damro.DAMRO(cfg)], **kw).output_ids == sequential[b]


def test_damro_with_var_equals_var_acting_in_both_branches(demo_pipe):
    """methods=[VAR, DAMRO] in one batched call == the two-cache loop with VAR's own state in each branch. k = all
    patches (the contrast image is the image in outlier order), so the demo's planted visual sinks are in both."""
    from minivar.demo import DEMO_SINK_DIMS
    from minivar.methods.method import Call
    from minivar.methods.var import VAR, VARConfig
    pipe = demo_pipe
    cfg = DAMROConfig(alpha=1.0, beta=0.1, topk=pipe.config.vision.num_patches)
    var_cfg = VARConfig(sink_dims=DEMO_SINK_DIMS, rho=0.5)
    img, prompt, n = image(3), "What is in the image?", 8
    both = pipe.generate(img, prompt, methods=[VAR(var_cfg), damro.DAMRO(cfg)], max_new_tokens=n)
    ids = pipe.prompt_ids(prompt)
    im = pipe.image(img)
    out = damro.outlier_image(pipe.model, [im], cfg.topk)
    cd_ids = torch.tensor(damro.contrast_rows(ids.tolist(), pipe.config.image_token_index, cfg.topk))
    hooks = [VAR(var_cfg).start(Call(pipe, r, None, [im], r.shape[1] + n, 1)).hooks for r in (ids, cd_ids)]
    ref = contrastive_generate(pipe.model, PromptBranch(ids, image_features=out.features, hooks=hooks[0]),
                               PromptBranch(cd_ids, image_features=out.outlier_features, hooks=hooks[1]),
                               alpha=cfg.alpha, beta=cfg.beta, max_new_tokens=n, eos_token_id=pipe.tokenizer.eos_id)
    assert both.output_ids == ref[0]
    var_report = both.reports["var"]
    assert sum(var_report["redistributed"]["prefill"]) + sum(var_report["redistributed"]["decode"]) > 0
    # the test can fail: VAR does change the contrast branch's logits
    fresh = VAR(var_cfg).start(Call(pipe, cd_ids, None, [im], cd_ids.shape[1], 1)).hooks
    with torch.inference_mode():
        plain = pipe.model(cd_ids, image_features=out.outlier_features[0], output="last")
        with_var = pipe.model(cd_ids, image_features=out.outlier_features[0], hooks=fresh, output="last")
    assert (plain - with_var).abs().max() > 1e-3
    # ... and the batched prefill's two rows are each branch's own logits with VAR in it
    request = pipe.prepare([img], [prompt], methods=[VAR(var_cfg), damro.DAMRO(cfg)], max_new_tokens=n)
    assert request.branches == 2
    with torch.inference_mode():
        rows = pipe.model(request.input_ids, image_features=request.image_features,
                          attention_mask=request.attention_mask, hooks=request.hooks, output="last")
        alone = [pipe.model(r, image_features=f, output="last",
                            hooks=VAR(var_cfg).start(Call(pipe, r, None, [im], r.shape[1], 1)).hooks)
                 for r, f in ((ids, out.features[0]), (cd_ids, out.outlier_features[0]))]
    assert (rows[0] - alone[0][0]).abs().max() <= 1e-4 and (rows[1] - alone[1][0]).abs().max() <= 1e-4


def test_many_questions_on_one_image_equal_one_by_one(demo_pipe):
    pipe, cfg = demo_pipe, DAMROConfig.preset("pope")
    img, prompts = image(4), ["Is there a cat?", "What colour is the sky in this picture?"]
    many = pipe.generate_many(img, prompts, methods=[damro.DAMRO(cfg)], max_new_tokens=6)
    assert [r.output_ids for r in many] == \
        [pipe.generate(img, p, methods=[damro.DAMRO(cfg)], max_new_tokens=6).output_ids for p in prompts]
    assert many[0].reports["damro"]["outliers"] == many[1].reports["damro"]["outliers"]


def test_options_build_the_method_or_one_error_naming_the_flag():
    spell = lambda dest: "--" + dest.replace("_", "-")                         # noqa: E731
    assert damro.from_options({"damro": False}, spell) is None
    m = damro.from_options({"damro": True, "damro_preset": "chair", "damro_topk": 8}, spell)
    assert m.name == "damro" and m.settings() == {"alpha": 1.5, "beta": 0.1, "topk": 8}
    assert damro.from_options({"damro": True}, spell).settings() == DAMROConfig().settings()
    for opts, flag in [({"damro_alpha": 1.0}, "--damro-alpha only applies with --damro"),
                       ({"damro": True, "damro_beta": 0.0}, "--damro-beta must be in (0, 1]"),
                       ({"damro": True, "damro_alpha": -1.0}, "--damro-alpha must be"),
                       ({"damro": True, "damro_topk": 0}, "--damro-topk must be"),
                       ({"damro": True, "damro_preset": "vqa"}, "--damro-preset name 'vqa'")]:
        with pytest.raises(MinivarError, match=flag.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
            damro.from_options(opts, spell)
    with pytest.raises(MinivarError, match="more than the 16 image patches"):
        damro.from_options({"damro": True, "damro_topk": 17}, spell).check(SimpleNamespace(config=tiny_llava_config()))


def test_outliers_and_visual_sinks_are_counted_on_the_same_patches(demo_pipe):
    report = {"image_span": [10, 26], "visual_sinks": {"0": [], "1": [12, 20], "2": [12]}}
    got = damro.outlier_sink_overlap([2, 5, 9], report)
    assert got == {"outliers": [2, 5, 9], "visual_sink_patches": [2, 10], "overlap": [2], "count": 1,
                   "per_layer": {"0": 0, "1": 1, "2": 1}}
    # on the demo (visual sinks planted on some patches), k = all patches: every sink patch is an outlier
    from minivar.demo import DEMO_SINK_DIMS
    from minivar.methods.var import VAR, VARConfig
    pipe = demo_pipe
    n = pipe.config.vision.num_patches
    r = pipe.generate(image(3), "What is it?", max_new_tokens=1,
                      methods=[VAR(VARConfig(sink_dims=DEMO_SINK_DIMS)), damro.DAMRO(DAMROConfig(topk=n))])
    both = damro.outlier_sink_overlap(r.reports["damro"]["outliers"], r.reports["var"])
    assert both["count"] == len(both["visual_sink_patches"]) > 0
    assert all(0 <= p < n for p in both["visual_sink_patches"])


def test_the_full_feature_strategy_gathers_as_released(tmp_path):
    """vision_feature_select_strategy "full": the indices are over the patches but gather from CLS + patches (the
    released quirk, restated): outliers and contrast features equal the released arithmetic."""
    pytest.importorskip("transformers")
    from minivar.checkpoint import load_model
    ref = hf_tiny(seed=2, image_size=56, strategy="full")
    ref.save_pretrained(tmp_path)
    mine = load_model(tmp_path, torch.float32)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    out = damro.outlier_image(mine, px, 5)
    with torch.inference_mode():
        idx, feats = released_outliers(ref, px, 5)
    assert torch.equal(out.outliers, idx)
    assert (torch.stack(out.outlier_features) - feats).abs().max() <= 1e-5
    assert out.features[0].shape[0] == 17                   # the full branch keeps CLS + 16 patches
