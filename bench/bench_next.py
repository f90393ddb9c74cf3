#!/usr/bin/env python
"""minivar's LLaVA-NeXT against transformers' LlavaNextForConditionalGeneration (sdpa): prefill and decode on the
same checkpoint, pixels and prompt ids, in one process, the two alternating; and minivar's peak RSS against the
checkpoint's size.

    python bench/bench_next.py                   # reference: bf16, full CLIP-L/336, 4 LLaMA-7B-sized layers,
                                                 # a 672×672 image (2,928 image tokens)
    python bench/bench_next.py --make tiny --quick --dtype float32     # seconds, for a smoke test

The checkpoint is made on first use (bench.py's make_checkpoint, random weights, hub layout) and reused. One worker
process loads minivar first and runs it once, so its peak RSS then (VmHWM) is minivar's alone; then it loads
transformers' model and times both, repeat by repeat, the order swapping every repeat so that both see the same
machine; the figures are the medians of the repeats. Prefill: the vision tower, the projector and the decoder over
the whole prompt up to the first token. Decode: tokens per second of the steps after it (transformers: generate()
of n + 1 tokens minus its prefill, as bench.py measures it). Output: a table, then one JSON line ("BENCH_NEXT_JSON ").
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

from bench import (CLIP_L_336, DTYPES, SHAPES, _cpu_name, hf_timed_generate, make_checkpoint, median,  # noqa: E402
                   peak_rss_gb, positive_int, sync, worker_result)
from minivar.models.llava_next import LlavaNextConfig  # noqa: E402

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))      # llava-hf's (all three variants)
IMAGE_SIZE = (672, 672)                                                        # (h, w): 2,928 image tokens


def next_shape(llava) -> LlavaNextConfig:
    """LLaVA-1.5's bench shape (bench.SHAPES) as LLaVA-NeXT: the same tower and decoder, the default pinpoints."""
    return LlavaNextConfig(vision=llava.vision, text=llava.text, pad_token_id=llava.pad_token_id,
                           image_grid_pinpoints=PINPOINTS)


# (named apart from bench.py's shapes: the checkpoint's marker file names the shape it was made as)
SHAPES_NEXT = {
    "next-reference": next_shape(SHAPES["reference"]),
    # a tiny tower and decoder, at 336 px so that the image gives the reference's 2,928 tokens
    "next-tiny": next_shape(SHAPES["tiny"]),
}
assert SHAPES_NEXT["next-reference"].vision == CLIP_L_336


def inputs(cfg: LlavaNextConfig):
    """A seeded 672×672 image as minivar's ImageInput and transformers' (pixel_values [1, 5, 3, 336, 336],
    image_sizes), and the prompt ids: BOS, 35 text tokens, the image's tokens, 12 text tokens."""
    import numpy as np
    from PIL import Image

    from minivar.models.anyres import process_image
    h, w = IMAGE_SIZE
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = process_image(Image.fromarray(rgb), cfg)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(100, 30000, (47,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[:35], torch.full((image.num_tokens,), cfg.image_token_index), text[35:]])
    return ids[None], image, image.pixel_values[None], torch.tensor([[h, w]])


def worker(args) -> dict:
    from minivar.checkpoint import load_model
    from minivar.generate import generate
    from minivar.pipeline import pick_device
    dev, dt = pick_device(args.device), DTYPES[args.dtype]
    t0 = time.perf_counter()
    ours = load_model(Path(args.checkpoint), dt, dev)
    sync(dev)
    res = {"minivar_load_s": time.perf_counter() - t0}
    cfg = ours.config
    ids, image, px, sizes = inputs(cfg)
    ids, image, px = ids.to(dev), image.to(dev, dt), px.to(dev, dt)
    n = args.new_tokens
    res["image_tokens"], res["prompt_tokens"] = image.num_tokens, ids.shape[1]

    def minivar_run(k):
        return generate(ours, ids, [image], max_new_tokens=k, eos_token_id=None)

    with torch.inference_mode():
        first = minivar_run(n + 1)                     # warm-up; the tokens
        res["minivar_tokens"] = first.output_ids[0]
        res["minivar_peak_rss_gb"] = peak_rss_gb()     # before transformers is even imported
        if args.no_transformers:
            theirs = None
        else:
            from transformers import LlavaNextForConditionalGeneration
            t0 = time.perf_counter()
            theirs = LlavaNextForConditionalGeneration.from_pretrained(
                args.checkpoint, dtype=dt, attn_implementation="sdpa").to(dev).eval()
            res["transformers_load_s"] = time.perf_counter() - t0
            mask = torch.ones_like(ids)

            def hf_run():               # prefill and decode rate from one timed run (bench.hf_timed_generate)
                out, prefill, decode = hf_timed_generate(theirs, dev, n, input_ids=ids, pixel_values=px,
                                                         image_sizes=sizes, attention_mask=mask)
                return prefill, decode, out[0, ids.shape[1]:].tolist()

            res["transformers_tokens"] = hf_run()[2]          # warm-up; the tokens
        times = {who: {"prefill_s": [], "decode_tok_s": []} for who in ("minivar", "transformers")}
        for i in range(args.repeats):
            for who in (("minivar", "transformers") if i % 2 == 0 else ("transformers", "minivar")):
                if who == "minivar":
                    prefill, decode = minivar_run(1).prefill_s, minivar_run(n + 1).decode_tokens_per_s
                elif theirs is not None:
                    prefill, decode, _ = hf_run()
                else:
                    continue
                times[who]["prefill_s"].append(prefill)
                times[who]["decode_tok_s"].append(decode)
    res["runs"] = times
    for who, t in times.items():
        if t["prefill_s"]:
            res[who] = {"prefill_s": median(t["prefill_s"]), "decode_tok_s": median(t["decode_tok_s"])}
    return res


def main(argv=None) -> int:
    summary, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(description=textwrap.fill(" ".join(summary.split()), 100),
                                epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint directory; made there (shape --make) if it has no config.json "
                        "(default: weights/bench-next-<make>-<dtype>)")
    p.add_argument("--make", choices=["reference", "tiny"], default="reference", help="shape of the checkpoint to make")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 repeats, 4 tokens")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 2, 4
    if args.worker:
        print("WORKER_JSON " + json.dumps(worker(args)))
        return 0
    if not args.no_transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("bench_next: transformers is not installed; minivar alone", file=sys.stderr)
            args.no_transformers = True
    args.checkpoint = make_checkpoint(f"next-{args.make}", args.dtype,
                                      args.checkpoint or REPO / "weights" / f"bench-next-{args.make}-{args.dtype}",
                                      shapes=SHAPES_NEXT)
    ckpt_bytes = sum(f.stat().st_size for f in Path(args.checkpoint).glob("*.safetensors"))
    for f in Path(args.checkpoint).glob("*.safetensors"):        # warm the page cache: load time is from warm disk
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    cmd = [sys.executable, __file__, "--worker", "--checkpoint", str(args.checkpoint), "--dtype", args.dtype,
           "--device", args.device, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    res = worker_result(cmd + (["--no-transformers"] if args.no_transformers else []), "bench_next: worker")
    if res is None:
        return 1
    report = {"date": date.today().isoformat(), "cpu": _cpu_name(), "torch": torch.__version__,
              "device": args.device, "dtype": args.dtype, "checkpoint": str(args.checkpoint),
              "checkpoint_gb": ckpt_bytes / 1e9, "new_tokens": args.new_tokens, "repeats": args.repeats, **res}
    report["rss_budget_gb"] = (1.1 * ckpt_bytes + 0.4e9) / 2**30          # issue 21's target
    report["rss_within_budget"] = res["minivar_peak_rss_gb"] <= report["rss_budget_gb"]
    if "transformers" in res:
        report["prefill_ratio_vs_transformers"] = res["minivar"]["prefill_s"] / res["transformers"]["prefill_s"]
        report["decode_speedup_vs_transformers"] = res["minivar"]["decode_tok_s"] / res["transformers"]["decode_tok_s"]
        report["same_tokens_as_transformers"] = res["minivar_tokens"] == res["transformers_tokens"]
    print_table(report)
    print("BENCH_NEXT_JSON " + json.dumps(report))
    return 0


def print_table(r: dict) -> None:
    hf = r.get("transformers")
    print(f"\nminivar LLaVA-NeXT benchmark — {r['date']}, {r['cpu']}, torch {r['torch']}, {r['device']}, "
          f"{r['dtype']}")
    print(f"checkpoint {r['checkpoint']} ({r['checkpoint_gb']:.2f} GB); a {IMAGE_SIZE[1]}×{IMAGE_SIZE[0]} image: "
          f"{r['image_tokens']} image tokens, {r['prompt_tokens']} prompt tokens; medians of {r['repeats']} "
          f"alternating repeats\n")
    print(f"{'':20}{'minivar':>12}" + (f"{'transformers':>14}{'ratio':>8}" if hf else ""))
    for label, key, fmt in (("prefill (s)", "prefill_s", "{:.3f}"), ("decode (tok/s)", "decode_tok_s", "{:.2f}")):
        line = f"{label:20}{fmt.format(r['minivar'][key]):>12}"
        if hf:
            line += f"{fmt.format(hf[key]):>14}{r['minivar'][key] / hf[key]:>8.2f}"
        print(line)
    if hf:
        print(f"\nprefill time ratio {r['prefill_ratio_vs_transformers']:.2f} (target ≤ 1.05), decode speed-up "
              f"{r['decode_speedup_vs_transformers']:.2f}x (target ≥ 1.3); same greedy tokens: "
              f"{r['same_tokens_as_transformers']}")
    print(f"minivar's peak RSS {r['minivar_peak_rss_gb']:.2f} GiB (budget 1.1 × checkpoint + 0.4 GB = "
          f"{r['rss_budget_gb']:.2f} GiB: {'within' if r['rss_within_budget'] else 'OVER'})")


if __name__ == "__main__":
    sys.exit(main())
