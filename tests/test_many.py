"""Many questions about one image (Pipeline.generate_many): the shared prefix computed once, the answers and VAR
reports those of running each question alone (fp32, the demo checkpoint: 4 layers, 576 image tokens)."""
from pathlib import Path

import pytest
import torch

from minivar import demo
from minivar.methods.hooks import Hook
from minivar.methods.var import VARConfig

IMAGE = Path(__file__).resolve().parents[1] / "assets" / "example.jpg"
QUESTIONS = ["Is there a dog in the image?", "Is there a cat?", "What colour is the sky?",
             "Is there a dog in the image? Please answer yes or no.", "Is there a cat?"]   # lengths differ; a repeat
N_NEW = 8
VARS = {"off": None} | {name: VARConfig.preset(name, sink_dims=demo.DEMO_SINK_DIMS)
                        for name in ("general", "hallucination", "vision")}


def one_by_one(llava, questions, var, **kw):
    return [llava.generate(IMAGE, q, max_new_tokens=N_NEW, var=var, **kw) for q in questions]


@pytest.mark.parametrize("var", list(VARS), ids=list(VARS))
def test_shared_prefix_answers_equal_one_by_one(demo_pipe, var):
    var = VARS[var]
    many = demo_pipe.generate_many(IMAGE, QUESTIONS, max_new_tokens=N_NEW, var=var)
    alone = one_by_one(demo_pipe, QUESTIONS, var)
    assert [m.output_ids for m in many] == [a.output_ids for a in alone]
    assert [m.text for m in many] == [a.text for a in alone]
    assert [m.prompt_ids for m in many] == [a.prompt_ids for a in alone]
    assert [m.finished for m in many] == [a.finished for a in alone]
    if var is not None:
        assert [m.var for m in many] == [a.var for a in alone]               # sinks, spans, counts
        assert sum(many[0].var["redistributed"]["prefill"]) > 0 and sum(many[0].var["redistributed"]["decode"]) > 0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """test_var's tiny model with planted sinks (its answers depend on the question), with a tokenizer."""
    import minivar
    from conftest import write_checkpoint
    from test_var import sink_test_config, sink_test_state
    cfg = sink_test_config()
    directory = write_checkpoint(tmp_path_factory.mktemp("planted") / "ckpt", sink_test_state(cfg), cfg, tokenizer=True)
    return minivar.load(str(directory), device="cpu", dtype="float32")


def test_eos_at_different_steps(planted, monkeypatch):
    """An end-of-sequence token reached at a different step by each question: each stops where it stops alone."""
    from test_var import PATCHES_2, TINY_DIMS, TINY_TAU, tiny_pil
    image = tiny_pil(PATCHES_2)
    var = VARConfig(tau=TINY_TAU, sink_dims=TINY_DIMS)
    free = [planted.generate(image, q, max_new_tokens=N_NEW, var=var).output_ids for q in QUESTIONS]
    eos = free[3][1]                  # question 3's second token, which the others emit later
    assert free[0].index(eos) > 1
    monkeypatch.setattr(planted.tokenizer, "eos_id", eos)
    for v in (None, var):
        many = planted.generate_many(image, QUESTIONS, max_new_tokens=N_NEW, var=v)
        alone = [planted.generate(image, q, max_new_tokens=N_NEW, var=v) for q in QUESTIONS]
        assert [m.output_ids for m in many] == [a.output_ids for a in alone]
        assert [m.finished for m in many] == [a.finished for a in alone]
        assert [m.var for m in many] == [a.var for a in alone]
    assert len({len(m.output_ids) for m in many}) > 1 and all(m.finished for m in many)


def test_identical_prompts_and_a_single_prompt(demo_pipe):
    """A prompt that is the whole shared prefix plus nothing: each keeps its last token to predict from."""
    same = demo_pipe.generate_many(IMAGE, ["Describe"] * 3, max_new_tokens=N_NEW)
    alone = demo_pipe.generate(IMAGE, "Describe", max_new_tokens=N_NEW)
    assert all(r.output_ids == alone.output_ids for r in same)
    assert same[0].timing["prefix_tokens"] == len(alone.prompt_ids) - 1
    single = demo_pipe.generate_many(IMAGE, ["What is in the image?"], max_new_tokens=N_NEW)
    assert single[0].output_ids == demo_pipe.generate(IMAGE, "What is in the image?", max_new_tokens=N_NEW).output_ids


def test_the_prefix_is_computed_once(demo_pipe, monkeypatch):
    """The vision tower runs once, and the decoder sees the prefix rows once, not once per question."""
    calls = []
    handle = demo_pipe.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    rows_seen = []

    class CountRows(Hook):
        def residual(self, layer, h, rows):
            if layer == 0:
                rows_seen.append((h.shape[0], len(rows)))

    import minivar.pipeline as pipeline_mod
    real_add = pipeline_mod.Pipeline.add_hooks

    def add_and_count(self, request, **kw):
        real_add(self, request, **kw)
        request.hooks.append(CountRows())

    monkeypatch.setattr(pipeline_mod.Pipeline, "add_hooks", add_and_count)
    try:
        out = demo_pipe.generate_many(IMAGE, QUESTIONS, max_new_tokens=2)
    finally:
        handle.remove()
    P = out[0].timing["prefix_tokens"]
    assert calls == [1]
    assert P > 576                                              # system text + image (+ the shared "Is there")
    own = max(len(r.prompt_ids) for r in out) - P
    # the prefix: batch of one, its P rows once (in prefill pieces of PREFILL_CHUNK positions: generate.prefill)
    from minivar.generate import PREFILL_CHUNK
    pieces = -(-P // PREFILL_CHUNK)
    assert rows_seen[:pieces] == [(1, min(PREFILL_CHUNK, P - s)) for s in range(0, P, PREFILL_CHUNK)]
    assert rows_seen[pieces] == (len(QUESTIONS), own)           # the questions' own tokens, as one batch
    assert rows_seen[pieces + 1:] == [(len(QUESTIONS), 1)]      # one decoding step
