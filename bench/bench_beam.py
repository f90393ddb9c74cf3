#!/usr/bin/env python
"""Beam search and OPERA: decode speed of minivar's beam search against transformers' generate(num_beams=K) on the
same checkpoint, pixels and prompt ids (bench.py's LLaVA reference shape: CLIP-L/336 + 4 LLaMA-2-7B layers, a
623-token prompt), and OPERA's per-token cost against plain beam search of the same width.

    python bench/bench_beam.py --device cuda --dtype float16          # the reference shape on a GPU
    python bench/bench_beam.py --make tiny --quick --dtype float32    # seconds, a smoke test

Decode time is the generation's time after its first token (prefill and first token excluded), per generated token;
no EOS, so every run makes exactly --new-tokens tokens (OPERA: its steps, rollbacks included, are counted).
Output: a table, then one JSON line (prefixed "BENCH_JSON ").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench import SHAPES, inputs, make_checkpoint, sync  # noqa: E402
from minivar.pipeline import DTYPES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: weights/bench-<shape>-<dtype>")
    p.add_argument("--make", choices=sorted(SHAPES), default="reference")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--beams", default="2,5", help="beam widths, comma-separated (default 2,5; OPERA at the last)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 repeat, 8 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 1, 8
    beams = [int(k) for k in args.beams.split(",")]
    ckpt = args.checkpoint or REPO / "weights" / f"bench-{args.make}-{args.dtype}"
    make_checkpoint(args.make, args.dtype, ckpt)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    n = args.new_tokens

    from minivar.checkpoint import load_model
    from minivar.generate import generate
    from minivar.methods.opera import LastLayer, OPERAConfig, opera_search
    model = load_model(ckpt, dt, dev)
    cfg = model.config
    ids, px = inputs(cfg)
    ids, px = ids.to(dev), px.to(dev, dt)
    feats = model.image_features(px)[0]
    result = {"device": str(dev), "dtype": args.dtype, "shape": args.make, "prompt_tokens": ids.shape[1],
              "new_tokens": n, "beams": {}}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)

    def best(fn):
        out = None
        for _ in range(args.repeats):
            r = fn()
            out = r if out is None or r["decode_s"] < out["decode_s"] else out
        return out

    def ours(K):
        g = generate(model, ids.repeat(K, 1), None, image_features=feats.repeat(K, 1), max_new_tokens=n + 1,
                     eos_token_id=None, num_beams=K)
        return {"decode_s": g.decode_s, "tokens": g.output_ids[0], "per_token_ms": 1e3 * g.decode_s / g.decode_tokens}

    def opera(K):
        oc = OPERAConfig(num_beams=K)
        hook = LastLayer(cfg.text.num_hidden_layers, ids.shape[1])
        g, rep = opera_search(model, ids.repeat(K, 1), oc, hook, image_features=feats.repeat(K, 1),
                              max_new_tokens=n + 1, stop_ids=None, hooks=[hook])
        return {"decode_s": g.decode_s, "per_token_ms": 1e3 * g.decode_s / g.decode_tokens,
                "rollbacks": rep["rollbacks"]}

    hf = None
    if not args.no_transformers:
        from transformers import LlavaForConditionalGeneration
        hf = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=dt, attn_implementation="sdpa").to(dev).eval()

    def theirs(K):
        mask = torch.ones_like(ids)

        def gen(k):
            t0 = time.perf_counter()
            out = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, do_sample=False, num_beams=K,
                              max_new_tokens=k, eos_token_id=None, pad_token_id=0)
            sync(dev)
            return time.perf_counter() - t0, out
        first = min(gen(1)[0] for _ in range(args.repeats))
        total, out = min((gen(n + 1) for _ in range(args.repeats)), key=lambda x: x[0])
        return {"decode_s": total - first, "per_token_ms": 1e3 * (total - first) / n,
                "tokens": out[0, ids.shape[1]:].tolist()}

    with torch.inference_mode():
        ours(beams[0])                                       # warm-up
        for K in beams:
            row = {"minivar": best(lambda: ours(K))}
            if hf is not None:
                row["transformers"] = best(lambda: theirs(K))
                row["same_tokens"] = row["minivar"].pop("tokens") == row["transformers"].pop("tokens")
                row["speedup"] = row["transformers"]["per_token_ms"] / row["minivar"]["per_token_ms"]
            else:
                row["minivar"].pop("tokens")
            result["beams"][str(K)] = row
        K = beams[-1]
        result["opera"] = best(lambda: opera(K)) | {"num_beams": K}
        result["opera"]["vs_beam"] = result["opera"]["per_token_ms"] / result["beams"][str(K)]["minivar"]["per_token_ms"]

    print(f"beam search decode, {args.make} shape, {args.dtype} on {result.get('gpu', dev)}: "
          f"{ids.shape[1]}-token prompt, {n} new tokens, ms per token (all beams)")
    for K, row in result["beams"].items():
        line = f"  K={K}: minivar {row['minivar']['per_token_ms']:.2f}"
        if "transformers" in row:
            line += (f", transformers {row['transformers']['per_token_ms']:.2f} ({row['speedup']:.2f}x), "
                     f"same tokens: {row['same_tokens']}")
        print(line)
    o = result["opera"]
    print(f"  OPERA K={o['num_beams']}: {o['per_token_ms']:.2f} ms per step, {o['vs_beam']:.2f}x plain beam search "
          f"of the same width ({o['rollbacks']} rollbacks)")
    print("BENCH_JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
