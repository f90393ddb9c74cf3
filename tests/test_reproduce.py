"""`minivar-eval reproduce var|damro` on tiny fixtures in the documented data-root layout (docs/eval.md).

The fixtures are the benchmark tests' own writers (tests/test_eval_benchmarks.py: the real formats), moved into the
data root's folders; runs use conftest's tiny checkpoint (16 image tokens) and two-token answers, so the whole paper's
evaluation takes seconds; the --dry-run test also uses the demo checkpoint's size.
"""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from minivar.eval import reproduce
from minivar.eval.compare import flatten
from test_eval_benchmarks import cvbench_rows, write_gqa, write_image, write_jsonl, write_mme, write_mmvp, write_pope
from test_eval_harness import cli



def damro_runs() -> bool:
    """Whether this build can make DAMRO runs: minivar.methods.damro and `run --damro ...` (reproduce's own check)."""
    from minivar.errors import MinivarError
    from minivar.eval.__main__ import build_parser
    if importlib.util.find_spec("minivar.methods.damro") is None:
        return False
    try:
        reproduce.check_method_available(reproduce.PAPERS["damro"], build_parser().run_parser)
    except MinivarError:
        return False
    return True


HAS_DAMRO = damro_runs()


def make_root(root: Path) -> Path:
    """POPE (3 splits, COCO images), MME (every subtask), GQA, MMVP and CV-Bench in the data-root layout; no CHAIR
    annotations (coco/annotations/), so CHAIR is the missing benchmark."""
    write_pope(root / "pope", splits=("adversarial", "random", "popular"))
    (root / "coco").mkdir(parents=True)
    shutil.move(root / "pope" / "val2014", root / "coco" / "val2014")
    write_mme(root / "mme" / "MME_Benchmark_release_version")
    gqa = write_gqa(root / "gqa")
    shutil.move(gqa / "data" / "testdev_balanced_questions.json", gqa / "testdev_balanced_questions.json")
    shutil.move(gqa / "data" / "images", gqa / "images")
    write_mmvp(root / "mmvp")
    two, three = cvbench_rows()
    for name, rows in (("test_2d", two), ("test_3d", three)):
        write_jsonl(root / "cvbench" / f"{name}.jsonl", rows)
        for r in rows:
            write_image(root / "cvbench" / r["filename"])
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("data"))


def files_under(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def args_for(root, out, model, *extra):
    return ["reproduce", "var", "--data-root", root, "--out", out, "--model", model, "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", "2", "--resamples", "50", *extra]


@pytest.fixture(scope="module")
def var_run(data_root, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    rc, stdout, err = cli(args_for(data_root, out, tiny_checkpoint, "--json"))
    assert rc == 0, err
    return out, json.loads(stdout), err


def test_table_equals_the_runs_metrics(var_run):
    out, table, _ = var_run
    benches = ["pope", "mme", "gqa", "mmvp", "cvbench"]
    assert sorted({row["benchmark"] for row in table["rows"]}) == sorted(benches)
    for row in table["rows"]:
        rep = next(r for e in reproduce.PAPERS["var"].entries if e.bench == row["benchmark"] for r in e.reported
                   if r.metric == row["metric"])
        base = json.loads((out / f"{row['benchmark']}-base" / "metrics.json").read_text())
        var = json.loads((out / f"{row['benchmark']}-var" / "metrics.json").read_text())
        assert row["measured"]["base"] == pytest.approx(flatten(base["metrics"])[row["metric"]] * rep.scale)
        assert row["measured"]["method"] == pytest.approx(flatten(var["metrics"])[row["metric"]] * rep.scale)
        assert row["delta"] == pytest.approx(row["measured"]["method"] - row["measured"]["base"])
        assert row["n"] == base["n"] == var["n"]
        assert (row["reported"]["base"], row["reported"]["method"]) == (rep.base, rep.method)
        assert row["reported"]["status"] == "reported, not verified"
        lo, hi = row["ci95"]
        assert lo <= row["delta"] + 1e-9 or hi >= row["delta"] - 1e-9
    # the interval is compare's, on the same two runs (scaled as the paper states the metric)
    rc, stdout, err = cli(["compare", out / "pope-base", out / "pope-var", "--json", "--resamples", "50"])
    assert rc == 0, err
    pope = next(row for row in table["rows"] if row["metric"] == "mean.f1")
    assert pope["ci95"] == pytest.approx([100 * x for x in json.loads(stdout)["metrics"]["mean.f1"]["ci95"]])
    assert table["quick_check"] is True and table["max_new_tokens"] == 2        # two-token answers: said so


def test_runs_are_exactly_the_run_commands(var_run, tmp_path):
    """Every run reproduce makes is printed as its `run` command; that command, given another --out, makes the same
    run (settings, answers, metrics), and the var run is `--var` with the benchmark family's preset."""
    out, _, err = var_run
    commands = [line.split(" run ", 1)[1].split() for line in err.splitlines() if " run " in line
                and line.startswith("minivar: python -m minivar.eval run ")]
    assert len(commands) == 10
    argv = next(c for c in commands if c[0] == "mmvp" and "--var" in c)
    at = argv.index("--out")
    assert Path(argv[at + 1]) == out / "mmvp-var"
    again = tmp_path / "again"
    rc, _, e = cli(["run", *argv[:at + 1], again, *argv[at + 2:]])
    assert rc == 0, e
    ran = out / "mmvp-var"
    assert (again / "answers.jsonl").read_text() == (ran / "answers.jsonl").read_text()
    assert (again / "metrics.json").read_text() == (ran / "metrics.json").read_text()
    settings = json.loads((ran / "run.json").read_text())
    assert settings["var"]["rho"] == 0.9 and settings["max_new_tokens"] == 2 and settings["limit"] is None
    assert json.loads((out / "pope-var" / "run.json").read_text())["var"]["rho"] == 0.5
    assert json.loads((out / "mme-var" / "run.json").read_text())["var"]["rho"] == 0.8
    assert json.loads((out / "pope-base" / "run.json").read_text())["var"] is None


def test_rerun_resumes_and_prints_the_table(var_run, data_root, tiny_checkpoint):
    out, table, _ = var_run
    before = files_under(out)
    rc, stdout, err = cli(args_for(data_root, out, tiny_checkpoint))
    assert rc == 0, err
    assert "loaded" not in err                       # every run was complete: nothing asked again
    assert files_under(out) == before
    lines = stdout.splitlines()
    assert lines[0].startswith("reproduce var: ")
    assert any("--max-new-tokens 2" in line and "NOT comparable" in line for line in lines)
    header = next(line for line in lines if line.startswith("benchmark"))
    assert "reported base → VAR" in header and "measured base → VAR" in header and "95% CI" in header
    row = next(line for line in lines if line.startswith("pope"))
    pope = next(r for r in table["rows"] if r["metric"] == "mean.f1")
    assert "85.90 → 86.53" in row and f"{pope['measured']['base']:.2f} → {pope['measured']['method']:.2f}" in row
    assert row.split()[-1] == str(pope["n"])
    assert any(line.startswith("reported: VAR paper") and "reported, not verified" in line for line in lines)


def test_missing_benchmark_is_one_line_and_the_others_run(var_run):
    out, table, err = var_run
    (chair,) = [s for s in table["skipped"] if s["benchmark"] == "chair"]
    assert "instances_val2014.json" in chair["reason"] and "cocodataset.org" in chair["reason"]
    lines = [line for line in err.splitlines() if "chair" in line]
    assert len(lines) == 1 and lines[0].endswith("; skipped") and "instances_val2014.json" in lines[0]
    assert not (out / "chair-base").exists()
    assert all((out / f"{b}-{s}" / "metrics.json").is_file() for b in ("pope", "mme", "gqa", "mmvp", "cvbench")
               for s in ("base", "var"))


def test_dry_run_makes_nothing(data_root, tiny_checkpoint, demo_env, tmp_path):
    out = tmp_path / "runs"
    before = files_under(data_root)
    rc, stdout, err = cli(["reproduce", "var", "--data-root", data_root, "--out", out, "--model", "demo",
                           "--device", "cpu", "--dry-run"])
    assert rc == 0, err
    assert not out.exists() and files_under(data_root) == before and not list(tmp_path.iterdir())
    assert "loaded" not in err
    assert "nothing is made" in stdout
    assert "pope: found" in stdout and "12 questions" in stdout.split("pope: found")[1].splitlines()[0]
    assert "missing: chair: missing" in stdout and "instances_val2014.json" in stdout
    assert stdout.count("python -m minivar.eval run ") == 10 and "at best" in stdout
    rc, stdout, err = cli(["reproduce", "var", "--data-root", data_root, "--out", out, "--model", tiny_checkpoint,
                           "--device", "cpu", "--dry-run", "--json", "--limit", "2", "--benchmarks", "pope,mmvp"])
    assert rc == 0, err
    plan = json.loads(stdout)
    assert not out.exists()
    assert [p["benchmark"] for p in plan["found"]] == ["pope", "mmvp"] and plan["missing"] == []
    assert plan["limit"] == 2 and all(p["questions"] == 2 for p in plan["found"])
    from safetensors.torch import load_file
    assert plan["model_params"] == sum(t.numel() for t in load_file(tiny_checkpoint / "model.safetensors").values())
    for item in plan["found"]:
        base, var = item["runs"]
        assert base["estimated_s"] > 0 and var["estimated_s"] > base["estimated_s"]     # VAR costs more
        assert "--limit 2" in base["command"] and var["command"].endswith("--var")


def test_limit_is_said_loudly(data_root, tiny_checkpoint, tmp_path):
    out = tmp_path / "quick"
    rc, stdout, err = cli(args_for(data_root, out, tiny_checkpoint, "--limit", "3", "--benchmarks", "pope"))
    assert rc == 0, err
    assert "--limit 3" in stdout.splitlines()[1] and "QUICK CHECK" in stdout and "NOT comparable" in stdout
    assert json.loads((out / "pope-var" / "run.json").read_text())["limit"] == 3
    assert json.loads((out / "pope-var" / "metrics.json").read_text())["n"] == 3
    rc, stdout, err = cli(args_for(data_root, out, tiny_checkpoint, "--limit", "3", "--benchmarks", "pope", "--json"))
    assert rc == 0, err
    table = json.loads(stdout)
    assert table["limit"] == 3 and table["quick_check"] and {r["n"] for r in table["rows"]} == {3}


def test_bad_input_is_one_line(data_root, tmp_path):
    out = tmp_path / "x"
    assert_one_line_error(*cli(["reproduce", "var", "--data-root", data_root, "--out", out, "--benchmarks",
                                "pope,vizwiz"]), "--benchmarks", "vizwiz")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, stdout, err = cli(["reproduce", "var", "--data-root", empty, "--out", out, "--benchmarks", "gqa"])
    assert rc == 2 and stdout == "" and err.splitlines()[-1].startswith("minivar: error: no data")
    assert "llava_gqa_testdev_balanced.jsonl" in err.splitlines()[0]
    assert_one_line_error(*cli(["reproduce", "var", "--data-root", tmp_path / "nope", "--out", out]), "--data-root")
    for flags, name in ((["--device", "tpu"], "tpu"), (["--batch-size", "0"], "--batch-size"),
                        (["--max-new-tokens", "0"], "--max-new-tokens"), (["--shard", "3/2"], "--shard"),
                        (["--limit", "0"], "--limit")):
        assert_one_line_error(*cli(["reproduce", "var", "--data-root", data_root, "--out", out, *flags]), name)
    assert not out.exists()


def test_var_settings_follow_the_harness_presets():
    from minivar.eval.benchmarks import get
    from minivar.methods.var import VARConfig
    for entry in reproduce.PAPERS["var"].entries:
        family = get(entry.bench).family
        assert entry.setting == f"{family} preset ρ {VARConfig.preset(family).rho}"
        assert entry.method_flags == ("--var",) and entry.base_flags == ()
    assert [e.bench for e in reproduce.PAPERS["var"].entries] == ["pope", "chair", "mme", "gqa", "mmvp", "cvbench"]


@pytest.mark.skipif(HAS_DAMRO, reason="this build makes DAMRO runs: they are tested instead")
def test_damro_unavailable_is_one_line(data_root, tmp_path):
    line = assert_one_line_error(*cli(["reproduce", "damro", "--data-root", data_root, "--out", tmp_path / "d"]))
    assert "DAMRO is not available in this build" in line
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(not HAS_DAMRO, reason="no DAMRO runs in this build (minivar.methods.damro and run --damro ...)")
def test_damro_runs_pass_its_settings(data_root, tmp_path):
    rc, stdout, err = cli(["reproduce", "damro", "--data-root", data_root, "--out", tmp_path / "d", "--device", "cpu",
                           "--dry-run", "--json"])
    assert rc == 0, err
    plan = {p["benchmark"]: p["runs"] for p in json.loads(stdout)["found"]}
    assert set(plan) == {"pope", "mme"}
    sampled = "--conv-mode llava_v1 --prompt-tokenization damro --image-aspect-ratio crop --temperature 1 --seed 42"
    assert plan["pope"][0]["command"].endswith(sampled) and plan["mme"][0]["command"].endswith(sampled)
    assert plan["pope"][1]["command"].endswith(f"--damro --damro-alpha 0.5 --damro-beta 0.1 --damro-topk 4 {sampled}")
    assert plan["mme"][1]["command"].endswith(f"--damro --damro-alpha 2 --damro-beta 0.1 --damro-topk 10 {sampled}")


def test_documented_eval_commands_parse():
    """Every `minivar-eval ...` line of the README's and docs' bash blocks is one the command line accepts."""
    import shlex

    from minivar.eval.__main__ import build_parser
    from test_readme import DOCS, blocks
    found = [shlex.split(line, comments=True) for block in blocks("bash", DOCS)
             for line in block.replace("\\\n", " ").splitlines()]
    found = [words[1:] for words in found if words and words[0] == "minivar-eval"]
    assert any(w[0] == "reproduce" for w in found)
    for argv in found:
        build_parser().parse_args(argv)            # an unknown or malformed flag exits 2


def test_notes_speak_only_of_what_ran(tmp_path):
    """`reproduce damro --benchmarks pope` prints no note about CHAIR's protocol or MME's subset; a run of all
    three prints them all; a reproduce where nothing ran prints none."""
    import argparse
    paper = reproduce.PAPERS["damro"]
    entries = {e.bench: e for e in paper.entries}
    args = argparse.Namespace(paper="damro", out=str(tmp_path), model="demo", limit=None, max_new_tokens=None,
                              resamples=10)

    def notes(*benches):
        return reproduce.make_table(args, paper, [entries[b] for b in benches], [])["notes"]

    pope = notes("pope")
    assert pope and not any("CHAIR" in n or "MME" in n for n in pope)
    assert any("sample" in n for n in pope)                                     # the notes about every run stay
    assert len(notes("pope", "chair", "mme")) == len(paper.notes)
    assert any("CHAIR" in n for n in notes("chair")) and notes() == []
    var_notes = reproduce.make_table(argparse.Namespace(**{**vars(args), "paper": "var"}), reproduce.PAPERS["var"],
                                     [e for e in reproduce.PAPERS["var"].entries if e.bench == "mme"], [])["notes"]
    assert var_notes and not any("CHAIR" in n for n in var_notes)
