"""The attention explorer (explorer.html) and `minivar --serve`, in headless Chromium (one browser per module;
tests/browser_support.py). Tiny random checkpoints made at test time; a 7B-shaped page from random attention.

What the page shows is checked against minivar's own numbers: attention.json's maps, head sums, VAR's own head
selection and visual sinks (the numbers behind the PNGs); the τ slider's sink count against a second run at that
τ; the ρ slider's heads against var.select_heads on a capture of the same run; each family's panels against its
layout."""
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from browser_support import Browser, browser_fixture, missing_browser  # noqa: F401
from conftest import run_cli, to_hub_key, unused_tensors, write_checkpoint
from test_pictures_families import hf_processor, next_dir, qwen_dir, tokenizer_dir  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_explorer import SeventyBShape, Tokens, seventy_b_numbers  # noqa: E402  (LLaVA-7B's shape, random)
IMAGE = REPO / "assets" / "example.jpg"
PROMPT = "What is in the image?"
DIMS, TAU = "1,5,9,13,17,21", "2.5"           # the tiny model's sink rule: a few visual sinks in every layer
BASE = ["--dtype", "float32", "--device", "cpu", "--sink-dims", DIMS, "--max-new-tokens", "4"]
RUN_A = ["--var", "--damro", "--damro-topk", "3", "--tau", TAU]
NASTY = "<!--<script>alert(1)</script> \u2028 & </style>"


@pytest.fixture(scope="module")
def browser():
    yield from browser_fixture()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny LLaVA-1.5: CLIP at 168 px (a 12×12 patch grid), a 4-layer, 4-head, 64-dim LLaMA; the demo tokenizer."""
    from minivar.demo import random_state_dict
    from minivar.models.config import LlavaConfig, TextConfig, VisionConfig
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=168, patch_size=14)
    text = TextConfig(vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
    cfg = LlavaConfig(vision=vision, text=text, image_token_index=259, pad_token_id=260, torch_dtype="float32")
    state = {to_hub_key(k): v for k, v in (random_state_dict(cfg, seed=0) | unused_tensors(cfg)).items()}
    return write_checkpoint(tmp_path_factory.mktemp("explorer_llava"), state, cfg, tokenizer=True)


def cli_run(model, out, *extra, image=IMAGE):
    rc, stdout, err = run_cli(["--image", image, "--prompt", PROMPT, "--model", model, "--json",
                               "--save-attention", out, *BASE, *extra])
    assert rc == 0, err
    return json.loads(stdout), json.loads((Path(out) / "attention.json").read_text())


@pytest.fixture(scope="module")
def run_a(llava_dir, tmp_path_factory):
    """VAR and DAMRO on the tiny LLaVA: (--json's record, attention.json, the page's path)."""
    out = tmp_path_factory.mktemp("run_a")
    record, numbers = cli_run(llava_dir, out, *RUN_A)
    assert str(out / "explorer.html") in record["pictures"]
    return record, numbers, out / "explorer.html"


def canvas_data(browser, selector):
    return browser.js(f"return document.querySelector('{selector}').toDataURL()")


def close(a, b, tol):
    assert len(a) == len(b)
    worst = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
    assert worst <= tol, worst


# ---------------------------------------------------------------------------------------------------------------

def test_llava_page_offline_linked_and_equal_to_attention_json(browser, run_a, tmp_path):
    record, numbers, page = run_a
    load_s = browser.open(page.as_uri())
    console, network = browser.logs()
    assert console == [] and network == [], (console, network)
    assert load_s < 20
    shot = tmp_path / "explorer.png"
    browser.driver.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 800
    target = __import__("os").environ.get("MINIVAR_SCREENSHOT")        # the README's picture: docs/img/explorer.png
    if target:
        shutil.copy(shot, target)

    # what attention.json (and so the PNGs) says, on the page: every answer row, the pictures' layer range, mean heads
    lo, hi = numbers["layer_range"]
    cur = browser.js(f"explorer.set({{row: -1, lo: {lo}, hi: {hi}, head: -1}}); return explorer.current()")
    for kind in ("before", "after"):
        want = numbers["attention"][kind]
        close(cur["attention"][kind], want, 1e-4 * max(want) + 5e-6)
    grid = browser.js("const g = explorer.headGrid(explorer.state);"
                      "return [Array.from(g.image), Array.from(g.selected)]")
    H = numbers["n_heads"]
    flat = [x for row in numbers["heads"]["image_attention"] for x in row]
    close(grid[0], flat, 1e-4 * max(flat))
    # VAR's own selection (what VAR did in this run) = the page's rule at the run's ρ and floor
    assert [grid[1][i:i + H] for i in range(0, len(grid[1]), H)] == numbers["heads"]["selected_fraction"]
    assert any(v for row in numbers["heads"]["selected_fraction"] for v in row)
    for layer, sinks in numbers["visual_sinks"].items():
        assert browser.js(f"return explorer.sinkOffsets({layer}, {TAU})") == sinks
    # before / after: VAR's maps differ; DAMRO's outliers are green on the image; its candidates are the answer
    assert cur["image_share"]["after"] != cur["image_share"]["before"]
    outliers = numbers["damro"]["outliers"]
    assert browser.js("return explorer.data.methods.find(m => m.kind === 'patches').marks") == outliers
    cols = numbers["panels"][0]["cols"]
    for o in outliers:
        r, c = divmod(o, cols)
        px = browser.js(f"""const cv = document.getElementById('panel-before-0'), k = +cv.dataset.cell;
                            const at = [{c} * k + 3, {r} * k + k / 2];      // inside the green outline
                            return Array.from(cv.getContext('2d').getImageData(at[0], at[1], 1, 1).data)""")
        assert px[:3] == [0, 200, 0], (o, px)
    steps = browser.js("return explorer.data.methods.find(m => m.kind === 'candidates').steps")
    ids = record["output_ids"]
    assert [s["branches"]["combined"][0]["id"] for s in steps][:len(ids)] == ids     # greedy: its top-1
    assert all(len(s["branches"][b]) == 5 for s in steps for b in ("full", "contrast"))

    # linked: a token, a layer, a head each change the drawing
    before = canvas_data(browser, "#panel-before-0")
    browser.driver.find_element("css selector", '.tok[data-row="1"]').click()
    assert browser.js("return explorer.state.row") == 1
    after_token = canvas_data(browser, "#panel-before-0")
    assert after_token != before
    browser.js("const el = document.getElementById('lo'); el.value = 0; el.dispatchEvent(new Event('change'))")
    assert browser.js("return explorer.state.lo") == 0
    after_layer = canvas_data(browser, "#panel-before-0")
    assert after_layer != after_token
    from selenium.webdriver.support.ui import Select
    Select(browser.driver.find_element("id", "head")).select_by_value("2")
    assert browser.js("return explorer.state.head") == 2
    assert canvas_data(browser, "#panel-before-0") != after_layer
    # export: the view as a PNG, the numbers as JSON
    png = browser.js("return explorer.viewPng()")
    assert png.startswith("data:image/png;base64,") and len(png) > 1000
    exported = browser.js("return JSON.parse(JSON.stringify(explorer.current()))")
    assert exported["head"] == 2 and exported["token_row"] == 1 and len(exported["attention"]["before"]) == 144
    assert browser.logs()[0] == []


def test_tau_slider_counts_the_sinks_minivar_finds(browser, run_a, llava_dir, tmp_path):
    _, numbers, page = run_a
    browser.open(page.as_uri())
    phi = sorted(set(numbers["phi"][1]))
    mid = (phi[len(phi) * 3 // 4] + phi[len(phi) * 3 // 4 + 1]) / 2          # between two φ of layer 1
    browser.js(f"const el = document.getElementById('tau'); el.value = {mid}; el.dispatchEvent(new Event('input'));"
               "const lo = document.getElementById('lo'); lo.value = 1; lo.dispatchEvent(new Event('change'))")
    tau = browser.js("return explorer.state.tau")            # as the slider's step left it
    shown = int(browser.js("return document.getElementById('sinkCount').dataset.count"))
    by_layer = browser.js("return explorer.current().sink_count_by_layer")
    _, again = cli_run(llava_dir, tmp_path / "tau", *(RUN_A[:-2] + ["--tau", repr(tau)]))
    assert by_layer == [len(again["visual_sinks"][str(layer)]) for layer in range(numbers["n_layers"])]
    assert shown == by_layer[1] and 0 < shown < len(phi)


def slider_selections(browser, page, model_dir, extra, settings, rule):
    """For each (ρ, floor) set on the page's sliders: the page's selected (row, layer, head) and what `rule`
    (var.select_heads or var_official.select_heads_official, as VAR calls it) selects on a capture of the same run."""
    import minivar
    from minivar import cli
    browser.open(page.as_uri())
    argv = ["--image", str(IMAGE), "--prompt", PROMPT, "--model", str(model_dir), *BASE, *extra]
    methods, _ = cli.method_settings(cli.build_parser().parse_args(argv))
    pipe = minivar.load(str(model_dir), device="cpu", dtype="float32")
    cap = pipe.capture(str(IMAGE), PROMPT, layers="all", attention=("before",), rows="answer", decode=True,
                       max_new_tokens=4, methods=methods)
    L = pipe.config.text.num_hidden_layers
    var = next(m for m in methods if m.name == "var").config
    out = []
    for rho, floor in settings:
        browser.js(f"for (const [id, v] of [['rho', {rho}], ['floor', {floor}]]) {{"
                   "const el = document.getElementById(id); el.value = v; el.dispatchEvent(new Event('input')); }")
        assert browser.js("return [explorer.state.rho, explorer.state.floor]") == [rho, floor]
        got = {tuple(x) for x in browser.js("explorer.set({row: -1}); return explorer.current().selected_heads")}
        want = set()
        for layer in range(L):
            probs = cap.attention_probs[layer]["before"]                       # [1, H, R, S]
            S = probs.shape[-1]
            image = torch.nn.functional.pad(cap.image, (0, S - cap.image.shape[1]))
            vis = torch.nn.functional.pad(cap.visual_sinks[layer], (0, S - cap.image.shape[1]))
            rows = torch.ones(1, probs.shape[2], dtype=torch.bool)
            sel = rule(probs, image, vis, rows, rho, floor)[0]                  # [H, R]
            if layer in var.layer_set(L) and bool(vis.any()):
                want |= {(r, layer, h) for h, r in torch.nonzero(sel).tolist()}
        out.append((got, want))
    return out


def test_rho_slider_selects_the_heads_select_heads_selects(browser, run_a, llava_dir):
    from minivar.methods.var import select_heads
    pairs = slider_selections(browser, run_a[2], llava_dir, RUN_A, [(0.98, 0.42), (0.99, 0.42)],
                              lambda p, i, v, r, rho, floor: select_heads(p, i, v, r, floor, rho))
    for got, want in pairs:
        assert got == want
    assert len({frozenset(g) for g, _ in pairs}) == 2 and all(g for g, _ in pairs)   # two different selections


def test_the_released_rule_selects_on_its_own_portion(browser, llava_dir, tmp_path):
    from minivar.methods.var_official import select_heads_official
    extra = ["--var", "--var-rule", "official", "--tau", TAU]
    cli_run(llava_dir, tmp_path / "official", *extra)
    pairs = slider_selections(browser, tmp_path / "official" / "explorer.html", llava_dir, extra,
                              [(0.01, 0.42), (0.01, 0.43), (0.0, 0.2)],
                              lambda p, i, v, r, rho, floor: select_heads_official(p, i, v, r, rho, floor))
    for got, want in pairs:
        assert got == want
    assert pairs[0][0] > pairs[1][0] > set() == pairs[2][0]     # a lower floor, more heads; rho 0: none


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_each_family_draws_the_grid_its_tokens_cover(browser, family, request, tmp_path):
    from test_pictures_families import CASES, image_file
    from minivar.inspection import token_cells
    model_dir = request.getfixturevalue(f"{family}_dir")
    img = image_file(tmp_path, CASES[family])
    extra = ["--damro"] if family == "next" else ["--vcd", "--mask-random-image-tokens", "3"]
    rc, stdout, err = run_cli(["--image", img, "--prompt", PROMPT, "--model", model_dir, "--json", "--save-attention",
                               tmp_path / "out", "--dtype", "float32", "--max-new-tokens", "2", "--sink-dims", "5",
                               *extra])
    assert rc == 0, err
    numbers = json.loads((tmp_path / "out" / "attention.json").read_text())
    browser.open((tmp_path / "out" / "explorer.html").as_uri())
    assert browser.logs() == ([], [])
    panels = numbers["panels"]
    assert browser.js("return explorer.cells") == token_cells([(p["name"], p["rows"], p["cols"], p["newline"])
                                                               for p in panels])
    sizes = browser.js("""return [...document.querySelectorAll('#panels canvas[data-kind="before"]')]
                          .map(c => [+c.dataset.panel, c.width, c.height, +c.dataset.cell])""")
    assert [s[0] for s in sizes] == list(range(len(panels)))
    for i, w, h, cell in sizes:
        assert (w, h) == (panels[i]["cols"] * cell, panels[i]["rows"] * cell)
    lo, hi = numbers["layer_range"]
    cur = browser.js(f"explorer.set({{row: -1, lo: {lo}, hi: {hi}, head: -1}}); return explorer.current()")
    want = numbers["attention"]["before"]
    close(cur["attention"]["before"], want, 1e-4 * max(want) + 5e-6)
    kinds = browser.js("return explorer.data.methods.map(m => m.kind)")
    assert "candidates" in kinds and (family != "next" or "patches" in kinds)
    if family == "qwen":                                 # the masked tokens, cyan at their cells (one panel here)
        masked = browser.js("return explorer.data.methods.filter(m => m.method === 'mask').map(m => m.marks)")
        assert masked == [sorted(numbers["masked"]["patches"])] and len(masked[0]) == 3


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-7B's shape: 32 layers × 32 heads, 576 image tokens, 32 generated tokens (33 answer rows), random attention

def test_seven_b_shaped_page_fits_and_stays_responsive(browser, tmp_path):
    from minivar import explorer
    cap = SeventyBShape()
    numbers = seventy_b_numbers(cap)
    data = explorer.explorer_data(cap, numbers, [Image.new("RGB", (336, 336), (128, 128, 128))], tokenizer=Tokens(),
                                  output_ids=list(range(32)), prompt_ids=list(range(700)), reports={}, records={},
                                  var=None)
    path = tmp_path / "explorer.html"
    path.write_text(explorer.page(data), encoding="utf-8")
    size = path.stat().st_size
    assert size <= 25_000_000, size
    assert data["head_rows_kept"] == 33                         # every answer row keeps its single heads
    load_s = browser.open(path.as_uri(), timeout=120)
    assert browser.logs() == ([], [])
    assert load_s < 15, load_s
    ms = browser.js("const t = performance.now(); explorer.set({row: 7, lo: 3, hi: 20}); explorer.set({head: 5});"
                    "return performance.now() - t")
    assert ms < 1000, ms                                         # two redraws
    # the numbers survive the quantisation: the mean over heads (16 bits), a single head (4 bits)
    start, end = cap.span
    mean = torch.stack([cap.attention_probs[layer]["before"][0, :, 7, start:end].mean(0)
                        for layer in range(3, 21)]).mean(0)
    got = browser.js("explorer.set({head: -1}); return explorer.current().attention.before")
    close(got, mean.tolist(), float(mean.max()) / 65535 + 1e-7)
    one = torch.stack([cap.attention_probs[layer]["before"][0, 5, 7, start:end] for layer in range(3, 21)])
    got = browser.js("explorer.set({head: 5}); return explorer.current().attention.before")
    close(got, one.mean(0).tolist(), float(one.max(-1).values.max()) / 30 + 1e-7)


def test_a_page_over_budget_keeps_8_bit_means_and_fewer_heads(browser, tmp_path):
    """Where 16-bit means would take over half the budget (a long answer, LLaVA-NeXT's tokens): 8 bits, and single
    heads for the rows the rest holds; the page reads both right."""
    from minivar import explorer
    L, H, N, R = 3, 4, 36, 6
    cap = SeventyBShape(L=L, H=H, N=N, R=R, start=5)
    numbers = seventy_b_numbers(cap, L=L, H=H, N=N)
    numbers["prompt"] = NASTY                            # text that would end or bend a script element, kept as text
    budget = R * L * N + 2 * (L * H * N // 2)             # 8-bit means and two rows of 4-bit heads (16 bits: over half)
    data = explorer.explorer_data(cap, numbers, [Image.new("RGB", (336, 336))], tokenizer=Tokens(),
                                  output_ids=list(range(R - 1)), prompt_ids=list(range(100)), reports={}, records={},
                                  var=None, budget=budget)
    assert "q8" in data["attention"]["before"] and data["head_rows_kept"] == 2
    assert "8 bits" in data["precision"][0] and "for 2 of 6 answer rows" in data["precision"][1]
    path = tmp_path / "explorer.html"
    path.write_text(explorer.page(data), encoding="utf-8")
    browser.open(path.as_uri())
    assert browser.logs() == ([], [])
    assert browser.js("return explorer.data.prompt") == NASTY
    start, end = cap.span
    for row, head in ((4, -1), (1, 2), (4, 2)):       # row 4, head 2: past the kept rows, so the mean over heads
        got = browser.js(f"explorer.set({{row: {row}, lo: 0, hi: 2, head: {head}}}); return explorer.current()")
        p = torch.stack([cap.attention_probs[layer]["before"][0, :, row, start:end] for layer in range(L)])
        one = head >= 0 and row < 2
        want = (p[:, head] if one else p.mean(1)).mean(0)
        tol = float(p[:, head].max() if one else p.mean(1).max()) / (30 if one else 510) + 1e-7
        close(got["attention"]["before"], want.tolist(), tol)
        assert got["head_map_kept"] == (head < 0 or row < 2)


# ---------------------------------------------------------------------------------------------------------------
# minivar --serve

def post(port, query, body, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/run?{query}", data=body, method="POST",
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_answers_an_upload_and_refuses_a_bad_one(browser, llava_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "minivar", "--model", str(llava_dir), "--serve", "--port", "0",
                             "--dtype", "float32", "--device", "cpu"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    try:
        line = ""
        for line in proc.stderr:
            if "serving on" in line:
                break
        m = re.search(r"http://127\.0\.0\.1:(\d+)/.*files in (\S+) ", line)
        assert m, line
        port, root = int(m.group(1)), Path(m.group(2))
        assert root.is_dir()
        # a real upload through the page
        browser.driver.get(f"http://127.0.0.1:{port}/")
        browser.driver.find_element("id", "image").send_keys(str(IMAGE))
        browser.js(f"document.querySelector('input[name=\"max-new-tokens\"]').value = 3;"
                   f"document.querySelector('input[name=\"var\"]').checked = true;"
                   f"document.querySelector('input[name=\"tau\"]').value = {TAU};")
        browser.driver.find_element("id", "run").click()
        browser.wait("return document.getElementById('explorer').src.includes('/runs/')", 120)
        browser.driver.switch_to.frame(browser.driver.find_element("id", "explorer"))
        browser.wait("return !!(window.explorer && window.explorer.ready)", 60)
        assert browser.js("return explorer.data.var.rho") == 0.8 and len(browser.js("return explorer.data.tokens")) >= 1
        browser.driver.switch_to.default_content()
        console, network = browser.logs()
        assert console == [], console
        # bad requests: not an image, too large, an unknown setting — each a 4xx with one message; the server lives
        status, out = post(port, "prompt=hi", b"this is not an image")
        assert status == 400 and "not an image" in out["error"]
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.putrequest("POST", "/run?prompt=hi")
        c.putheader("Content-Length", str(30 * 1024 * 1024))
        c.endheaders()
        r = c.getresponse()
        assert r.status == 413 and "at most" in json.loads(r.read())["error"]
        c.close()
        status, out = post(port, "prompt=hi&rho=abc", IMAGE.read_bytes())
        assert status == 400 and "--rho" in out["error"]
        status, out = post(port, "prompt=hi&max-new-tokens=1&sink-dims=" + DIMS, IMAGE.read_bytes())
        assert status == 200 and out["explorer"].startswith("/runs/")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{out['explorer']}", timeout=30) as r:
            assert r.status == 200 and b"minivar attention explorer" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0
    assert not root.exists()                                     # the runs' files went with the server


def test_serve_warns_when_bound_beyond_this_machine():
    from minivar import serve
    assert serve.host_warning("127.0.0.1", 8765) is None and serve.host_warning("localhost", 1) is None
    assert "anyone who can reach port 8765 can run the model" in serve.host_warning("0.0.0.0", 8765)


def test_serve_is_busy_while_a_generation_runs(tmp_path):
    from minivar import serve
    server = serve.Server(llava=None, root=tmp_path, defaults={})
    with server.lock:
        with pytest.raises(serve.BadRequest) as e:
            server.run("prompt=hi", IMAGE.read_bytes())
    assert e.value.status == 503 and "busy" in str(e.value)


def test_explorer_needs_every_layer():
    from minivar import explorer
    cap = SeventyBShape(L=2, H=2, N=4, R=2, start=3)
    del cap.attention_probs[1]
    with pytest.raises(ValueError, match="layers \\[1\\]"):
        explorer.explorer_data(cap, seventy_b_numbers(cap, L=2, H=2, N=4), [None], tokenizer=Tokens(),
                               output_ids=[1], prompt_ids=list(range(10)), reports={}, records={}, var=None)


def test_serve_flags_are_checked_before_anything_loads():
    from conftest import assert_one_line_error
    assert_one_line_error(*run_cli(["--serve", "--image", IMAGE, "--model", "demo"]), "--serve", "--image")
    assert_one_line_error(*run_cli(["--serve", "--var", "--rho", "0.5"]), "--serve", "--var", "--rho")
    assert_one_line_error(*run_cli(["--port", "9000", "--image", IMAGE, "--prompt", "hi"]), "--port", "--serve")
    assert_one_line_error(*run_cli(["--host", "0.0.0.0", "--image", IMAGE, "--prompt", "hi"]), "--host", "--serve")
    assert_one_line_error(*run_cli(["--prompt", "hi"]), "--image")
