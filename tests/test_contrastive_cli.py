"""DAMRO and VCD on the command lines: the flags, --json's keys, composition with VAR, the harness's run.json and
resume rule, and every bad value as one line."""
import json

import pytest

from conftest import assert_one_line_error, run_cli
from minivar.methods.damro import DAMRO, DAMROConfig
from minivar.methods.vcd import VCD, VCDConfig

IMAGE = "assets/example.jpg"
PROMPT = "Is there a cat in the image?"
BASE = ["--image", IMAGE, "--prompt", PROMPT, "--model", "demo", "--max-new-tokens", "3", "--dtype", "float32",
        "--device", "cpu", "--conv-mode", "llava_hf"]


def json_run(*flags):
    rc, out, err = run_cli(BASE + ["--json", *flags])
    assert rc == 0, err
    return json.loads(out), err


def test_damro_flags_give_the_methods_answer_and_report(demo_env, demo_pipe):
    record, err = json_run("--damro", "--damro-preset", "pope")
    damro = record["damro"]
    assert (damro["alpha"], damro["beta"], damro["topk"]) == (0.5, 0.1, 4)
    assert len(damro["outliers"]) == 4 and len(set(damro["outliers"])) == 4
    assert all(0 <= i < 576 for i in damro["outliers"])
    expected = demo_pipe.generate(IMAGE, PROMPT, max_new_tokens=3, conv_mode="llava_hf",
                                  methods=[DAMRO(DAMROConfig.preset("pope"))])
    assert record["output_ids"] == expected.output_ids and damro == expected.reports["damro"]
    assert f"minivar: DAMRO: ViT outlier patches {','.join(map(str, damro['outliers']))} (k 4)" in err
    record, _ = json_run("--damro", "--damro-preset", "pope", "--damro-alpha", "1.5", "--damro-topk", "6")
    assert (record["damro"]["alpha"], record["damro"]["topk"]) == (1.5, 6)      # a flag beats the preset


def test_vcd_flags_and_composition_with_var(demo_env, demo_pipe):
    record, _ = json_run("--vcd", "--seed", "3")
    assert record["vcd"] == {"alpha": 1.0, "beta": 0.1, "noise_step": 500}
    expected = demo_pipe.generate(IMAGE, PROMPT, max_new_tokens=3, conv_mode="llava_hf",
                                  methods=[VCD(VCDConfig(), seed=3)])
    assert record["output_ids"] == expected.output_ids
    both, _ = json_run("--var", "--sink-dims", "37,301", "--damro")
    assert set(both) >= {"var", "damro"} and both["damro"]["topk"] == 10


@pytest.mark.parametrize("flags, names", [
    (["--damro", "--damro-beta", "0"], ["--damro-beta"]),
    (["--damro", "--damro-beta", "1.5"], ["--damro-beta"]),
    (["--damro", "--damro-alpha", "-1"], ["--damro-alpha"]),
    (["--damro", "--damro-topk", "0"], ["--damro-topk"]),
    (["--damro", "--damro-topk", "5000"], ["--damro-topk", "576"]),     # more than the image's patches
    (["--damro-alpha", "1"], ["--damro-alpha", "--damro"]),
    (["--vcd", "--vcd-noise-step", "1000"], ["--vcd-noise-step"]),
    (["--vcd-beta", "0.2"], ["--vcd-beta", "--vcd"]),
    (["--damro", "--vcd"], ["--damro", "--vcd"]),
])
def test_bad_contrastive_flags_are_one_line(demo_env, flags, names):
    assert_one_line_error(*run_cli(BASE + flags), *names)


def test_the_harness_records_damro_and_resumes_only_alike(demo_env, tmp_path):
    import test_eval_harness as th
    from minivar.eval import benchmarks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmarks, "get", th.fake_get, raising=False)
        root = th.make_data(tmp_path / "data", n_images=1, per_image=2)
        args = ["run", "tinyyn", "--data", root / "questions.jsonl", "--images", root / "images", "--out",
                tmp_path / "run", "--model", "demo", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2",
                "--damro", "--damro-preset", "pope"]
        rc, out, err = th.cli(args)
        assert rc == 0, err
        run = json.loads((tmp_path / "run" / "run.json").read_text())
        assert run["methods"] == {"damro": {"alpha": 0.5, "beta": 0.1, "topk": 4}} and run["var"] is None
        rc, out, err = th.cli(args[:-1] + ["chair"])             # another preset: another run
        assert rc == 2 and "methods" in err and "--damro" not in out
        rc, out, err = th.cli(args + ["--temperature", "1", "--seed", "42"])      # sampling is answer-changing
        assert rc == 2 and "decoding" in err


def test_contrastive_runs_load_the_decoder_for_two_row_steps(demo_env, tmp_path, monkeypatch):
    """--damro / --vcd (CLI and harness) ask the loader for the contrastive layout (packed decoder weights on a CPU
    in bf16, models/packed.py); a run without them does not. The answers are checked equal in test_packed.py."""
    import minivar
    import test_eval_harness as th
    from minivar.eval import benchmarks
    real, asked = minivar.load, []

    def recording_load(*args, **kwargs):
        asked.append(kwargs.get("contrastive", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(minivar, "load", recording_load)
    for flags, contrastive in ((["--damro"], True), (["--vcd"], True), ([], False), (["--var", "--sink-dims", "37,301"], False)):
        rc, out, err = run_cli(BASE + flags)
        assert rc == 0, err
        assert asked[-1] is contrastive, flags
    monkeypatch.setattr(benchmarks, "get", th.fake_get, raising=False)
    root = th.make_data(tmp_path / "data", n_images=1, per_image=2)
    for i, (flags, contrastive) in enumerate(((["--vcd"], True), ([], False))):
        rc, out, err = th.cli(["run", "tinyyn", "--data", root / "questions.jsonl", "--images", root / "images",
                               "--out", tmp_path / f"run{i}", "--model", "demo", "--device", "cpu", "--dtype",
                               "float32", "--max-new-tokens", "2", *flags])
        assert rc == 0, err
        assert asked[-1] is contrastive, flags
