"""PAI (minivar/methods/pai.py) against its released arithmetic, restated loop by loop on transformers' own models.

The reference: LALBJ/PAI's `llama_new_forward` (attention.py) written as transformers' eager attention function —
scores / √hd, + the mask, max with the dtype's minimum, then, in layers start … end−1 while `use_attn and not
use_cfg`, the last query row's image columns a ← |a|·α + a, fp32 softmax — switched by a dict standing for the
attributes `llama_modify` sets on each layer; and the released loop: the prompt's forward with `use_cfg` still set
(llama_modify's), then per step CFGLogits (log-softmax, the no-image prompt's forward with `use_cfg` set, then
cleared; cutoff log 0.1 + max; γ·(s − u) + u; −∞ below the cutoff) and argmax, each branch its own cache. The
image span and the no-image prompt are cut out of the ids here, by position. Held against minivar's batched
generation (both branches in one forward per step) on a tiny LLaVA and a tiny Qwen2-VL made with transformers.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import minivar  # noqa: E402
from minivar.errors import MinivarError  # noqa: E402
from minivar.methods.pai import PAI, PAIConfig, PAIState, from_options, guidance  # noqa: E402
from test_damro import IMAGE_ID, hf_tiny, image  # noqa: E402

PROMPT = "What is in the image?"


# ---------------------------------------------------------------------------------------------------------------
# The released code, restated

class Switches(dict):
    """What llama_modify / CFGLogits set on the attention modules: use_attn, use_cfg, alpha, the layer range and
    img_start_idx / img_end_idx."""


def released_attention(switches: Switches, text_classes: tuple[str, ...], repeat_kv):
    def forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(w).masked_fill(~attention_mask, torch.finfo(w.dtype).min)
            w = w + attention_mask[..., :key.shape[-2]]
            w = torch.max(w, torch.tensor(torch.finfo(w.dtype).min))
        s = switches
        if type(module).__name__ in text_classes and s["start"] <= module.layer_idx < s["end"] and \
                s["use_attn"] and not s["use_cfg"]:
            a, b = s["img_start_idx"], s["img_end_idx"]
            w[:, :, -1, a:b] = w[:, :, -1, a:b].abs() * s["alpha"] + w[:, :, -1, a:b]
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w
    return forward


@contextlib.contextmanager
def patched(switches: Switches):
    """transformers' eager attention of LLaMA and Qwen2-VL replaced by the released forward (text layers only)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2_vl import modeling_qwen2_vl
    with pytest.MonkeyPatch.context() as mp:
        for mod in (modeling_llama, modeling_qwen2_vl):
            mp.setattr(mod, "eager_attention_forward",
                       released_attention(switches, ("LlamaAttention", "Qwen2VLAttention"), mod.repeat_kv))
        yield


def cfg_logits(scores, uncond_logits, gamma):
    """CFG.py's __call__ after the unconditional forward."""
    scores = F.log_softmax(scores, dim=-1)
    if gamma == 1:
        return scores
    unconditional_logits = F.log_softmax(uncond_logits, dim=-1)
    cutoff = torch.log(torch.tensor(0.1)) + scores.max(dim=-1, keepdim=True).values
    out = gamma * (scores - unconditional_logits) + unconditional_logits
    return out.masked_fill(scores < cutoff, -float("inf"))


@torch.inference_mode()
def released_generate(ref, full_inputs: dict, uncond_ids, span, *, alpha, start, end, gamma, steps,
                      first_token="unedited", seed=None, qwen=False):
    """chair_eval.py's loop (greedy; seed: softmax + multinomial from a seeded generator instead) around
    llama_modify and CFGLogits. first_token="edited": the prompt's forward edited too (use_cfg clear from the
    start); γ = 1: the released run without --use-cfg (no CFGLogits; use_cfg never set)."""
    use_cfg = gamma != 1
    switches = Switches(use_attn=True, use_cfg=use_cfg and first_token == "unedited", alpha=alpha, start=start,
                        end=end, img_start_idx=span[0], img_end_idx=span[1])
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    deltas = {}

    def forward(branch, past=None, **inputs):
        # transformers' Qwen2-VL keeps the prompt's rope deltas on the model: one per branch here (the prompt
        # without the image has none: its text positions count on from 0)
        if qwen:
            ref.model.rope_deltas = deltas.get(branch)
        out = ref(**inputs, past_key_values=past, use_cache=True)
        if qwen and past is None:
            deltas[branch] = ref.model.rope_deltas if "image_grid_thw" in inputs else None
        return out

    tokens = []
    with patched(switches):
        cond, uncond = forward("cond", **full_inputs), None
        for _ in range(steps):
            if use_cfg:
                switches["use_cfg"] = True
                uncond = (forward("uncond", input_ids=uncond_ids) if uncond is None else
                          forward("uncond", uncond.past_key_values, input_ids=torch.tensor([[tokens[-1]]])))
                switches["use_cfg"] = False
            scores = cfg_logits(cond.logits[:, -1], uncond.logits[:, -1] if use_cfg else None, gamma)
            if seed is None:
                nxt = scores.argmax(-1)
            else:
                nxt = torch.multinomial(F.softmax(scores, -1), 1, generator=generator).squeeze(1)
            tokens.append(int(nxt))
            cond = forward("cond", cond.past_key_values, input_ids=nxt[:, None])
    return tokens


def cut(ids: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    return torch.cat([ids[:, :first], ids[:, stop:]], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# The two families

@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from minivar.demo import make_tokenizer
    d = tmp_path_factory.mktemp("pai_llava")
    ref = hf_tiny(seed=2)
    ref.save_pretrained(d)
    make_tokenizer().save(str(d / "tokenizer.json"))
    return ref, minivar.load(str(d), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from transformers import Qwen2VLForConditionalGeneration
    from test_qwen2_vl_pipeline import make_checkpoint
    d = make_checkpoint(tmp_path_factory.mktemp("pai_qwen"), "qwen2_vl", seed=3)
    ref = Qwen2VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    ref.set_attn_implementation("eager")
    return ref, minivar.load(str(d), device="cpu", dtype="float32")


def llava_case(pair, picture):
    ref, pipe = pair
    ids = pipe.prompt_ids(PROMPT)
    where = (ids[0] == IMAGE_ID).nonzero().flatten()
    span = (int(where[0]), int(where[-1]) + 1)                # img_start_idx = 1 + len(token_before), + 576 here
    assert span[1] - span[0] == pipe.config.num_image_tokens
    inputs = {"input_ids": ids, "pixel_values": pipe.pixels(picture)}
    return inputs, cut(ids, *span), span


def qwen_case(pair, picture):
    ref, pipe = pair
    im = pipe.image(picture)
    ids = pipe.prompt_ids(PROMPT, num_image_tokens=im.num_tokens)
    cfg = pipe.config
    where = (ids[0] == cfg.image_token_id).nonzero().flatten()
    span = (int(where[0]), int(where[-1]) + 1)
    assert int(ids[0, span[0] - 1]) == cfg.vision_start_token_id and int(ids[0, span[1]]) == cfg.vision_end_token_id
    inputs = {"input_ids": ids, "pixel_values": im.pixel_values, "mm_token_type_ids": (ids == cfg.image_token_id).int(),
              "image_grid_thw": torch.tensor([list(im.meta["grid_thw"])])}
    return inputs, cut(ids, span[0] - 1, span[1] + 1), span      # <|vision_start|> … <|vision_end|> removed


CASES = [  # (alpha, layers, gamma, first_token, seed)
    (2.0, (0, 2), 1.5, "unedited", None),
    (2.0, (1, 2), 3.0, "unedited", None),
    (3.0, (0, 2), 1.0, "unedited", None),            # γ = 1: no branch, the prompt's last row edited
    (0.2, (0, 2), 1.1, "unedited", None),            # the released α, γ
    (2.0, (0, 2), 1.5, "edited", None),              # the corrected rule: the first token's forward edited too
    (2.0, (0, 2), 2.0, "unedited", 7),
]


@pytest.mark.parametrize("alpha,layers,gamma,first_token,seed", CASES)
def test_llava_equals_the_released_loop(llava, alpha, layers, gamma, first_token, seed):
    ref, pipe = llava
    picture = image(4)
    inputs, uncond, span = llava_case(llava, picture)
    want = released_generate(ref, inputs, uncond, span, alpha=alpha, start=layers[0], end=layers[1], gamma=gamma,
                             steps=10, first_token=first_token, seed=seed)
    cfg = PAIConfig(alpha=alpha, layers=layers, gamma=gamma, first_token=first_token)
    got = pipe.generate(picture, PROMPT, methods=[PAI(cfg)], max_new_tokens=10,
                        temperature=0.0 if seed is None else 1.0, seed=seed)
    eos = pipe.tokenizer.eos_id
    assert got.output_ids == (want[:want.index(eos)] if eos in want else want)
    assert got.reports["pai"] == cfg.settings() | {"layers_edited": list(layers)}


@pytest.mark.parametrize("alpha,layers,gamma,first_token", [
    (2.0, (0, 3), 2.0, "unedited"), (0.2, (2, 32), 1.1, "unedited"), (3.0, (1, 3), 1.0, "unedited"),
    (2.0, (0, 3), 2.0, "edited")])
def test_qwen2_vl_equals_the_released_loop(qwen, alpha, layers, gamma, first_token):
    ref, pipe = qwen
    picture = image(5, size=(112, 84))
    inputs, uncond, span = qwen_case(qwen, picture)
    n = pipe.config.text.num_hidden_layers
    want = released_generate(ref, inputs, uncond, span, alpha=alpha, start=layers[0], end=min(layers[1], n),
                             gamma=gamma, steps=10, first_token=first_token, qwen=True)
    cfg = PAIConfig(alpha=alpha, layers=layers, gamma=gamma, first_token=first_token)
    got = pipe.generate(picture, PROMPT, methods=[PAI(cfg)], max_new_tokens=10)
    stops = set(pipe.stop_ids) if isinstance(pipe.stop_ids, (list, tuple, set)) else {pipe.stop_ids}
    end = next((i for i, t in enumerate(want) if t in stops), len(want))
    assert got.output_ids == want[:end]
    assert got.reports["pai"]["layers_edited"] == [layers[0], min(layers[1], n)]   # clipped to the model's depth


def test_the_cases_are_not_idle(llava, qwen):
    """PAI changes the answer on both tiny models (so the comparisons above can fail), and each of its two steps
    alone does too."""
    for pair, size in ((llava, (120, 80)), (qwen, (112, 84))):
        ref, pipe = pair
        picture = image(4 if pair is llava else 5, size=size)
        base = pipe.generate(picture, PROMPT, max_new_tokens=10).output_ids
        n = pipe.config.text.num_hidden_layers
        for cfg in (PAIConfig(alpha=2.0, layers=(0, n), gamma=1.5), PAIConfig(alpha=3.0, layers=(0, n), gamma=1.0),
                    PAIConfig(alpha=0.0, layers=(0, n), gamma=3.0)):
            assert pipe.generate(picture, PROMPT, methods=[PAI(cfg)], max_new_tokens=10).output_ids != base, cfg


def test_the_attention_step_equals_the_released_forward(llava):
    """One forward of the whole prompt: minivar's model with the PAI hook from the last row on == transformers with
    the released attention armed (use_cfg clear), logits within 1e-4; and it moves only the last row."""
    ref, pipe = llava
    inputs, _, span = llava_case(llava, image(4))
    ids = inputs["input_ids"]
    T = ids.shape[1]
    image_mask = pipe.model.image_positions(ids)
    hook = PAIState(2.0, range(0, 2), image_mask, T - 1, T)
    with torch.inference_mode():
        mine = pipe.model(ids, [pipe.image(image(4))], hooks=[hook])
        plain = pipe.model(ids, [pipe.image(image(4))])
        with patched(Switches(use_attn=True, use_cfg=False, alpha=2.0, start=0, end=2, img_start_idx=span[0],
                              img_end_idx=span[1])):
            want = ref(**inputs).logits
    assert (mine - want).abs().max() < 1e-4
    assert torch.equal(mine[:, :-1], plain[:, :-1]) and (mine[:, -1] - plain[:, -1]).abs().max() > 1e-3


def test_the_step_is_attention_py_and_a_masked_key_stays_masked():
    from minivar.methods.pai import amplify
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 1, 6, generator=g) * 4
    keys = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    scores[0, :, :, 2] = torch.finfo(torch.float32).min                    # a key a sink mask removed
    out = amplify(scores, keys, 2.0)
    want = scores.clone()
    for b, cols in ((0, [1, 3]), (1, [2, 3, 4])):
        want[b, :, :, cols] = scores[b, :, :, cols].abs() * 2.0 + scores[b, :, :, cols]
    assert torch.equal(out, want) and torch.softmax(out, -1)[0, :, :, 2].max() == 0


def test_guidance_is_cfg_py():
    g = torch.Generator().manual_seed(0)
    full, plain = torch.randn(3, 50, generator=g) * 3, torch.randn(3, 50, generator=g) * 3
    for gamma in (1.0, 1.1, 2.0):
        assert torch.equal(guidance(full, plain, gamma), cfg_logits(full, plain, gamma))
    out = guidance(full, plain, 2.0)
    s = F.log_softmax(full, -1)
    assert torch.equal(torch.isinf(out), s < math.log(0.1) + s.max(-1, keepdim=True).values)


def test_batched_and_many_questions_equal_one_by_one(llava):
    """Two samples of different lengths in one batch (both branches of each, left-padded), and several questions
    about one image (the shared prefix, both branches' prefixes), equal each sample alone."""
    ref, pipe = llava
    cfg = PAIConfig(alpha=2.0, layers=(0, 2), gamma=2.0)
    prompts = [PROMPT, "Is there a dog in the image? Answer briefly."]
    pictures = [image(4), image(6)]
    alone = [pipe.generate(p, q, methods=[PAI(cfg)], max_new_tokens=8).output_ids for p, q in zip(pictures, prompts)]
    batch = pipe.generate_batch(pictures, prompts, methods=[PAI(cfg)], max_new_tokens=8)
    assert [r.output_ids for r in batch] == alone
    many = pipe.generate_many(pictures[0], prompts, methods=[PAI(cfg)], max_new_tokens=8)
    one = [pipe.generate(pictures[0], q, methods=[PAI(cfg)], max_new_tokens=8).output_ids for q in prompts]
    assert [r.output_ids for r in many] == one


def test_llava_next_batch_and_many_questions_equal_one_by_one(tmp_path):
    """LLaVA-NeXT (its image span: the crops' tokens and the newline tokens): PAI's answers in a batch of two
    images of different token counts, and for two questions about one image, equal each alone."""
    from test_llava_next_pipeline import write_next
    pipe = minivar.load(str(write_next(tmp_path / "next")), device="cpu", dtype="float32")
    cfg = PAIConfig(alpha=2.0, layers=(0, pipe.config.text.num_hidden_layers), gamma=2.0)
    pictures, prompts = [image(3, size=(150, 70)), image(4)], [PROMPT, "Describe the picture please."]
    alone = [pipe.generate(p, q, methods=[PAI(cfg)], max_new_tokens=6).output_ids for p, q in zip(pictures, prompts)]
    assert [r.output_ids for r in pipe.generate_batch(pictures, prompts, methods=[PAI(cfg)], max_new_tokens=6)] == alone
    many = pipe.generate_many(pictures[0], prompts, methods=[PAI(cfg)], max_new_tokens=6)
    assert many[1].output_ids == pipe.generate(pictures[0], prompts[1], methods=[PAI(cfg)], max_new_tokens=6).output_ids
    assert alone[0] != pipe.generate(pictures[0], PROMPT, max_new_tokens=6).output_ids


def test_with_var_composes_in_list_order(llava):
    """VAR and PAI together: both report, the answer differs from PAI's alone, and a batch equals one by one."""
    from minivar.methods.var import VAR, VARConfig
    ref, pipe = llava
    picture = image(4)
    cfg = PAIConfig(alpha=2.0, layers=(0, 2), gamma=2.0)
    var = VARConfig(tau=0.5, rho=0.0, p=0.9, sink_dims=(0, 1))
    both = pipe.generate(picture, PROMPT, methods=[VAR(var), PAI(cfg)], max_new_tokens=8)
    assert set(both.reports) == {"var", "pai"} and sum(both.reports["var"]["redistributed"]["decode"]) > 0
    assert both.output_ids != pipe.generate(picture, PROMPT, methods=[PAI(cfg)], max_new_tokens=8).output_ids
    batch = pipe.generate_batch([picture, image(6)], [PROMPT, "Describe it."], methods=[VAR(var), PAI(cfg)],
                                max_new_tokens=8)
    assert batch[0].output_ids == both.output_ids


def test_a_capture_gives_the_explorer_its_records(llava):
    """With a capture (the pictures / the explorer): the report holds the image keys' scores before and after per
    edited layer (after = a + α·|a| ≥ before), and the explorer gets a table of them and the guidance's candidates."""
    from minivar.probe import Capture
    ref, pipe = llava
    cfg = PAIConfig(alpha=2.0, layers=(0, 2), gamma=2.0)
    cap = Capture([0], rows="answer", decode=True)
    r = pipe.generate(image(4), PROMPT, methods=[PAI(cfg)], max_new_tokens=4, capture=cap)
    scores = r.reports["pai"]["scores"]
    assert set(scores) == {"0", "1"} and all(v["rows"] == 3 for v in scores.values())   # the 2nd … 4th tokens
    table, candidates = r.extra["explorer"]["pai"]
    assert table["kind"] == "table" and [row[0] for row in table["rows"]] == [0, 1]
    assert all(after > before for _, _, before, after in table["rows"])
    assert candidates["kind"] == "candidates" and len(candidates["steps"]) == len(r.output_ids)
    assert set(candidates["steps"][0]["branches"]) == {"full", "no image", "guided"}


def test_settings_options_and_errors(llava):
    ref, pipe = llava
    assert PAIConfig().settings() == {"alpha": 0.2, "layers": [2, 32], "gamma": 1.1, "first_token": "unedited"}
    spell = lambda d: "--" + d.replace("_", "-")             # noqa: E731
    m = from_options({"pai": True, "pai_layers": "1-2", "pai_alpha": 0.5}, spell)
    assert m.config == PAIConfig(alpha=0.5, layers=(1, 2)) and m.adds_branch
    assert from_options({"pai": True, "pai_gamma": 1.0}, spell).adds_branch is False
    assert from_options({"pai": False}, spell) is None
    for opts, flag in (({"pai_alpha": 1.0}, "--pai-alpha"), ({"pai": True, "pai_gamma": 0.5}, "--pai-gamma"),
                       ({"pai": True, "pai_layers": "5-2"}, "--pai-layers"),
                       ({"pai": True, "pai_layers": "x"}, "--pai-layers"),
                       ({"pai": True, "pai_alpha": -1.0}, "--pai-alpha"),
                       ({"pai": True, "pai_first_token": "maybe"}, "--pai-first-token")):
        with pytest.raises(MinivarError, match=flag) as e:
            from_options(opts, spell)
        assert "\n" not in str(e.value)
    with pytest.raises(MinivarError, match="starts past the model's 2 layers"):   # the default 2-32 on 2 layers
        pipe.generate(image(4), PROMPT, methods=[PAI()], max_new_tokens=2)
    with pytest.raises(MinivarError, match="each add a contrast branch"):
        from minivar.methods.vcd import VCD
        pipe.generate(image(4), PROMPT, methods=[PAI(PAIConfig(layers=(0, 2))), VCD()], max_new_tokens=2)
