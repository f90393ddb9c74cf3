"""The evaluation side of the fresh-eyes trial (issue 19, section 2): each test here failed before its fix.

Runs use test_eval_harness's tiny benchmark and checkpoint (its `tiny` fixture: one finished reference run).
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest

from conftest import assert_one_line_error
from minivar.eval import harness
from test_eval_benchmarks import write_mme, write_pope
from test_eval_harness import N_IMAGES, PER_IMAGE, REPO, answers, cli, make_b, run_args, snapshot, tiny  # noqa: F401

DOCS = REPO / "docs"


# ---------------------------------------------------------------------------------------------------------------
# 1. A finished run never shrinks

def test_a_finished_run_never_shrinks(tiny, tmp_path):
    root, ref, _ = tiny
    out = tmp_path / "full"
    shutil.copytree(ref, out)
    before = snapshot(out)
    line = assert_one_line_error(*cli(run_args(root, out, "--limit", "4")), "--limit", out)
    assert "12 questions" in line and "shrink" in line
    assert snapshot(out) == before                          # run.json and metrics.json keep the 12
    assert cli(["compare", ref, out, "--json", "--resamples", "20"])[0] == 0
    # a limited run may grow, and then not shrink back
    part = tmp_path / "part"
    assert cli(run_args(root, part, "--limit", "6"))[0] == 0
    assert cli(run_args(root, part, "--limit", "3"))[0] == 2
    rc, _, err = cli(run_args(root, part, "--limit", "8", "--json"))
    assert rc == 0, err
    assert json.loads((part / "metrics.json").read_text())["n"] == 8 == len(answers(part / "answers.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# 8. Help texts, and usage lines that name the command used

def help_of(*argv) -> str:
    rc, out, err = cli([*argv, "--help"])
    assert rc == 0, err
    return out


def test_help_texts():
    run = " ".join(help_of("run").split())
    assert "default llava-hf/llava-1.5-7b-hf, a 14 GB download" in run
    for words in ("--conv-mode {vicuna_v1,llava_hf,llava_v1,mistral_instruct,qwen,qwen3,internvl} prompt template",
                  "--image-aspect-ratio {pad,crop,anyres,smart_resize,tiles} pad:",
                  "POPE, MME, GQA 128; CHAIR, MMVP, CV-Bench 512", "--dtype {auto,float32,float16,bfloat16} auto",
                  "first N questions, in the order the data files list them"):
        assert words in run, words
    score = " ".join(help_of("score").split())
    assert "--data PATH [PATH ...] with --bench:" in score and "--answers FILE with --bench:" in score
    compare = " ".join(help_of("compare").split())
    assert "95%%" not in compare and "95% paired" in compare
    assert "(default 1000)" in compare and "(default 0)" in compare


def test_usage_names_the_command_used(tmp_path):
    from minivar.eval.__main__ import prog_name
    assert prog_name("/venv/bin/minivar-eval") == "minivar-eval"
    assert prog_name("/repo/minivar/eval/__main__.py") == "python -m minivar.eval"
    # the installed script's name, as a console-script wrapper runs it
    script = tmp_path / "minivar-eval"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom minivar.eval.__main__ import main\n"
                      "sys.exit(main())\n")
    got = subprocess.run([sys.executable, str(script), "compare", "--help"], capture_output=True, text=True)
    assert got.returncode == 0 and got.stdout.startswith("usage: minivar-eval compare")
    got = subprocess.run([sys.executable, "-m", "minivar.eval", "run", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert got.stdout.startswith("usage: python -m minivar.eval run")


# ---------------------------------------------------------------------------------------------------------------
# 13. torchrun without CUDA: --device auto is the CPU

def test_torchrun_without_cuda_runs_on_the_cpu(tiny, tmp_path, monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert harness.run_device("auto", env, cuda=False) == "cpu"
    assert harness.run_device("auto", env, cuda=True) == "cuda:1"
    assert harness.run_device("cuda", env, cuda=False) == "cuda:1"       # asked for: its own error then
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    root, _, _ = tiny
    args = [a for a in run_args(root, tmp_path / "r") if a not in ("--device", "cpu")]
    rc, _, err = cli(args)
    assert rc == 0, err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["device"] == "cpu"


# ---------------------------------------------------------------------------------------------------------------
# 14. SIGTERM says how to resume; a resume says what it kept

def test_sigterm_says_how_to_resume_and_the_resume_says_what_it_kept(tiny, tmp_path, demo_env):
    root, ref, _ = tiny
    out = tmp_path / "termed"
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
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.decode().splitlines()[-1] == "minivar: terminated (SIGTERM): rerun the same command to resume"
    kept = file.read_bytes().count(b"\n")
    assert 2 <= kept < N_IMAGES * PER_IMAGE
    rc, _, err = cli(run_args(root, out, "--batch-size", "1"))
    assert rc == 0, err
    assert f"kept the {kept} answers in answers.jsonl;" in err and "dropped" not in err
    assert len(answers(file)) == N_IMAGES * PER_IMAGE


def test_resume_says_it_dropped_a_torn_line(tiny, tmp_path):
    root, ref, _ = tiny
    out = tmp_path / "torn"
    shutil.copytree(ref, out)
    (out / "metrics.json").unlink()
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:4]) + lines[4][:17])
    rc, _, err = cli(run_args(root, out))
    assert rc == 0, err
    (said,) = [line for line in err.splitlines() if "resuming" in line]
    assert "kept the 4 answers" in said and "dropped a line cut off by a kill" in said


# ---------------------------------------------------------------------------------------------------------------
# 15. download gqa / chair: nothing downloaded, exit non-zero

@pytest.mark.parametrize("bench, words", [("chair", "annotations_trainval2014"),
                                          ("gqa", "testdev_balanced_questions.json")])
def test_download_without_a_hub_copy_exits_non_zero(bench, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(["download", bench])
    assert rc == 1 and out == "" and words in err and "nothing was downloaded" in err
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------------------------
# 16. Input errors that teach; MME with a subset of its subtasks

@pytest.mark.parametrize("indent", [None, 2])
def test_pope_json_array_says_one_object_per_line(tmp_path, indent):
    root = write_pope(tmp_path)
    path = root / "coco_pope_random.json"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text(json.dumps(records, indent=indent))
    line = assert_one_line_error(*cli(["run", "pope", "--data", path, "--images", root / "val2014",
                                       "--out", tmp_path / "out", "--model", "demo"]), "coco_pope_random.json:1")
    assert "JSON array" in line and "one JSON object per line" in line


def test_mme_with_a_subset_of_subtasks_runs_with_a_warning(tiny, tmp_path):
    root, _, _ = tiny
    mme = write_mme(tmp_path / "MME_Benchmark_release_version")
    for task in ("landmark", "OCR", "code_reasoning"):
        shutil.rmtree(mme / task)
    out = tmp_path / "mme"
    rc, stdout, err = cli(["run", "mme", "--data", mme, "--out", out, "--model", root / "model", "--device", "cpu",
                           "--dtype", "float32", "--max-new-tokens", "2", "--json"])
    assert rc == 0, err
    (warning,) = [line for line in err.splitlines() if "warning" in line]
    assert warning.startswith("minivar: warning: ") and "3 of the 14" in warning and "landmark, OCR, code_reasoning" in warning
    result = json.loads(stdout)
    assert result["n"] == 22 and set(result["metrics"]["subtasks"]) == {"existence", "count", "position", "color",
                                                                         "posters", "celebrity", "scene", "artwork",
                                                                         "commonsense_reasoning", "numerical_calculation",
                                                                         "text_translation"}


def test_docs_name_the_pope_files_and_the_mme_layout():
    text = (DOCS / "eval.md").read_text()
    assert "coco_pope_<split>.json" in text
    for part in ("MME_Benchmark_release_version/", "questions_answers_YN/", "images/", "<id>.txt"):
        assert part in text, part


# ---------------------------------------------------------------------------------------------------------------
# 17. Small slips: plurals; library messages through logging, not printed

def test_one_answer_changed_is_singular(tiny, tmp_path):
    _, ref, _ = tiny
    recs = answers(ref / "answers.jsonl")
    flipped = [k for k, r in enumerate(recs) if r["text"] != "Yes"][:2]     # answers that "Yes" does change
    rc, stdout, err = cli(["compare", ref, make_b(tiny, tmp_path, flipped[:1]), "--resamples", "20"])
    assert rc == 0, err
    assert "12 questions, 1 answer changed;" in stdout
    rc, stdout, _ = cli(["compare", ref, make_b(tiny, tmp_path / "2", flipped), "--resamples", "20"])
    assert "12 questions, 2 answers changed;" in stdout


def test_library_messages_are_logged_not_printed(tiny, tmp_path, capsys, caplog):
    """From Python, harness.run prints nothing with a `minivar:` prefix: its messages go to the "minivar.eval"
    logger (and warnings to the warnings module); the command line prints them as before."""
    root, _, _ = tiny
    bench = harness.get_benchmark("tinyyn")
    with caplog.at_level(logging.INFO, logger="minivar.eval"):
        result = harness.run(bench, [root / "questions.jsonl"], tmp_path / "py", images=root / "images",
                             model=str(root / "model"), device="cpu", dtype="float32", batch_size=2)
    assert result["n"] == 12
    captured = capsys.readouterr()
    assert "minivar:" not in captured.err and captured.out == ""
    said = [r.getMessage() for r in caplog.records if r.name == "minivar.eval"]
    assert any(m.startswith("loaded ") for m in said) and any(m.startswith("12 answers in") for m in said)
    assert not any(m.startswith("minivar:") for m in said)
    mme = write_mme(tmp_path / "MME_Benchmark_release_version")
    shutil.rmtree(mme / "scene")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        harness.get_benchmark("mme").read([mme], need_images=False)
    assert [str(w.message) for w in caught if "scene" in str(w.message)]
    assert "minivar:" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 18. CHAIR figures are not comparable: said where the numbers are

def test_chair_figures_say_they_are_not_comparable():
    for path in (DOCS / "eval.md", REPO / "README.md"):
        rows = [line for line in path.read_text().splitlines() if "CHAIR_S" in line and "45.0" in line]
        assert rows, path
        for row in rows:
            assert "not comparable" in row, (path, row)


# ---------------------------------------------------------------------------------------------------------------
# 9. The README: one current comparison with its command; history in docs/performance.md; nothing a user cannot act on

def test_readme_states_one_current_comparison():
    import re
    readme = (REPO / "README.md").read_text()
    perf = readme.split("## Performance", 1)[1].split("\n## ", 1)[0]
    assert "python bench/bench.py" in perf
    decode = [line for line in perf.splitlines() if line.startswith("| decode |")]
    assert len(decode) == 1                                 # one comparison, not two contradicting tables
    minivar_rates = set(re.findall(r"minivar (\d+(?:\.\d+)?) tok/s", perf)) | {decode[0].split("|")[2].strip()}
    assert len(minivar_rates) == 1, minivar_rates
    history = (DOCS / "performance.md").read_text()
    assert "16.5 tok/s" in history and "16.5 tok/s" not in readme and "9.9 tok/s" not in readme
    for remark in ("../shared", "this project's machine", "the project's machine", "morning", "on this VM"):
        assert remark not in readme, remark


def test_sigterm_inside_an_except_exception_still_ends_the_run(tiny, tmp_path, monkeypatch):
    """The signal may arrive while code that catches Exception runs (the progress line scores partial answers in a
    try/except Exception): the run still ends with 143 and the resume hint, not carry on and exit 0."""
    import os
    import signal

    from minivar.eval import harness
    root, _, _ = tiny
    real = harness.headline_of
    fired = []

    def headline_of(bench, answered):
        if answered and not fired:
            fired.append(1)
            try:
                os.kill(os.getpid(), signal.SIGTERM)       # delivered here, inside headline_of's except Exception
                return real(bench, answered)
            except Exception:                              # what the harness's own handler does
                return None
        return real(bench, answered)

    monkeypatch.setattr(harness, "headline_of", headline_of)
    out = tmp_path / "termed"
    rc, _, err = cli(run_args(root, out, "--batch-size", "1"))
    assert fired and rc == 143, err
    assert err.strip().splitlines()[-1] == "minivar: terminated (SIGTERM): rerun the same command to resume"
    assert 1 <= len(answers(out / "answers.jsonl")) < N_IMAGES * PER_IMAGE
