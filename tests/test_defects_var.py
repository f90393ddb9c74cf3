"""Issue 19's defects on the VAR side, each pinned by a test that failed before its fix."""
import json

import pytest
from PIL import Image

import minivar
from conftest import assert_one_line_error, run_cli
from minivar.flags import methods_from_options, var_of
from minivar.methods.var import VARConfig

IMAGE = "assets/example.jpg"
PROMPT = "What is in the image?"
BASE = ["--image", IMAGE, "--prompt", PROMPT, "--model", "demo", "--max-new-tokens", "2", "--conv-mode", "llava_hf",
        "--dtype", "float32", "--device", "cpu"]


def test_sink_dims_auto_serves_the_pictures_without_var(demo_env, tmp_path):      # defect 2
    rc, out, err = run_cli(BASE + ["--sink-dims", "auto", "--save-attention", tmp_path / "pics", "--json"])
    assert rc == 0, err
    numbers = json.loads((tmp_path / "pics" / "attention.json").read_text())
    assert numbers["sink_dims"] == [37, 301]                 # the finder's (the demo's planted dims)


def test_a_finder_result_never_leaks_into_a_later_call(demo_env, demo_weights):      # defect 3
    pipe = minivar.load("demo", device="cpu", dtype="float32")
    img = Image.open(IMAGE)
    official = pipe.generate(img, PROMPT, max_new_tokens=2, var=VARConfig(rule="official"),
                             prompt_tokenization="official")
    later = pipe.generate(img, PROMPT, max_new_tokens=2, var=VARConfig())
    fresh = minivar.load("demo", device="cpu", dtype="float32").generate(img, PROMPT, max_new_tokens=2,
                                                                         var=VARConfig())
    assert official.var["sink_dims"] == []                   # no BOS: the finder finds nothing there
    assert later.var == fresh.var and later.var["sink_dims"] == [37, 301]


def test_one_default_for_the_official_rule_without_a_preset():                     # defect 6
    from minivar.eval.__main__ import build_parser, var_settings
    from minivar.lmms_plugin import var_config

    class General:
        family = "general"
    cli_cfg = var_of(methods_from_options({"var": True, "var_rule": "official"})[0])
    plugin_cfg = var_config(var=True, rule="official")
    args = build_parser().parse_args(["run", "gqa", "--data", "x", "--out", "y", "--var", "--var-rule", "official"])
    harness_cfg = var_settings(args, General())
    # no task known (minivar, the plugin): the released configuration's rho 0.5 (the plugin said 0.2)
    assert cli_cfg == plugin_cfg and cli_cfg.rho == 0.5
    # a task known (the harness): its preset, in the code's convention (general ρ 0.8 → rho 0.2)
    assert harness_cfg.rho == pytest.approx(0.2)
    assert var_config(var=True).rho == var_of(methods_from_options({"var": True})[0]).rho == 0.8


def test_var_true_or_a_preset_name_is_accepted(demo_pipe):                          # defect 7
    img = Image.open(IMAGE)
    assert demo_pipe.generate(img, PROMPT, max_new_tokens=2, var=True).var == \
        demo_pipe.generate(img, PROMPT, max_new_tokens=2, var=VARConfig()).var
    assert demo_pipe.generate(img, PROMPT, max_new_tokens=2, var="hallucination").var["rho"] == 0.5
    with pytest.raises(TypeError, match="VARConfig, True or a preset name"):
        demo_pipe.generate(img, PROMPT, max_new_tokens=2, var=3)


def test_max_new_tokens_0_is_refused_before_the_model_loads(demo_env):              # defect 10
    rc, out, err = run_cli([a for a in BASE if a not in ("2",)][:6] + ["--max-new-tokens", "0"])
    line = assert_one_line_error(rc, out, err, "--max-new-tokens")
    assert "loaded" not in err and line


def test_the_official_rule_reports_the_layers_it_touches(demo_env):                 # defect 11
    rc, out, err = run_cli(BASE + ["--var", "--var-rule", "official", "--var-layers", "0-3", "--json"])
    assert rc == 0, err
    var = json.loads(out)["var"]
    assert var["layers"] == [2, 3] and var["layers_not_touched"] == [0, 1]
    assert "layers 0,1 not touched" in err and "only in layers 2.." in err


def test_run_json_holds_the_sink_dims_used(demo_env, tmp_path):                     # defect 12
    from test_eval_harness import cli, make_data, run_args  # noqa: F401  (the harness's tiny benchmark)
    import test_eval_harness as th
    from minivar.eval import benchmarks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmarks, "get", th.fake_get, raising=False)
        root = make_data(tmp_path / "data", n_images=1, per_image=2)
        args = ["run", "tinyyn", "--data", root / "questions.jsonl", "--images", root / "images", "--out",
                tmp_path / "run", "--model", "demo", "--device", "cpu", "--dtype", "float32", "--var",
                "--max-new-tokens", "2"]
        rc, out, err = cli(args)
        assert rc == 0, err
        run = json.loads((tmp_path / "run" / "run.json").read_text())
        assert run["var"]["sink_dims"] == [37, 301] and run["var_sink_dims_source"] == "finder"
        assert "var_sink_dims" not in run
        rc, out, err = cli(args)                                 # and the resume accepts it
        assert rc == 0, err


def test_the_picture_legend_states_the_rule_in_force(demo_env, tmp_path):           # defect 5
    from minivar.viz import rule_legend
    rc, out, err = run_cli(BASE + ["--var", "--var-rule", "official", "--save-attention", tmp_path / "pics"])
    assert rc == 0, err
    numbers = json.loads((tmp_path / "pics" / "attention.json").read_text())
    assert numbers["selection_rule"]["rule"] == "official" and numbers["var"]["rule"] == "official"
    legend = " ".join(rule_legend(numbers["selection_rule"], "selected by VAR"))
    assert "visual-sink share" in legend and "last layer included" in legend and "paper" not in legend
    paper = " ".join(rule_legend({"rule": "paper", "rho": 0.8, "min_image_attention": 0.2, "layers": [0, 1, 2]},
                                 "selected by VAR"))
    assert "never the last layer" in paper and "r >= rho=0.8" in paper


def test_the_status_line_says_what_the_decode_rate_counts(demo_env):               # defect 17 (status line)
    rc, out, err = run_cli(BASE + ["--json"])
    assert rc == 0, err
    record = json.loads(out)
    d, n = record["timing"]["decode_tokens"], len(record["output_ids"])
    assert d == n - 1 == 1
    assert f"(1 token after the first), {n} tokens" in err
