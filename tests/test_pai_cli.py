"""PAI everywhere: the command line (--pai flags, --json's key, the status line, bad values as one line), the harness
(run.json records every setting, a resume refuses a change), the lmms-eval plugin (pai= model args) and the
pictures (attention.json's "pai": the image-key scores before and after the step). On the demo checkpoint."""
import json

import pytest

from conftest import assert_one_line_error, run_cli
from minivar.methods.pai import PAI, PAIConfig

IMAGE = "assets/example.jpg"
PROMPT = "Is there a cat in the image?"
BASE = ["--image", IMAGE, "--prompt", PROMPT, "--model", "demo", "--max-new-tokens", "3", "--dtype", "float32",
        "--device", "cpu", "--conv-mode", "llava_hf"]


def json_run(*flags):
    rc, out, err = run_cli(BASE + ["--json", *flags])
    assert rc == 0, err
    return json.loads(out), err


def test_pai_flags_give_the_methods_answer_and_report(demo_env, demo_pipe):
    record, err = json_run("--pai", "--pai-alpha", "1.5", "--pai-layers", "1-3", "--pai-gamma", "2")
    cfg = PAIConfig(alpha=1.5, layers=(1, 3), gamma=2.0)
    expected = demo_pipe.generate(IMAGE, PROMPT, max_new_tokens=3, conv_mode="llava_hf", methods=[PAI(cfg)])
    assert record["output_ids"] == expected.output_ids
    assert record["pai"] == cfg.settings() | {"layers_edited": [1, 3]}
    assert "minivar: PAI: image keys' scores a + α·|a|, α 1.5, in layers 1..2; guidance γ 2" in err
    record, _ = json_run("--pai")                                   # the released defaults, clipped to 4 layers
    assert record["pai"] == {"alpha": 0.2, "layers": [2, 32], "gamma": 1.1, "first_token": "unedited",
                             "layers_edited": [2, 4]}
    both, _ = json_run("--var", "--sink-dims", "37,301", "--pai", "--pai-first-token", "edited")
    assert set(both) >= {"var", "pai"} and both["pai"]["first_token"] == "edited"
    beams, _ = json_run("--pai", "--pai-gamma", "1", "--num-beams", "2")    # the attention step alone: in beams
    assert beams["pai"]["gamma"] == 1.0 and beams["num_beams"] == 2


@pytest.mark.parametrize("flags, names", [
    (["--pai", "--pai-gamma", "0.5"], ["--pai-gamma"]),
    (["--pai", "--pai-alpha", "-1"], ["--pai-alpha"]),
    (["--pai", "--pai-layers", "8-3"], ["--pai-layers"]),
    (["--pai", "--pai-layers", "two"], ["--pai-layers"]),
    (["--pai", "--pai-layers", "4-32"], ["--pai-layers", "4 layers"]),     # past the model's depth
    (["--pai-alpha", "1"], ["--pai-alpha", "--pai"]),
    (["--pai", "--vcd"], ["--pai", "--vcd"]),
    (["--pai", "--damro"], ["--pai", "--damro"]),
    (["--pai", "--opera"], ["--opera", "--pai", "--pai-gamma"]),             # its guidance branch: no beams
    (["--pai", "--num-beams", "2"], ["beam search", "PAI's guidance"]),
])
def test_bad_pai_flags_are_one_line(demo_env, flags, names):
    assert_one_line_error(*run_cli(BASE + flags), *names)


def test_the_harness_records_pai_and_resumes_only_alike(demo_env, tmp_path):
    import test_eval_harness as th
    from minivar.eval import benchmarks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmarks, "get", th.fake_get, raising=False)
        root = th.make_data(tmp_path / "data", n_images=1, per_image=2)
        args = ["run", "tinyyn", "--data", root / "questions.jsonl", "--images", root / "images", "--out",
                tmp_path / "run", "--model", "demo", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2",
                "--pai", "--pai-gamma", "1.5"]
        rc, out, err = th.cli(args)
        assert rc == 0, err
        run = json.loads((tmp_path / "run" / "run.json").read_text())
        assert run["methods"] == {"pai": {"alpha": 0.2, "layers": [2, 32], "gamma": 1.5, "first_token": "unedited"}}
        rc, out, err = th.cli(args)                                      # the same settings: resumed, nothing new
        assert rc == 0, err
        for more in (["--pai-alpha", "0.3"], ["--pai-first-token", "edited"], ["--pai-layers", "1-3"]):
            rc, out, err = th.cli(args + more)
            assert rc == 2 and "methods" in err, more


def test_the_plugin_takes_pai_model_args(demo_weights, demo_pipe):
    pytest.importorskip("lmms_eval")
    from minivar.errors import MinivarError
    from minivar.lmms_plugin import Minivar
    lm = Minivar(pretrained="demo", device="cpu", dtype="float32", weights_dir=str(demo_weights), pai=True,
                 pai_layers="1-3", pai_gamma=2.0, pai_alpha=1.0)
    assert [m.name for m in lm.methods] == ["pai"]
    assert lm.methods[0].config == PAIConfig(alpha=1.0, layers=(1, 3), gamma=2.0)
    with pytest.raises(MinivarError, match="--model_args pai_gamma"):
        Minivar(pretrained="demo", device="cpu", dtype="float32", weights_dir=str(demo_weights), pai=True,
                pai_gamma=0.2)


def test_attention_json_holds_pais_scores_before_and_after(demo_env, tmp_path):
    out = tmp_path / "pics"
    rc, stdout, err = run_cli(BASE + ["--json", "--save-attention", str(out), "--pai", "--pai-layers", "1-3",
                                      "--pai-alpha", "0.5", "--pai-gamma", "1.5"])
    assert rc == 0, err
    record = json.loads(stdout)
    numbers = json.loads((out / "attention.json").read_text())
    pai = numbers["pai"]
    assert "scores" not in record["pai"] and {k: v for k, v in pai.items() if k != "scores"} == record["pai"]
    assert set(pai["scores"]) == {"1", "2"}
    n_image = numbers["image_span"][1] - numbers["image_span"][0]
    for layer in ("1", "2"):
        s = pai["scores"][layer]
        assert s["rows"] == 2                  # the released rule: the 2nd and 3rd tokens' rows (not the 1st)
        assert len(s["before"]) == len(s["after"]) == n_image
        for a, b in zip(s["before"], s["after"]):      # a + 0.5·|a| (rounded to 5 places; a mean over heads)
            assert b >= a - 1e-4
        assert max(b - a for a, b in zip(s["before"], s["after"])) > 1e-3
