"""Issue 28, section 2: the defects a newcomer hit, each pinned by a test that failed before its fix, and the
cosmetic ones fixed in passing."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, run_cli, to_hub_key, unused_tensors, write_checkpoint
from minivar.errors import MinivarError
from minivar.eval import harness
from test_eval_harness import N_IMAGES, PER_IMAGE, REPO, answers, cli, run_args, tiny  # noqa: F401

IMAGE = "assets/example.jpg"
PROMPT = "What is in the image?"
BASE = ["--image", IMAGE, "--prompt", PROMPT, "--model", "demo", "--max-new-tokens", "2", "--dtype", "float32",
        "--device", "cpu"]


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("minivar: error: ")]


# ---------------------------------------------------------------------------------------------------------------
# 1. A seed past 64 bits is refused before the model loads

@pytest.mark.parametrize("seed", [2 ** 70, 2 ** 64, -2 ** 63 - 1])
def test_a_seed_past_64_bits_is_refused_before_loading(demo_env, monkeypatch, seed):
    import minivar

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(minivar, "load", no_load)
    rc, out, err = run_cli(BASE + ["--seed", seed, "--temperature", "1"])
    assert_one_line_error(rc, out, err, "--seed", str(seed))


def test_a_seed_past_64_bits_in_the_api(demo_pipe):
    img = Image.open(REPO / IMAGE)
    with pytest.raises(MinivarError, match="`seed`"):
        demo_pipe.generate(img, PROMPT, max_new_tokens=1, seed=2 ** 70)
    with pytest.raises(MinivarError, match="`seed`"):
        demo_pipe.generate_many(img, [PROMPT], max_new_tokens=1, seed=2 ** 70)
    # the limits themselves are torch's: both ends are accepted, by the check and by a generator
    from minivar.pipeline import check_generation_args
    for seed in (2 ** 64 - 1, -2 ** 63):
        check_generation_args(1, 1.0, 1.0, seed)
        torch.Generator().manual_seed(seed)


def test_a_seed_past_64_bits_writes_no_run(tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "run"
    line = assert_one_line_error(*cli(run_args(root, out, "--seed", 2 ** 70, "--temperature", "1")), "--seed")
    assert str(2 ** 70) in line
    assert not out.exists()                                  # no run.json, no empty answers.jsonl
    assert cli(run_args(root, out, "--seed", "1", "--temperature", "1"))[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# 2. MINIVAR_WEIGHTS naming a file or a folder that cannot be made

@pytest.mark.parametrize("kind", ["file", "uncreatable"])
def test_minivar_weights_that_is_no_folder_is_one_line(tmp_path, monkeypatch, kind):
    from minivar import checkpoint
    bad = tmp_path / "weights-file"
    bad.write_text("not a folder")
    if kind == "uncreatable":
        bad = bad / "below-a-file"
    monkeypatch.setenv("MINIVAR_WEIGHTS", str(bad))
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", checkpoint.default_weights_dir())
    for model in ("demo", "some-org/some-model"):
        rc, out, err = run_cli(["--image", IMAGE, "--prompt", PROMPT, "--model", model])
        assert_one_line_error(rc, out, err, "MINIVAR_WEIGHTS", str(bad))


# ---------------------------------------------------------------------------------------------------------------
# 3. Non-finite logits: refused, naming the checkpoint's weights

@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory, tiny_config, tiny_state):
    """conftest's tiny checkpoint with one NaN in a decoder weight."""
    state = dict(tiny_state)
    key = "language_model.model.layers.0.mlp.down_proj.weight"
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    state = {to_hub_key(k): v for k, v in (state | unused_tensors(tiny_config)).items()}
    return write_checkpoint(tmp_path_factory.mktemp("nan_checkpoint"), state, tiny_config, tokenizer=True)


def test_non_finite_logits_cli(nan_checkpoint):
    rc, out, err = run_cli(["--image", IMAGE, "--prompt", PROMPT, "--model", nan_checkpoint, "--device", "cpu",
                            "--dtype", "float32", "--max-new-tokens", "3"])
    assert rc == 2 and out == ""
    (line,) = error_lines(err)
    assert "not finite" in line and "checkpoint" in line and "weights" in line
    assert err.endswith(line + "\n")                        # the last word, after the load's status line


def test_non_finite_logits_api(nan_checkpoint, tiny_checkpoint):
    import minivar
    img = Image.open(REPO / IMAGE)
    bad = minivar.load(str(nan_checkpoint), device="cpu", dtype="float32")
    for call in (lambda: bad.generate(img, PROMPT, max_new_tokens=2),
                 lambda: bad.generate_many(img, [PROMPT, "Is it red?"], max_new_tokens=2),
                 lambda: bad.generate(img, PROMPT, max_new_tokens=2, temperature=1.0, seed=0)):
        with pytest.raises(MinivarError, match="not finite.*checkpoint"):
            call()
    good = minivar.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    assert len(good.generate(img, PROMPT, max_new_tokens=2).output_ids) >= 1


def test_non_finite_logits_harness_keeps_finished_answers(tiny, tmp_path, monkeypatch):
    """The run stops with one line when a batch's logits go non-finite; the batches answered before stay, nothing
    is written for the failing one, and the run can be resumed once the weights are sound."""
    root, ref, _ = tiny
    out = tmp_path / "nan"
    real = harness.answer_group
    calls = []

    def poisoned(pipeline, image, prompts, settings):
        calls.append(len(prompts))
        if len(calls) == 3:                  # the third batch: a NaN appears in the weights
            w = pipeline.model.language_model.model.layers[0].mlp.down_proj.weight
            saved = w.detach().clone()
            w.data[0, 0] = float("nan")
            try:
                return real(pipeline, image, prompts, settings)
            finally:
                w.data.copy_(saved)
        return real(pipeline, image, prompts, settings)
    monkeypatch.setattr(harness, "answer_group", poisoned)
    rc, stdout, err = cli(run_args(root, out))
    assert rc == 2 and stdout == ""
    (line,) = error_lines(err)
    assert "not finite" in line and "checkpoint" in line
    recs = answers(out / "answers.jsonl")
    assert len(recs) == sum(calls[:2]) and len({r["question_id"] for r in recs}) == len(recs)
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(harness, "answer_group", real)
    assert cli(run_args(root, out))[0] == 0
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# 4. One bound for --max-new-tokens: ≥ 1 everywhere, in the same words

BOUND = "must be a whole number ≥ 1"


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_new_tokens_one_bound(demo_env, demo_pipe, tiny, tmp_path, value):
    line = assert_one_line_error(*run_cli(BASE[:6] + ["--max-new-tokens", value]), "--max-new-tokens")
    assert line == f"minivar: error: --max-new-tokens {BOUND}, got {value}"
    root, _, _ = tiny
    line = assert_one_line_error(*cli(run_args(root, tmp_path / "r", "--max-new-tokens", value)), "--max-new-tokens")
    assert line == f"minivar: error: --max-new-tokens {BOUND}, got {value}"
    img = Image.open(REPO / IMAGE)
    for call in (demo_pipe.generate, demo_pipe.generate_many):
        with pytest.raises(MinivarError) as e:
            call(img, PROMPT if call == demo_pipe.generate else [PROMPT], max_new_tokens=int(value))
        assert str(e.value) == f"`max_new_tokens` {BOUND}, got {value}"


# ---------------------------------------------------------------------------------------------------------------
# 5. Two runs into one --out: the second is refused naming the first's pid; stale locks are taken over;
#    a resume drops duplicate lines, saying so

def slow_child(delay: float) -> str:
    """A `minivar-eval run` in a child interpreter whose batches take `delay` seconds more."""
    return (f"import sys, time; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
            "from minivar.eval import benchmarks, harness; import test_eval_harness as t; benchmarks.get = t.fake_get\n"
            "real = harness.answer_group\n"
            f"harness.answer_group = lambda *a: time.sleep({delay}) or real(*a)\n"
            "from minivar.eval.__main__ import main; sys.exit(main(sys.argv[1:]))")


def start_child(root, out, demo_env, delay=0.3):
    env = os.environ | {"MINIVAR_WEIGHTS": str(demo_env), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", slow_child(delay), *map(str, run_args(root, out))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    file = out / "answers.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if file.is_file() and file.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()
    return proc


def test_two_runs_into_one_out(tiny, tmp_path, demo_env):
    """Two real processes: the second run into a busy --out is refused naming the first's pid; once the first is
    killed (its lock file left behind), the next run takes the lock over, answers each question once and releases
    the lock when it ends."""
    root, ref, _ = tiny
    out = tmp_path / "shared"
    first = start_child(root, out, demo_env)
    try:
        line = assert_one_line_error(*cli(run_args(root, out)), "--out", f"pid {first.pid}")
        assert "another" in line
        assert first.poll() is None                         # the first run goes on
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    assert [p.name for p in out.iterdir() if "lock" in p.name] == [".answers.jsonl.lock"]     # left by the kill
    rc, _, err = cli(run_args(root, out))
    assert rc == 0, err
    recs = answers(out / "answers.jsonl")
    assert len(recs) == N_IMAGES * PER_IMAGE == len({r["question_id"] for r in recs})
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
    assert [p.name for p in out.iterdir() if "lock" in p.name] == []                          # released on exit


def test_overlapping_shards_are_kept_out(tmp_path):
    """An unsharded run and a shard (or shards of two splits) would answer the same questions; shards of one split
    would not."""
    out = tmp_path / "o"
    with harness.RunLock(out, (0, 2)):
        with harness.RunLock(out, (1, 2)):                  # the other half of the same split: side by side
            pass
        for other in (None, (0, 2), (1, 3)):
            with pytest.raises(MinivarError, match=f"pid {os.getpid()}"):
                with harness.RunLock(out, other):
                    pass
    assert not out.exists()                                 # made for the lock alone: removed with it


def test_resume_drops_duplicate_lines_saying_so(tiny, tmp_path):
    root, ref, _ = tiny
    out = tmp_path / "dup"
    shutil.copytree(ref, out)
    (out / "metrics.json").unlink()
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:7] + lines[:5]))      # 5 duplicates, 5 questions missing
    rc, _, err = cli(run_args(root, out))
    assert rc == 0, err
    assert re.search(r"dropped 5 duplicate answer lines", err), err
    assert "kept the 7 answers" in err
    recs = answers(out / "answers.jsonl")
    assert len(recs) == N_IMAGES * PER_IMAGE == len({r["question_id"] for r in recs})
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# 7. The API names the argument and the type expected

def test_api_type_errors_name_the_argument(demo_pipe):
    img = Image.open(REPO / IMAGE)
    cases = [(lambda: demo_pipe.generate(img, b"hi"), "`prompt`", "str"),
             (lambda: demo_pipe.generate_many(img, "a string"), "`prompts`", "list"),
             (lambda: demo_pipe.generate_batch([img], "a string"), "`prompts`", "list"),
             (lambda: demo_pipe.generate(img, PROMPT, max_new_tokens="5"), "`max_new_tokens`", "int"),
             (lambda: demo_pipe.generate(img, PROMPT, max_new_tokens=2.0), "`max_new_tokens`", "int"),
             (lambda: demo_pipe.generate(img, PROMPT, temperature="1"), "`temperature`", "number"),
             (lambda: demo_pipe.generate(img, PROMPT, top_p="0.5", temperature=1.0), "`top_p`", "number"),
             (lambda: demo_pipe.generate(img, PROMPT, seed="7"), "`seed`", "int"),
             (lambda: demo_pipe.generate_many(img, [PROMPT, 3]), "`prompts`", "str")]
    for call, name, kind in cases:
        with pytest.raises(MinivarError) as e:
            call()
        assert name in str(e.value) and kind in str(e.value), str(e.value)
    with pytest.raises(MinivarError, match="empty"):                # an empty prompt is still called empty
        demo_pipe.generate(img, "  ")


# ---------------------------------------------------------------------------------------------------------------
# 8. The lmms-eval plugin's refusal: one clear line on stderr before lmms-eval's traceback

def test_lmms_plugin_refusal_is_one_line_on_stderr(capsys):
    pytest.importorskip("lmms_eval")
    from minivar.lmms_plugin import Minivar
    with pytest.raises(MinivarError):
        Minivar(pretrained="no/such-model-anywhere", conv_mode="chatml")
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("minivar: error: --model_args conv_mode='chatml'")
    doc = " ".join((REPO / "docs" / "lmms-eval.md").read_text().split())
    assert "exits with code 0" in doc and "results" in doc and "minivar: error:" in doc


# ---------------------------------------------------------------------------------------------------------------
# 9. Panel titles fit their panels, for every family's panel widths

def ink(im: Image.Image) -> int:
    """Pixels not of the background colour."""
    import numpy as np
    from minivar import viz
    return int((np.asarray(im.convert("RGB")) != np.array(viz.BACKGROUND, dtype=np.uint8)).any(-1).sum())


def attention_numbers(panels, grid=None):
    n = grid * grid if grid is not None else sum(p["rows"] * p["cols"] + p["rows"] * p["newline"] for p in panels)
    numbers = {"layer_range": [0, 1], "n_heads": 4, "answer_rows": [0], "prompt": PROMPT, "answer": "a",
               "attention": {"before": [1.0 / n] * n, "after": [1.0 / n] * n}, "var": True}
    if grid is not None:
        numbers.update(grid=grid, image_size=grid * 14)
    else:
        numbers["panels"] = panels
    return numbers


# the panel layouts of each family: LLaVA-1.5 (one 24x24 grid), LLaVA-NeXT (base + tiles), Qwen2-VL (a few merged
# tokens a side, any aspect ratio)
LAYOUTS = {
    "llava": (attention_numbers([], grid=24), lambda: Image.new("RGB", (336, 336), "white")),
    "llava_next": (attention_numbers([{"name": "base image", "rows": 4, "cols": 4, "newline": False, "first": 0},
                                      {"name": "tile 1 (row 1, column 2)", "rows": 4, "cols": 4, "newline": True,
                                       "first": 16}]),
                   lambda: [Image.new("RGB", (56, 56), "white")] * 2),
    "qwen2_vl": (attention_numbers([{"name": "image", "rows": 2, "cols": 2, "newline": False, "first": 0}]),
                 lambda: [Image.new("RGB", (56, 56), "white")]),
    "qwen2_vl_wide": (attention_numbers([{"name": "image", "rows": 1, "cols": 8, "newline": False, "first": 0}]),
                      lambda: [Image.new("RGB", (224, 28), "white")]),
}


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_panel_titles_fit_their_panels(family, monkeypatch):
    from minivar import viz
    numbers, view = LAYOUTS[family]
    framed = []
    real = viz.axes

    def recording(plot, **kw):
        im, origin = real(plot, **kw)
        framed.append((kw.get("title"), im, origin))
        return im, origin
    monkeypatch.setattr(viz, "axes", recording)
    if numbers.get("grid"):                                   # LLaVA-1.5's one square grid
        viz.draw_attention(numbers, view())
    else:
        viz._attention_panels(numbers, view())
    titled = [(t, im, origin) for t, im, origin in framed if t]
    assert titled
    for title, im, (left, top) in titled:
        assert "%" not in title or title.endswith("the image") or title.endswith("attention"), title
        alone = viz.label(viz.ascii_text(title), 15)
        assert alone.width <= im.width, (title, alone.width, im.width)
        band = im.crop((0, 0, im.width, top - 1))            # the title's rows, above the plot's frame
        assert ink(band) == ink(alone), title                 # the whole title is drawn: nothing clipped or cut


# ---------------------------------------------------------------------------------------------------------------
# Cosmetic

def test_status_lines(demo_env):
    rc, out, err = run_cli(BASE[:6] + ["--max-new-tokens", "1", "--dtype", "float32", "--device", "cpu"])
    assert rc == 0, err
    status = next(line for line in err.splitlines() if "prefill" in line)
    assert "0.00 tok/s" not in status and "1 tokens" not in status and "1 token," in status
    from minivar.cli import var_summary
    report = {"sinks": {"0": [1]}, "visual_sinks": {"0": [1]}, "redistributed": {"prefill": [1], "decode": [0]},
              "sink_dims": [], "sink_dims_source": "finder", "tau": 20, "rho": 0.8, "p": 0.6}
    assert "sink dims none (finder)" in var_summary(report) and "  " not in var_summary(report)


def test_masking_log_says_one_count_once(demo_env, tmp_path):
    rc, out, err = run_cli(BASE + ["--mask-visual-sinks", "--json"])
    assert rc == 0, err
    counts = set(json.loads(out)["masked"]["count"].values())
    line = next(line for line in err.splitlines() if "masked the visual sinks" in line)
    if len(counts) == 1:                                      # one count: said once
        assert f"({counts.pop()} per layer)" in line, line
    else:
        assert f"({min(counts)}-{max(counts)} per layer)" in line, line
    assert not re.search(r"\((\d+)-\1 per layer\)", line), line


def test_qwen2_5_aspect_error_names_its_family():
    from types import SimpleNamespace
    from minivar.models.qwen2_vl.family import qwen_image
    from minivar.models.qwen2_vl.processing import QwenImageConfig
    strip = Image.new("RGB", (28 * 300, 28))
    for model_type, name, other in (("qwen2_5_vl", "Qwen2.5-VL", "Qwen2-VL"), ("qwen2_vl", "Qwen2-VL", "Qwen2.5-VL")):
        with pytest.raises(MinivarError) as e:
            qwen_image(strip, SimpleNamespace(model_type=model_type, image=QwenImageConfig()))
        assert name in str(e.value) and other not in str(e.value) and "aspect ratio" in str(e.value)


def test_mme_totals_print_in_one_format():
    import contextlib
    import io
    from minivar.eval.__main__ import show
    from minivar.eval.benchmarks.base import Question
    from minivar.eval.benchmarks.mme import MME
    qs = [Question(f"q{i}", "Is it?", "img", load_image=None, unit="img",
                   meta={"subtask": "existence", "label": "yes"}) for i in range(2)]
    metrics = MME().score([(q, "No") for q in qs])            # perception only, all wrong: both totals 0
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        show({"bench": "mme", "n": 2, "metrics": metrics}, False)
    text = buf.getvalue()
    assert re.search(r"^perception +0\.0000$", text, re.M) and re.search(r"^cognition +0\.0000$", text, re.M), text


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_temperature_is_refused(demo_env, value):
    assert_one_line_error(*run_cli(BASE + ["--temperature", value]), "--temperature")


def test_an_option_without_effect_is_an_error_naming_what_it_needs(demo_env, tiny, tmp_path, demo_pipe):
    line = assert_one_line_error(*run_cli(BASE + ["--top-p", "0.5"]), "--top-p", "--temperature")
    assert "only applies with" in line
    root, _, _ = tiny
    line = assert_one_line_error(*cli(run_args(root, tmp_path / "r", "--top-p", "0.5")), "--top-p", "--temperature")
    assert not (tmp_path / "r").exists()
    with pytest.raises(MinivarError, match="`top_p`.*`temperature`"):
        demo_pipe.generate(Image.open(REPO / IMAGE), PROMPT, top_p=0.5)
    assert run_cli(BASE + ["--top-p", "0.5", "--temperature", "0.7", "--seed", "1"])[0] == 0
    # --seed alike: it seeds sampling, VCD's noise and (minivar) the random masking; alone it does nothing
    line = assert_one_line_error(*run_cli(BASE + ["--seed", "3"]), "--seed", "--temperature", "--vcd",
                                 "--mask-random-image-tokens")
    assert "only applies with" in line
    assert_one_line_error(*cli(run_args(root, tmp_path / "s", "--seed", "3")), "--seed", "--temperature", "--vcd")
    assert not (tmp_path / "s").exists()


def test_score_and_compare_positionals_have_help():
    for sub in ("score", "compare"):
        rc, out, err = cli([sub, "--help"])
        assert rc == 0
        positional = out.split("positional arguments:")[1].split("options:")[0]
        for line in positional.strip().splitlines():
            if line.startswith("  ") and not line.startswith("   "):
                assert len(line.split()) > 1, (sub, line)         # the name followed by its help text
