#!/usr/bin/env python
"""InternVL benchmark: vision tower time, prefill time (vision + decoder over the prompt + first token), decode speed
and peak memory of minivar and of transformers' InternVLForConditionalGeneration (sdpa) on the same checkpoint,
pixels and prompt ids, in one run, alternating between the two, the medians of several repeats.

    python bench/bench_internvl.py              # reference: InternViT-300M + 4 decoder layers of InternVL3.5-8B, bf16
    python bench/bench_internvl.py --quick      # tiny shape, 2 repeats, 8 tokens: seconds, for a smoke test
    python bench/bench_internvl.py --device cuda --dtype float16

The checkpoint is made with transformers on first use (random weights, save_pretrained's hub layout, the tests'
small byte-level BPE tokenizer with InternVL's image tokens, the chat template, a preprocessor_config.json) in
weights/bench-internvl-<make>-<dtype>. A 448 × 448 image is one tile: 256 image tokens. Each implementation runs in a
process of its own that stays up for the whole run, and the repeats alternate between them, the order swapping
every repeat (bench_qwen.py's protocol). Targets: prefill ≤ 1.05 × transformers' time, decode ≥ 1.3 × its tokens/s.
Output: a table, then one JSON line (prefixed "BENCH_JSON ").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench as base  # noqa: E402  (bench.py's helpers: timing, peak RSS, CPU name, argument types)
from bench_qwen import TARGETS, summary  # noqa: E402  (the same targets and medians)
from minivar.pipeline import DTYPES  # noqa: E402

# InternViT-300M-448px-V2_5 (InternVL3 / 3.5 up to 14B) and Qwen3-8B's decoder layers (InternVL3_5-8B-HF), 4 of 36.
INTERNVIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      image_size=[448, 448], patch_size=[14, 14], norm_type="layer_norm", use_qk_norm=False,
                      layer_norm_eps=1e-6)
SHAPES = {
    "reference": dict(vision=INTERNVIT_300M,
                      text=dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                rms_norm_eps=1e-6, max_position_embeddings=40960,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "tiny": dict(vision=dict(INTERNVIT_300M, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64),
                 text=dict(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           rms_norm_eps=1e-6, max_position_embeddings=40960,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
PREPROCESSOR = {"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": False, "min_patches": 1,
                "max_patches": 12, "size": {"height": 448, "width": 448}, "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225], "resample": 3}
QUESTION = "Describe this image in detail."
INIT_VERSION = 1


def make_checkpoint(kind: str, dtype: str, directory: Path) -> Path:
    """A random InternVL checkpoint of the given shape made by transformers, written once and reused (bench.py's
    rule: a checkpoint without our marker is the user's own and is taken as it is)."""
    marker = directory / ".bench-checkpoint"
    made_by = f"minivar bench_internvl, shape {kind}, init {INIT_VERSION}\n"
    if (directory / "config.json").is_file() and (not marker.is_file() or marker.read_text() == made_by):
        return directory
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    sys.path.insert(0, str(REPO / "tests"))
    from test_internvl import write_tokenizer                # the tests' tokenizer and chat template
    for old in directory.glob("*.safetensors"):
        old.unlink()
    ids = write_tokenizer(directory)
    text = dict(SHAPES[kind]["text"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    cfg = InternVLConfig(vision_config=SHAPES[kind]["vision"], text_config=text,
                         image_token_id=ids["<IMG_CONTEXT>"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration._from_config(cfg, dtype=DTYPES[dtype]).eval()
    keep = {name: (directory / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    model.save_pretrained(directory, max_shard_size="4GB")
    for name, data in keep.items():
        (directory / name).write_bytes(data)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    marker.write_text(made_by)
    return directory


def make_inputs(directory: Path, image_size: int):
    """(prompt ids [1, T], ImageInput) for a seeded random image_size² picture and QUESTION in the checkpoint's
    template: minivar's own processing (equal to transformers' processor, tests/test_internvl.py)."""
    import numpy as np
    from PIL import Image

    from minivar.checkpoint import read_config
    from minivar.models.registry import family_of
    cfg = read_config(directory)
    family = family_of(cfg)
    pixels = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    image = family.images(Image.fromarray(pixels), cfg)
    ids = family.make_tokenizer(directory, cfg).encode_prompt(QUESTION, num_image_tokens=image.num_tokens)
    return torch.tensor([ids]), image


class MinivarWorker:
    """minivar.load and minivar's generate loop (the CLI's path), on the prompt of make_inputs."""

    def __init__(self, args):
        import minivar
        from minivar.generate import generate
        self.device = torch.device(args.device)
        t0 = time.perf_counter()
        self.pipe = minivar.load(str(args.checkpoint), device=args.device, dtype=args.dtype)
        base.sync(self.device)
        self.load_s = time.perf_counter() - t0
        ids, image = make_inputs(Path(args.checkpoint), args.image_size)
        self.ids = ids.to(self.device)
        self.image = dataclasses.replace(image, pixel_values=image.pixel_values.to(self.device, self.pipe.dtype))
        self.n = args.new_tokens
        self.generate = lambda k: generate(self.pipe.model, self.ids, [self.image], max_new_tokens=k,
                                           eos_token_id=None)
        with torch.inference_mode():
            self.generate(2)                                                         # warm-up
            self.vision()

    def vision(self) -> float:
        t0 = time.perf_counter()
        self.pipe.model.image_features([self.image])
        base.sync(self.device)
        return time.perf_counter() - t0

    def repeat(self) -> dict:
        with torch.inference_mode():
            vision_s = self.vision()
            g = self.generate(self.n + 1)
        return {"vision_s": vision_s, "prefill_s": g.prefill_s, "decode_tok_s": g.decode_tokens_per_s,
                "tokens": g.output_ids[0]}


class TransformersWorker:
    """transformers' InternVLForConditionalGeneration (sdpa) and its generate, on the same ids and pixels."""

    def __init__(self, args):
        import transformers
        from transformers import InternVLForConditionalGeneration
        from transformers.generation.streamers import BaseStreamer
        self.device, self.version = torch.device(args.device), transformers.__version__
        dt = DTYPES[args.dtype]
        t0 = time.perf_counter()
        self.model = InternVLForConditionalGeneration.from_pretrained(
            str(args.checkpoint), dtype=dt, attn_implementation="sdpa").to(self.device).eval()
        base.sync(self.device)
        self.load_s = time.perf_counter() - t0
        ids, image = make_inputs(Path(args.checkpoint), args.image_size)
        ids = ids.to(self.device)
        self.inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=image.pixel_values.to(self.device, dt))
        self.n = args.new_tokens

        class Clock(BaseStreamer):
            """The time of each put: the prompt's first, then every new token's."""
            def __init__(self):
                self.times, self.tokens = [], []

            def put(self, value):
                self.times.append(time.perf_counter())
                self.tokens.append(value)

            def end(self):
                pass

        self.clock = Clock
        with torch.inference_mode():
            self.generate(2)
            self.vision()

    def generate(self, k: int):
        clock = self.clock()
        t0 = time.perf_counter()
        self.model.generate(**self.inputs, do_sample=False, max_new_tokens=k, min_new_tokens=k, streamer=clock)
        return t0, clock

    def vision(self) -> float:
        t0 = time.perf_counter()
        self.model.model.get_image_features(pixel_values=self.inputs["pixel_values"])
        base.sync(self.device)
        return time.perf_counter() - t0

    def repeat(self) -> dict:
        with torch.inference_mode():
            vision_s = self.vision()
            t0, clock = self.generate(self.n + 1)
        first, last = clock.times[1], clock.times[-1]
        return {"vision_s": vision_s, "prefill_s": first - t0, "decode_tok_s": self.n / (last - first),
                "tokens": [int(t) for t in torch.cat([v.reshape(-1) for v in clock.tokens[1:]]).tolist()]}


def serve(args) -> int:
    """The worker's loop: one JSON line (prefixed WORKER_JSON) per command read from stdin."""
    def reply(obj):
        print("WORKER_JSON " + json.dumps(obj), flush=True)

    worker = {"minivar": MinivarWorker, "transformers": TransformersWorker}[args.worker](args)
    reply({"load_s": worker.load_s, "rss_after_load_gb": base.peak_rss_gb(),
           "version": getattr(worker, "version", None)})
    for line in sys.stdin:
        command = line.strip()
        if command == "repeat":
            reply(worker.repeat())
        elif command == "finish":
            reply(base.peak_memory(worker.device))
            return 0
    return 0


class Worker:
    """The parent's handle on a worker process: ask(command) → its JSON answer (None once it has failed)."""

    def __init__(self, name: str, args):
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, __file__, "--worker", name, "--checkpoint", str(args.checkpoint), "--dtype",
               args.dtype, "--device", args.device, "--new-tokens", str(args.new_tokens), "--image-size",
               str(args.image_size)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True)
        self.failed = False

    def answer(self):
        for line in self.proc.stdout:
            if line.startswith("WORKER_JSON "):
                return json.loads(line[len("WORKER_JSON "):])
        self.failed = True
        self.stderr.seek(0)
        print(f"bench_internvl: the {self.name} worker failed:\n{self.stderr.read()[-3000:]}", file=sys.stderr)
        return None

    def ask(self, command: str):
        if self.failed:
            return None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self.answer()

    def close(self):
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def main(argv=None) -> int:
    summary_text, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(description=textwrap.fill(" ".join(summary_text.split()), 100),
                                epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory; made there (shape --make) if it has no "
                                                   "config.json (default: weights/bench-internvl-<make>-<dtype>)")
    p.add_argument("--make", choices=sorted(SHAPES), help="shape of the checkpoint to make (default: reference; "
                                                          "tiny with --quick)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=base.positive_int, default=32)
    p.add_argument("--repeats", type=base.positive_int, default=5)
    p.add_argument("--image-size", type=base.positive_int, default=448, help="side of the square image (448: one "
                                                                             "tile, 256 image tokens)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny shape (unless --make), 2 repeats, 8 tokens")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens, args.make = 2, 8, args.make or "tiny"
    args.make = args.make or "reference"
    if args.worker:
        return serve(args)
    args.checkpoint = make_checkpoint(args.make, args.dtype, args.checkpoint
                                      or REPO / "weights" / f"bench-internvl-{args.make}-{args.dtype}")
    ckpt_bytes = sum(f.stat().st_size for f in Path(args.checkpoint).glob("*.safetensors"))
    for f in Path(args.checkpoint).glob("*.safetensors"):        # warm the page cache: load time is from warm disk
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    names = ["minivar"] + ([] if args.no_transformers else ["transformers"])
    workers, loads = {}, {}
    for name in names:          # one after the other: neither load competes with the other
        workers[name] = Worker(name, args)
        loads[name] = workers[name].answer()
    runs = {name: [] for name in names}
    for i in range(args.repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            r = workers[name].ask("repeat")
            if r is not None:
                runs[name].append(r)
    results = {}
    for name in names:
        memory = workers[name].ask("finish")
        workers[name].close()
        results[name] = summary(loads[name], runs[name], memory) if loads[name] and runs[name] and memory else None
    mv, hf = results["minivar"], results.get("transformers")
    if mv is None:
        return 1
    ids, image = make_inputs(Path(args.checkpoint), args.image_size)
    report = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "cpu": base._cpu_name(), "torch": torch.__version__, "device": args.device, "dtype": args.dtype,
        "shape": args.make, "checkpoint": str(args.checkpoint), "checkpoint_gb": ckpt_bytes / 1e9,
        "image_size": args.image_size, "image_tokens": image.num_tokens, "prompt_tokens": ids.shape[1],
        "new_tokens": args.new_tokens, "repeats": args.repeats, "targets": TARGETS, "minivar": mv,
        "transformers": hf,
    }
    if hf:
        report["prefill_ratio_vs_transformers"] = mv["prefill_s"] / hf["prefill_s"]
        report["vision_ratio_vs_transformers"] = mv["vision_s"] / hf["vision_s"]
        report["decode_speedup_vs_transformers"] = mv["decode_tok_s"] / hf["decode_tok_s"]
        report["prefill_target_met"] = report["prefill_ratio_vs_transformers"] <= TARGETS["prefill_ratio_max"]
        report["decode_target_met"] = report["decode_speedup_vs_transformers"] >= TARGETS["decode_speedup_min"]
        report["same_tokens_as_transformers"] = mv["tokens"] == hf["tokens"]
    print_table(report)
    print("BENCH_JSON " + json.dumps(report))
    return 0


def print_table(r: dict) -> None:
    mv, hf = r["minivar"], r["transformers"]
    rows = [("load (s)", "load_s", "{:.2f}"), ("peak RSS (GiB)", "peak_rss_gb", "{:.2f}"),
            ("vision tower (s)", "vision_s", "{:.3f}"), ("prefill (s)", "prefill_s", "{:.3f}"),
            ("decode (tok/s)", "decode_tok_s", "{:.2f}")]
    if "peak_gpu_gb" in mv:
        rows.insert(2, ("peak GPU memory (GiB)", "peak_gpu_gb", "{:.2f}"))
    print(f"\nminivar InternVL benchmark — {r['date']}, {r['cpu']} ({r['machine']}), torch {r['torch']}, "
          f"{r['device']}, {r['dtype']}")
    print(f"checkpoint {r['checkpoint']} ({r['checkpoint_gb']:.2f} GB, shape {r['shape']}); one {r['image_size']}² "
          f"image → {r['image_tokens']} image tokens, a {r['prompt_tokens']}-token prompt, {r['new_tokens']} new "
          f"tokens; medians of {r['repeats']} alternating repeats\n")
    print(f"{'':24}{'minivar':>12}" + (f"{'transformers':>14}{'ratio':>8}" if hf else ""))
    for label, key, fmt in rows:
        line = f"{label:24}{fmt.format(mv[key]):>12}"
        if hf and key in hf:
            line += f"{fmt.format(hf[key]):>14}{mv[key] / hf[key]:>8.2f}"
        print(line)
    if hf:
        t = r["targets"]
        met = {True: "met", False: "NOT met"}
        print(f"\nprefill {r['prefill_ratio_vs_transformers']:.2f}× transformers' time (target ≤ "
              f"{t['prefill_ratio_max']}: {met[r['prefill_target_met']]}); decode "
              f"{r['decode_speedup_vs_transformers']:.2f}× its tokens/s (target ≥ {t['decode_speedup_min']}: "
              f"{met[r['decode_target_met']]}); same tokens: {r['same_tokens_as_transformers']}")


if __name__ == "__main__":
    sys.exit(main())
