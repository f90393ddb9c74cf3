#!/usr/bin/env python
"""Contrastive decoding's cost: decode tok/s and prefill time of base, DAMRO and VCD on minivar, and DAMRO the way
its released code runs it, timed in one process on the same checkpoint, pixels and prompt ids.

    python bench/bench_contrastive.py                       # reference config (CLIP-L/336 + 4 LLaMA-2-7B layers, bf16)
    python bench/bench_contrastive.py --make tiny --quick   # seconds, a smoke test

minivar runs both branches of DAMRO/VCD as rows of one batched forward per step (the weights read once per step), on
a model loaded as `--damro` / `--vcd` load it (on a CPU in bf16 its decoder weights packed for two-row steps; base
runs on a plain load); the released structure (coder-gx/DAMRO's sample.py, restated here on transformers'
LlavaForConditionalGeneration) runs the full branch and the contrast branch as two sequential forwards with two KV
caches per step. Each repeat runs every variant once, the order rotating, and the figures are medians over the
repeats (ratios: the median of the per-repeat ratios, so each ratio compares runs made under the same machine
conditions). Targets: DAMRO and VCD decode time per token ≤ 1.35× base; DAMRO prefill ≤ 1.15× base; minivar DAMRO
end to end (prefill + decode) ≥ 1.5× faster than the released structure. Output: a table, then one JSON line
prefixed "BENCH_CD_JSON ".
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench import DTYPES, SHAPES, _cpu_name, inputs, make_checkpoint, median, positive_int, sync  # noqa: E402

VARIANTS = ("base", "damro", "vcd", "damro_released")
TARGETS = {"damro_decode_ratio": 1.35, "vcd_decode_ratio": 1.35, "damro_prefill_ratio": 1.15,
           "damro_end_to_end_speedup": 1.5}


def released_combine(l_full: torch.Tensor, l_cd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The released combination rule (sample.py), on the raw last-position logits of both branches:
    cutoff = log β + max l_full; l = (1+α)·l_full − α·l_cd; l = −∞ where l_full < cutoff."""
    cutoff = torch.log(torch.tensor(beta)) + l_full.max(dim=-1, keepdim=True).values
    diffs = (1 + alpha) * l_full - alpha * l_cd
    return diffs.masked_fill(l_full < cutoff, -float("inf"))


class ReleasedDAMRO:
    """DAMRO as its released code runs it, on transformers' LLaVA: one vision-tower run with forward hooks on the
    q_proj / k_proj of encoder.layers[vision_feature_layer] (the full-width CLS attention, topk, gather, projector),
    then two forwards — the full prompt, and the prompt with the k outlier features as its image — each with its
    own cache, and per step the released rule and two one-token forwards on the two caches (greedy here: the released
    scripts sample, which costs the same)."""

    def __init__(self, model, ids: torch.Tensor, pixel_values: torch.Tensor, alpha: float, beta: float, topk: int):
        self.model, self.ids, self.px = model, ids, pixel_values
        self.alpha, self.beta, self.topk = alpha, beta, topk
        image_id = model.config.image_token_index
        spots = (ids[0] == image_id).nonzero().flatten()
        first, last = int(spots[0]), int(spots[-1])
        # the contrast prompt: the same text, k image tokens in place of the image's
        self.cd_ids = torch.cat([ids[:, :first], torch.full((1, topk), image_id, device=ids.device),
                                 ids[:, last + 1:]], dim=1)

    def image_embeds(self):
        """(full branch's image features [1, N, D], the contrast image's [1, k, D]) from one tower run."""
        cfg, model = self.model.config, self.model
        tower = model.model.vision_tower
        layer = getattr(tower, "vision_model", tower).encoder.layers[cfg.vision_feature_layer]
        seen = {}
        handles = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
                   layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))]
        try:
            out = tower(self.px, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        selected = out.hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        C = selected.shape[-1]
        attn = F.softmax((seen["q"] @ seen["k"].transpose(-2, -1)) * C ** -0.5, dim=-1)     # full width, no heads
        _, idx = torch.topk(attn[:, 0, 1:], self.topk, dim=1, largest=True)
        gathered = torch.gather(selected, 1, idx.unsqueeze(-1).expand(-1, -1, C))
        proj = model.model.multi_modal_projector
        return proj(selected), proj(gathered)

    def embeds(self, ids, feats):
        is_image = ids == self.model.config.image_token_index
        e = self.model.get_input_embeddings()(ids.masked_fill(is_image, 0))
        return e.masked_scatter(is_image[..., None], feats.to(e.dtype))

    def run(self, new_tokens: int, device) -> dict:
        sync(device)
        t0 = time.perf_counter()
        full_feats, cd_feats = self.image_embeds()
        full = self.model(inputs_embeds=self.embeds(self.ids, full_feats), use_cache=True)
        cd = self.model(inputs_embeds=self.embeds(self.cd_ids, cd_feats), use_cache=True)
        tokens = []
        prefill_s = None
        for step in range(new_tokens):
            nxt = released_combine(full.logits[:, -1].float(), cd.logits[:, -1].float(), self.alpha,
                                   self.beta).argmax(dim=-1)
            tokens.append(int(nxt))
            if prefill_s is None:
                sync(device)
                prefill_s, t1 = time.perf_counter() - t0, time.perf_counter()
            if step + 1 == new_tokens:
                break
            full = self.model(input_ids=nxt[:, None], past_key_values=full.past_key_values, use_cache=True)
            cd = self.model(input_ids=nxt[:, None], past_key_values=cd.past_key_values, use_cache=True)
        sync(device)
        decode_s = time.perf_counter() - t1
        return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_tok_s": (new_tokens - 1) / decode_s,
                "total_s": prefill_s + decode_s, "tokens": tokens}


def minivar_runner(pipe, ids: torch.Tensor, px: torch.Tensor, args):
    """variant → a function running it on minivar for n tokens: the methods' branch (DAMRO: the outliers, from the
    same tower run as the full features; VCD: the noised image through the tower) and hooks, then minivar's
    generation loop (both branches as rows of one forward per step)."""
    from minivar.generate import generate
    from minivar.methods.damro import DAMRO, DAMROConfig
    from minivar.methods.vcd import VCD, VCDConfig
    methods = {"base": lambda: [], "vcd": lambda: [VCD(VCDConfig(), seed=0)],
               "damro": lambda: [DAMRO(DAMROConfig(alpha=args.alpha, beta=args.beta, topk=args.topk))]}
    rows = [ids[0].tolist()]
    model, device = pipe.model, pipe.device

    def run(variant: str, new_tokens: int) -> dict:
        sync(device)
        t0 = time.perf_counter()
        chosen = methods[variant]()
        request = pipe._request(rows, model.image_inputs(px), new_tokens, chosen, None, False)
        pipe.add_hooks(request, methods=chosen)
        images = request.images if request.image_features is None else request.row_images
        setup_s = time.perf_counter() - t0              # DAMRO's/VCD's tower runs happen here, base's in prefill
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
    from minivar.models import packed
    from minivar.pipeline import Pipeline, pick_device
    dev, dt = pick_device(args.device), DTYPES[args.dtype]

    def pipeline(contrastive: bool):          # loaded as minivar.load(contrastive=...) loads it
        t0 = time.perf_counter()
        model = load_model(Path(args.checkpoint), dt, dev, pack_decoder=contrastive)
        return Pipeline(model, None, Path(args.checkpoint), dev, dt, time.perf_counter() - t0)

    pipe = pipeline(False)
    # --damro / --vcd load the decoder packed for their two-row steps where that changes anything (a CPU in bf16):
    # DAMRO and VCD run on such a load, base on the plain one, as each would be run from the command line
    cd_pipe = pipeline(True) if dev.type == "cpu" and dt == torch.bfloat16 and packed.available() else pipe
    ids, px = inputs(pipe.model.config)
    ids, px = ids.to(dev), px.to(dev, dt)
    run_base, run_cd = minivar_runner(pipe, ids, px, args), minivar_runner(cd_pipe, ids, px, args)
    runners = {"base": lambda n: run_base("base", n), "damro": lambda n: run_cd("damro", n),
               "vcd": lambda n: run_cd("vcd", n)}
    version = None
    if not args.no_transformers:
        try:
            import transformers
            from transformers import LlavaForConditionalGeneration
        except ImportError:
            print("bench: transformers is not installed; skipping the released structure", file=sys.stderr)
        else:
            version = transformers.__version__
            transformers.logging.set_verbosity_error()   # the tower layers past the feature layer: never run
            ref = LlavaForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dt,
                                                                attn_implementation="sdpa").to(dev).eval()
            released = ReleasedDAMRO(ref, ids, px, args.alpha, args.beta, args.topk)
            runners["damro_released"] = lambda n: released.run(n, dev)
    n = args.new_tokens + 1                         # the first token comes with the prefill
    runs = {v: [] for v in runners}
    with torch.inference_mode():
        for v in runners:
            runners[v](2)                           # warm-up
        order = list(runners)
        for i in range(args.repeats):
            for v in order[i % len(order):] + order[:i % len(order)]:    # the order rotates every repeat
                runs[v].append(runners[v](n))
    res = {"transformers": version, "runs": {v: [{k: r[k] for k in ("prefill_s", "decode_s", "decode_tok_s",
                                                                    "total_s")} for r in rs] for v, rs in runs.items()}}
    res["median"] = {v: {k: median([r[k] for r in rs]) for k in ("prefill_s", "decode_tok_s", "total_s")}
                     for v, rs in runs.items()}
    base = runs["base"]

    def ratio(v, key, invert=False):       # median over the repeats of (variant / base), each repeat's own pair
        if v not in runs:
            return None
        return median([(b[key] / r[key]) if invert else (r[key] / b[key]) for b, r in zip(base, runs[v])])

    res["ratios"] = {
        "damro_decode_ratio": ratio("damro", "decode_tok_s", invert=True),     # decode time per token / base's
        "vcd_decode_ratio": ratio("vcd", "decode_tok_s", invert=True),
        "damro_prefill_ratio": ratio("damro", "prefill_s"),
        "vcd_prefill_ratio": ratio("vcd", "prefill_s"),
    }
    if "damro_released" in runs:
        res["ratios"]["damro_end_to_end_speedup"] = median(
            [r["total_s"] / m["total_s"] for m, r in zip(runs["damro"], runs["damro_released"])])
        res["ratios"]["damro_decode_speedup_vs_released"] = median(
            [m["decode_tok_s"] / r["decode_tok_s"] for m, r in zip(runs["damro"], runs["damro_released"])])
        res["same_tokens_as_released"] = runs["damro"][0]["tokens"] == runs["damro_released"][0]["tokens"]
    res["tokens"] = {v: rs[0]["tokens"] for v, rs in runs.items()}
    return res


def print_table(report: dict) -> None:
    m, r = report["median"], report["ratios"]
    print(f"contrastive decoding, {report['device']} {report['dtype']}, {report['new_tokens']} new tokens, "
          f"{report['repeats']} repeats (medians)")
    print(f"{'variant':<16}{'prefill (s)':>14}{'decode (tok/s)':>16}{'end to end (s)':>16}")
    for v in VARIANTS:
        if v in m:
            print(f"{v:<16}{m[v]['prefill_s']:>14.3f}{m[v]['decode_tok_s']:>16.2f}{m[v]['total_s']:>16.3f}")
    print(f"{'ratio':<36}{'measured':>10}{'target':>10}  met")
    rows = [("DAMRO decode time / base", "damro_decode_ratio", "≤"), ("VCD decode time / base", "vcd_decode_ratio", "≤"),
            ("DAMRO prefill / base", "damro_prefill_ratio", "≤"),
            ("released DAMRO / minivar DAMRO (total)", "damro_end_to_end_speedup", "≥")]
    for label, key, sense in rows:
        value, target = r.get(key), TARGETS[key]
        if value is None:
            print(f"{label:<36}{'—':>10}{sense + str(target):>10}  (not run)")
            continue
        met = value <= target if sense == "≤" else value >= target
        print(f"{label:<36}{value:>10.3f}{sense + str(target):>10}  {'yes' if met else 'NO'}")


def main(argv=None) -> int:
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
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--alpha", type=float, default=1.0, help="DAMRO's α (its cost does not depend on it)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--topk", type=positive_int, default=10, help="DAMRO's k (the released MME/LLaVA setting: 10)")
    p.add_argument("--no-transformers", action="store_true", help="skip the released structure")
    p.add_argument("--quick", action="store_true", help="2 repeats, 4 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 2, 4
    args.checkpoint = make_checkpoint(args.make, args.dtype,
                                      args.checkpoint or REPO / "weights" / f"bench-{args.make}-{args.dtype}")
    res = worker(args)
    report = {"date": date.today().isoformat(), "cpu": _cpu_name(), "torch": torch.__version__,
              "device": args.device, "dtype": args.dtype, "checkpoint": str(args.checkpoint),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "topk": args.topk, "targets": TARGETS} | res
    print_table(report)
    print("BENCH_CD_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
