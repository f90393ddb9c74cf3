#!/usr/bin/env python
"""minivar benchmark: load time, peak memory, vision / prefill / decode speed, VAR cost, batching, and the same
figures for transformers' LlavaForConditionalGeneration (sdpa) on the same checkpoint, pixels and prompt ids.

    python bench/bench.py                       # reference config (full CLIP-L/336 + 4 LLaMA-2-7B layers, bf16)
    python bench/bench.py --make tiny --quick   # seconds, for a smoke test
    python bench/bench.py --make 7b --device cuda --dtype float16    # a 7B-shaped random checkpoint on a GPU

Each implementation runs in its own subprocess so its peak RSS is its own. Decode is memory-bound, so the
benchmark also measures this machine's memory bandwidth and prints decode speed as a share of that roofline:
tokens/s ≤ bandwidth / bytes of decoder + lm_head weights read per token. The bandwidth is measured right before and
after each decode run, by reading those very weights, because a VM's bandwidth can drift within minutes.
Output: a table on stderr-free stdout, then one JSON line (prefixed "BENCH_JSON ").
"""
from __future__ import annotations

import argparse
import textwrap
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minivar.checkpoint import read_config  # noqa: E402
from minivar.models.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from minivar.pipeline import DTYPES  # noqa: E402

CLIP_L_336 = VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14)
SHAPES = {
    # the reference configuration of the performance targets
    "reference": LlavaConfig(vision=CLIP_L_336, text=TextConfig(vocab_size=32064, hidden_size=4096,
                             intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                             max_position_embeddings=4096, rms_norm_eps=1e-5), pad_token_id=32001),
    "7b": LlavaConfig(vision=CLIP_L_336, text=TextConfig(vocab_size=32064, max_position_embeddings=4096,
                      rms_norm_eps=1e-5), pad_token_id=32001),
    "tiny": LlavaConfig(vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, image_size=336, patch_size=14),
                        text=TextConfig(vocab_size=32064, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5),
                        pad_token_id=32001),
}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint and inputs

INIT_VERSION = 2          # bump when the random weights' rule changes: checkpoints made before are made again


def make_checkpoint(kind: str, dtype: str, directory: Path, shapes: dict | None = None) -> Path:
    """A random checkpoint of the given shape (`shapes`, default SHAPES: LLaVA-1.5's; bench_next.py passes its
    LLaVA-NeXT ones) in the llava-hf hub layout, written once and reused."""
    from safetensors.torch import save_file

    from minivar.demo import random_tensor
    from minivar.models.registry import family_of
    marker = directory / ".bench-checkpoint"        # what made it: a checkpoint made by an older rule is made again
    made_by = f"minivar bench, shape {kind}, init {INIT_VERSION}\n"
    if (directory / "config.json").is_file() and (not marker.is_file() or marker.read_text() == made_by):
        return directory                          # made earlier by this rule, or a checkpoint of the user's own
    for old in directory.glob("*.safetensors"):
        old.unlink()
    cfg = (shapes or SHAPES)[kind]
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = family_of(cfg).model(cfg)           # the config's family: Llava, LlavaNext
    g = torch.Generator().manual_seed(0)
    shard, shard_bytes, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for key, p in model.state_dict().items():
        t = random_tensor(key, p.shape, g)          # the demo's rule, one tensor at a time (a 7B does not fit twice)
        hub = key.replace("vision_tower.", "vision_tower.vision_model.", 1)
        shard[hub] = t.to(DTYPES[dtype])
        shard_bytes += shard[hub].nbytes
        if shard_bytes > 4e9:
            flush()
    flush()
    total = sum((directory / f).stat().st_size for f in set(index.values()))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": index}))
    hf = cfg.to_hf() | {"dtype": dtype}
    (directory / "config.json").write_text(json.dumps(hf, indent=1))
    marker.write_text(made_by)
    return directory


def inputs(cfg: LlavaConfig, batch: int = 1):
    """A 623-token prompt like LLaVA-1.5's (BOS, system + question text, 576 image tokens) and seeded pixels."""
    g = torch.Generator().manual_seed(0)
    n_img = cfg.num_image_tokens
    text_before, text_after = 35, 12
    ids = torch.cat([torch.tensor([1]), torch.randint(100, 30000, (text_before,), generator=g),
                     torch.full((n_img,), cfg.image_token_index), torch.randint(100, 30000, (text_after,), generator=g)])
    px = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids[None].repeat(batch, 1), px.repeat(batch, 1, 1, 1)


def decode_bytes_per_token(cfg: LlavaConfig, dtype: torch.dtype) -> int:
    """Weights read for one decode step: every decoder layer, the final norm, lm_head (the embedding is one row)."""
    t = cfg.text
    per_layer = (2 * t.hidden_size * t.num_attention_heads * t.head_dim + 2 * t.hidden_size * t.n_kv_heads * t.head_dim
                 + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size)
    params = t.num_hidden_layers * per_layer + t.hidden_size + t.vocab_size * t.hidden_size
    return params * torch.finfo(dtype).bits // 8


def decode_weights(model) -> list[torch.Tensor]:
    """The tensors one decode step reads in full: every decoder layer, the final norm, lm_head."""
    lm = model.language_model
    return list(lm.model.layers.parameters()) + list(lm.model.norm.parameters()) + list(lm.lm_head.parameters())


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def read_bandwidth(tensors: list[torch.Tensor], device) -> float:
    """Streaming read bandwidth in bytes/s: the time to read these tensors once (a max over each one's bits seen as
    integers: no arithmetic worth the name, no special float values). Given the decode weights, it reads the very
    weight bytes a decode step reads (the step also reads the KV cache, ~2 % more at 600 positions)."""
    n = sum(t.numel() * t.element_size() for t in tensors)
    sync(device)
    t0 = time.perf_counter()
    for t in tensors:
        t.view(_SAME_SIZE_INT[t.element_size()]).amax()
    sync(device)
    return n / (time.perf_counter() - t0)


def gemv_rate(model, device) -> float:
    """Bytes/s of the bare matrix-vector products a decode step makes (one vector through every weight matrix,
    with the kernels decode uses): the speed limit of decode on this machine's kernels, attention and the rest left
    out."""
    from minivar.generate import decode_kernels
    mats = [t for t in decode_weights(model) if t.dim() == 2]
    xs = {k: torch.randn(1, k, dtype=mats[0].dtype, device=device) for k in {m.shape[1] for m in mats}}
    n = sum(m.numel() * m.element_size() for m in mats)
    with decode_kernels(torch.device(device)):
        sync(device)
        t0 = time.perf_counter()
        for m in mats:
            torch.nn.functional.linear(xs[m.shape[1]], m)
        sync(device)
        return n / (time.perf_counter() - t0)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_gb() -> float:
    """This process's peak resident memory, GiB. On Linux VmHWM, the high-water mark of the process's own memory
    map: getrusage's ru_maxrss survives exec, so a worker started by a parent that once held a big checkpoint
    would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20                      # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20         # bytes on macOS, kB elsewhere


def peak_memory(device) -> dict:
    out = {"peak_rss_gb": peak_rss_gb()}
    if str(device).startswith("cuda"):
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def best_load(load, repeats: int, device):
    """(model, seconds): the fastest of `repeats` loads, each begun after the previous model was freed (peak memory
    stays one model's). Like the other figures, the best of several runs: this VM's timings are noisy."""
    import gc
    best = float("inf")
    for _ in range(repeats):
        model = None                                              # free the previous copy first
        gc.collect()
        t0 = time.perf_counter()
        model = load()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return model, best


MIN_COST_PAIRS = 3           # VAR off/on pairs needed before VAR's cost is given


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def hf_timed_generate(model, device, n: int, **inputs):
    """transformers' greedy generate of exactly n + 1 tokens, timed within the one run: (output ids, prefill
    seconds — up to the first token's logits —, decode tokens/s of the n later steps). A logits processor notes the
    time each step's logits arrive, so both figures come from the same run (two separately timed runs, of 1 and of
    n + 1 tokens, gave a negative decode rate whenever the shorter one happened to be the slower)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepTimes(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            sync(device)
            self.times.append(time.perf_counter())
            return scores

    steps = StepTimes()
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n + 1, min_new_tokens=n + 1,
                         logits_processor=LogitsProcessorList([steps]))
    sync(device)
    first, last = steps.times[0], steps.times[-1]
    return out, first - t0, n / (last - first)


# ---------------------------------------------------------------------------------------------------------------
# Workers (each in its own process)

def worker_minivar(args) -> dict:
    from minivar.checkpoint import load_model
    from minivar.generate import generate
    from minivar.pipeline import pick_device
    from minivar.methods.var import Sinks, VARConfig, VARState
    dev, dt = pick_device(args.device), DTYPES[args.dtype]
    # what minivar.load does, minus the tokenizer
    model, load_s = best_load(lambda: load_model(Path(args.checkpoint), dt, dev), min(args.repeats, 3), dev)
    cfg = model.config
    rss_after_load = peak_rss_gb()
    ids, px = inputs(cfg)
    ids, px = ids.to(dev), px.to(dev, dt)
    n = args.new_tokens
    var_cfg = VARConfig(tau=args.var_tau, sink_dims=(1415 % cfg.text.hidden_size, 2533 % cfg.text.hidden_size))

    def var_state(batch_ids):
        sinks = Sinks(var_cfg.sink_dims, var_cfg.tau, cfg.text.num_hidden_layers, batch_ids == cfg.image_token_index)
        return VARState(var_cfg, sinks, max_len=batch_ids.shape[1] + n + 1)

    def run(max_new, var=False, batch_ids=ids, batch_px=px):
        out = generate(model, batch_ids, batch_px, max_new_tokens=max_new, eos_token_id=None,
                       hooks=var_state(batch_ids) if var else None)
        sync(dev)
        return out

    with torch.inference_mode():
        run(2)                                                   # warm-up, VAR off and on
        run(2, True)
        vision_s = best_of(lambda: (model.image_features(px), sync(dev)), args.repeats)
        res = {"load_s": load_s, "rss_after_load_gb": rss_after_load, "vision_s": vision_s}
        # Each repeat runs VAR off and VAR on back to back (the order swapping every repeat), so each pair sees the
        # same machine conditions: the table gives the best of the repeats; VAR's cost is the median over the pairs.
        # Each VAR-off decode run is bracketed by two reads of the weights it reads (this VM's bandwidth drifts
        # between 30 and 60 GB/s within minutes); its roofline uses the faster of the two reads.
        weights = decode_weights(model)
        prefill, decode, bandwidth, gemv = {False: [], True: []}, {False: [], True: []}, [], []
        for i in range(args.repeats):
            for var in ((False, True) if i % 2 == 0 else (True, False)):
                prefill[var].append(run(1, var).prefill_s)
                if not var:
                    before = read_bandwidth(weights, dev)
                decode[var].append(run(n + 1, var))
                if not var:
                    bandwidth.append(max(before, read_bandwidth(weights, dev)))
                    gemv.append(gemv_rate(model, dev))
        for label, var in (("", False), ("var_", True)):
            res[label + "prefill_s"] = min(prefill[var])
            res[label + "decode_tok_s"] = max(g.decode_tokens_per_s for g in decode[var])
        res["tokens"] = decode[False][0].output_ids[0]
        # VAR's cost is a difference of two noisy timings: from fewer than MIN_COST_PAIRS pairs (--quick runs one) it
        # is noise (a quick run once printed -96 %), so it is not given
        measured = args.repeats >= MIN_COST_PAIRS
        res["var_prefill_cost_pct"] = median([100 * (on / off - 1) for off, on in zip(prefill[False], prefill[True])]
                                             ) if measured else None
        res["var_decode_cost_pct"] = median([100 * (1 - on.decode_tokens_per_s / off.decode_tokens_per_s)
                                             for off, on in zip(decode[False], decode[True])]) if measured else None
        res["decode_bytes_per_token"] = sum(t.numel() * t.element_size() for t in weights)
        res["runs"] = [{"decode_tok_s": g.decode_tokens_per_s, "bandwidth_gb_s": b / 1e9, "gemv_gb_s": k / 1e9,
                        "roofline_pct": 100 * g.decode_tokens_per_s * res["decode_bytes_per_token"] / b}
                       for g, b, k in zip(decode[False], bandwidth, gemv)]
        state = var_state(ids)
        generate(model, ids, px, max_new_tokens=4, eos_token_id=None, hooks=state)
        res["var_pairs_prefill"] = int(state.counts["prefill"].sum())
        res["var_pairs_decode_per_token"] = int(state.decode_rows.sum()) / 3
        res["var_sinks_per_layer"] = [len(v) for v in state.report()["sinks"].values()]
        res.update(peak_memory(dev))          # the single-prompt figures; batches below need more activations
        batches = {}
        for bs in args.batch_sizes:
            b_ids, b_px = inputs(cfg, bs)
            g = run(n + 1, False, b_ids.to(dev), b_px.to(dev, dt))
            batches[str(bs)] = {"decode_tok_s": bs * g.decode_tokens_per_s, "prefill_s": g.prefill_s}
        res["batch"] = batches
    res["peak_rss_with_batches_gb"] = peak_memory(dev)["peak_rss_gb"]
    return res


def worker_transformers(args) -> dict:
    from transformers import LlavaForConditionalGeneration
    import transformers
    dt = DTYPES[args.dtype]
    model, load_s = best_load(lambda: LlavaForConditionalGeneration.from_pretrained(
        args.checkpoint, dtype=dt, attn_implementation="sdpa").to(args.device).eval(), min(args.repeats, 3), args.device)
    cfg = read_config(args.checkpoint)
    ids, px = inputs(cfg)
    ids, px = ids.to(args.device), px.to(args.device, dt)
    mask = torch.ones_like(ids)
    n = args.new_tokens

    def gen():
        return hf_timed_generate(model, args.device, n, input_ids=ids, pixel_values=px, attention_mask=mask)

    with torch.inference_mode():
        gen()                                                    # warm-up
        vision_s = best_of(lambda: (model.model.get_image_features(pixel_values=px), sync(args.device)), args.repeats)
        runs = [gen() for _ in range(args.repeats)]              # each figure from one run; the best run's
    out = runs[0][0]
    res = {"version": transformers.__version__, "load_s": load_s, "vision_s": vision_s,
           "prefill_s": min(r[1] for r in runs), "decode_tok_s": max(r[2] for r in runs),
           "tokens": out[0, ids.shape[1]:].tolist()}
    res.update(peak_memory(args.device))
    return res


def run_worker(name: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--checkpoint", str(args.checkpoint), "--dtype", args.dtype,
           "--device", args.device, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--var-tau", str(args.var_tau), "--batch-sizes", ",".join(map(str, args.batch_sizes))]
    return worker_result(cmd, f"bench: {name} worker")


def worker_result(cmd: list[str], label: str) -> dict | None:
    """Run a worker process; its result is the JSON of its WORKER_JSON line (None, with its stderr shown, if none)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("WORKER_JSON "):
            return json.loads(line[len("WORKER_JSON "):])
    print(f"{label} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number ≥ 1")
    return n


def positive_ints(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


def main(argv=None) -> int:
    # the docstring's first paragraph (a whole sentence, not its first line), then its examples
    summary, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(description=textwrap.fill(" ".join(summary.split()), 100), epilog="examples:\n" + examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint directory; made there (shape --make) if it has no config.json "
                        "(default: weights/bench-<make>-<dtype>)")
    p.add_argument("--make", choices=sorted(SHAPES), default="reference", help="shape of the checkpoint to make")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--repeats", type=positive_int, default=4)
    p.add_argument("--batch-sizes", type=positive_ints, default=[1, 2, 4], help="comma-separated, e.g. 1,2,4")
    p.add_argument("--var-tau", type=float, default=2.0,
                   help="τ for the VAR run: random weights have no massive activations, so a low τ makes sinks")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 repeat, 8 tokens, batch 1,2")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens, args.batch_sizes = 1, 8, [1, 2]
    if args.worker:
        fn = {"minivar": worker_minivar, "transformers": worker_transformers}[args.worker]
        print("WORKER_JSON " + json.dumps(fn(args)))
        return 0

    args.checkpoint = make_checkpoint(args.make, args.dtype,
                                      args.checkpoint or REPO / "weights" / f"bench-{args.make}-{args.dtype}")
    ckpt_bytes = sum(f.stat().st_size for f in Path(args.checkpoint).glob("*.safetensors"))
    for f in Path(args.checkpoint).glob("*.safetensors"):        # warm the page cache: load time is from warm disk
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    mv = run_worker("minivar", args)
    hf = None
    if not args.no_transformers:
        try:
            import transformers  # noqa: F401
            hf = run_worker("transformers", args)
        except ImportError:
            print("bench: transformers is not installed; skipping the comparison", file=sys.stderr)
    if mv is None:
        return 1
    runs = mv["runs"]
    mid = sorted(runs, key=lambda r: r["roofline_pct"])[(len(runs) - 1) // 2]   # the median run (the lower one of two)
    roofline = mid["bandwidth_gb_s"] * 1e9 / mv["decode_bytes_per_token"]

    report = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "cpu": _cpu_name(), "torch": torch.__version__, "device": args.device, "dtype": args.dtype,
        "checkpoint": str(args.checkpoint), "checkpoint_gb": ckpt_bytes / 1e9, "new_tokens": args.new_tokens,
        "decode_gb_per_token": mv["decode_bytes_per_token"] / 1e9, "bandwidth_gb_s": mid["bandwidth_gb_s"],
        "roofline_tok_s": roofline, "decode_roofline_pct": mid["roofline_pct"],
        "decode_gemv_pct": 100 * mid["decode_tok_s"] * mv["decode_bytes_per_token"] / (mid["gemv_gb_s"] * 1e9),
        "minivar": mv, "transformers": hf,
    }
    report["var_decode_cost_pct"] = mv["var_decode_cost_pct"]
    report["var_prefill_cost_pct"] = mv["var_prefill_cost_pct"]
    report["rss_budget_gb"] = (1.1 * ckpt_bytes + 0.3e9) / 2**30
    if hf:
        report["decode_speedup_vs_transformers"] = mv["decode_tok_s"] / hf["decode_tok_s"]
        report["prefill_ratio_vs_transformers"] = mv["prefill_s"] / hf["prefill_s"]
        report["same_tokens_as_transformers"] = mv["tokens"] == hf["tokens"]
    print_table(report)
    print("BENCH_JSON " + json.dumps(report))
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(r: dict) -> None:
    mv, hf = r["minivar"], r["transformers"]
    rows = [("load (s)", "load_s", "{:.2f}"), ("peak RSS (GiB)", "peak_rss_gb", "{:.2f}"),
            ("vision tower (s)", "vision_s", "{:.3f}"), ("prefill (s)", "prefill_s", "{:.3f}"),
            ("decode (tok/s)", "decode_tok_s", "{:.2f}")]
    if "peak_gpu_gb" in mv:
        rows.insert(2, ("peak GPU memory (GB)", "peak_gpu_gb", "{:.2f}"))
    print(f"\nminivar benchmark — {r['date']}, {r['cpu']} ({r['machine']}), torch {r['torch']}, {r['device']}, {r['dtype']}")
    print(f"checkpoint {r['checkpoint']} ({r['checkpoint_gb']:.2f} GB); a decode step reads "
          f"{r['decode_gb_per_token']:.2f} GB of weights\n")
    head = f"{'':24}{'minivar':>12}" + (f"{'transformers':>14}{'ratio':>8}" if hf else "")
    print(head)
    for label, key, fmt in rows:
        line = f"{label:24}{fmt.format(mv[key]):>12}"
        if hf and key in hf:
            line += f"{fmt.format(hf[key]):>14}{mv[key] / hf[key]:>8.2f}"
        print(line)
    print("\ndecode runs (VAR off), each between two reads of the decode weights:")
    for run in mv["runs"]:
        print(f"  {run['decode_tok_s']:6.2f} tok/s   bandwidth {run['bandwidth_gb_s']:5.1f} GB/s → "
              f"{run['roofline_pct']:3.0f}% of the roofline   (bare GEMVs of the same weights: {run['gemv_gb_s']:.1f} GB/s)")
    print(f"decode: {r['decode_roofline_pct']:.0f}% of the bandwidth roofline (median run: {r['bandwidth_gb_s']:.1f} GB/s "
          f"→ {r['roofline_tok_s']:.2f} tok/s); {r['decode_gemv_pct']:.0f}% of what the bare GEMVs reach")
    if hf:
        print(f"decode speed-up vs transformers: {r['decode_speedup_vs_transformers']:.2f}x; "
              f"prefill time ratio: {r['prefill_ratio_vs_transformers']:.2f}; "
              f"same greedy tokens: {r['same_tokens_as_transformers']}")
    cost = (f"cost, median of the off/on pairs: prefill time {r['var_prefill_cost_pct']:+.1f}%, decode speed "
            f"{-r['var_decode_cost_pct']:+.1f}%" if r["var_prefill_cost_pct"] is not None else
            f"cost not measured (it needs --repeats ≥ {MIN_COST_PAIRS}; --quick runs one pair)")
    print(f"VAR on: prefill {mv['var_prefill_s']:.3f} s, decode {mv['var_decode_tok_s']:.2f} tok/s; {cost}; "
          f"sinks per layer {mv['var_sinks_per_layer']}, (head,row) pairs redistributed: prefill {mv['var_pairs_prefill']}, "
          f"decode {mv['var_pairs_decode_per_token']:.0f}/token")
    print(f"peak RSS {mv['peak_rss_gb']:.2f} GiB (budget 1.1 x checkpoint + 0.3 GB = {r['rss_budget_gb']:.2f} GiB); "
          f"{mv['peak_rss_with_batches_gb']:.2f} GiB after the batched runs")
    print("batch size → decode tok/s (all sequences): " +
          ", ".join(f"{bs}: {v['decode_tok_s']:.2f}" for bs, v in mv["batch"].items()))


if __name__ == "__main__":
    sys.exit(main())
