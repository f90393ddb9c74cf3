#!/usr/bin/env python
"""Qwen3-VL benchmark: vision tower time, prefill time (vision + decoder over the prompt + first token), decode speed
and peak memory of minivar and of transformers' Qwen3VLForConditionalGeneration / Qwen3VLMoeForConditionalGeneration
(sdpa) on the same checkpoint, pixels and prompt ids, in one run, alternating between the two, medians of repeats.

    python bench/bench_qwen3.py                  # reference: Qwen3-VL-8B's ViT + 4 of its decoder layers, bf16
    python bench/bench_qwen3.py --make moe       # Qwen3-VL-30B-A3B's ViT + 2 of its MoE layers (128 experts, top 8)
    python bench/bench_qwen3.py --quick          # tiny shape, 2 repeats, 8 tokens: seconds, for a smoke test

The checkpoint is made with transformers on first use (random weights, its save layout, the tests' byte-level BPE
tokenizer.json with Qwen's special tokens, the Qwen3-VL preprocessor_config.json) in weights/bench-qwen3-<make>-
<dtype>. Each implementation runs in a process of its own that stays up for the whole run (its peak RSS is its own);
the repeats alternate, the order swapping every repeat. One 448×448 image: 28×28 16-px patches → 196 image tokens.
Targets: prefill ≤ 1.05 × transformers' time, decode ≥ 1.3 × its tokens/s, peak RSS ≤ 1.1 × checkpoint + 0.3 GB.
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
from bench_qwen import summary  # noqa: E402  (the medians of the repeats)
from minivar.pipeline import DTYPES  # noqa: E402

# Qwen3-VL-8B-Instruct's vision tower (config.json); 30B-A3B's is the same with a 2048-wide output
VIT = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24], patch_size=16, spatial_merge_size=2,
           temporal_patch_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh")
ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
SHAPES = {
    "reference": dict(moe=False, vision=VIT,
                      text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=4,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                                max_position_embeddings=262144, rope_parameters=ROPE)),
    "moe": dict(moe=True, vision=dict(VIT, out_hidden_size=2048),
                text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=2,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
                          max_position_embeddings=262144, rope_parameters=ROPE, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1)),
    "tiny": dict(moe=True, vision=dict(VIT, depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                                       out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                 text=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                           max_position_embeddings=32768, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32,
                           rope_parameters=dict(ROPE, mrope_section=[2, 3, 3]))),
}
PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
QUESTION = "Describe this image in detail."
INIT_VERSION = 1


def hf_class(kind: str):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
    return Qwen3VLMoeForConditionalGeneration if SHAPES[kind]["moe"] else Qwen3VLForConditionalGeneration


def make_checkpoint(kind: str, dtype: str, directory: Path) -> Path:
    """A random checkpoint of the shape made by transformers (its save layout), written once and reused."""
    marker = directory / ".bench-checkpoint"
    made_by = f"minivar bench_qwen3, shape {kind}, init {INIT_VERSION}\n"
    if (directory / "config.json").is_file() and (not marker.is_file() or marker.read_text() == made_by):
        return directory
    from tokenizers import Tokenizer
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig
    sys.path.insert(0, str(REPO / "tests"))
    from test_qwen2_vl_model import write_tokenizer
    for old in directory.glob("*.safetensors"):
        old.unlink()
    write_tokenizer(directory)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = {key: tok.token_to_id(name) for key, name in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    shape = SHAPES[kind]
    cfg = (Qwen3VLMoeConfig if shape["moe"] else Qwen3VLConfig)(
        text_config=shape["text"], vision_config=shape["vision"], tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    model = hf_class(kind)._from_config(cfg, dtype=DTYPES[dtype]).eval()
    model.save_pretrained(directory, max_shard_size="4GB")
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|im_end|>")]}))
    marker.write_text(made_by)
    return directory


def make_inputs(directory: Path, image_size: int):
    """(prompt ids [1, T], ImageInput): a seeded random picture and QUESTION in the checkpoint's template."""
    import numpy as np
    from PIL import Image

    from minivar.checkpoint import read_config
    from minivar.models.qwen2_vl.processing import preprocess_image
    from minivar.models.registry import family_of
    cfg = read_config(directory)
    pixels = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    image = preprocess_image(Image.fromarray(pixels), cfg.image)
    ids = family_of(cfg).make_tokenizer(directory, cfg).encode_prompt(QUESTION, num_image_tokens=image.num_tokens)
    return torch.tensor([ids]), image


class MinivarWorker:
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
            self.generate(2)
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
    def __init__(self, args):
        import transformers
        from transformers.generation.streamers import BaseStreamer
        self.device, self.version = torch.device(args.device), transformers.__version__
        dt = DTYPES[args.dtype]
        t0 = time.perf_counter()
        self.model = hf_class(args.make).from_pretrained(str(args.checkpoint), dtype=dt,
                                                         attn_implementation="sdpa").to(self.device).eval()
        base.sync(self.device)
        self.load_s = time.perf_counter() - t0
        ids, image = make_inputs(Path(args.checkpoint), args.image_size)
        ids = ids.to(self.device)
        image_id = int(json.loads((Path(args.checkpoint) / "config.json").read_text())["image_token_id"])
        # transformers 5.x reads M-RoPE positions only with mm_token_type_ids (1 at image tokens)
        self.inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_id).int(),
                           pixel_values=image.pixel_values.to(self.device, dt),
                           image_grid_thw=torch.tensor([image.meta["grid_thw"]], device=self.device))
        self.n = args.new_tokens

        class Clock(BaseStreamer):
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
        self.model.model.get_image_features(pixel_values=self.inputs["pixel_values"],
                                            image_grid_thw=self.inputs["image_grid_thw"])
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
    def reply(obj):
        print("WORKER_JSON " + json.dumps(obj), flush=True)

    worker = {"minivar": MinivarWorker, "transformers": TransformersWorker}[args.worker](args)
    reply({"load_s": worker.load_s, "rss_after_load_gb": base.peak_rss_gb(), "version": getattr(worker, "version", None)})
    for line in sys.stdin:
        if line.strip() == "repeat":
            reply(worker.repeat())
        elif line.strip() == "finish":
            reply(base.peak_memory(worker.device))
            return 0
    return 0


class Worker:
    def __init__(self, name: str, args):
        self.name, self.stderr, self.failed = name, tempfile.TemporaryFile(mode="w+"), False
        cmd = [sys.executable, __file__, "--worker", name, "--checkpoint", str(args.checkpoint), "--make", args.make,
               "--dtype", args.dtype, "--device", args.device, "--new-tokens", str(args.new_tokens),
               "--image-size", str(args.image_size)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def answer(self):
        for line in self.proc.stdout:
            if line.startswith("WORKER_JSON "):
                return json.loads(line[len("WORKER_JSON "):])
        self.failed = True
        self.stderr.seek(0)
        print(f"bench_qwen3: the {self.name} worker failed:\n{self.stderr.read()[-3000:]}", file=sys.stderr)
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


TARGETS = {"prefill_ratio_max": 1.05, "decode_speedup_min": 1.3, "rss_max": "1.1 × checkpoint + 0.3 GB"}


def main(argv=None) -> int:
    summary_text, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(description=textwrap.fill(" ".join(summary_text.split()), 100),
                                epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: weights/bench-qwen3-<make>-<dtype>)")
    p.add_argument("--make", choices=sorted(SHAPES), help="shape (default: reference; tiny with --quick)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=base.positive_int, default=32)
    p.add_argument("--repeats", type=base.positive_int, default=5)
    p.add_argument("--image-size", type=base.positive_int, default=448, help="side of the square image (448: 196 "
                                                                             "image tokens)")
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
                                      or REPO / "weights" / f"bench-qwen3-{args.make}-{args.dtype}")
    ckpt_bytes = sum(f.stat().st_size for f in Path(args.checkpoint).glob("*.safetensors"))
    for f in Path(args.checkpoint).glob("*.safetensors"):        # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    names = ["minivar"] + ([] if args.no_transformers else ["transformers"])
    workers, loads = {}, {}
    for name in names:
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
    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "load_average": os.getloadavg(), "cpu": base._cpu_name(), "torch": torch.__version__,
              "device": args.device, "dtype": args.dtype, "shape": args.make, "checkpoint": str(args.checkpoint),
              "checkpoint_gb": ckpt_bytes / 1e9, "image_size": args.image_size, "image_tokens": image.num_tokens,
              "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "repeats": args.repeats,
              "targets": TARGETS, "minivar": mv, "transformers": hf}
    report["rss_target_met"] = mv["peak_rss_gb"] * 2 ** 30 / 1e9 <= 1.1 * ckpt_bytes / 1e9 + 0.3
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
    print(f"\nminivar Qwen3-VL benchmark — {r['date']}, {r['cpu']} ({r['machine']}, load average "
          f"{r['load_average'][0]:.1f}), torch {r['torch']}, {r['device']}, {r['dtype']}")
    print(f"checkpoint {r['checkpoint']} ({r['checkpoint_gb']:.2f} GB, shape {r['shape']}); one {r['image_size']}² "
          f"image → {r['image_tokens']} image tokens, a {r['prompt_tokens']}-token prompt, {r['new_tokens']} new "
          f"tokens; medians of {r['repeats']} alternating repeats\n")
    print(f"{'':24}{'minivar':>12}" + (f"{'transformers':>14}{'ratio':>8}" if hf else ""))
    for label, key, fmt in rows:
        line = f"{label:24}{fmt.format(mv[key]):>12}"
        if hf and key in hf:
            line += f"{fmt.format(hf[key]):>14}{mv[key] / hf[key]:>8.2f}"
        print(line)
    met = {True: "met", False: "NOT met"}
    print(f"\npeak RSS {mv['peak_rss_gb'] * 2 ** 30 / 1e9:.2f} GB vs 1.1 × {r['checkpoint_gb']:.2f} + 0.3: "
          f"{met[r['rss_target_met']]}")
    if hf:
        t = r["targets"]
        print(f"prefill time: {r['prefill_ratio_vs_transformers']:.3f} × transformers' (target ≤ "
              f"{t['prefill_ratio_max']}): {met[r['prefill_target_met']]}")
        print(f"decode speed: {r['decode_speedup_vs_transformers']:.3f} × transformers' (target ≥ "
              f"{t['decode_speedup_min']}): {met[r['decode_target_met']]}")
        print(f"same greedy tokens: {r['same_tokens_as_transformers']} (transformers {hf['version']})")


if __name__ == "__main__":
    sys.exit(main())
