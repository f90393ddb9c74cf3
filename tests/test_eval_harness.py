"""python -m minivar.eval (run / score / compare / download) with a tiny yes/no benchmark.

The benchmark here (TinyYesNo: a JSONL of questions + an image folder) stands in for the real ones, which are
tested in their own files; the harness only uses the Benchmark contract (minivar/eval/benchmarks/base.py). One run
uses the demo checkpoint (576 image tokens: about a second per batch on a CPU); the others use conftest's tiny
checkpoint (16 image tokens), which exercises the same code in milliseconds. Runs go through the CLI in-process,
except the one killed mid-run, a real interpreter.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, assert_one_line_error
from minivar import processing
from minivar.errors import MinivarError
from minivar.eval import benchmarks, harness
from minivar.eval.__main__ import main
from minivar.eval.benchmarks.base import Benchmark, Question

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, PER_IMAGE = 4, 3


class TinyYesNo(Benchmark):
    """Yes/no questions from a JSONL ({"id", "image", "question", "label"}) about images in --images. Scoring unit:
    the image (image_accuracy counts images whose questions are all right), so the bootstrap's units are tested."""
    name = "tinyyn"
    family = "hallucination"
    max_new_tokens = 3
    headline = "accuracy"
    loads: dict = {}               # image key → how often load_image ran (the harness loads each image once)

    def read(self, paths, images=None, **options):
        questions = []
        for path in paths:
            if path.suffix != ".jsonl" or not path.is_file():
                raise MinivarError(f"--data '{path}' is not a .jsonl question file")
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    rec = json.loads(line)
                    qid, image, text, label = str(rec["id"]), rec["image"], rec["question"], rec["label"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise MinivarError(f"'{path}' line {lineno} is not a question record") from None
                file = Path(images or path.parent) / image
                if not file.is_file():
                    raise MinivarError(f"image '{file}' of question {qid} not found")
                questions.append(Question(qid, text, image, load_image=partial(self._load, file, image), unit=image,
                                          meta={"label": label}))
        return questions

    def _load(self, file, key):
        TinyYesNo.loads[key] = TinyYesNo.loads.get(key, 0) + 1
        return processing.load_image(file)

    def score(self, answered):
        said_yes = ["yes" in text.lower() for _, text in answered]
        right = [y == (q.meta["label"] == "yes") for (q, _), y in zip(answered, said_yes)]
        units: dict = {}
        for (q, _), ok in zip(answered, right):
            units[q.scoring_unit] = units.get(q.scoring_unit, True) and ok
        return {"accuracy": sum(right) / len(right), "yes_ratio": sum(said_yes) / len(said_yes),
                "image_accuracy": sum(units.values()) / len(units), "n": len(right), "note": "text is left out"}


REAL_GET = getattr(benchmarks, "get", None)


def fake_get(name):
    """minivar.eval.benchmarks.get with the tiny benchmark added."""
    if name == TinyYesNo.name:
        return TinyYesNo()
    if REAL_GET is not None:
        return REAL_GET(name)
    raise MinivarError(f"unknown benchmark '{name}' (choose from {TinyYesNo.name})")


def make_data(root: Path, n_images: int = N_IMAGES, per_image: int = PER_IMAGE) -> Path:
    """n_images noise images of different sizes and per_image questions each, the images' questions interleaved
    (the harness must group them by image in the order of first appearance)."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (30 + 9 * i, 40, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    objects = ["cat", "dog", "car", "tree", "cup", "bird"]
    lines = []
    for k in range(n_images * per_image):
        i = (k + k // n_images) % n_images     # img0 img1 img2 img3 img1 img2 ... : interleaved
        lines.append(json.dumps({"id": 100 + k, "image": f"img{i}.png", "question": f"Is there a {objects[k % 6]}?",
                                 "label": "yes" if k % 2 else "no"}))
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny(demo_env, tiny_checkpoint, tmp_path_factory):
    """The tiny benchmark registered under its name, its data, and one uninterrupted reference run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmarks, "get", fake_get, raising=False)
        root = make_data(tmp_path_factory.mktemp("tiny"))
        (root / "model").symlink_to(tiny_checkpoint, target_is_directory=True)
        ref = root / "ref"
        rc, out, err = cli(run_args(root, ref, "--json"))
        assert rc == 0, err
        yield root, ref, out


def run_args(root: Path, out: Path, *extra):
    """The run command on the tiny checkpoint (root/model), fp32 on the CPU, in batches of 2."""
    return ["run", "tinyyn", "--data", root / "questions.jsonl", "--images", root / "images", "--out", out,
            "--model", root / "model", "--device", "cpu", "--dtype", "float32", "--batch-size", "2", *extra]


def cli(argv) -> tuple[int, str, str]:
    """minivar.eval's main in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(records) -> dict:
    return {r["question_id"]: (r["text"], r["output_ids"]) for r in records}


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()} if directory.exists() else None


# ---------------------------------------------------------------------------------------------------------------
# run

def test_run_on_the_demo_checkpoint(tiny, tmp_path):
    """`--model demo` end to end: the answers are the model's own (one question asked alone gives the same ids)."""
    root = make_data(tmp_path / "d", n_images=2, per_image=2)
    out = tmp_path / "demo"
    rc, stdout, err = cli(["run", "tinyyn", "--data", root / "questions.jsonl", "--images", root / "images",
                           "--out", out, "--model", "demo", "--device", "cpu", "--dtype", "float32", "--json"])
    assert rc == 0, err
    recs = answers(out / "answers.jsonl")
    questions = TinyYesNo().read([root / "questions.jsonl"], root / "images")
    assert sorted(r["question_id"] for r in recs) == sorted(q.question_id for q in questions)
    import minivar
    pipe = minivar.load("demo", device="cpu", dtype="float32")
    for q in questions[:2]:
        alone = pipe.generate(q.load_image(), q.prompt, max_new_tokens=3)
        assert by_id(recs)[q.question_id] == (alone.text.strip(), alone.output_ids)
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "demo" and json.loads(stdout)["n"] == 4
    assert json.loads(stdout) == json.loads((out / "metrics.json").read_text())


def test_run_end_to_end(tiny):
    root, ref, out = tiny
    result = json.loads(cli(["score", ref, "--json"])[1])
    recs = answers(ref / "answers.jsonl")
    questions = TinyYesNo().read([root / "questions.jsonl"], root / "images")
    # one line per question, LLaVA's answer-file keys, grouped by image in order of first appearance
    assert len(recs) == len(questions) == N_IMAGES * PER_IMAGE
    assert {"question_id", "prompt", "text", "output_ids", "finished"} <= set(recs[0])
    expected_order = [q.question_id for g in harness.group_by_image(questions) for q in g]
    assert [r["question_id"] for r in recs] == expected_order
    assert expected_order != [q.question_id for q in questions]            # the data really interleaves images
    assert all(0 < len(r["output_ids"]) <= TinyYesNo.max_new_tokens for r in recs)   # the benchmark's max_new_tokens
    # the answers are the model's: one question asked alone gives the same ids
    import minivar
    pipe = minivar.load(str(root / "model"), device="cpu", dtype="float32")
    for q in questions[:3]:
        alone = pipe.generate(q.load_image(), q.prompt, max_new_tokens=3)
        assert by_id(recs)[q.question_id] == (alone.text.strip(), alone.output_ids)
    # run.json records the settings; metrics.json = the benchmark's score of the answers = `score`
    run = json.loads((ref / "run.json").read_text())
    assert run["benchmark"] == "tinyyn" and run["model"] == str((root / "model").resolve()) and run["dtype"] == "float32"
    assert run["var"] is None and run["conv_mode"] == "vicuna_v1" and run["image_aspect_ratio"] == "pad"
    assert run["max_new_tokens"] == 3 and run["batch_size"] == 2 and run["minivar_version"]
    assert run["data"][0]["bytes"] == (root / "questions.jsonl").stat().st_size
    texts = {r["question_id"]: r["text"] for r in recs}
    expected = TinyYesNo().score([(q, texts[q.question_id]) for q in questions])
    assert json.loads((ref / "metrics.json").read_text()) == result == {"bench": "tinyyn", "n": 12, "metrics": expected}
    # the run's own --json output: exactly one JSON object, the same
    assert json.loads(out) == result and out.count("\n") == 1


def test_images_load_once_and_batches_stay_within_an_image(tiny, tmp_path, monkeypatch):
    root, ref, _ = tiny
    calls = []
    real = harness.answer_group
    monkeypatch.setattr(harness, "answer_group", lambda pipe, image, prompts, s: calls.append(prompts) or
                        real(pipe, image, prompts, s))
    TinyYesNo.loads.clear()
    rc, out, err = cli(run_args(root, tmp_path / "r", "--limit", "5", "--json"))
    assert rc == 0, err
    # --limit 5: the first five questions in the data's order; they cover all 4 images
    questions = TinyYesNo().read([root / "questions.jsonl"], root / "images")
    first5 = {q.question_id for q in questions[:5]}
    recs = answers(tmp_path / "r" / "answers.jsonl")
    assert {r["question_id"] for r in recs} == first5
    assert json.loads(out)["n"] == 5
    assert TinyYesNo.loads == {f"img{i}.png": 1 for i in range(N_IMAGES)}
    # batches are cut from all of an image's questions (so a limit or a resume never changes a batch)
    groups = harness.group_by_image(questions)
    assert calls == [[q.prompt for q in g[:2]] for g in groups]
    assert by_id(recs) == {k: v for k, v in by_id(answers(ref / "answers.jsonl")).items() if k in first5}


def test_resume_after_kill(tiny, tmp_path, demo_env):
    """A real `python -m minivar.eval run` killed mid-run, then the same command again: the answers equal the
    uninterrupted run's, with no duplicates and no gaps."""
    root, ref, _ = tiny
    out = tmp_path / "killed"
    # The child answers slowly (0.2 s a batch) so that the kill surely lands mid-run.
    child = (f"import sys, time; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
             "from minivar.eval import benchmarks, harness; import test_eval_harness as t; benchmarks.get = t.fake_get\n"
             "real = harness.answer_group\n"
             "harness.answer_group = lambda *a: time.sleep(0.2) or real(*a)\n"
             "from minivar.eval.__main__ import main; sys.exit(main(sys.argv[1:]))")
    env = os.environ | {"MINIVAR_WEIGHTS": str(demo_env), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", child, *map(str, run_args(root, out, "--batch-size", "1"))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    file = out / "answers.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if file.is_file() and file.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()      # still running: killed mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    written = file.read_bytes().count(b"\n")
    assert 2 <= written < N_IMAGES * PER_IMAGE
    assert not (out / "metrics.json").exists()
    # a second run with batch size 1 answers every question once; the answers equal the (batch-2) reference's
    # (fp32: the batch size changes no answer here, which makes the comparison possible)
    rc, _, err = cli(run_args(root, out, "--batch-size", "1"))
    assert rc == 0, err
    recs = answers(file)
    assert len(recs) == N_IMAGES * PER_IMAGE and len({r["question_id"] for r in recs}) == len(recs)
    assert by_id(recs) == by_id(answers(ref / "answers.jsonl"))
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())


def test_torn_last_line_is_repaired(tiny, tmp_path):
    root, ref, _ = tiny
    out = tmp_path / "torn"
    shutil.copytree(ref, out)
    (out / "metrics.json").unlink()
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    # killed in the middle of line 5, the second answer of a batch of two (lines 4-5: the 2nd image's first batch):
    # the rerun asks that batch again, whole, and writes only the answer that was lost
    (out / "answers.jsonl").write_text("".join(lines[:4]) + lines[4][:17])
    assert harness.read_answers(out / "answers.jsonl").keys() == {json.loads(x)["question_id"] for x in lines[:4]}
    rc, _, err = cli(run_args(root, out))
    assert rc == 0, err
    assert (out / "answers.jsonl").read_text() == "".join(lines)     # the same lines, none twice, no torn piece
    assert (out / "metrics.json").read_text() == (ref / "metrics.json").read_text()


def test_shards_and_torchrun_merge_to_one_run(tiny, tmp_path, monkeypatch):
    root, ref, _ = tiny
    out = tmp_path / "sharded"
    rc, stdout, err = cli(run_args(root, out, "--shard", "0/2", "--json"))
    assert rc == 0, err
    assert stdout == "" and not (out / "metrics.json").exists()       # the other shard is still missing
    rc, stdout, err = cli(run_args(root, out, "--shard", "0/2", "--json", "--partial"))   # nothing left to do
    assert rc == 0 and json.loads(stdout)["n"] == 6 and "loaded" not in err
    # under torchrun (RANK / WORLD_SIZE, no --shard) this process is shard 1 of 2
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc, stdout, err = cli(run_args(root, out, "--json"))
    assert rc == 0, err
    part0, part1 = answers(out / "answers-0-of-2.jsonl"), answers(out / "answers-1-of-2.jsonl")
    assert not (out / "answers.jsonl").exists()
    # disjoint, split by image, together the whole run with the same answers and metrics
    assert {r["image"] for r in part0} == {"img0.png", "img2.png"} and {r["image"] for r in part1} == {"img1.png", "img3.png"}
    assert by_id(part0 + part1) == by_id(answers(ref / "answers.jsonl")) and len(part0) + len(part1) == 12
    assert json.loads(stdout) == json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # the shards can also be scored from two directories (e.g. two machines)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "run.json", other)
    shutil.move(out / "answers-1-of-2.jsonl", other)
    assert cli(["score", out, other, "--json"])[1] == cli(["score", ref, "--json"])[1]


def test_torchrun_device_and_shard():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert harness.torchrun_shard(env) == (3, 4) and harness.torchrun_shard({}) is None
    assert harness.run_device("auto", env, cuda=True) == "cuda:1" == harness.run_device("cuda", env, cuda=True)
    assert harness.run_device("cpu", env) == "cpu" and harness.run_device("cuda:0", env) == "cuda:0"
    assert harness.run_device("auto", {}) == "auto"
    assert harness.parse_shard("2/5") == (2, 5) and harness.parse_shard("0/1") is None


def test_resume_with_other_settings_is_refused(tiny, tmp_path, monkeypatch):
    root, ref, _ = tiny
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    before = snapshot(out)
    import minivar
    monkeypatch.setattr(minivar, "load", lambda *a, **k: pytest.fail("the model must not load"))
    for extra, name in [(["--max-new-tokens", "5"], "max_new_tokens"), (["--var"], "var"),
                        (["--batch-size", "3"], "batch_size"), (["--image-aspect-ratio", "crop"], "image_aspect_ratio"),
                        (["--dtype", "bfloat16"], "dtype"), (["--conv-mode", "llava_hf"], "conv_mode"),
                        (["--num-beams", "2"], "decoding"), (["--opera"], "methods")]:
        args = run_args(root, out) + extra
        rc, stdout, err = cli(args)
        assert_one_line_error(rc, stdout, err, out, name)
        assert snapshot(out) == before
    # other questions (the data changed) are refused too
    data2 = tmp_path / "q2.jsonl"
    data2.write_text((root / "questions.jsonl").read_text().replace("cat", "lion"))
    args = run_args(root, out)
    args[args.index(root / "questions.jsonl")] = data2
    assert_one_line_error(*cli(args), "questions")
    # a smaller --limit would shrink the finished run (issue 19, defect 1): refused, nothing changes
    assert_one_line_error(*cli(run_args(root, out, "--limit", "5", "--json")), "--limit")
    assert snapshot(out) == before


def test_run_with_opera_records_its_settings_and_the_beam_width(tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "opera"
    rc, stdout, err = cli(run_args(root, out, "--opera", "--opera-candidates", "2", "--num-beams", "2", "--limit",
                                   "2", "--max-new-tokens", "3", "--json"))
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["decoding"] == {"num_beams": 2}
    assert run["methods"]["opera"] == {"scale": 50.0, "threshold": 15, "candidates": 2, "penalty": 1.0,
                                       "num_beams": 2, "window": 512, "rule": "released"}
    # a resume asking for another OPERA setting is refused before anything loads
    assert_one_line_error(*cli(run_args(root, out, "--opera", "--opera-candidates", "3", "--num-beams", "2",
                                        "--limit", "2", "--max-new-tokens", "3")), "methods")


# ---------------------------------------------------------------------------------------------------------------
# score and compare

def test_score_refuses_overlaps_and_reports_missing(tiny, tmp_path):
    root, ref, _ = tiny
    lines = (ref / "answers.jsonl").read_text().splitlines(keepends=True)
    # the same question answered differently in two run directories
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(ref / "run.json", other)
    changed = json.loads(lines[4]) | {"text": "something else"}
    (other / "answers.jsonl").write_text(json.dumps(changed) + "\n")
    assert_one_line_error(*cli(["score", ref, other, "--json"]), changed["question_id"])
    # overlapping with the same text is fine
    (other / "answers.jsonl").write_text(lines[4])
    assert cli(["score", ref, other, "--json"])[1] == cli(["score", ref, "--json"])[1]
    # missing answers: refused without --partial (saying how many), scored with it
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(ref / "run.json", part)
    (part / "answers.jsonl").write_text("".join(lines[:9]))
    assert_one_line_error(*cli(["score", part]), "3 of 12", "--partial")
    rc, stdout, err = cli(["score", part, "--partial", "--json"])
    assert rc == 0 and "3 of 12" in err
    result = json.loads(stdout)
    assert set(result) == {"bench", "n", "metrics"} and result["n"] == 9
    # without --json: a table, one metric per line
    rc, stdout, _ = cli(["score", ref])
    assert rc == 0 and "accuracy" in stdout and "image_accuracy" in stdout and "note" not in stdout


def make_b(tiny, tmp_path, flip: list[int]) -> Path:
    """A copy of the reference run whose answers to the questions at `flip` (file positions) say "Yes"."""
    _, ref, _ = tiny
    b = tmp_path / "b"
    shutil.copytree(ref, b)
    recs = answers(b / "answers.jsonl")
    for k in flip:
        recs[k]["text"] = "Yes"
    (b / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return b


def test_compare(tiny, tmp_path):
    root, ref, _ = tiny
    b = make_b(tiny, tmp_path, [0, 1, 2, 5, 7])
    rc, stdout, err = cli(["compare", ref, b, "--json", "--resamples", "300"])
    assert rc == 0, err
    result = json.loads(stdout)
    assert cli(["compare", ref, b, "--json", "--resamples", "300"])[1] == stdout        # deterministic (seeded)
    assert result["answers_changed"] == 5 and result["n"] == 12 and result["bench"] == "tinyyn"
    score_a = json.loads((ref / "metrics.json").read_text())["metrics"]
    score_b = json.loads(cli(["score", b, "--json"])[1])["metrics"]
    assert set(result["metrics"]) == {"accuracy", "yes_ratio", "image_accuracy", "n"}   # numeric leaves only
    for key, m in result["metrics"].items():
        assert m["a"] == score_a[key] and m["b"] == score_b[key] and m["delta"] == pytest.approx(m["b"] - m["a"])
        lo, hi = m["ci95"]
        assert lo <= m["delta"] <= hi, (key, m)
    assert result["metrics"]["yes_ratio"]["delta"] > 0 and result["metrics"]["yes_ratio"]["ci95"][0] > 0
    assert result["metrics"]["n"]["ci95"] == [0.0, 0.0]
    # another seed: other intervals; a run against itself: zero everywhere
    assert cli(["compare", ref, b, "--json", "--resamples", "300", "--seed", "1"])[1] != stdout
    same = json.loads(cli(["compare", ref, ref, "--json", "--resamples", "50"])[1])
    assert same["answers_changed"] == 0 and all(m["ci95"] == [0.0, 0.0] for m in same["metrics"].values())
    rc, stdout, _ = cli(["compare", ref, b, "--resamples", "50"])
    assert rc == 0 and "answers changed" in stdout and "image_accuracy" in stdout


def test_bootstrap_gives_each_drawn_unit_its_own_copy():
    """Units drawn twice must count twice: with one unit right and one wrong, image_accuracy of a resample is 0,
    0.5 or 1, and the copies keep the two questions of a unit together."""
    from minivar.eval.compare import paired_bootstrap
    qs = [Question(f"q{i}", "p", f"im{i // 2}", load_image=None, unit=f"im{i // 2}", meta={"label": "yes"})
          for i in range(4)]
    a = {"q0": "yes", "q1": "yes", "q2": "no", "q3": "yes"}
    b = {"q0": "yes", "q1": "yes", "q2": "yes", "q3": "yes"}
    seen = []
    bench = TinyYesNo()
    real = bench.score
    bench.score = lambda answered: seen.append(answered) or real(answered)
    m = paired_bootstrap(bench, qs, a, b, resamples=20, seed=0)["image_accuracy"]
    assert (m["a"], m["b"], m["delta"]) == (0.5, 1.0, 0.5)
    for answered in seen[2:]:
        ids = [q.question_id for q, _ in answered]
        assert len(ids) == 4 and len(set(ids)) == 4 and len({q.unit for q, _ in answered}) == 2
        assert all(q.unit.split("#")[0] == f"im{int(q.question_id[1]) // 2}" for q, _ in answered)
    assert 0.0 <= m["ci95"][0] <= m["ci95"][1] <= 1.0


def test_compare_refuses_other_questions(tiny, tmp_path):
    root, ref, _ = tiny
    other = tmp_path / "limited"
    shutil.copytree(ref, other)
    run = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps(run | {"limit": 5}))
    assert_one_line_error(*cli(["compare", ref, other]), "same questions")
    part = make_b(tiny, tmp_path, [])
    (part / "answers.jsonl").write_text("".join((ref / "answers.jsonl").read_text().splitlines(keepends=True)[:3]))
    assert_one_line_error(*cli(["compare", ref, part, "--json"]), "incomplete", "9 of 12")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing written

@pytest.mark.parametrize("change, name", [
    (lambda a, root: a.__setitem__(1, "nosuchbench"), "nosuchbench"),
    (lambda a, root: a.extend(["--shard", "2/2"]), "--shard"),
    (lambda a, root: a.extend(["--shard", "one/2"]), "--shard"),
    (lambda a, root: a.__setitem__(3, root / "missing.jsonl"), "missing.jsonl"),
    (lambda a, root: a.__setitem__(3, root / "images"), "is not a .jsonl"),         # wrong layout: the reader's error
    (lambda a, root: a.extend(["--batch-size", "0"]), "--batch-size"),
    (lambda a, root: a.extend(["--limit", "0"]), "--limit"),
    (lambda a, root: a.extend(["--rho", "0.5"]), "--rho"),                           # VAR flag without --var (run.py)
    (lambda a, root: a.extend(["--var", "--p", "1.5"]), "--p"),
    (lambda a, root: a.extend(["--max-new-tokens", "-1"]), "--max-new-tokens"),
    (lambda a, root: a.extend(["--device", "tpu"]), "tpu"),
    (lambda a, root: a.extend(["--model", root / "no-model"]), "no-model"),
    (lambda a, root: a.extend(["--frobnicate"]), "--frobnicate"),
    (lambda a, root: a.extend(["--max-new-tokens", "0"]), "--max-new-tokens"),       # an empty answer scores "yes"
    (lambda a, root: a.__setitem__(a.index("--out") + 1, str(root / "model" / "config.json" / "sub")), "is a file"),
    (lambda a, root: a.__setitem__(a.index("--out") + 1, "/proc/minivar-out"), "cannot"),   # refused by the kernel
])
def test_bad_run_input(tiny, tmp_path, change, name):
    root, _, _ = tiny
    out = tmp_path / "out"
    args = [str(a) for a in run_args(root, out)]
    change(args, root)
    assert_one_line_error(*cli(args), name)
    assert not out.exists()


def test_bad_score_and_compare_input(tiny, tmp_path):
    root, ref, _ = tiny
    assert_one_line_error(*cli(["score", tmp_path]), "run.json")
    assert_one_line_error(*cli(["score"]), "RUN_DIR")
    assert_one_line_error(*cli(["score", ref, "--answers", ref / "answers.jsonl"]), "--answers")
    assert_one_line_error(*cli(["score", "--bench", "pope", "--data", root]), "--answers")
    assert_one_line_error(*cli(["score", "--bench", "pope", "--data", root, "--answers", tmp_path / "x.jsonl"]), "x.jsonl")
    assert_one_line_error(*cli(["compare", ref]), "RUN_DIR_B")
    bad = tmp_path / "bad"
    shutil.copytree(ref, bad)
    with open(bad / "answers.jsonl", "a") as f:
        f.write("{not json}\n")
    assert_one_line_error(*cli(["score", bad]), "answers.jsonl", "line 13")


# ---------------------------------------------------------------------------------------------------------------
# download

def test_download_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(["download", "pope"])
    line = assert_one_line_error(rc, out, err, "lmms-lab/POPE", "--data")
    assert not (tmp_path / "data").exists(), line


def test_download_fetches_the_hub_copy(tmp_path):
    from minivar.eval.download import download
    calls, messages = [], []

    def snapshot(repo_id, repo_type, local_dir, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        Path(local_dir, "Full").mkdir(parents=True)
        Path(local_dir, "Full", "random-00000-of-00001.parquet").write_bytes(b"x")

    assert download("pope", tmp_path / "p", snapshot=snapshot, log=messages.append) == tmp_path / "p"
    assert calls == [("lmms-lab/POPE", "dataset", ["Full/*", "README.md"])]
    assert "--data " + str(tmp_path / "p") in messages[0]
    # nothing arrived (offline without an error): one clear error, no empty folder left
    with pytest.raises(MinivarError, match="nyu-visionx/CV-Bench"):
        download("cvbench", tmp_path / "c", snapshot=lambda *a, **k: None, log=messages.append)
    assert not (tmp_path / "c").exists()


def test_download_names_official_sources():
    for bench, words in [("chair", "annotations_trainval2014"), ("gqa", "testdev_balanced_questions.json")]:
        rc, out, err = cli(["download", bench])
        assert rc == 1 and words in err and out == ""       # nothing downloaded: not a success (issue 19, 15)


# ---------------------------------------------------------------------------------------------------------------
# Pieces

def test_var_preset_follows_the_benchmark_family():
    from minivar.eval.__main__ import build_parser, var_settings
    parse = build_parser().parse_args
    base = ["run", "tinyyn", "--data", "x", "--out", "y"]
    assert var_settings(parse(base), TinyYesNo()) is None
    assert var_settings(parse(base + ["--var"]), TinyYesNo()).rho == 0.5            # hallucination family
    vision = type("Vision", (TinyYesNo,), {"family": "vision"})()
    assert var_settings(parse(base + ["--var"]), vision).rho == 0.9
    assert var_settings(parse(base + ["--var", "--var-preset", "general"]), vision).rho == 0.8
    cfg = var_settings(parse(base + ["--var", "--rho", "0.3", "--tau", "10", "--sink-dims", "5,7"]), vision)
    assert (cfg.rho, cfg.tau, cfg.sink_dims, cfg.p) == (0.3, 10.0, (5, 7), 0.6)


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)           # import tqdm → ImportError: the plain line
    scored = []
    with harness.cli_logging():       # as the command line prints it (from Python it is logged)
        p = harness.Progress(10, 2, "accuracy", lambda: scored.append(1) or 0.75, score_every_s=60)
        p.update(3, force=True)
        p.update(1)                   # within 5 s and the scoring interval: neither printed nor re-scored
        p.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("minivar: 5/10 questions") and "q/s" in err[0] and "ETA" in err[0]
    assert "accuracy 0.7500" in err[0] and len(scored) == 1


def test_read_answers_rules(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "a"}\n{"question_id": 2, "te')
    assert harness.read_answers(f) == {"1": {"question_id": 1, "text": "a"}}
    assert f.read_text().endswith('"te')                     # read only: the torn tail stays
    harness.read_answers(f, repair=True)
    assert f.read_text().count("\n") == 2 and f.read_text().endswith("}\n")
    f.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n')
    with pytest.raises(MinivarError, match="twice"):
        harness.read_answers(f)
    with pytest.raises(MinivarError, match="not one of"):
        harness.read_answers(f, known_ids={"7"})


# ---------------------------------------------------------------------------------------------------------------
# The real benchmarks (minivar/eval/benchmarks) on real data from ../shared

EVAL_DATA = SHARED / "testdata" / "eval"
needs_eval_data = pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"{EVAL_DATA} not found (shared test data)")


@needs_eval_data
def test_score_answer_file_reproduces_llava_pope():
    """`score --bench pope` on LLaVA-1.5-13B's answers gives eval_pope.py's numbers (mean F1 85.9)."""
    pope = EVAL_DATA / "pope"
    rc, out, err = cli(["score", "--bench", "pope", "--data", *[pope / f"coco_pope_{s}.json" for s in
                                                                 ("adversarial", "random", "popular")],
                        "--questions", pope / "llava_pope_test.jsonl", "--answers", pope / "llava-v1.5-13b-answers.jsonl",
                        "--json"])
    assert rc == 0, err
    result = json.loads(out)
    expected = json.loads((pope / "expected-llava-v1.5-13b.json").read_text())
    assert result["bench"] == "pope" and result["n"] == 8910
    assert result["metrics"]["mean"]["f1"] == expected["mean_f1"]
    for split in ("adversarial", "random", "popular"):
        for key, value in expected[split].items():
            assert result["metrics"][split][key] == value, (split, key)


@needs_eval_data
def test_score_answer_file_must_cover_the_questions(tmp_path):
    pope = EVAL_DATA / "pope"
    part = tmp_path / "answers.jsonl"
    part.write_text("".join((pope / "llava-v1.5-13b-answers.jsonl").read_text().splitlines(keepends=True)[:100]))
    assert_one_line_error(*cli(["score", "--bench", "pope", "--data", pope / "coco_pope_adversarial.json",
                                "--answers", part, "--json"]), "answers.jsonl")


@needs_eval_data
def test_pope_run_end_to_end(tiny, tmp_path):
    """`run pope` on two real POPE splits (8 questions each; the images are stand-ins with COCO's names): one batch
    per image across the splits, metrics per split, and the answer file scores the same through `score --bench`."""
    root, _, _ = tiny
    data = tmp_path / "pope"
    (data / "val2014").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split in ("random", "adversarial"):
        lines = (EVAL_DATA / "pope" / f"coco_pope_{split}.json").read_text().splitlines(keepends=True)[:8]
        (data / f"coco_pope_{split}.json").write_text("".join(lines))
        for line in lines:
            image = data / "val2014" / json.loads(line)["image"]
            if not image.exists():
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    files = [data / "coco_pope_random.json", data / "coco_pope_adversarial.json"]
    out = tmp_path / "run"
    rc, stdout, err = cli(["run", "pope", "--data", *files, "--images", data / "val2014", "--out", out,
                           "--model", root / "model", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2",
                           "--batch-size", "16", "--var", "--tau", "3", "--json"])
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["n"] == 16 and set(result["metrics"]) == {"random", "adversarial", "mean"}
    run = json.loads((out / "run.json").read_text())
    assert run["var"]["rho"] == 0.5 and run["var"]["tau"] == 3.0 and run["max_new_tokens"] == 2   # POPE's preset
    recs = answers(out / "answers.jsonl")
    assert [r["question_id"] for r in recs][:3] == ["10000001", "10000002", "10000003"]     # LLaVA's POPE ids
    assert len({r["image"] for r in recs}) == 2
    rc, stdout, err = cli(["score", "--bench", "pope", "--data", *files, "--answers", out / "answers.jsonl", "--json"])
    assert rc == 0, err
    assert json.loads(stdout) == result
    # the harness (questions of an image on a shared prefix) answers as run.py does, one question alone
    from conftest import run_cli
    for rec in recs[:2] + recs[-1:]:
        rc, stdout, err = run_cli(["--image", str(data / "val2014" / rec["image"]), "--prompt", rec["prompt"],
                                   "--model", str(root / "model"), "--device", "cpu", "--dtype", "float32",
                                   "--max-new-tokens", "2", "--var", "--var-preset", "hallucination", "--tau", "3",
                                   "--json"])
        assert rc == 0, err
        assert json.loads(stdout)["text"] == rec["text"]


@needs_eval_data
def test_mme_run_with_limit(tiny, tmp_path):
    """`run mme` on the real release layout (placeholder images): --limit 4 = two images' question pairs."""
    root, _, _ = tiny
    out = tmp_path / "mme"
    rc, stdout, err = cli(["run", "mme", "--data", EVAL_DATA / "mme" / "MME_Benchmark_release_version", "--out", out,
                           "--model", root / "model", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2",
                           "--limit", "4", "--json"])
    assert rc == 0, err
    result = json.loads(stdout)
    recs = answers(out / "answers.jsonl")
    assert result["n"] == 4 == len(recs) and len({r["image"] for r in recs}) == 2
    assert {"perception", "cognition", "subtasks"} <= set(result["metrics"])
    assert cli(["score", out, "--json"])[1] == stdout


# ---------------------------------------------------------------------------------------------------------------
# VAR's rule, its ablations and the prompt tokenization (issue 13): recorded, resumed only alike, comparable

def test_var_rule_and_prompt_tokenization_are_recorded_and_resumed_alike(tiny, tmp_path):
    root, ref, _ = tiny
    out = tmp_path / "official"
    official = ["--var", "--var-rule", "official", "--sink-dims", "3,7", "--prompt-tokenization", "official"]
    rc, stdout, err = cli(run_args(root, out, *official, "--limit", "4"))
    assert rc == 0, err
    settings = json.loads((out / "run.json").read_text())
    assert settings["prompt_tokenization"] == "official"
    assert (settings["var"]["rule"], settings["var"]["heads"], settings["var"]["rho"]) == ("official", "image-centric", 0.5)
    before = snapshot(out)
    for extra, name in [(["--var", "--sink-dims", "3,7", "--prompt-tokenization", "official"], "var"),
                        (["--var", "--var-rule", "official", "--sink-dims", "3,7"], "prompt_tokenization"),
                        (official + ["--var-heads", "all"], "var"), (official + ["--var-layers", "0-1"], "var")]:
        assert_one_line_error(*cli(run_args(root, out, *extra, "--limit", "4")), out, name)
        assert snapshot(out) == before
    rc, _, err = cli(run_args(root, out, *official))                    # the same settings resume
    assert rc == 0, err
    assert len(answers(out / "answers.jsonl")) == len(answers(ref / "answers.jsonl"))
    rc, stdout, err = cli(["compare", ref, out, "--json", "--resamples", "50"])   # across rules and tokenizations
    assert rc == 0, err
    assert json.loads(stdout)["n"] == len(answers(ref / "answers.jsonl"))


def test_var_rule_flags(monkeypatch):
    from minivar.eval.__main__ import build_parser, var_settings
    monkeypatch.setattr(benchmarks, "get", fake_get, raising=False)
    parse = build_parser().parse_args
    base = ["run", "tinyyn", "--data", "x", "--out", "y"]
    cfg = var_settings(parse(base + ["--var", "--var-rule", "official"]), TinyYesNo())    # hallucination: ρ 0.5
    assert (cfg.rule, cfg.rho, cfg.p, cfg.paper_values()) == ("official", 0.5, 0.6, (0.5, 0.4))
    vision = type("Vision", (TinyYesNo,), {"family": "vision"})()
    assert var_settings(parse(base + ["--var", "--var-rule", "official"]), vision).rho == 0.1   # 1 − 0.9
    cfg = var_settings(parse(base + ["--var", "--var-heads", "all", "--var-layers", "2-4"]), vision)
    assert (cfg.heads, cfg.layers, cfg.rule) == ("all", (2, 3, 4), "paper")
    with pytest.raises(MinivarError, match="--var-rule only applies with --var"):
        var_settings(parse(base + ["--var-rule", "official"]), vision)
    assert_one_line_error(*cli(base + ["--prompt-tokenization", "official", "--conv-mode", "llava_hf"]),
                          "--prompt-tokenization", "--conv-mode")
