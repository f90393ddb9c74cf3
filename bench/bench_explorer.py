"""The attention explorer at LLaVA-7B's attention shape (32 layers × 32 heads, 576 image tokens, 32 generated
tokens = 33 answer rows), from random attention: the page's size, the time to build it, and — where headless
Chromium and selenium are installed — the time to load it and to redraw after a change.

    python bench/bench_explorer.py [--rows 33] [--out explorer-7b.html]

tests/test_explorer.py builds the same page (SeventyBShape) and checks its size budget (25 MB) in a browser."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Tokens:
    """A stand-in tokenizer: token i reads "t{i} "."""
    class Stream:
        def push(self, i):
            return f"t{i} "

        def flush(self):
            return ""

    def decode_token_stream(self):
        return self.Stream()

    def decode(self, ids):
        return "".join(f"t{i} " for i in ids)


class SeventyBShape:
    """What explorer_data reads from a probe.Capture, at LLaVA-7B's shape, random (softmax of Gaussian logits)."""

    def __init__(self, L=32, H=32, N=576, R=33, start=35, seed=0):
        g = torch.Generator().manual_seed(seed)
        T = start + N + 40
        S = T + R - 1
        self.rows = list(range(T - 1, T - 1 + R))
        self.attention_probs, self.head_stats, self.phi = {}, {}, {}
        for layer in range(L):
            p = torch.softmax(torch.randn(1, H, R, S, generator=g) * 2, -1)
            self.attention_probs[layer] = {"before": p}
            a = p[..., start:start + N].sum(-1)
            self.head_stats[layer] = {"image_before": a, "nonsink_before": a * 0.9}
            self.phi[layer] = torch.rand(1, T, generator=g) * 30
        self.span = (start, start + N)

    def selected(self, layer):
        return None


def seventy_b_numbers(cap, L=32, H=32, N=576):
    """The attention.json fields explorer_data reads, for a SeventyBShape (one 24×24 panel)."""
    from minivar.inspection import default_layer_range
    start, end = cap.span
    side = int(N ** 0.5)
    return {"image_span": [start, end], "n_layers": L, "n_heads": H, "layer_range": list(default_layer_range(L)),
            "model": "random-7b",
            "panels": [{"name": "image", "rows": side, "cols": N // side, "newline": False, "first": 0}],
            "newline_tokens": [], "sink_dims": [1415, 2533], "tau": 20.0,
            "visual_sinks": {str(layer): [] for layer in range(L)}, "var": None,
            "selection_rule": {"rule": "paper", "rho": 0.8, "min_image_attention": 0.2, "layers": list(range(L - 1))},
            "prompt": "a 7B-shaped page", "answer": "random"}


def build(rows: int = 33):
    from PIL import Image

    from minivar import explorer
    cap = SeventyBShape(R=rows)
    t = time.perf_counter()
    data = explorer.explorer_data(cap, seventy_b_numbers(cap), [Image.new("RGB", (336, 336), (128, 128, 128))],
                                  tokenizer=Tokens(), output_ids=list(range(rows - 1)),
                                  prompt_ids=list(range(700)), reports={}, records={}, var=None)
    html = explorer.page(data)
    return html, time.perf_counter() - t, data["head_rows_kept"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=33, help="answer rows (generated tokens + 1; default: 33)")
    ap.add_argument("--out", default=None, help="also keep the page here (default: a temporary file)")
    args = ap.parse_args(argv)
    html, build_s, kept = build(args.rows)
    path = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "explorer.html"
    path.write_text(html, encoding="utf-8")
    print(f"page: {path.stat().st_size / 1e6:.2f} MB ({args.rows} rows, single heads for {kept}); "
          f"built in {build_s:.2f} s")
    sys.path.insert(0, str(REPO / "tests"))
    from browser_support import Browser, missing_browser
    why = missing_browser()
    if why:
        print(f"browser: not measured ({why})")
        return 0
    b = Browser()
    try:
        load_s = b.open(path.as_uri(), timeout=300)
        times = [b.js("const t = performance.now(); explorer.set(arguments[0]); return performance.now() - t", change)
                 for change in ({"row": 7}, {"lo": 3, "hi": 20}, {"head": 5}, {"row": -1}, {"rho": 0.5}, {"tau": 10})]
        timing = b.js("return explorer.timing")
        print(f"browser: loaded in {load_s:.2f} s (the script starts at {timing['script_start_ms']:.0f} ms, decodes "
              f"the data in {timing['decode_ms']:.0f} ms, draws in {timing['first_draw_ms']:.0f} ms)")
        print("browser: redraws (row, layers 3-20, head, every row, rho, tau) "
              + ", ".join(f"{t:.0f}" for t in times) + " ms")
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
