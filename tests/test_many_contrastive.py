"""Many questions about one image with a contrast branch (Pipeline.generate_many with DAMRO or VCD): each branch's
prefix (the full prompt's image, DAMRO's k outlier tokens, VCD's noised image) computed once, both branches of
every question decoded together — the answers and reports those of running each question alone (greedy, fp32, the
demo checkpoint: 4 layers, 576 image tokens)."""
from pathlib import Path

import pytest

import minivar.pipeline as pipeline_mod
from minivar import demo
from minivar.methods.contrastive import ContrastiveRun, call_rows
from minivar.methods.damro import DAMRO, DAMROConfig
from minivar.methods.hooks import Hook
from minivar.methods.method import Branch, Method
from minivar.methods.var import VAR, VARConfig
from minivar.methods.vcd import VCD, VCDConfig

IMAGE = Path(__file__).resolve().parents[1] / "assets" / "example.jpg"
QUESTIONS = ["Is there a dog in the image?", "Is there a cat?", "What colour is the sky?", "Is there a cat?"]
N_NEW = 6
VAR_CFG = VARConfig.preset("general", sink_dims=demo.DEMO_SINK_DIMS)
METHODS = {
    "damro": lambda: [DAMRO(DAMROConfig(alpha=1.0, beta=0.1, topk=4))],
    "damro-k10-a2": lambda: [DAMRO(DAMROConfig(alpha=2.0, beta=0.2, topk=10))],
    "vcd": lambda: [VCD(VCDConfig(), seed=3)],
    "var+damro": lambda: [VAR(VAR_CFG), DAMRO(DAMROConfig(alpha=1.0, topk=4))],
    "var+vcd": lambda: [VAR(VAR_CFG), VCD(VCDConfig(alpha=0.5, noise_step=300), seed=1)],
}


@pytest.mark.parametrize("name", list(METHODS))
def test_contrastive_shared_prefix_equals_one_by_one(demo_pipe, name):
    many = demo_pipe.generate_many(IMAGE, QUESTIONS, max_new_tokens=N_NEW, methods=METHODS[name]())
    alone = [demo_pipe.generate(IMAGE, q, max_new_tokens=N_NEW, methods=METHODS[name]()) for q in QUESTIONS]
    assert all("prefix_tokens" in m.timing for m in many)          # the shared path ran, not generate_batch's
    assert many[0].timing["prefix_tokens"] > 576
    assert [m.output_ids for m in many] == [a.output_ids for a in alone]
    assert [m.text for m in many] == [a.text for a in alone]
    assert [m.prompt_ids for m in many] == [a.prompt_ids for a in alone]
    assert [m.finished for m in many] == [a.finished for a in alone]
    assert [m.reports for m in many] == [a.reports for a in alone]      # DAMRO's outliers, VCD's settings, VAR's
    method = "damro" if "damro" in name else "vcd"
    assert all(method in m.reports for m in many)
    if "damro" in name:
        assert len(many[0].reports["damro"]["outliers"]) == many[0].reports["damro"]["topk"]
    if "var" in name:
        assert sum(many[0].var["redistributed"]["prefill"]) > 0 and sum(many[0].var["redistributed"]["decode"]) > 0


def test_the_contrast_branch_changes_the_answers(demo_pipe):
    """The shared contrast prefix is not idle: DAMRO's answers differ from the base model's, α = 0 gives them back."""
    base = [r.output_ids for r in demo_pipe.generate_many(IMAGE, QUESTIONS, max_new_tokens=N_NEW)]
    damro = demo_pipe.generate_many(IMAGE, QUESTIONS, max_new_tokens=N_NEW, methods=[DAMRO(DAMROConfig(topk=4))])
    assert [r.output_ids for r in damro] != base
    zero = demo_pipe.generate_many(IMAGE, QUESTIONS, max_new_tokens=N_NEW,
                                   methods=[DAMRO(DAMROConfig(alpha=0.0, topk=4))])
    assert [r.output_ids for r in zero] == base


class CountRows(Hook):
    """Each forward call's (batch, rows) at layer 0."""

    def __init__(self, seen):
        self.seen = seen

    def residual(self, layer, h, rows):
        if layer == 0:
            self.seen.append((h.shape[0], len(rows)))


@pytest.mark.parametrize("name,towers", [("damro", 1), ("vcd", 2)])
def test_each_prefix_is_computed_once(demo_pipe, monkeypatch, name, towers):
    """The vision tower runs once per image (DAMRO: one run gives both images; VCD: the image and its noised copy),
    the two prefixes run once as a batch of two, then every question's two branches run as one batch per step."""
    calls = []
    handle = demo_pipe.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    seen = []
    real_add = pipeline_mod.Pipeline.add_hooks

    def add_and_count(self, request, **kw):
        real_add(self, request, **kw)
        request.hooks.append(CountRows(seen))

    monkeypatch.setattr(pipeline_mod.Pipeline, "add_hooks", add_and_count)
    try:
        out = demo_pipe.generate_many(IMAGE, QUESTIONS, max_new_tokens=2, methods=METHODS[name]())
    finally:
        handle.remove()
    P = out[0].timing["prefix_tokens"]
    assert len(calls) == towers
    own = max(len(r.prompt_ids) for r in out) - P
    B = len(QUESTIONS)
    # both prefixes once, as a batch of two (the contrast one left-padded to P), in prefill pieces of PREFILL_CHUNK
    from minivar.generate import PREFILL_CHUNK
    pieces = -(-P // PREFILL_CHUNK)
    assert seen[:pieces] == [(2, min(PREFILL_CHUNK, P - s)) for s in range(0, P, PREFILL_CHUNK)]
    assert seen[pieces] == (2 * B, own)             # the questions' own tokens, both branches, one batch
    assert seen[pieces + 1:] == [(2 * B, 1)]        # one decoding step for all 2B rows


class QuestionContrast(Method):
    """A contrast branch that changes the question (one text token before the answer), not the shared prefix."""
    name = "question_contrast"

    def branch(self, call):
        return [Branch(r[:-3] + [100] + r[-2:], f) for r, f in zip(call_rows(call), call.image_features())]

    def start(self, call):
        return ContrastiveRun(1.0, 0.1, "question_contrast")


def test_a_branch_that_changes_the_questions_runs_as_one_batch(demo_pipe, monkeypatch):
    """Where the contrast branch differs after the shared prefix, generate_many runs generate_batch (both branches,
    no shared prefix) — the same answers as one by one."""
    asked = []
    real = pipeline_mod.Pipeline.generate_batch

    def spy(self, images, prompts, **kw):
        asked.append(len(prompts))
        return real(self, images, prompts, **kw)

    monkeypatch.setattr(pipeline_mod.Pipeline, "generate_batch", spy)
    many = demo_pipe.generate_many(IMAGE, QUESTIONS[:2], max_new_tokens=3, methods=[QuestionContrast()])
    assert asked == [2] and "prefix_tokens" not in many[0].timing
    alone = [demo_pipe.generate(IMAGE, q, max_new_tokens=3, methods=[QuestionContrast()]) for q in QUESTIONS[:2]]
    assert [m.output_ids for m in many] == [a.output_ids for a in alone]


class IdTokenizer:
    """A tokenizer for the tiny LLaVA-NeXT checkpoint (whose vocabulary is 300 ids, no tokenizer.json): a prompt is
    test_llava_next's prompt ids (BOS, text, the image's tokens, text) followed by one id per word of the question."""
    eos_id = 2
    stop_ids = None

    def encode_prompt(self, prompt, conv_mode, n_image):
        from test_llava_next import prompt_ids
        return prompt_ids(n_image).tolist() + [3 + sum(map(ord, w)) % 270 for w in prompt.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_llava_next_damro_shares_the_prefix(tmp_path_factory):
    """LLaVA-NeXT's contrast image (the base crop's k outliers + one image_newline) as the second prefix: generate_many
    equals one by one, the tower once, both prefixes once."""
    pytest.importorskip("transformers")
    pytest.importorskip("minivar.models.llava_next")
    import torch
    from minivar.pipeline import Pipeline
    from test_llava_next import image, load_llava_next, make_reference, save
    d = save(make_reference("llama"), tmp_path_factory.mktemp("next_many"), "hub")
    model = load_llava_next(d)
    pipe = Pipeline(model, IdTokenizer(), d, torch.device("cpu"), torch.float32, 0.0)
    img, questions = image("wide"), ["is there a dog", "is there a cat", "what colour"]
    for method in (lambda: [DAMRO(DAMROConfig(alpha=1.0, topk=3))], lambda: [VCD(VCDConfig(), seed=2)]):
        calls = []
        handle = model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
        try:
            many = pipe.generate_many(img, questions, max_new_tokens=5, methods=method(), image_aspect_ratio="anyres")
        finally:
            handle.remove()
        alone = [pipe.generate(img, q, max_new_tokens=5, methods=method(), image_aspect_ratio="anyres")
                 for q in questions]
        assert "prefix_tokens" in many[0].timing
        assert [m.output_ids for m in many] == [a.output_ids for a in alone]
        assert [m.reports for m in many] == [a.reports for a in alone]
        assert len(calls) == (1 if isinstance(method()[0], DAMRO) else 2)


def test_each_branch_is_prefilled_at_its_own_length_with_the_same_numbers(demo_pipe):
    """DAMRO's contrast rows (k image tokens) are prefilled from their own first real position, not padded to the
    full prompt's length: the logits and the generation equal one joint, left-padded prefill."""
    import torch
    from minivar import generate as gen
    from minivar.methods.damro import DAMRO, DAMROConfig
    request = demo_pipe.prepare(["assets/example.jpg"] * 2, ["Is there a cat?", "What is in the image?"],
                                methods=[DAMRO(DAMROConfig.preset("pope"))], max_new_tokens=4)
    assert request.branches == 2 and request.attention_mask is not None
    model, ids, mask = demo_pipe.model, request.input_ids, request.attention_mask
    T = ids.shape[1]
    joint_cache = gen.new_cache(model, ids.shape[0], T + 4, ids.device)
    split_cache = gen.new_cache(model, ids.shape[0], T + 4, ids.device)
    with torch.inference_mode():
        joint = gen.prefill(model, ids, image_features=request.image_features, cache=joint_cache, attention_mask=mask)
        assert gen.branch_prefill_applies(model, split_cache, 0, None, request.image_features, True, [])
        split = gen.prefill_branches(model, ids, request.image_features, split_cache, mask, 2)
        torch.testing.assert_close(split, joint, rtol=0, atol=1e-4)
        step = torch.tensor([5, 7, 5, 7])
        full = torch.cat([mask, torch.ones(4, 1, dtype=torch.bool)], 1)
        a = gen.decode_step(model, step, cache=joint_cache, position=T, attention_mask=full)
        b = gen.decode_step(model, step, cache=split_cache, position=T, attention_mask=full)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    # the whole generation, through the pipeline, equals each sample alone
    together = demo_pipe.run(request)
    alone = [demo_pipe.generate("assets/example.jpg", p, methods=[DAMRO(DAMROConfig.preset("pope"))],
                                max_new_tokens=4) for p in ("Is there a cat?", "What is in the image?")]
    assert [r.output_ids for r in together] == [r.output_ids for r in alone]
