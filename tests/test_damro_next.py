"""DAMRO on LLaVA-NeXT against the released modeling_llava_next.py restated on transformers'
LlavaNextForConditionalGeneration: top-k per crop, the contrast image the base crop's k features + one
image_newline, two caches, the shared rule. Runs where the LLaVA-NeXT family (minivar/models/llava_next.py) is."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("minivar.models.llava_next")

from minivar.generate import generate  # noqa: E402
from minivar.methods import damro  # noqa: E402
from minivar.methods.contrastive import PromptBranch, combine, contrastive_generate  # noqa: E402
from minivar.methods.method import Call  # noqa: E402
from minivar.models.anyres import process_image  # noqa: E402
from test_llava_next import IMAGE_ID, hf_inputs, hf_processor, image, llama_pair, prompt_ids  # noqa: E402,F401


def released_next_contrast(ref, pixel_values, topk):
    """modeling_llava_next.py (DAMRO) restated: hooks on layers[-2]'s q/k over every crop, per-crop top-k, gather,
    projector, then pack_image_features_damro: the first crop's k rows + image_newline."""
    tower = ref.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[ref.config.vision_feature_layer]
    seen = {}
    hs = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
          layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))]
    try:
        out = tower(pixel_values, output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    selected = out.hidden_states[ref.config.vision_feature_layer][:, 1:]
    B, N, C = selected.shape
    attn = F.softmax((seen["q"] @ seen["k"].transpose(-2, -1)) * C ** -0.5, dim=-1)
    _, idx = torch.topk(attn[:, 0, 1:], topk, dim=1, largest=True)
    feats = ref.model.multi_modal_projector(torch.gather(selected, 1, idx.unsqueeze(-1).expand(-1, -1, C)))
    return idx, torch.cat([feats[0], ref.model.image_newline[None].to(feats.dtype)], dim=0)


@pytest.mark.parametrize("name,topk", [("wide", 4), ("tall", 10), ("square", 16)])
def test_next_contrast_image_and_tokens_equal_the_released_arithmetic(llama_pair, hf_processor, name, topk):
    ref, model, _ = llama_pair
    cfg = damro.DAMROConfig(alpha=1.0, beta=0.1, topk=topk).validate(model.config)
    img = image(name)
    im = process_image(img, model.config)
    ids = prompt_ids(im.num_tokens)[None]
    pipe = SimpleNamespace(model=model, config=model.config)
    call = Call(pipe, ids, None, [im], ids.shape[1] + 8, 1)
    with torch.inference_mode():
        branch = damro.DAMRO(cfg).branch(call)[0]
        px, sizes = hf_inputs(hf_processor, img)
        idx, want = released_next_contrast(ref, im.pixel_values, topk)
        expected_full = ref.model.get_image_features(px, sizes).pooler_output[0]
    assert call.shared["damro"][0].tolist() == idx[0].tolist()            # the base crop's outliers
    assert branch.image_features.shape == (topk + 1, want.shape[-1])
    assert (branch.image_features - want).abs().max() <= 1e-5
    assert (call.features[0] - expected_full).abs().max() <= 1e-5         # the full branch, from the same tower run
    cd_ids = torch.tensor([branch.input_ids])
    assert int((cd_ids == IMAGE_ID).sum()) == topk + 1

    # the two-cache loop of the released sampler on transformers vs minivar's batched generation
    with torch.inference_mode():
        embeds = ref.get_input_embeddings()(cd_ids.masked_fill(cd_ids == IMAGE_ID, 0))
        embeds = embeds.masked_scatter((cd_ids == IMAGE_ID)[..., None], want.to(embeds.dtype))
        full = ref(input_ids=ids, pixel_values=px, image_sizes=sizes, use_cache=True)
        cd = ref(inputs_embeds=embeds, use_cache=True)
        released = []
        for _ in range(8):
            nxt = combine(full.logits[:, -1], cd.logits[:, -1], cfg.alpha, cfg.beta).argmax(-1)
            released.append(int(nxt))
            full = ref(input_ids=nxt[:, None], past_key_values=full.past_key_values, use_cache=True)
            cd = ref(input_ids=nxt[:, None], past_key_values=cd.past_key_values, use_cache=True)
        two_caches = contrastive_generate(model, PromptBranch(ids, image_features=call.features),
                                          PromptBranch(cd_ids, image_features=[branch.image_features]),
                                          alpha=cfg.alpha, beta=cfg.beta, max_new_tokens=8, eos_token_id=None)[0]
        rows, mask = damro.left_pad([ids[0].tolist(), branch.input_ids], 0)
        run = damro.DAMRO(cfg).start(call)
        batched = generate(model, rows, image_features=torch.cat([call.features[0], branch.image_features]),
                           attention_mask=mask, max_new_tokens=8, eos_token_id=None, branches=2,
                           choose=lambda logits: run.choose(logits[0], logits[1])).output_ids[0]
    assert two_caches == released == batched
