"""minivar as an lmms-eval model (minivar/lmms_plugin.py): the entry point, the model args and generation kwargs,
and lmms-eval's real evaluator running local tasks (tests/fixtures/lmms: JSON lines + images) on the demo
checkpoint, whose answers and scores must equal what minivar's pipeline gives directly.

Needs lmms-eval 0.7.3 (see requirements-lmms.txt); skipped where it is not installed.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed (pip install -r requirements-lmms.txt, then lmms-eval --no-deps)",
                allow_module_level=True)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from minivar import processing  # noqa: E402
from minivar.errors import MinivarError  # noqa: E402
from minivar.lmms_plugin import (ContinuationEncoder, GenSettings, Minivar, batches, cut_at_until,  # noqa: E402
                                 gen_settings, manifest, user_text, var_config)
from minivar.methods.var import VARConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "lmms"
POST_PROMPT = "\nAnswer the question using a single word or phrase."      # minivar_test_vqa.yaml's


def write_entry_point(directory: Path) -> Path:
    """What installing minivar's package metadata does for lmms-eval: a dist-info whose entry_points.txt puts
    `minivar = minivar.lmms_plugin:manifest` into the group `lmms_eval.models` (importlib.metadata reads any
    *.dist-info folder on sys.path)."""
    info = directory / "minivar_plugin_test-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: minivar-plugin-test\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\nminivar = minivar.lmms_plugin:manifest\n")
    return directory


def fixture_docs() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines()]


def fixture_image(doc) -> Image.Image:
    with Image.open(FIXTURES / "images" / doc["image"]) as img:
        img.load()
        return img


# ---------------------------------------------------------------------------------------------------------------
# Registration

def test_manifest_registers_the_minivar_simple_model():
    from lmms_eval.models.registry_v2 import ModelManifest
    m = manifest()
    assert isinstance(m, ModelManifest)
    assert (m.model_id, m.simple_class_path, m.chat_class_path) == ("minivar", "minivar.lmms_plugin.Minivar", None)


def test_lmms_eval_finds_the_model_through_the_entry_point(tmp_path, monkeypatch):
    from lmms_eval.models.registry_v2 import ModelRegistryV2
    monkeypatch.syspath_prepend(str(write_entry_point(tmp_path)))
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()          # what lmms_eval.models does at import, group lmms_eval.models
    assert registry.resolve("minivar").model_type == "simple"
    assert registry.get_model_class("minivar") is Minivar      # also checks: an lmms subclass with is_simple


# ---------------------------------------------------------------------------------------------------------------
# Model args and generation kwargs

def test_var_model_args():
    assert var_config() is None
    assert var_config(var=True) == VARConfig(rho=0.8)
    assert var_config(var=True, var_preset="hallucination") == VARConfig(rho=0.5)
    # lmms-eval hands "0.7" as 0.7, "20" as 20; an explicit rho beats the preset
    cfg = var_config(var=True, var_preset="vision", rho=0.7, tau=20, p=0.5, min_image_attention=0.1)
    assert (cfg.rho, cfg.tau, cfg.p, cfg.min_image_attention) == (0.7, 20, 0.5, 0.1)
    for given in ("[1415,2533]", "1415;2533", "2533 1415"):
        assert var_config(var=True, sink_dims=given).sink_dims == (1415, 2533)
    assert var_config(var=True, sink_dims=7).sink_dims == (7,)
    assert var_config(var=True, sink_dims="auto").find_sink_dims                # the finder, as --sink-dims auto
    assert var_config(var=True, layers="[0,1,2]").layers == (0, 1, 2)


def test_layers_take_the_command_lines_range_too():
    """Issue 19, defect 17: `layers` accepts the CLI's `A-B` (`--var-layers 0-3`) as well as its own lists."""
    for given in ("0-3", "0;1;2;3", "[0,1,2,3]", "0 1 2 3"):
        assert var_config(var=True, layers=given).layers == (0, 1, 2, 3), given
        assert var_config(var=True, var_layers=given).layers == (0, 1, 2, 3), given     # the CLI's option name
    assert var_config(var=True, layers="2").layers == (2,)
    for bad in ("3-1", "0-", "-2", "a-b", "0-1;2-3"):
        with pytest.raises(MinivarError, match="layers"):
            var_config(var=True, layers=bad)


@pytest.mark.parametrize("args, names", [
    ({"var_preset": "general"}, ["var_preset", "var=true"]),
    ({"rho": 0.5}, ["rho", "var=true"]),
    ({"var": True, "rhoo": 0.5}, ["rhoo"]),
    ({"var": True, "var_preset": "strict"}, ["strict"]),
    ({"var": True, "p": 1.5}, ["p"]),
    ({"var": True, "sink_dims": "1415,x"}, ["sink_dims"]),
    ({"var": "yes"}, ["var"]),
])
def test_bad_var_model_args_are_refused(args, names):
    with pytest.raises(MinivarError) as e:
        var_config(**args)
    for name in names:
        assert name in str(e.value)


def test_generation_kwargs():
    greedy = GenSettings(max_new_tokens=128, temperature=0.0, top_p=1.0, seed=None, until=())
    assert gen_settings({}, "t", 128, False) == greedy
    assert gen_settings(None, "t", 128, False) == greedy
    # GQA / MME style; the task's max_new_tokens wins; lmms-eval's default until is kept only with apply_until
    gqa = {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False, "until": ["\n\n"]}
    assert gen_settings(gqa, "t", 128, False) == GenSettings(16, 0.0, 1.0, None, ())
    assert gen_settings(gqa, "t", 128, True).until == ("\n\n",)
    assert gen_settings({"until": "ASSISTANT:"}, "t", 128, True).until == ("ASSISTANT:",)
    # MM-Vet: temperature 0.2 with do_sample false is greedy (transformers' rule)
    assert gen_settings({"temperature": 0.2, "do_sample": False}, "t", 128, False).temperature == 0.0
    # no do_sample: temperature > 0 samples (LLaVA's rule); do_sample without a temperature samples at 1.0
    assert gen_settings({"temperature": 0.2, "top_p": 0.9}, "t", 128, False) == GenSettings(128, 0.2, 0.9, None, ())
    assert gen_settings({"do_sample": True, "seed": 3}, "t", 128, False) == GenSettings(128, 1.0, 1.0, 3, ())
    # the image mode is the model's (model arg image_aspect_ratio), not the task's
    assert gen_settings({"image_aspect_ratio": "original"}, "t", 128, False) == greedy
    # beam search: the task's width
    assert gen_settings({"num_beams": 3}, "t", 128, False) == GenSettings(128, 0.0, 1.0, None, (), num_beams=3)


@pytest.mark.parametrize("kwargs, name", [({"num_beams": 0}, "num_beams"), ({"top_k": 5}, "top_k"),
                                          ({"repetition_penalty": 1.2}, "repetition_penalty"),
                                          ({"visual_cot": True}, "visual_cot"), ({"until": [1]}, "until")])
def test_unsupported_generation_kwargs_are_refused(kwargs, name):
    with pytest.raises(MinivarError) as e:
        gen_settings(kwargs, "mytask", 128, False)
    assert name in str(e.value) and "mytask" in str(e.value)


def test_until_cut_context_and_batches():
    assert cut_at_until("Yes.\n\nBecause", ("\n\n",)) == "Yes."
    assert cut_at_until("a ASSISTANT: b\n\nc", ("\n\n", "ASSISTANT:")) == "a "     # the earliest stop string
    assert cut_at_until("no stop", ("\n\n", "")) == "no stop"
    assert user_text("<image>\nWhat is it?") == "What is it?"
    assert user_text("Look: <image> here") == "Look:  here"
    # same key together, longest first, at most batch_size per batch
    assert batches(["a", "b", "a", "a"], [5, 9, 7, 1], 2) == [[1], [2, 0], [3]]
    assert sorted(i for b in batches([0] * 7, [3, 1, 4, 1, 5, 9, 2], 3) for i in b) == list(range(7))


def test_continuation_is_tokenized_as_running_text(llama_tokenizer_path):
    """With the real LLaMA tokenizer: ' yes' after 'ASSISTANT:' is '▁yes' (one token), not '▁' + 'yes', and prompt +
    continuation are exactly the ids of the whole conversation text."""
    tok = processing.Tokenizer(llama_tokenizer_path, 32000)
    encode = ContinuationEncoder(tok, "vicuna_v1", 576)
    text = "Is there a dog?" + POST_PROMPT
    prompt, cont = encode(text, " yes")
    assert prompt == tok.encode_prompt(text, "vicuna_v1", 576)
    assert cont == [encode.raw.token_to_id("▁yes")]
    after = processing.build_prompt(text).split("<image>")[1]
    head = prompt[:prompt.index(32000)]
    assert prompt + cont == head + [32000] * 576 + encode.raw.encode(after + " yes", add_special_tokens=False).ids
    assert encode(text, " (A)")[1] == encode.raw.encode(after + " (A)", add_special_tokens=False).ids[-3:]
    with pytest.raises(MinivarError):
        encode(text, "")


# ---------------------------------------------------------------------------------------------------------------
# The model in-process, on the demo checkpoint

@pytest.fixture(scope="module")
def lm(demo_weights):
    return Minivar(pretrained="demo", device="cpu", dtype="float32", weights_dir=str(demo_weights), batch_size=2)


def requests(kind, task, items):
    """lmms-eval Instances as its tasks build them, one per (context, doc_to_visual, gen_kwargs | target), for
    docs 0, 1, ...: arguments (context, gen_kwargs | target, doc_to_visual, doc_id, task, split)."""
    from lmms_eval.api.instance import Instance
    return [Instance(request_type=kind, arguments=(context, arg, visual, doc_id, task, "test"), idx=0,
                     metadata={"task": task, "doc_id": doc_id, "repeats": 1})
            for doc_id, (context, visual, arg) in enumerate(items)]


def image_of(doc):
    return [fixture_image(doc)]


def test_generate_until_equals_the_pipeline(lm):
    docs = fixture_docs()
    lm.task_dict = {"t": {"test": docs}}
    contexts = [d["question"] + POST_PROMPT for d in docs]
    reqs = requests("generate_until", "t", [(c, image_of, {"max_new_tokens": 5, "do_sample": False, "until": ["\n\n"]})
                                            for c in contexts])
    out = lm.generate_until(reqs)
    for doc, context, o in zip(docs, contexts, out):
        direct = lm.pipeline.generate(fixture_image(doc), context, max_new_tokens=5)
        assert o.text == direct.text.strip()
        counts = o.token_counts
        assert (counts.input_tokens, counts.output_tokens) == (len(direct.prompt_ids), len(direct.output_ids))
    assert len({o.text for o in out}) == 3            # three images, three answers: a mix-up would show


def test_questions_about_one_picture_share_its_prefix(lm, monkeypatch):
    """Two questions of a batch about the same pixels go through generate_many together, and answer as alone."""
    docs = fixture_docs()
    lm.task_dict = {"t": {"test": docs}}
    picture = fixture_image(docs[0])
    questions = ["What is in the image?" + POST_PROMPT, "Is there a dog?" + POST_PROMPT]
    reqs = requests("generate_until", "t", [(q, lambda doc: [picture.copy()], {"max_new_tokens": 5, "do_sample": False})
                                            for q in questions])
    calls = []
    real = lm.pipeline.generate_many
    monkeypatch.setattr(lm.pipeline, "generate_many", lambda image, prompts, **k: calls.append(len(prompts))
                        or real(image, prompts, **k))
    out = lm.generate_until(reqs)
    assert calls == [2]
    for q, o in zip(questions, out):
        assert o.text == lm.pipeline.generate(picture, q, max_new_tokens=5).text.strip()


def test_generate_until_keeps_request_order_across_settings_and_cuts_at_until(lm, monkeypatch):
    docs = fixture_docs()
    lm.task_dict = {"t": {"test": docs}}
    direct = [lm.pipeline.generate(fixture_image(d), d["question"], max_new_tokens=6).text for d in docs]
    stop = direct[1][3:5]                         # a piece of the second answer: with apply_until, cut there
    assert direct[1].find(stop) == 3
    settings = [{"max_new_tokens": 2}, {"max_new_tokens": 6, "until": [stop]}, {"max_new_tokens": 6}]
    reqs = requests("generate_until", "t", [(d["question"], image_of, kw) for d, kw in zip(docs, settings)])
    two = lm.pipeline.generate(fixture_image(docs[0]), docs[0]["question"], max_new_tokens=2).text
    assert [o.text for o in lm.generate_until(reqs)] == [two.strip(), direct[1].strip(), direct[2].strip()]
    monkeypatch.setattr(lm, "apply_until", True)
    assert [o.text for o in lm.generate_until(reqs)] == [two.strip(), direct[1][:3].strip(), direct[2].strip()]


def test_loglikelihood_is_the_summed_loss_of_the_continuation(lm):
    docs = fixture_docs()
    lm.task_dict = {"t": {"test": docs}}
    pairs = [(d["question"], " " + c) for d in docs for c in d["choices"]]
    owner = [i for i, d in enumerate(docs) for _ in d["choices"]]
    from lmms_eval.api.instance import Instance
    reqs = [Instance("loglikelihood", (q, c, image_of, i, "t", "test"), 0, {"task": "t", "doc_id": i, "repeats": 1})
            for (q, c), i in zip(pairs, owner)]
    out = [r.text for r in lm.loglikelihood(reqs)]      # GenerationResult-wrapped pairs (see the plugin)
    for (q, c), i, (loss, greedy) in zip(pairs, owner, out):
        prompt, cont = lm.encode_pair(q, c)
        logits = lm.pipeline.logits(torch.tensor([prompt + cont]), lm.pipeline.pixels(fixture_image(docs[i])))[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        assert loss == pytest.approx(-logp[range(len(cont)), cont].sum().item(), abs=1e-3)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
        assert loss > 0
    assert len({round(loss, 3) for loss, _ in out}) == len(out)


def test_requests_without_exactly_one_image_are_refused(lm):
    lm.task_dict = {"t": {"test": fixture_docs()}}
    two = requests("generate_until", "t", [("Q?", lambda d: image_of(d) * 2, {})])
    none = requests("generate_until", "t", [("Q?", lambda d: [], {})])
    for reqs, count in ((two, "got 2"), (none, "got 0")):
        with pytest.raises(MinivarError) as e:
            lm.generate_until(reqs)
        assert "task t, doc 0" in str(e.value) and count in str(e.value)


@pytest.mark.parametrize("args, name", [({"batch_size": "auto"}, "batch_size"), ({"conv_mode": "chatml"}, "conv_mode"),
                                        ({"image_aspect_ratio": "original"}, "image_aspect_ratio"),
                                        ({"rho": 0.5}, "rho"), ({"max_new_tokens": -1}, "max_new_tokens")])
def test_bad_model_args_fail_before_loading(args, name):
    with pytest.raises(MinivarError) as e:
        Minivar(pretrained="no/such-model-anywhere", **args)     # would fail to download if it got that far
    assert name in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# lmms-eval's own evaluator, end to end

def test_lmms_eval_runs_local_tasks_on_minivar_with_var(tmp_path, demo_weights, demo_pipe):
    """`python -m lmms_eval --model minivar` with VAR on, batch size 2, over a generate_until task, a
    multiple_choice task and a loglikelihood task: every logged answer and score equals minivar's own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(write_entry_point(tmp_path / "ep")), str(REPO)]
                                                      + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               MINIVAR_WEIGHTS=str(demo_weights), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "minivar",
           "--model_args", "pretrained=demo,device=cpu,dtype=float32,var=true,var_preset=hallucination,p=0.8",
           "--tasks", "minivar_test_vqa,minivar_test_choice,minivar_test_loglikelihood",
           "--include_path", "tests/fixtures/lmms", "--batch_size", "2", "--log_samples", "--output_path", str(out_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr

    def samples(task):
        # lmms-eval logs an error and still exits 0 when a task fails: the files tell whether it ran
        found = sorted(out_dir.glob(f"**/*_samples_{task}.jsonl"))
        assert found, f"lmms-eval wrote no samples for {task}:\n{log[-4000:]}"
        return sorted((json.loads(line) for line in found[-1].read_text().splitlines()), key=lambda s: s["doc_id"])

    docs = fixture_docs()
    var = VARConfig.preset("hallucination", p=0.8)

    # generate_until: the logged answer is minivar's greedy answer with VAR, stripped
    vqa = samples("minivar_test_vqa")
    assert [s["doc_id"] for s in vqa] == [0, 1, 2]
    for s, doc in zip(vqa, docs):
        direct = demo_pipe.generate(fixture_image(doc), doc["question"] + POST_PROMPT, max_new_tokens=6, var=var)
        assert s["filtered_resps"] == direct.text.strip(), s
        # the demo's answers hardly depend on the text: the prompt's length shows it was LLaVA's, post-prompt included
        assert s["token_counts"][0] == {"input_tokens": len(direct.prompt_ids), "output_tokens": len(direct.output_ids)}
        assert s["exact_match"] == float(direct.text.strip().lower() == doc["answer"])

    # loglikelihood: the loss of " <answer>" after the prompt, with VAR (and VAR made a difference)
    encode = ContinuationEncoder(demo_pipe.tokenizer, "vicuna_v1", demo_pipe.config.num_image_tokens)

    known = {}

    def loss(doc, continuation, var_cfg):
        key = (doc["question_id"], continuation, var_cfg)
        if key not in known:
            known[key] = loss_of(doc, continuation, var_cfg)
        return known[key]

    def loss_of(doc, continuation, var_cfg):
        prompt, cont = encode(doc["question"], continuation)
        logits = demo_pipe.logits(torch.tensor([prompt + cont]), demo_pipe.pixels(fixture_image(doc)), var=var_cfg)[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        return -logp[range(len(cont)), cont].sum().item()

    ll = samples("minivar_test_loglikelihood")
    for s, doc in zip(ll, docs):
        expected = loss(doc, " " + doc["answer"], var)
        assert s["loss"] == pytest.approx(expected, abs=1e-3)
    assert abs(ll[0]["loss"] - loss(docs[0], " " + docs[0]["answer"], None)) > 1e-3       # VAR reached the model

    # multiple_choice: lmms-eval picks the choice with the smallest loss (np.argmin), i.e. the most likely one
    choice = samples("minivar_test_choice")
    for s, doc in zip(choice, docs):
        losses = [loss(doc, " " + c, var) for c in doc["choices"]]
        assert [float(x[0]) for x in s["filtered_resps"]] == pytest.approx(losses, abs=1e-3)
        assert s["acc"] == float(min(range(len(losses)), key=losses.__getitem__) == doc["label"])

    results = sorted(out_dir.glob("**/*_results.json"))
    assert results, log[-4000:]
    scores = json.loads(results[-1].read_text())["results"]
    assert scores["minivar_test_vqa"]["exact_match,none"] == pytest.approx(sum(s["exact_match"] for s in vqa) / 3)
    assert scores["minivar_test_choice"]["acc,none"] == pytest.approx(sum(s["acc"] for s in choice) / 3)


def test_beam_search_and_opera_through_the_plugin(tiny_checkpoint):
    """A task's num_beams runs beam search; the model args opera=true num_beams=2 run OPERA: the pipeline's answers."""
    from minivar.methods.opera import OPERA
    docs = fixture_docs()[:2]
    contexts = [d["question"] + POST_PROMPT for d in docs]
    plain = Minivar(pretrained=str(tiny_checkpoint), device="cpu", dtype="float32", batch_size=2)
    plain.task_dict = {"t": {"test": docs}}
    out = plain.generate_until(requests("generate_until", "t", [(c, image_of, {"max_new_tokens": 4, "num_beams": 3})
                                                                for c in contexts]))
    assert [o.text for o in out] == [plain.pipeline.generate(fixture_image(d), c, max_new_tokens=4,
                                                             num_beams=3).text.strip() for d, c in zip(docs, contexts)]
    opera = Minivar(pretrained=str(tiny_checkpoint), device="cpu", dtype="float32", batch_size=2, opera=True,
                    num_beams=2, opera_candidates=2)
    opera.task_dict = {"t": {"test": docs}}
    out = opera.generate_until(requests("generate_until", "t", [(c, image_of, {"max_new_tokens": 4})
                                                                for c in contexts]))
    want = [opera.pipeline.generate(fixture_image(d), c, max_new_tokens=4, methods=[OPERA(num_beams=2, candidates=2)])
            for d, c in zip(docs, contexts)]
    assert [o.text for o in out] == [w.text.strip() for w in want]
