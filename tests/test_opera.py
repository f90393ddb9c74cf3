"""OPERA against the released loop (tests/opera_reference.py: shikiw/OPERA's opera_beam_search transcribed statement
by statement, driving the model through plain recomputing forward calls) on a planted tiny checkpoint where
rollbacks really happen; and OPERA through the command line, the API and the harness."""
import json
import sys

import pytest
import torch

from conftest import assert_one_line_error, build_model, run_cli, tiny_llava_config
from opera_reference import released_opera

import minivar
from minivar.demo import random_state_dict
from minivar.errors import MinivarError
from minivar.methods.opera import OPERA, LastLayer, OPERAConfig, opera_search

CFG = tiny_llava_config()


def planted_state():
    """Random weights, and in the last layer a head that attends to one token id (197) wherever it stands — its
    output removed, so it changes only the attention OPERA reads: every token's embedding holds 3 in dim 0 (the
    head's query reads it), token 197's also in dim 1 (its key reads it), in the slowest-turning RoPE pair."""
    st = random_state_dict(CFG, seed=0, std=0.2)
    emb = st["language_model.model.embed_tokens.weight"]
    emb[:, 0], emb[:, 1] = 3.0, 0.0
    emb[197, 1] = 3.0
    last = f"language_model.model.layers.{CFG.text.num_hidden_layers - 1}.self_attn."
    q, k, o = (st[last + n + "_proj.weight"] for n in ("q", "k", "o"))
    hd = CFG.text.hidden_size // CFG.text.num_attention_heads
    q[:hd], k[:hd], o[:, :hd] = 0.0, 0.0, 0.0
    q[hd // 2 - 1, 0] = k[hd // 2 - 1, 1] = 1.0
    return st


@pytest.fixture(scope="module")
def planted():
    return build_model(CFG, planted_state())


def short_prompt():
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([1]), torch.randint(3, 250, (4,), generator=g),
                     torch.full((CFG.num_image_tokens,), CFG.image_token_index),
                     torch.randint(3, 250, (6,), generator=g)])[None]
    return ids, torch.randn(1, 3, 56, 56, generator=g)


def test_opera_equals_the_released_loop_where_rollbacks_happen(planted, threshold=3, rollbacks=2):
    ids, px = short_prompt()
    image = planted.image_inputs(px)
    K, C, N = 3, 3, 30
    want, want_score, want_rollbacks = released_opera(planted, ids, image, num_beams=K, max_new_tokens=N,
                                                      eos_token_id=None, threshold=threshold, num_attn_candidates=C)
    cfg = OPERAConfig(threshold=threshold, candidates=C, num_beams=K)
    hook = LastLayer(CFG.text.num_hidden_layers, ids.shape[1])
    gen, report = opera_search(planted, ids.repeat(K, 1), cfg, hook, images=image * K, max_new_tokens=N,
                               stop_ids=None, hooks=[hook])
    assert want_rollbacks == rollbacks and report["rollbacks"] == want_rollbacks      # rollbacks really happen
    assert gen.output_ids[0] == want
    assert gen.scores[0] == pytest.approx(want_score, abs=1e-5)
    assert sum(s["rollback_to"] is not None for s in report["steps"]) == rollbacks
    # the per-step record: each step's candidates and their penalties (None on a rollback step)
    step = report["steps"][12]
    assert len(step["candidates"]) == K and len(step["candidates"][0]) == C
    assert step["penalty"] is None or len(step["penalty"][0]) == C


def test_opera_with_no_penalty_and_no_rollback_is_not_plain_beam_search(planted):
    """OPERA's log-softmax runs over each beam's candidates only: with penalty 0 and no rollback its beam scores are
    not transformers' (the quirk docs/opera.md states), while the loop still equals the released one."""
    from minivar.generate import generate
    ids, px = short_prompt()
    image = planted.image_inputs(px)
    K, N = 3, 12
    want, want_score, _ = released_opera(planted, ids, image, num_beams=K, max_new_tokens=N, eos_token_id=None,
                                         penalty_weights=0.0, threshold=10 ** 6)
    cfg = OPERAConfig(penalty=0.0, threshold=10 ** 6, num_beams=K)
    hook = LastLayer(CFG.text.num_hidden_layers, ids.shape[1])
    gen, report = opera_search(planted, ids.repeat(K, 1), cfg, hook, images=image * K, max_new_tokens=N,
                               stop_ids=None, hooks=[hook])
    assert gen.output_ids[0] == want and report["rollbacks"] == 0 and report["penalised_steps"] == 0
    beams = generate(planted, ids.repeat(K, 1), px.repeat(K, 1, 1, 1), max_new_tokens=N, eos_token_id=None,
                     num_beams=K)
    assert gen.scores[0] != pytest.approx(beams.scores[0], abs=1e-3)


def test_opera_config_ranges():
    for bad, name in [(dict(num_beams=1), "num_beams"), (dict(candidates=0), "candidates"),
                      (dict(threshold=1.5), "threshold"), (dict(rule="x"), "rule"), (dict(scale=0), "scale")]:
        with pytest.raises(MinivarError, match=name):
            OPERAConfig(**bad).validate()


# ---------------------------------------------------------------------------------------------------------------
# Everywhere: the command line, the API, the harness

def cli_args(tiny_checkpoint, tmp_path, *more):
    from PIL import Image
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (120, 30, 200)).save(image)
    return ["--model", str(tiny_checkpoint), "--image", str(image), "--prompt", "Describe it.", "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", "6", *more]


def test_cli_opera_json_reports_rollbacks_and_penalised_steps(tiny_checkpoint, tmp_path):
    rc, out, err = run_cli(cli_args(tiny_checkpoint, tmp_path, "--opera", "--opera-candidates", "3", "--num-beams",
                                    "2", "--json"))
    assert rc == 0, err
    record = json.loads(out)
    assert set(record["opera"]) >= {"rollbacks", "penalised_steps", "steps"}
    assert record["opera"]["rollbacks"] == 0 and record["opera"]["penalised_steps"] == len(record["opera"]["steps"])
    assert record["num_beams"] == 2 and "OPERA: 0 rollbacks" in err
    pipe = minivar.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    from PIL import Image
    api = pipe.generate(Image.open(tmp_path / "x.png"), "Describe it.", max_new_tokens=6,
                        methods=[OPERA(candidates=3, num_beams=2)])
    assert api.output_ids == record["output_ids"] and api.reports["opera"] == record["opera"]


@pytest.mark.parametrize("flags, names", [
    (["--opera", "--vcd"], ["--opera", "--vcd"]),
    (["--opera-threshold", "3"], ["--opera-threshold", "--opera"]),
    (["--opera", "--num-beams", "1"], ["--num-beams"]),
    (["--num-beams", "3", "--temperature", "0.5"], ["--num-beams", "--temperature"]),
    (["--num-beams", "0"], ["--num-beams"]),
    (["--opera", "--save-attention", "pics"], ["--save-attention"]),
])
def test_cli_refusals_are_one_line(tiny_checkpoint, tmp_path, flags, names):
    rc, out, err = run_cli(cli_args(tiny_checkpoint, tmp_path, *flags))
    assert_one_line_error(rc, out, err, *names)


def test_api_refuses_opera_with_a_contrast_branch_and_batches_one_by_one(tiny_checkpoint):
    from PIL import Image
    from minivar.methods.vcd import VCD
    pipe = minivar.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    images = [Image.new("RGB", (40, 30), (120, 30, 200)), Image.new("RGB", (30, 40), (10, 200, 20))]
    with pytest.raises(MinivarError, match="contrast"):
        pipe.generate(images[0], "Hi", methods=[OPERA(num_beams=2), VCD()], max_new_tokens=3)
    opera = OPERA(candidates=2, num_beams=2)
    both = pipe.generate_batch(images, ["Describe it.", "What is it?"], max_new_tokens=5, methods=[opera])
    alone = [pipe.generate(im, p, max_new_tokens=5, methods=[opera]) for im, p in
             zip(images, ["Describe it.", "What is it?"])]
    assert [r.output_ids for r in both] == [r.output_ids for r in alone]
    assert [r.reports["opera"] for r in both] == [r.reports["opera"] for r in alone]


def test_opera_on_qwen2_vl_equals_the_released_loop(tmp_path):
    """Qwen2-VL's M-RoPE: the candidates fed together sit at the position a decode step gives them."""
    pytest.importorskip("transformers")
    from test_qwen2_vl_model import hf_model, image, load_qwen2_vl, prompt_ids, write_checkpoint
    model = load_qwen2_vl(write_checkpoint(hf_model("qwen2_vl"), tmp_path, "hub"))
    images = [image((1, 4, 6))]
    ids = torch.tensor([prompt_ids(images)])
    K, C, N = 2, 3, 14
    want, want_score, _ = released_opera(model, ids, images, num_beams=K, max_new_tokens=N, eos_token_id=None,
                                         num_attn_candidates=C, threshold=2)
    hook = LastLayer(model.config.text.num_hidden_layers, ids.shape[1])
    gen, report = opera_search(model, ids.repeat(K, 1), OPERAConfig(candidates=C, num_beams=K, threshold=2), hook,
                               images=images * K, max_new_tokens=N, stop_ids=None, hooks=[hook])
    assert gen.output_ids[0] == want and gen.scores[0] == pytest.approx(want_score, abs=1e-5)
