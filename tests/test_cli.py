"""run.py end to end on the offline demo and tiny checkpoints.

Contract: success prints the answer (or exactly one JSON object with --json) on stdout and exits 0; bad input of any
kind exits 2 with exactly one line on stderr naming the thing at fault, nothing on stdout, and no traceback.
Most cases call minivar.cli.main() in-process (fast); a few go through a real interpreter, all started at once.
"""
import io
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, run_cli
from minivar import checkpoint, cli
from minivar.demo import DEMO_SINK_PATCHES

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "assets" / "example.jpg"
PROMPT = "What is in the image?"
IMAGE_ID, EOS = 259, 2        # the demo's <image> and </s>


def image_run(prompt_ids):
    """Start and length of the (single) run of image ids."""
    start = prompt_ids.index(IMAGE_ID)
    n = sum(1 for i in prompt_ids if i == IMAGE_ID)
    assert prompt_ids[start:start + n] == [IMAGE_ID] * n
    return start, n


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints for the error cases

def copy_dir(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)          # read-only use: links are enough
    return dst


def with_state(src: Path, dst: Path, change) -> Path:
    copy_dir(src, dst, skip=("model.safetensors",))
    state = load_file(str(src / "model.safetensors"))
    change(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def with_config(src: Path, dst: Path, **changes) -> Path:
    copy_dir(src, dst, skip=("config.json",))
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def with_missing_shard(src: Path, dst: Path) -> Path:
    copy_dir(src, dst, skip=("model.safetensors",))
    (dst / "model-00001-of-00002.safetensors").symlink_to(src / "model.safetensors")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        weight_map = {k: "model-00001-of-00002.safetensors" for k in f.keys()}
    weight_map["language_model.lm_head.weight"] = "model-00002-of-00002.safetensors"
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


WRONG = "language_model.model.layers.1.self_attn.o_proj.weight"
MISSING = "multi_modal_projector.linear_1.bias"


def wrong_shape(state):
    state[WRONG] = torch.zeros(64, 60)


def missing_tensor(state):
    del state[MISSING]


# the default dtype (bf16 on CPU); the shorter llava_hf template (616 prompt ids instead of 771) to save time
BASE = ["--image", IMAGE, "--prompt", PROMPT, "--model", "demo", "--max-new-tokens", "3", "--conv-mode", "llava_hf"]


# ---------------------------------------------------------------------------------------------------------------
# Through the real interpreter (started concurrently: the import of torch dominates)

@pytest.fixture(scope="module")
def procs(demo_weights, tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_subprocess")
    short_context = with_config(demo_weights / "demo", tmp / "short-context", max_position_embeddings=600)
    cases = {
        "text": BASE,
        "json": BASE + ["--json"],
        "wrong_shape": ["--image", IMAGE, "--prompt", PROMPT, "--model", with_state(tiny_checkpoint, tmp / "wrong", wrong_shape)],
        "too_long": ["--image", IMAGE, "--prompt", PROMPT, "--model", short_context],
        "bad_dtype": BASE + ["--dtype", "float8"],
    }
    env = dict(os.environ, MINIVAR_WEIGHTS=str(demo_weights), PYTHONIOENCODING="utf-8")
    started = {name: subprocess.Popen([sys.executable, str(REPO / "run.py"), *map(str, argv)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
               for name, argv in cases.items()}
    results = {}
    for name, p in started.items():
        out, err = p.communicate(timeout=300)
        results[name] = (p.returncode, out, err)
    return results


def test_a_closed_stdout_stops_quietly(demo_weights):
    """`run.py ... | head`: when the reader of stdout goes away, no traceback; exit 141, as other tools do."""
    r, w = os.pipe()
    os.close(r)                                                   # nobody will ever read what run.py writes
    env = dict(os.environ, MINIVAR_WEIGHTS=str(demo_weights), PYTHONIOENCODING="utf-8")
    try:
        p = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, BASE)], cwd=REPO, env=env, stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(w)
    assert p.returncode == 141, p.stderr
    assert "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr


def test_the_three_ways_to_start_it_are_one_program(tmp_path):
    """`python run.py` (from any directory), `python -m minivar` and the installed `minivar` all run minivar.cli."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ways = {"run.py": [sys.executable, str(REPO / "run.py")], "-m": [sys.executable, "-m", "minivar"]}
    helps = {}
    for name, cmd in ways.items():
        p = subprocess.run(cmd + ["--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        helps[name] = p.stdout
        p = subprocess.run(cmd + ["--prompt", "x"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert_one_line_error(p.returncode, p.stdout, p.stderr, "--image")
    assert helps["run.py"] == helps["-m"] and "--save-attention" in helps["-m"]


def test_text_mode_prints_the_answer(procs):
    rc, out, err = procs["text"]
    assert rc == 0, err
    assert "Traceback" not in err and "error" not in err
    assert all(line.startswith("minivar: ") for line in err.splitlines()), err
    # the streamed text is exactly the decoded answer of the same (deterministic) run
    _, json_out, _ = procs["json"]
    assert out == json.loads(json_out)["text"] + "\n"
    assert out.strip()


def test_json_mode_prints_exactly_one_json_object(procs):
    rc, out, err = procs["json"]
    assert rc == 0, err
    assert out.endswith("\n") and out.count("\n") == 1, out[:500]
    record = json.loads(out)
    start, n = image_run(record["prompt_ids"])
    assert n == 576 and record["prompt_ids"][0] == 1          # BOS, then the template with 576 image ids
    assert EOS not in record["output_ids"] and 1 <= len(record["output_ids"]) <= 3
    assert isinstance(record["text"], str)
    t = record["timing"]
    for key in ("load_s", "prefill_s", "decode_tokens_per_s"):
        assert isinstance(t[key], float) and t[key] >= 0, key
    assert "var" not in record and record["dtype"] == "bfloat16"
    assert all(line.startswith("minivar: ") for line in err.splitlines()), err


@pytest.mark.parametrize("case, names", [("wrong_shape", [WRONG, "(64, 60)"]),
                                         ("too_long", ["600", "max_position_embeddings"]),
                                         ("bad_dtype", ["--dtype", "float8"])])
def test_errors_through_the_interpreter(procs, case, names):
    assert_one_line_error(*procs[case], *names)


# ---------------------------------------------------------------------------------------------------------------
# VAR report

@pytest.fixture(scope="module")
def var_record(demo_env):
    rc, out, err = run_cli(BASE + ["--var", "--json"])
    assert rc == 0, err
    assert out.count("\n") == 1
    return json.loads(out)


def test_var_json_reports_sinks_and_counts(var_record):
    var = var_record["var"]
    n_layers = 4
    start, n = image_run(var_record["prompt_ids"])
    assert var["image_span"] == [start, start + 576]
    planted = {start + p for p in DEMO_SINK_PATCHES}
    assert set(var["sinks"]) == {str(i) for i in range(n_layers)}
    for layer, positions in var["sinks"].items():
        assert positions == sorted(positions)
        assert planted <= set(positions), (layer, positions)
        assert 0 in positions                                          # BOS: the text sink
        assert var["visual_sinks"][layer] == [p for p in positions if start <= p < start + 576]
    red = var["redistributed"]
    assert len(red["prefill"]) == len(red["decode"]) == n_layers
    assert red["prefill"][-1] == 0 and red["decode"][-1] == 0           # the last layer is never modified
    assert sum(red["prefill"]) > 0                                    # the demo gives VAR work to do
    # decode steps run = tokens after the first, plus the step that produced EOS when it stopped there
    decode_steps = len(var_record["output_ids"]) - (0 if var_record["finished"] else 1)
    assert (sum(red["decode"]) > 0) == (decode_steps > 0)
    assert var["sink_dims"] == [37, 301]
    assert EOS not in var_record["output_ids"]


def test_var_on_a_local_checkpoint_with_user_sink_dims(tiny_checkpoint):
    rc, out, err = run_cli(["--image", IMAGE, "--prompt", "Hi", "--model", tiny_checkpoint, "--max-new-tokens", "2",
                         "--json", "--var", "--sink-dims", "7,3", "--var-preset", "hallucination", "--p", "0.5"])
    assert rc == 0, err
    record = json.loads(out)
    assert record["var"]["sink_dims"] == [3, 7] and record["var"]["sink_dims_source"] == "user"
    assert record["var"]["rho"] == 0.5 and record["var"]["p"] == 0.5
    assert image_run(record["prompt_ids"])[1] == 16
    assert record["model"] == str(tiny_checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# Bad input, in-process: exit 2, one line on stderr naming the culprit, nothing on stdout

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "notes.txt").write_text("this is not an image\n")
    data = IMAGE.read_bytes()
    (tmp / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp / "a_directory.jpg").mkdir()
    return tmp


def args(image=IMAGE, prompt=PROMPT, model="demo", *extra):
    return ["--image", image, "--prompt", prompt, "--model", model, "--max-new-tokens", "2", *extra]


@pytest.mark.parametrize("name, argv, culprit", [
    ("missing image", lambda b: args(b / "nope.jpg"), ["nope.jpg", "not found"]),
    ("directory as image", lambda b: args(b / "a_directory.jpg"), ["a_directory.jpg", "directory"]),
    ("non-image file", lambda b: args(b / "notes.txt"), ["notes.txt"]),
    ("truncated JPEG", lambda b: args(b / "truncated.jpg"), ["truncated.jpg", "truncated"]),
    ("empty prompt", lambda b: args(IMAGE, ""), ["--prompt", "empty"]),
    ("whitespace prompt", lambda b: args(IMAGE, " \n\t "), ["--prompt", "empty"]),
    ("negative max-new-tokens", lambda b: args() + ["--max-new-tokens", "-1"], ["--max-new-tokens", "-1"]),
    ("unknown model path", lambda b: args(IMAGE, PROMPT, b / "no-such-model"), ["no-such-model", "not found"]),
    ("unknown flag", lambda b: args() + ["--bogus-flag"], ["--bogus-flag"]),
    ("missing --image", lambda b: ["--prompt", PROMPT], ["--image"]),
    ("var flag without --var", lambda b: args() + ["--var-preset", "vision"], ["--var-preset", "--var"]),
    ("tau without --var", lambda b: args() + ["--tau", "5"], ["--tau", "--var"]),
    ("unknown preset", lambda b: args() + ["--var", "--var-preset", "best"], ["--var-preset", "best"]),
    ("p above 1", lambda b: args() + ["--var", "--p", "1.5"], ["--p", "1.5"]),
    ("negative rho", lambda b: args() + ["--var", "--rho", "-0.1"], ["--rho", "-0.1"]),
    ("zero tau", lambda b: args() + ["--var", "--tau", "0"], ["--tau", "0"]),
    ("nan p", lambda b: args() + ["--var", "--p", "nan"], ["--p", "nan"]),
    ("malformed sink dims", lambda b: args() + ["--var", "--sink-dims", "1,x"], ["--sink-dims", "1,x"]),
    ("sink dim outside hidden", lambda b: args() + ["--var", "--sink-dims", "99999"], ["--sink-dims", "99999", "768"]),
    ("unknown dtype", lambda b: args() + ["--dtype", "float8"], ["--dtype", "float8"]),
    ("unknown device", lambda b: args() + ["--device", "tpu"], ["--device", "tpu"]),
    ("top-p above 1", lambda b: args() + ["--top-p", "1.5"], ["--top-p", "1.5"]),
    ("negative temperature", lambda b: args() + ["--temperature", "-1"], ["--temperature", "-1"]),
    ("non-integer max-new-tokens", lambda b: args() + ["--max-new-tokens", "many"], ["--max-new-tokens", "many"]),
    # checked against the prompt's image tokens: still before any status line
    ("more random tokens than image tokens", lambda b: args() + ["--mask-random-image-tokens", "100000"],
     ["--mask-random-image-tokens", "100000", "576"]),
])
def test_bad_input_gives_one_error_line(demo_env, bad_files, capfd, name, argv, culprit):
    assert_one_line_error(*run_cli(argv(bad_files)), *culprit)
    leaked = capfd.readouterr()
    assert leaked.out == "" and leaked.err == "", leaked         # nothing written around Python's sys.std*


@pytest.mark.parametrize("name, make, extra, culprit", [
    ("no config.json", lambda src, dst: copy_dir(src, dst, skip=("config.json",)), [], ["config.json"]),
    ("missing shard", with_missing_shard, [], ["model-00002-of-00002.safetensors"]),
    ("wrong-shaped tensor", lambda src, dst: with_state(src, dst, wrong_shape), [], [WRONG, "(64, 60)"]),
    ("missing tensor", lambda src, dst: with_state(src, dst, missing_tensor), [], [MISSING]),
    ("no tokenizer.json", lambda src, dst: copy_dir(src, dst, skip=("tokenizer.json",)), [], ["tokenizer.json"]),
    ("short context", lambda src, dst: with_config(src, dst, max_position_embeddings=100), [], ["100", "prompt"]),
    ("sink dim outside hidden", None, ["--var", "--sink-dims", "64"], ["--sink-dims", "64"]),
    ("no sink dims to mask", None, ["--mask-visual-sinks"], ["masking visual sinks", "sink dims"]),
])
def test_bad_checkpoint_gives_one_error_line(tiny_checkpoint, tmp_path, capfd, name, make, extra, culprit):
    model = make(tiny_checkpoint, tmp_path / "model") if make else tiny_checkpoint
    line = assert_one_line_error(*run_cli(args(IMAGE, PROMPT, model, *extra)), *culprit)
    if make is not None and name != "short context":
        assert str(tmp_path / "model") in line                       # which checkpoint is broken
    leaked = capfd.readouterr()
    assert leaked.out == "" and leaked.err == "", leaked


def test_hub_id_offline_points_to_model_flag(demo_env, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "weights")
    assert_one_line_error(*run_cli(args(IMAGE, PROMPT, "llava-hf/llava-1.5-7b-hf")), "llava-hf/llava-1.5-7b-hf", "--model")


def test_the_cli_lists_what_the_package_accepts():
    """run.py spells out its choices and default model (so --help needs no torch import): they must not drift."""
    from minivar import processing
    from minivar.methods import var
    from minivar.pipeline import DTYPES
    actions = {a.dest: a for a in cli.build_parser()._actions}
    # every registered family's templates and image modes (LLaVA-1.5's are processing's), and nothing else
    from minivar.models.registry import FAMILIES, family_for
    family_for("llava")                                          # the built-in families register themselves
    assert set(processing.CONV_MODES) <= set(actions["conv_mode"].choices)
    assert set(processing.IMAGE_MODES) <= set(actions["image_aspect_ratio"].choices)
    assert set(actions["conv_mode"].choices) == {c for f in FAMILIES.values() for c in f.conv_modes}
    assert set(actions["image_aspect_ratio"].choices) == {m for f in FAMILIES.values() for m in f.image_modes}
    from minivar.methods import damro
    assert set(actions["damro_preset"].choices) == set(damro.PRESETS)
    assert set(actions["dtype"].choices) == {"auto", *DTYPES}
    assert set(actions["var_preset"].choices) == set(var.PRESETS)
    assert actions["model"].default == checkpoint.DEFAULT_MODEL


# ---------------------------------------------------------------------------------------------------------------
# --help, the status lines, the terminal, the sink rule without VAR

def test_help_shows_every_default_and_the_default_model_size():
    parser = cli.build_parser()
    for action in parser._actions:
        if action.dest in ("help", "version"):
            continue
        assert "default" in action.help.lower() or action.required, action.option_strings
    text = " ".join(parser.format_help().split())
    assert f"Default: {checkpoint.DEFAULT_MODEL}, LLaVA-1.5-7B: a 14.1 GB download" in text
    assert cli.DEFAULT_MODEL == checkpoint.DEFAULT_MODEL


class _Finished:
    def __init__(self, finished, n):
        self.finished, self.output_ids = finished, [5] * n


@pytest.mark.parametrize("finished, n, max_new, key", [(True, 2, 3, "eos"), (True, 3, 3, "eos"),
                                                       (False, 3, 3, "max_new_tokens"), (False, 0, 0, "max_new_tokens"),
                                                       (False, 2, 3, "context")])
def test_stop_reason(finished, n, max_new, key):
    assert cli.stop_reason(_Finished(finished, n), max_new, 2048)[0] == key


def test_text_mode_says_why_it_stopped_and_what_var_did(demo_env):
    rc, out, err = run_cli(BASE + ["--var"])
    assert rc == 0, err
    lines = err.splitlines()
    summary = [line for line in lines if line.startswith("minivar: VAR: ")]
    assert len(summary) == 1, err
    # the same numbers as --json's record (deterministic greedy run); with VAR the demo stops at EOS here
    rc, json_out, _ = run_cli(BASE + ["--var", "--json"])
    record = json.loads(json_out)
    var = record["var"]
    assert record["stopped"] == "eos" and record["finished"] is True
    assert any(line.endswith(f"{len(record['output_ids'])} tokens, stopped at EOS") for line in lines), err
    per_layer = " ".join(f"{len(var['visual_sinks'][k])}+{len(var['sinks'][k]) - len(var['visual_sinks'][k])}"
                         for k in sorted(var["sinks"], key=int))
    prefill, decode = sum(var["redistributed"]["prefill"]), sum(var["redistributed"]["decode"])
    assert f"sinks per layer (visual+text) {per_layer};" in summary[0]
    assert f"{prefill + decode} (head, row) pairs redistributed ({prefill} in the prefill, {decode} while decoding)" \
        in summary[0]
    assert prefill > 0 and "4+1" in per_layer                  # the demo's 4 planted patches and its BOS


def test_text_mode_says_it_stopped_at_max_new_tokens(demo_env):
    rc, out, err = run_cli(BASE + ["--max-new-tokens", "1"])       # the demo's first token is not EOS
    assert rc == 0, err
    assert err.splitlines()[-1].endswith("no decode step, 1 token, stopped at --max-new-tokens 1"), err


def test_json_says_why_it_stopped_at_the_context_length(demo_weights, tmp_path, monkeypatch):
    # prompt (616 ids with llava_hf) + 2 answer tokens fill a 618-token context before --max-new-tokens 3
    model = with_config(demo_weights / "demo", tmp_path / "short", max_position_embeddings=618)
    rc, out, err = run_cli(["--image", IMAGE, "--prompt", PROMPT, "--model", model, "--max-new-tokens", "3",
                            "--conv-mode", "llava_hf", "--json"])
    assert rc == 0, err
    record = json.loads(out)
    assert len(record["prompt_ids"]) == 616 and len(record["output_ids"]) == 2
    assert record["stopped"] == "context" and record["finished"] is False
    assert "stopped at the model's context length (618 tokens)" in err


def test_terminal_text_escapes_control_characters():
    assert cli.terminal_text("a\tb\nc") == "a\tb\nc"                      # newlines and tabs stay
    assert cli.terminal_text("\x1b[31mred\x07\r\x00\x7f\x9b") == "\\x1b[31mred\\x07\\r\\x00\\x7f\\x9b"
    assert cli.terminal_text("ünï 日本 😀") == "ünï 日本 😀"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_generated_control_characters_are_escaped_on_a_terminal_only(demo_env, monkeypatch):
    sampled = BASE + ["--max-new-tokens", "40", "--temperature", "1.0", "--seed", "3"]   # the later flag wins
    rc, out, err = run_cli(sampled + ["--json"])
    text = json.loads(out)["text"]
    controls = {c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"}
    assert controls, repr(text)                                 # this seed's noise has some (else pick another)
    rc, piped, err = run_cli(sampled)                           # a pipe or file gets the text as generated
    assert rc == 0 and piped == text + "\n", err
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert cli.main([str(a) for a in sampled]) == 0
    shown = terminal.getvalue()
    assert shown == cli.terminal_text(text) + "\n"
    assert not any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in shown)


def masked_counts(argv):
    rc, out, err = run_cli(BASE + ["--mask-visual-sinks", "--json"] + argv)
    assert rc == 0, err
    return json.loads(out)["masked"]


def test_tau_and_sink_dims_serve_sink_masking_without_var(demo_env):
    default = masked_counts([])
    assert set(default["count"].values()) == {len(DEMO_SINK_PATCHES)}       # the planted sinks, in every layer
    assert set(masked_counts(["--tau", "1000"])["count"].values()) == {0}    # no φ reaches τ = 1000
    assert set(masked_counts(["--sink-dims", "37"])["count"].values()) == {0}   # the text-sink dim: no visual sinks


def test_tau_serves_the_pictures_without_var(demo_env, tmp_path):
    rc, out, err = run_cli(BASE + ["--save-attention", tmp_path / "pics", "--tau", "1000", "--json"])
    assert rc == 0, err
    numbers = json.loads((tmp_path / "pics" / "attention.json").read_text())
    assert numbers["tau"] == 1000 and all(v == [] for v in numbers["visual_sinks"].values())
    assert "var" not in json.loads(out)


def test_tau_without_anything_that_uses_sinks_is_an_error(demo_env):
    assert_one_line_error(*run_cli(BASE + ["--sink-dims", "37"]), "--sink-dims", "--var", "--save-attention")


def test_library_errors_name_the_parameter_and_the_cli_names_the_flag():
    """The Python API's errors name its parameters; the command lines translate them to their flags."""
    from minivar.errors import MinivarError, for_command_line
    from minivar.pipeline import check_generation_args
    from minivar.methods.var import VARConfig
    with pytest.raises(MinivarError) as e:
        VARConfig(p=1.5).validate()
    assert str(e.value) == "`VARConfig.p` must be in [0, 1], got 1.5"
    assert for_command_line(str(e.value)) == "--p must be in [0, 1], got 1.5"
    with pytest.raises(MinivarError) as e:
        check_generation_args(-1, 0.0, 1.0)
    assert for_command_line(str(e.value)) == "--max-new-tokens must be a whole number ≥ 1, got -1"
    assert for_command_line("`not_a_parameter` stays") == "not_a_parameter stays"
    rc, out, err = run_cli(BASE + ["--var", "--p", "1.5"])
    assert rc == 2 and err.strip() == "minivar: error: --p must be in [0, 1], got 1.5"
