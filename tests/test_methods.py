"""A method written only against the documented interface (minivar.methods.method), outside minivar/: it adds a
hook and changes the token choice, and runs through generate, generate_many, the command line's Python path and
the harness; composed with VAR as the identity it leaves VAR's report alone."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from minivar import cli
from minivar.methods.hooks import Hook
from minivar.methods.method import Method, MethodRun
from minivar.methods.var import VARConfig

IMAGE = "assets/example.jpg"
PROMPTS = ["Is there a cat in the image?", "What colour is the sky?", "Is there a dog?"]


class RowCounter(Hook):
    """Counts the query rows layer 0 sees (every forward call of the generation)."""

    def __init__(self):
        self.rows = 0

    def residual(self, layer, h, rows):
        if layer == 0:
            self.rows += h.shape[0] * len(rows)


class Ban(Method):
    """Never emit token `banned` (its logit to −inf before the choice); report the rows the model ran."""
    name = "ban"

    def __init__(self, banned: int | None):
        self.banned = banned

    def settings(self):
        return {"banned": self.banned}

    def start(self, call):
        return BanRun(self.banned, call.samples)


class BanRun(MethodRun):
    def __init__(self, banned, samples):
        self.banned, self.counter = banned, RowCounter()
        self.hooks = [self.counter]

    def choose(self, logits, contrast):
        if self.banned is None:                  # the identity
            return logits
        out = logits.clone()
        out[:, self.banned] = float("-inf")
        return out

    def report(self, b, generated_rows):
        return {"banned": self.banned, "rows_seen": self.counter.rows}


def test_a_user_method_changes_the_token_choice_through_generate(demo_pipe):
    base = demo_pipe.generate(IMAGE, PROMPTS[0], max_new_tokens=4)
    first = base.output_ids[0]
    out = demo_pipe.generate(IMAGE, PROMPTS[0], max_new_tokens=4, methods=[Ban(first)])
    assert first not in out.output_ids
    # its first token is the base prefill's runner-up: the logits of the prompt with the banned one removed
    ids = torch.tensor([base.prompt_ids])
    logits = demo_pipe.logits(ids, demo_pipe.pixels(IMAGE))[0, -1].clone()
    logits[first] = float("-inf")
    assert out.output_ids[0] == int(logits.argmax())
    T = len(base.prompt_ids)
    assert out.reports["ban"] == {"banned": first, "rows_seen": T + len(out.output_ids) - 1}


def test_a_user_method_through_generate_many_equals_one_by_one(demo_pipe):
    base = demo_pipe.generate(IMAGE, PROMPTS[0], max_new_tokens=3)
    ban = Ban(base.output_ids[0])
    many = demo_pipe.generate_many(IMAGE, PROMPTS, max_new_tokens=3, methods=[ban])
    alone = [demo_pipe.generate(IMAGE, p, max_new_tokens=3, methods=[ban]) for p in PROMPTS]
    assert [m.output_ids for m in many] == [a.output_ids for a in alone]
    assert all(ban.banned not in m.output_ids for m in many)


def test_var_composed_with_the_identity_gives_vars_report(demo_pipe):
    var = VARConfig(sink_dims=(5, 7), tau=2.0)
    alone = demo_pipe.generate(IMAGE, PROMPTS[0], max_new_tokens=4, var=var)
    both = demo_pipe.generate(IMAGE, PROMPTS[0], max_new_tokens=4, var=var, methods=[Ban(None)])
    assert both.output_ids == alone.output_ids and both.var == alone.var
    assert sum(alone.var["redistributed"]["prefill"]) + sum(alone.var["redistributed"]["decode"]) >= 0
    assert both.reports["ban"]["banned"] is None


def test_a_user_method_through_the_command_lines_python_path(demo_env, demo_pipe):
    base = demo_pipe.generate(IMAGE, PROMPTS[0], max_new_tokens=3, conv_mode="llava_hf")
    ban = Ban(base.output_ids[0])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["--image", IMAGE, "--prompt", PROMPTS[0], "--model", "demo", "--max-new-tokens", "3",
                       "--conv-mode", "llava_hf", "--json", "--dtype", str(demo_pipe.dtype).replace("torch.", ""),
                       "--device", "cpu"], methods=[ban])
    assert rc == 0, err.getvalue()
    record = json.loads(out.getvalue())
    assert ban.banned not in record["output_ids"]
    assert record["ban"]["banned"] == ban.banned
    expected = demo_pipe.generate(IMAGE, PROMPTS[0], max_new_tokens=3, conv_mode="llava_hf", methods=[ban])
    assert record["output_ids"] == expected.output_ids


def test_a_user_method_through_the_harness(demo_env, demo_pipe, tmp_path):
    from minivar.eval import harness
    images = tmp_path / "val2014"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / name)
        for k, obj in enumerate(["cat", "dog"]):
            lines.append(json.dumps({"question_id": 2 * i + k + 1, "image": name,
                                     "text": f"Is there a {obj} in the image?", "label": "yes" if k else "no"}))
    data = tmp_path / "coco_pope_random.json"
    data.write_text("\n".join(lines) + "\n")
    bench = harness.get_benchmark("pope")
    questions = harness.read_questions(bench, [data], images)
    probe = demo_pipe.generate(questions[0].load_image(), questions[0].prompt, max_new_tokens=1)
    ban = Ban(probe.output_ids[0])
    result = harness.run(bench, [data], tmp_path / "run", images=images, model="demo", methods=[ban],
                         device="cpu", dtype="float32", max_new_tokens=3, load=lambda *a, **k: demo_pipe,
                         log=lambda m: None)
    assert result is not None and result["n"] == 4
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["methods"] == {"ban": {"banned": ban.banned}}
    answers = [json.loads(x) for x in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert all(ban.banned not in a["output_ids"] for a in answers)
    # a resume with other method settings is refused, naming them
    from minivar.errors import MinivarError
    with pytest.raises(MinivarError, match="methods"):
        harness.run(bench, [data], tmp_path / "run", images=images, model="demo", methods=[Ban(None)],
                    device="cpu", dtype="float32", max_new_tokens=3, load=lambda *a, **k: demo_pipe,
                    log=lambda m: None)
