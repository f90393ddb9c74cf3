#!/usr/bin/env python
"""PAI's cost: decode tok/s and prefill time of base and PAI on minivar, in one process, on the same checkpoint,
pixels and prompt ids.

    python bench/bench_pai.py                        # reference config (CLIP-L/336 + 4 LLaMA-2-7B layers, bf16)
    python bench/bench_pai.py --make tiny --quick    # seconds, a smoke test

PAI (methods/pai.py) adds a branch without the image, run as rows of the same batched forward as the full prompt
(the weights read once per step), and edits the image keys' pre-softmax scores of the last row in its layers (a
written-out attention row there). Variants: base (a plain load); pai — the released settings, α 0.2, layers 2-32
(clipped to the model's depth), γ 1.1 — on a load as `--pai` makes it (on a CPU in bf16 its decoder packed for
two-row steps, as for DAMRO and VCD); pai_attention — γ 1, the attention step alone, no branch, on the plain load.
Each repeat runs every variant once, the order rotating; the figures are medians over the repeats (ratios: the median
of the per-repeat ratios). Target: PAI's decode time per token ≤ 1.35× base's. Output: a table, then one JSON line
prefixed "BENCH_PAI_JSON ".
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench import DTYPES, SHAPES, _cpu_name, inputs, make_checkpoint, median, positive_int, sync  # noqa: E402

VARIANTS = ("base", "pai", "pai_attention")
TARGETS = {"pai_decode_ratio": 1.35}


def runner(pipe, ids: torch.Tensor, px: torch.Tensor, methods):
    """A function running `methods` (a list, made fresh per run) on `pipe` for n tokens through minivar's
    generation loop, as Pipeline.generate runs it (the request, its branch and hooks, then generate)."""
    from minivar.generate import generate
    rows = [ids[0].tolist()]
    model, device = pipe.model, pipe.device

    def run(new_tokens: int) -> dict:
        sync(device)
        t0 = time.perf_counter()
        chosen = methods()
        request = pipe._request(rows, model.image_inputs(px), new_tokens, chosen, None, False)
        pipe.add_hooks(request, methods=chosen)
        images = request.images if request.image_features is None else request.row_images
        setup_s = time.perf_counter() - t0
        gen = generate(model, request.input_ids, images, image_features=request.image_features,
                       max_new_tokens=request.max_new_tokens, eos_token_id=None,
                       attention_mask=request.attention_mask, hooks=request.hooks, branches=request.branches,
                       choose=request.choose)
        prefill_s = setup_s + gen.prefill_s
        return {"prefill_s": prefill_s, "decode_s": gen.decode_s, "decode_tok_s": gen.decode_tokens_per_s,
                "total_s": prefill_s + gen.decode_s, "tokens": gen.output_ids[0]}
    return run


def worker(args) -> dict:
    from minivar.checkpoint import load_model
    from minivar.methods.pai import PAI, PAIConfig
    from minivar.models import packed
    from minivar.pipeline import Pipeline, pick_device
    dev, dt = pick_device(args.device), DTYPES[args.dtype]

    def pipeline(contrastive: bool):          # loaded as minivar.load(contrastive=...) loads it
        t0 = time.perf_counter()
        model = load_model(Path(args.checkpoint), dt, dev, pack_decoder=contrastive)
        return Pipeline(model, None, Path(args.checkpoint), dev, dt, time.perf_counter() - t0)

    pipe = pipeline(False)
    branch_pipe = pipeline(True) if dev.type == "cpu" and dt == torch.bfloat16 and packed.available() else pipe
    ids, px = inputs(pipe.model.config)
    ids, px = ids.to(dev), px.to(dev, dt)
    n_layers = pipe.config.text.num_hidden_layers
    released = PAIConfig(alpha=args.alpha, layers=(min(2, n_layers - 1), 32), gamma=args.gamma)
    runners = {"base": runner(pipe, ids, px, lambda: []),
               "pai": runner(branch_pipe, ids, px, lambda: [PAI(released)]),
               "pai_attention": runner(pipe, ids, px, lambda: [PAI(PAIConfig(alpha=args.alpha,
                                                                             layers=released.layers, gamma=1.0))])}
    n = args.new_tokens + 1                         # the first token comes with the prefill
    runs = {v: [] for v in runners}
    with torch.inference_mode():
        for v in runners:
            runners[v](2)                           # warm-up
        order = list(runners)
        for i in range(args.repeats):
            for v in order[i % len(order):] + order[:i % len(order)]:    # the order rotates every repeat
                runs[v].append(runners[v](n))
    res = {"pai_settings": released.settings() | {"layers_edited": [released.layers[0],
                                                                    min(released.layers[1], n_layers)]},
           "runs": {v: [{k: r[k] for k in ("prefill_s", "decode_s", "decode_tok_s", "total_s")} for r in rs]
                    for v, rs in runs.items()}}
    res["median"] = {v: {k: median([r[k] for r in rs]) for k in ("prefill_s", "decode_tok_s", "total_s")}
                     for v, rs in runs.items()}
    base = runs["base"]

    def ratio(v, key, invert=False):       # median over the repeats of (variant / base), each repeat's own pair
        return median([(b[key] / r[key]) if invert else (r[key] / b[key]) for b, r in zip(base, runs[v])])

    res["ratios"] = {"pai_decode_ratio": ratio("pai", "decode_tok_s", invert=True),
                     "pai_prefill_ratio": ratio("pai", "prefill_s"),
                     "pai_attention_decode_ratio": ratio("pai_attention", "decode_tok_s", invert=True)}
    res["tokens"] = {v: rs[0]["tokens"] for v, rs in runs.items()}
    return res


def print_table(report: dict) -> None:
    m, r = report["median"], report["ratios"]
    print(f"PAI, {report['device']} {report['dtype']}, {report['new_tokens']} new tokens, {report['repeats']} repeats "
          f"(medians); PAI {report['pai_settings']}")
    print(f"{'variant':<16}{'prefill (s)':>14}{'decode (tok/s)':>16}{'end to end (s)':>16}")
    for v in VARIANTS:
        print(f"{v:<16}{m[v]['prefill_s']:>14.3f}{m[v]['decode_tok_s']:>16.2f}{m[v]['total_s']:>16.3f}")
    print(f"{'ratio':<40}{'measured':>10}{'target':>10}  met")
    for label, key in (("PAI decode time / base", "pai_decode_ratio"), ("PAI prefill / base", "pai_prefill_ratio"),
                       ("PAI attention step alone: decode / base", "pai_attention_decode_ratio")):
        target = TARGETS.get(key)
        met = "" if target is None else ("yes" if r[key] <= target else "NO")
        print(f"{label:<40}{r[key]:>10.3f}{'' if target is None else '≤' + str(target):>10}  {met}")


def main(argv=None) -> int:
    summary, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(description=textwrap.fill(" ".join(summary.split()), 100),
                                epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint directory; made there (shape --make) if it has no config.json "
                        "(default: weights/bench-<make>-<dtype>)")
    p.add_argument("--make", choices=sorted(SHAPES), default="reference", help="shape of the checkpoint to make")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--alpha", type=float, default=0.2, help="PAI's α (its cost does not depend on it)")
    p.add_argument("--gamma", type=float, default=1.1, help="PAI's γ (≠ 1: the branch)")
    p.add_argument("--quick", action="store_true", help="2 repeats, 4 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 2, 4
    args.checkpoint = make_checkpoint(args.make, args.dtype,
                                      args.checkpoint or REPO / "weights" / f"bench-{args.make}-{args.dtype}")
    res = worker(args)
    report = {"date": date.today().isoformat(), "cpu": _cpu_name(), "torch": torch.__version__,
              "device": args.device, "dtype": args.dtype, "checkpoint": str(args.checkpoint),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "targets": TARGETS} | res
    print_table(report)
    print("BENCH_PAI_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
