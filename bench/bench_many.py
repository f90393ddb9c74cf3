#!/usr/bin/env python
"""Many questions about one image: a POPE-shaped workload (K images × Q yes/no questions, short answers) timed three
ways on the same checkpoint, pixels and prompts:

  (a) minivar's shared image prefix (Pipeline.generate_many: vision tower and prefix once per image, the questions
      as one batch on it),
  (b) minivar one question at a time (Pipeline.generate),
  (c) transformers' LlavaForConditionalGeneration (sdpa), one question at a time — the way lmms-eval's llava_hf and
      the official VAR code run a benchmark (image encoded and prompt prefilled again for every question),

for Q = 1, 6, 18, VAR off and on for (a) and (b), then `python -m minivar.eval run pope` end to end on the same
workload (model load included). Each part runs in its own process, so its peak RSS is its own.

    python bench/bench_many.py                     # reference config (CLIP-L/336 + 4 LLaMA-2-7B layers, bf16, CPU)
    python bench/bench_many.py --make tiny --quick # seconds, a smoke test

The questions need the LLaMA tokenizer: ../shared/testdata/llama-tokenizer/tokenizer.json, or --tokenizer PATH.
Output: a table, then one JSON line prefixed "BENCH_MANY_JSON ".
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench import (DTYPES, SHAPES, _cpu_name, make_checkpoint, peak_rss_gb, positive_int,  # noqa: E402
                   positive_ints, worker_result)

OBJECTS = ["dog", "cat", "person", "car", "chair", "bottle", "cup", "bird", "tree", "boat", "horse", "bench",
           "clock", "book", "bus", "train", "kite", "pizza"]
SUFFIX = "\nAnswer the question using a single word or phrase."          # LLaVA's POPE prompt
TOKENIZER = REPO.parent / "shared" / "testdata" / "llama-tokenizer" / "tokenizer.json"


def questions(q: int) -> list[str]:
    return [f"Is there a {OBJECTS[i % len(OBJECTS)]} in the image?{SUFFIX}" for i in range(q)]


def make_images(directory: Path, k: int) -> list[Path]:
    """K seeded 640×480 noise photos, named like COCO val2014 files (the POPE reader wants them by name)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(k):
        path = directory / f"COCO_val2014_{i + 1:012d}.jpg"
        pixels = torch.randint(0, 256, (480, 640, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Workers

def worker_minivar(args) -> dict:
    import minivar
    from minivar.methods.var import VARConfig
    llava = minivar.load(str(args.checkpoint), device=args.device, dtype=args.dtype)
    llava.tokenizer.eos_id = None              # random weights: every answer is exactly --new-tokens long
    images = [Path(p) for p in args.images]
    hidden = llava.config.text.hidden_size
    var = VARConfig.preset("hallucination", tau=args.var_tau, sink_dims=(1415 % hidden, 2533 % hidden))
    n = args.new_tokens
    llava.generate_many(images[0], questions(2), max_new_tokens=n)               # warm-up
    res = {"load_s": llava.load_s, "shared": {}, "one_by_one": {}}
    for label, cfg in (("off", None), ("on", var)):
        for q in args.questions:
            rates = []
            for _ in range(args.repeats):              # the best of the repeats: this VM's timings are noisy
                t0 = time.perf_counter()
                out = [llava.generate_many(img, questions(q), max_new_tokens=n, var=cfg) for img in images]
                rates.append(len(images) * q / (time.perf_counter() - t0))
            res["shared"][f"{label}-{q}"] = max(rates)
            if cfg is not None and q == max(args.questions):
                res["var_pairs"] = sum(sum(r.var["redistributed"]["prefill"]) for rs in out for r in rs)
        # one at a time: the rate does not depend on Q; timed over K × min(6, max Q) questions
        q1 = min(6, max(args.questions))
        t0 = time.perf_counter()
        for img in images:
            for text in questions(q1):
                llava.generate(img, text, max_new_tokens=n, var=cfg)
        res["one_by_one"][label] = len(images) * q1 / (time.perf_counter() - t0)
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def worker_transformers(args) -> dict:
    import transformers
    from transformers import LlavaForConditionalGeneration

    import minivar.processing as processing
    from minivar.checkpoint import read_config
    cfg = read_config(args.checkpoint)
    dt = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dt,
                                                          attn_implementation="sdpa").to(args.device).eval()
    load_s = time.perf_counter() - t0
    tok = processing.Tokenizer(args.checkpoint, cfg.image_token_index)
    n = args.new_tokens

    def answer(image, text):        # per question: preprocess, tokenize, generate — no reuse across questions
        px = processing.preprocess(processing.load_image(image), cfg.vision.image_size, "pad")[None].to(args.device, dt)
        ids = torch.tensor([tok.encode_prompt(text, "vicuna_v1", cfg.num_image_tokens)], device=args.device)
        model.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=n, min_new_tokens=n)

    images = [Path(p) for p in args.images]
    q1 = min(6, max(args.questions))
    with torch.inference_mode():
        answer(images[0], questions(1)[0])                                          # warm-up
        t0 = time.perf_counter()
        for img in images:
            for text in questions(q1):
                answer(img, text)
        rate = len(images) * q1 / (time.perf_counter() - t0)
    return {"version": transformers.__version__, "load_s": load_s, "one_by_one": rate, "peak_rss_gb": peak_rss_gb()}


def run_eval_cli(args, q: int, work: Path) -> dict:
    """`python -m minivar.eval run pope` on --eval-images images × q questions, timed as a user would time it:
    process start and model load included."""
    data = work / f"pope-{q}"
    data.mkdir()
    images = [str(p) for p in make_images(data, args.eval_images)]
    lines = [json.dumps({"question_id": i * q + j + 1, "image": Path(img).name,
                         "text": f"Is there a {OBJECTS[j % len(OBJECTS)]} in the image?",
                         "label": "yes" if j % 2 == 0 else "no"})
             for i, img in enumerate(images) for j in range(q)]
    (data / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "minivar.eval", "run", "pope", "--data", str(data / "coco_pope_random.json"),
           "--images", str(data), "--out", str(work / f"run-{q}"), "--model",
           str(args.checkpoint), "--device", args.device, "--dtype", args.dtype, "--max-new-tokens",
           str(args.new_tokens), "--batch-size", str(q), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"bench_many: the eval run failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    return {"wall_s": wall, "questions_per_s": len(lines) / wall}


def run_worker(name: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--checkpoint", str(args.checkpoint), "--dtype", args.dtype,
           "--device", args.device, "--new-tokens", str(args.new_tokens), "--var-tau", str(args.var_tau),
           "--questions", ",".join(map(str, args.questions)), "--repeats", str(args.repeats),
           "--images", *map(str, args.images)]
    return worker_result(cmd, f"bench_many: {name} worker")


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Questions/s on a POPE-shaped workload: minivar's shared image prefix vs "
                                            "one question at a time vs transformers' per-question loop.")
    p.add_argument("--checkpoint", type=Path, help="an existing checkpoint (default: make one in weights/)")
    p.add_argument("--make", choices=sorted(SHAPES), default="reference", help="shape of the checkpoint to make")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", nargs="+", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n-images", type=positive_int, default=2, help="K images (default 2)")
    p.add_argument("--eval-images", type=positive_int, default=10,
                   help="images of the end-to-end `minivar.eval run pope` (default 10)")
    p.add_argument("--questions", type=positive_ints, default=[1, 6, 18], help="Q per image, e.g. 1,6,18")
    p.add_argument("--new-tokens", type=positive_int, default=3, help="answer length (POPE answers are 1-3 tokens)")
    p.add_argument("--var-tau", type=float, default=2.0,
                   help="τ for VAR on random weights (they have no massive activations: 2.0 makes some sinks)")
    p.add_argument("--repeats", type=positive_int, default=2, help="shared-prefix runs per cell (the best is kept)")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="a LLaMA tokenizer.json")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip the end-to-end `minivar.eval run pope`")
    p.add_argument("--quick", action="store_true", help="1 image, Q = 1,6, 2 tokens")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        torch.manual_seed(0)
        fn = {"minivar": worker_minivar, "transformers": worker_transformers}[args.worker]
        print("WORKER_JSON " + json.dumps(fn(args)))
        return 0
    if args.quick:
        args.n_images, args.questions, args.new_tokens, args.repeats, args.eval_images = 1, [1, 6], 2, 1, 1
    if not args.tokenizer.is_file():
        print(f"bench_many: error: no tokenizer at '{args.tokenizer}' (pass --tokenizer PATH to a LLaMA "
              f"tokenizer.json)", file=sys.stderr)
        return 2
    # a checkpoint of the user's own is used as it is; otherwise a random one of --make's shape is made (once)
    args.checkpoint = make_checkpoint(args.make, args.dtype,
                                      args.checkpoint or REPO / "weights" / f"bench-{args.make}-{args.dtype}")
    if not (args.checkpoint / "tokenizer.json").is_file():
        shutil.copy(args.tokenizer, args.checkpoint / "tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        args.images = [str(p) for p in make_images(work / "images", args.n_images)]
        ours = run_worker("minivar", args)
        theirs = None if args.no_transformers else run_worker("transformers", args)
        e2e = {} if args.no_eval else {str(q): run_eval_cli(args, q, work) for q in args.questions}
    if ours is None:
        return 1
    result = {"date": date.today().isoformat(), "cpu": _cpu_name(), "torch": torch.__version__,
              "device": args.device, "dtype": args.dtype, "checkpoint": str(args.checkpoint),
              "images": args.n_images, "questions": args.questions, "var_tau": args.var_tau, "eval_images": args.eval_images, "new_tokens": args.new_tokens,
              "minivar": ours, "transformers": theirs, "eval_cli": e2e}
    print_table(result)
    print("BENCH_MANY_JSON " + json.dumps(result))
    return 0


def print_table(r: dict) -> None:
    m, t = r["minivar"], r["transformers"]
    print(f"minivar many-questions benchmark — {r['date']}, {r['cpu']}, torch {r['torch']}, {r['device']}, "
          f"{r['dtype']}")
    print(f"checkpoint {r['checkpoint']}; {r['images']} images × Q questions, {r['new_tokens']} new tokens each")
    print("questions/s          Q   shared prefix   one by one   transformers   shared/transformers   shared/one-by-one")
    for q in r["questions"]:
        a, b = m["shared"][f"off-{q}"], m["one_by_one"]["off"]
        c = t["one_by_one"] if t else float("nan")
        print(f"  VAR off         {q:4d}   {a:13.3f}   {b:10.3f}   {c:12.3f}   {a / c:19.2f}x   {a / b:17.2f}x")
    for q in r["questions"]:
        a, off = m["shared"][f"on-{q}"], m["shared"][f"off-{q}"]
        print(f"  VAR on          {q:4d}   {a:13.3f}   {m['one_by_one']['on']:10.3f}   "
              f"{'':12}   VAR costs {100 * (1 - a / off):5.1f}% of the shared path's throughput")
    print(f"VAR: hallucination preset, τ {r['var_tau']}; (head, row) pairs redistributed in the prefills at the "
          f"largest Q: {m.get('var_pairs')}")
    print(f"peak RSS (GiB): minivar {m['peak_rss_gb']:.2f}" + (f", transformers {t['peak_rss_gb']:.2f}" if t else ""))
    for q, e in r["eval_cli"].items():
        if e:
            print(f"python -m minivar.eval run pope, {r['eval_images']} images × Q = {q} (--batch-size {q}), process "
                  f"start and model load included: {e['questions_per_s']:.3f} questions/s ({e['wall_s']:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
