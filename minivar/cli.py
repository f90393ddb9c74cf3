"""minivar command line: answer a question about an image with LLaVA-1.5, optionally with VAR.

    minivar --image assets/example.jpg --prompt "What is in the image?" --model demo
    minivar --image x.jpg --prompt "..." --var                # real 7B from the hub (14 GB download)

The same program runs as `minivar` (installed), `python -m minivar` and `python run.py` (a clone).
Errors in what you pass (files, flags, checkpoints) print one line on stderr, `minivar: error: ...`, and exit with
code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"minivar: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="minivar", description="LLaVA-1.5 in plain PyTorch, with Visual Attention Redistribution (VAR).",
                allow_abbrev=False)
    p.add_argument("--image", required=True, help="image file (any format and mode PIL reads)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf",
                   help="hub id (downloaded into weights/), a local checkpoint directory, or 'demo' (tiny random, offline)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--conv-mode", choices=["vicuna_v1", "llava_hf"], default="vicuna_v1")
    p.add_argument("--image-aspect-ratio", choices=["pad", "crop"], default="pad",
                   help="pad: LLaVA-1.5 evaluation (default); crop: llava-hf processor")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="auto = float16 on CUDA, bfloat16 on CPU")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (ids, text, timing, VAR)")
    v = p.add_argument_group("VAR (Visual Attention Redistribution)")
    v.add_argument("--var", action="store_true", help="apply VAR")
    v.add_argument("--var-preset", choices=["general", "hallucination", "vision"], default=None,
                   help="ρ preset: general 0.8 (default), hallucination 0.5, vision 0.9")
    v.add_argument("--tau", type=float, default=None, help="sink threshold τ on φ (default 20)")
    v.add_argument("--rho", type=float, default=None, help="non-sink image-attention floor ρ (overrides the preset)")
    v.add_argument("--p", type=float, default=None, help="fraction of sink attention moved (default 0.6)")
    v.add_argument("--min-image-attention", type=float, default=None, help="image-attention floor (default 0.2)")
    v.add_argument("--sink-dims", default=None, help="comma-separated dims, or 'auto' to run the sink-dim finder")
    i = p.add_argument_group("looking inside (pictures, sink removal; see docs/pictures.md)")
    i.add_argument("--save-attention", metavar="DIR", default=None,
                   help="write PNG pictures of sinks and attention, and their numbers (attention.json), into DIR")
    i.add_argument("--attention-layers", metavar="A-B", default=None,
                   help="layer range of the attention picture (default 10-12 of 32 layers, scaled to the model)")
    m = i.add_mutually_exclusive_group()
    m.add_argument("--mask-visual-sinks", action="store_true",
                   help="remove each layer's visual sink tokens from attention (their key columns masked)")
    m.add_argument("--mask-random-image-tokens", metavar="N", type=int, default=None,
                   help="remove N random image tokens from attention in every layer (seeded by --seed, default 0)")
    return p


def var_config(args):
    """The VARConfig the flags ask for, or None without --var (VAR flags without --var are an error)."""
    from minivar.errors import MinivarError
    from minivar.var import VARConfig, parse_sink_dims
    var_flags = {"--var-preset": args.var_preset, "--tau": args.tau, "--rho": args.rho, "--p": args.p,
                 "--min-image-attention": args.min_image_attention, "--sink-dims": args.sink_dims}
    if not args.var:
        given = [k for k, v in var_flags.items() if v is not None]
        if given:
            raise MinivarError(f"{given[0]} only applies with --var")
        return None
    sink_dims = parse_sink_dims(args.sink_dims) if args.sink_dims is not None else None
    cfg = VARConfig.preset(args.var_preset or "general", tau=args.tau, rho=args.rho, p=args.p,   # --rho beats the preset
                           min_image_attention=args.min_image_attention, sink_dims=sink_dims)
    # The ranges that need no model are checked now, before the slow load (sink dims need the hidden size: later).
    return cfg.validate()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from minivar.errors import MinivarError
    try:
        return run(args)
    except MinivarError as e:
        print(f"minivar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minivar: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read stdout has gone (`run.py ... | head`): stop quietly, like other command-line tools. Point
        # stdout at /dev/null so Python's own flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def run(args) -> int:
    import minivar
    from minivar import processing
    from minivar.errors import MinivarError
    from minivar.pipeline import check_generation_args

    # Check everything the user passed before the (slow) model load.
    check_generation_args(args.max_new_tokens, args.temperature, args.top_p)
    if not args.prompt.strip():
        raise MinivarError("--prompt is empty")
    var = var_config(args)
    image = processing.load_image(args.image)
    from minivar.probe import RunInspection
    inspection = RunInspection.from_args(args)       # --save-attention / --mask-*: None when not asked for

    llava = minivar.load(args.model, device=args.device, dtype=args.dtype)
    # What depends on the model (its context length, hidden size) is checked too before any status line is printed:
    # bad input of any kind gives exactly one line on stderr, the error.
    # So are VAR's sink dims (the finder may run now; the pipeline keeps them for the generation) and the probe's
    # checks against this prompt; the finder's report is printed after the status line. (The generation makes its
    # own VAR state and binds the probe again, to the same prompt: the same state.)
    ids = llava.prompt_ids(args.prompt, args.conv_mode)
    notes = []
    if var is not None:
        llava.var_state(var, ids, warn=notes.append)
    probe = inspection.probe(llava, var) if inspection is not None else None
    llava.bind_probe(probe, ids, var, warn=notes.append)
    print(f"minivar: loaded {args.model} in {llava.load_s:.2f}s on {llava.device} "
          f"({str(llava.dtype).replace('torch.', '')})", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)

    stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
    out = llava.generate(image, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, conv_mode=args.conv_mode,
                         image_aspect_ratio=args.image_aspect_ratio, var=var, probe=probe, on_text=stream)
    t = out.timing
    print(f"minivar: prefill {t['prefill_s']:.2f}s, decode {t['decode_tokens_per_s']:.2f} tok/s, "
          f"{len(out.output_ids)} tokens", file=sys.stderr)
    inspected = inspection.finish(llava, out, image, args.image_aspect_ratio, var, args.prompt,
                                  log=lambda msg: print(msg, file=sys.stderr)) if inspection is not None else {}
    if args.json:
        record = {"model": str(llava.directory), "device": str(llava.device), "dtype": str(llava.dtype).replace("torch.", ""),
                  "prompt_ids": out.prompt_ids, "output_ids": out.output_ids, "text": out.text,
                  "finished": out.finished, "timing": t}
        if out.var is not None:
            record["var"] = out.var
        record.update(inspected)                      # "masked", "pictures"
        print(json.dumps(record))
    else:
        print()
    return 0
