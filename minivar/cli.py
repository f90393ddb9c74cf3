"""minivar command line: answer a question about an image with a vision-language model (LLaVA-1.5, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL: every family of models/registry.py), optionally with VAR, DAMRO or VCD.

    minivar --image assets/example.jpg --prompt "What is in the image?" --model demo
    minivar --image x.jpg --prompt "..." --var                # real 7B from the hub (14 GB download)

The same program runs as `minivar` (installed), `python -m minivar` and `python run.py` (a clone).
Errors in what you pass (files, flags, checkpoints) print one line on stderr, `minivar: error: ...`, and exit with
code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import unicodedata


from minivar import __version__
from minivar.defaults import DEFAULT_MODEL
from minivar.flags import (CONV_MODES, IMAGE_MODES, PROMPT_TOKENIZATION_HELP, PROMPT_TOKENIZATIONS,  # (no torch
                           HelpFormatter, add_beam_flags, add_contrastive_flags, overview)            # either)

INTRO = ("Answer a question about an image with a vision-language model in plain PyTorch, optionally with "
         "training-free attention methods.")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"minivar: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def format_help(self):  # the families come from the registry, which imports torch: only when help is printed
        self.description = f"{INTRO}\n\n{overview()}"
        return super().format_help()


class _Help(HelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    # Every default is written into its help text (--help is where a user learns that the default model is a 14 GB
    # download), so a test can check that none is missing.
    p = _Parser(prog="minivar", description=INTRO,
                epilog="Hub checkpoints are downloaded once into the weights folder (MINIVAR_WEIGHTS, default: weights/ "
                       "of a source checkout, else ~/.cache/minivar) and reused. Bad input prints one line, "
                       "'minivar: error: ...', and exits with code 2.",
                formatter_class=_Help, allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"minivar {__version__}",
                   help="print minivar's version and exit")
    p.add_argument("--image",
                   help="image file, any format and mode PIL reads (required except with --serve; no default)")
    p.add_argument("--prompt", help="the question or instruction (required except with --serve; no default)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id (downloaded on first use), a local checkpoint directory, or an offline demo: 'demo' "
                        "(LLaVA-1.5) or 'demo-<model_type>' (each other family's; listed above), tiny random weights "
                        f"made in seconds. Default: {DEFAULT_MODEL}, LLaVA-1.5-7B: a 14.1 GB "
                        "download, ≥ 16 GB of (V)RAM")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass, with --temperature > 0 only (default: 1.0)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling and --mask-random-image-tokens (default: none for sampling, 0 for masking)")
    p.add_argument("--conv-mode", choices=CONV_MODES, default=None,
                   help="prompt template: vicuna_v1 = LLaVA-1.5's evaluation, with its system prompt; llava_hf = the "
                        "llava-hf model card's; llava_v1 = LLaVA's conv_llava_v1 (\"curious human\"), the template "
                        "DAMRO's and VCD's scripts use; mistral_instruct = LLaVA-NeXT-Mistral's; qwen = Qwen2-VL's "
                        "Instruct chat; qwen3 = the Qwen3-VL checkpoint's own chat template; internvl = the InternVL "
                        "checkpoint's chat template (default: the model's own: vicuna_v1, mistral_instruct for "
                        "LLaVA-NeXT-Mistral, qwen for Qwen2-VL / Qwen2.5-VL, qwen3 for Qwen3-VL, internvl for InternVL)")
    p.add_argument("--image-aspect-ratio", choices=IMAGE_MODES, default=None,
                   help="pad: LLaVA-1.5 evaluation; crop: llava-hf processor; anyres: LLaVA-NeXT's tiles; "
                        "smart_resize: Qwen2-VL's; tiles: InternVL's 448 px tiles + thumbnail "
                        "(default: the model's own: pad, anyres, smart_resize, tiles)")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="Qwen2-VL / Qwen2.5-VL: the fewest pixels an image is resized to (default: the checkpoint's "
                        "preprocessor_config.json)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="Qwen2-VL / Qwen2.5-VL: the most pixels an image is resized to, which caps its tokens at "
                        "max_pixels / 784 (default: the checkpoint's preprocessor_config.json; the hub's 12,845,056 "
                        "allows 16,384 tokens)")
    p.add_argument("--max-patches", type=int, default=None,
                   help="InternVL: the most 448 px tiles an image is cut into (a thumbnail is added when there are "
                        "several), which caps its tokens at 256 · (max_patches + 1) (default: the checkpoint's "
                        "preprocessor_config.json, 12)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto = cuda if available)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="default: auto = float16 on CUDA, bfloat16 on CPU")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (ids, text, finished, stopped, timing, VAR) instead of "
                        "streaming the text (default: off)")
    p.add_argument("--prompt-tokenization", choices=PROMPT_TOKENIZATIONS, default="llava",
                   help=f"{PROMPT_TOKENIZATION_HELP} (default: llava)")
    v = p.add_argument_group("VAR (Visual Attention Redistribution)")
    v.add_argument("--var", action="store_true", help="apply VAR (default: off)")
    v.add_argument("--var-preset", choices=["general", "hallucination", "vision"], default=None,
                   help="ρ preset: general 0.8, hallucination 0.5, vision 0.9 (default: general)")
    v.add_argument("--tau", type=float, default=None,
                   help="sink threshold τ on φ, for VAR and for the sinks of --save-attention / --mask-visual-sinks "
                        "(default: 20)")
    v.add_argument("--rho", type=float, default=None,
                   help="non-sink image-attention floor ρ, overrides the preset (default: the preset's)")
    v.add_argument("--p", type=float, default=None, help="fraction of sink attention moved (default: 0.6)")
    v.add_argument("--min-image-attention", type=float, default=None, help="image-attention floor (default: 0.2)")
    v.add_argument("--sink-dims", default=None,
                   help="comma-separated dims, or 'auto' to run the sink-dim finder; for VAR and the sinks of "
                        "--save-attention / --mask-visual-sinks (default: the known dims of LLaVA-1.5-7B/13B, the "
                        "finder for other models)")
    v.add_argument("--var-rule", choices=["paper", "official"], default=None,
                   help="paper: the paper's rule; official: as the authors' released code computes it, --rho and "
                        "--p in its convention (rho: visual-sink ceiling, p: fraction kept; its defaults τ 20, "
                        "rho 0.5, p 0.6; docs/official-rule.md) (default: paper)")
    v.add_argument("--var-heads", choices=["image-centric", "all"], default=None,
                   help="all: every head of the touched rows, the paper's ablation (default: image-centric)")
    v.add_argument("--var-layers", metavar="A-B", default=None,
                   help="the layers VAR may modify (default: the rule's, paper 0..L−2, official 2..L−1)")
    add_contrastive_flags(p)
    add_beam_flags(p)
    s = p.add_argument_group("the live explorer (docs/explorer.md)")
    s.add_argument("--serve", action="store_true",
                   help="load the model once and serve a page to upload an image, ask, choose the methods and see "
                        "the run's attention explorer (default: off)")
    s.add_argument("--host", default=None,
                   help="with --serve: the address to bind; anything but localhost lets others run the model "
                        "(default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="with --serve: the port (default: 8765)")
    i = p.add_argument_group("looking inside (pictures, sink removal; see docs/pictures.md)")
    i.add_argument("--save-attention", metavar="DIR", default=None,
                   help="write PNG pictures of sinks and attention, their numbers (attention.json) and the "
                        "attention explorer (explorer.html, one page that opens offline) into DIR (default: off)")
    i.add_argument("--attention-layers", metavar="A-B", default=None,
                   help="layer range of the attention picture (default: 10-12 of 32 layers, scaled to the model)")
    m = i.add_mutually_exclusive_group()
    m.add_argument("--mask-visual-sinks", action="store_true",
                   help="remove each layer's visual sink tokens from attention, their key columns masked "
                        "(default: off)")
    m.add_argument("--mask-random-image-tokens", metavar="N", type=int, default=None,
                   help="remove N random image tokens from attention in every layer, seeded by --seed "
                        "(default: off)")
    return p


def var_config(args):
    """(the VARConfig the flags ask for, or None without --var; the sink rule — τ and sink dims — of the sinks the
    pictures and sink masking use). The VAR-only flags without --var are an error; --tau / --sink-dims without --var
    serve the pictures and masking alone."""
    methods, rule = method_settings(args)
    from minivar.flags import var_of
    return var_of(methods), rule


def method_settings(args):
    """(the methods the flags ask for, the pictures' sink rule): the translation minivar-eval and the lmms-eval
    plugin share (flags.py)."""
    from minivar.flags import DAMRO_OPTIONS, OPERA_OPTIONS, PAI_OPTIONS, VAR_OPTIONS, VCD_OPTIONS, methods_from_options
    opts = {k: getattr(args, k) for k in ("var", "seed", "num_beams") + VAR_OPTIONS + DAMRO_OPTIONS + VCD_OPTIONS
            + PAI_OPTIONS + OPERA_OPTIONS}
    return methods_from_options(opts, sinks_used=args.save_attention is not None or args.mask_visual_sinks)


def stop_reason(result, max_new_tokens: int, context: int) -> tuple[str, str]:
    """Why the generation stopped, as (key for --json, words for the status line). Pipeline.generate stops at EOS
    (result.finished), after max_new_tokens, or when prompt + answer fill the model's context."""
    if result.finished:
        return "eos", "at EOS"
    if len(result.output_ids) >= max_new_tokens:
        return "max_new_tokens", f"at --max-new-tokens {max_new_tokens}"
    return "context", f"at the model's context length ({context} tokens)"


def var_summary(report: dict) -> str:
    """One status line on what VAR did: sinks per layer (visual + text) and the (head, row) pairs redistributed."""
    layers = sorted(int(k) for k in report["sinks"])
    per_layer = []
    for layer in layers:
        n_visual = len(report["visual_sinks"].get(str(layer), []))
        per_layer.append(f"{n_visual}+{len(report['sinks'][str(layer)]) - n_visual}")
    prefill, decode = (sum(report["redistributed"][phase]) for phase in ("prefill", "decode"))
    dims = ",".join(str(d) for d in report["sink_dims"]) or "none"
    settings = f"ρ {report['rho']:g}, p {report['p']:g}"
    if report.get("rule") == "official":           # the code's conventions, and the paper's next to them
        settings = (f"rule official: rho {report['rho']:g} (ρ {report['rho_paper']:g}), p {report['p']:g} kept "
                    f"(p {report['p_paper']:g} moved)")
    if report.get("heads") == "all":
        settings += ", every head"
    if report.get("layers_not_touched"):
        settings += (f"; layers {','.join(map(str, report['layers_not_touched']))} not touched: "
                     f"{report['why']}")
    return (f"minivar: VAR: sinks per layer (visual+text) {' '.join(per_layer) or 'none'}; "
            f"{prefill + decode} (head, row) pairs redistributed ({prefill} in the prefill, {decode} while decoding); "
            f"sink dims {dims} ({report.get('sink_dims_source')}), τ {report['tau']:g}, " + settings)


def method_summary(name: str, report: dict) -> str:
    """One status line per method: VAR's own; DAMRO's outliers and settings; VCD's; another method's report."""
    if name == "var":
        return var_summary(report)
    if name == "damro":
        outliers = ",".join(map(str, report["outliers"] or []))
        return (f"minivar: DAMRO: ViT outlier patches {outliers} (k {report['topk']}) as the contrast image, "
                f"α {report['alpha']:g}, β {report['beta']:g}")
    if name == "vcd":
        return (f"minivar: VCD: the image noised to diffusion step {report['noise_step']} as the contrast image, "
                f"α {report['alpha']:g}, β {report['beta']:g}")
    if name == "pai":
        lo, hi = report["layers_edited"] or [0, 0]
        guided = (f"guidance γ {report['gamma']:g} against the prompt without the image" if report["gamma"] != 1
                  else "no guidance (γ 1)")
        return (f"minivar: PAI: image keys' scores a + α·|a|, α {report['alpha']:g}, in layers {lo}..{hi - 1}; "
                f"{guided}" + ("; the first token chosen before any edit (the released loop)"
                                if report["gamma"] != 1 and report["first_token"] == "unedited" else ""))
    if name == "opera":
        return (f"minivar: OPERA: {report['rollbacks']} rollback{'s' * (report['rollbacks'] != 1)}, "
                f"{report['penalised_steps']} penalised step{'s' * (report['penalised_steps'] != 1)}")
    return f"minivar: {name}: {json.dumps(report)}"


def terminal_text(text: str) -> str:
    """Generated text made safe for a terminal: control characters (ESC, BEL, CR, C1 ...) other than newline and tab
    are shown escaped (\\x1b), so a model's output cannot move the cursor, recolour or retitle the terminal."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) == "Cc" and c not in "\n\t"
                   else c for c in text)


def main(argv=None, methods=()) -> int:
    """The command line; `methods`: more Method objects (methods/method.py) to run after the flags' own — the
    Python path to a method of your own."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from minivar.errors import run_command
    if args.serve:
        from minivar import serve
        # a flag without effect is an error: with --serve, each request brings its image, question and settings
        given = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest not in serve.SERVER_FLAGS
                 and getattr(args, a.dest, a.default) != a.default]     # (--version sets no attribute)
        if given:
            parser.error(f"--serve takes the image, the question and the settings from each request (its page), "
                         f"not from {', '.join(given)}")
        return run_command(lambda a: serve.serve(a, build_parser, method_settings), args)
    for flag, value in (("--host", args.host), ("--port", args.port)):
        if value is not None:
            parser.error(f"{flag} only applies with --serve")
    missing = [f for f, v in (("--image", args.image), ("--prompt", args.prompt)) if v is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return run_command(lambda a: run(a, methods), args)


def run(args, extra_methods=()) -> int:
    import minivar
    from minivar import processing
    from minivar.errors import MinivarError
    from minivar.inspection import RunInspection
    from minivar.pipeline import check_generation_args

    # Check everything the user passed before the (slow) model load.
    check_generation_args(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if not args.prompt.strip():
        raise MinivarError("--prompt is empty")
    methods, rule = method_settings(args)
    methods = methods + list(extra_methods)
    from minivar.flags import check_seed_applies, contrastive_load, num_beams_of, var_of
    check_seed_applies(args.seed, args.temperature, methods,
                       uses=(("--mask-random-image-tokens", args.mask_random_image_tokens is not None),))
    from minivar.pipeline import check_beam_args
    num_beams = num_beams_of(vars(args))
    if num_beams > 1 and args.temperature > 0:
        raise MinivarError(f"--num-beams {num_beams} is a greedy beam search: it needs --temperature 0, got "
                           f"{args.temperature}")
    if num_beams > 1 and (args.save_attention is not None or args.mask_visual_sinks
                          or args.mask_random_image_tokens is not None):
        raise MinivarError(f"--save-attention and the masking flags record one row per sample: they do not run "
                           f"with beam search (--num-beams {num_beams}{' from --opera' * bool(args.opera)})")
    check_beam_args(num_beams, args.temperature)
    var = var_of(methods)
    image = processing.load_image(args.image)
    inspection = RunInspection.from_args(args)       # --save-attention / --mask-*: None when not asked for

    llava = minivar.load(args.model, device=args.device, dtype=args.dtype,
                         image_options={"min_pixels": args.min_pixels, "max_pixels": args.max_pixels,
                                        "max_patches": args.max_patches},
                         contrastive=contrastive_load(methods))
    # The request is prepared once, before any status line: what depends on the model (its context length, hidden
    # size, VAR's sink dims — the finder may run now) is checked there, so bad input of any kind gives exactly one
    # line on stderr. The finder's report is printed after the status line. Without --var, the sink sets of the
    # pictures and of sink masking follow --tau / --sink-dims (`rule`).
    capture, mask = inspection.hooks(llava, var) if inspection is not None else (None, None)
    notes = []
    request = llava.prepare([image], [args.prompt], conv_mode=args.conv_mode,
                            image_aspect_ratio=args.image_aspect_ratio, max_new_tokens=args.max_new_tokens,
                            methods=methods,
                            sink_config=rule if var is None else None, capture=capture, mask=mask,
                            warn=notes.append, prompt_tokenization=args.prompt_tokenization, num_beams=num_beams)
    print(f"minivar: loaded {args.model} in {llava.load_s:.2f}s on {llava.device} "
          f"({str(llava.dtype).replace('torch.', '')})", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)

    to_terminal = sys.stdout.isatty()

    def stream(piece):
        print(terminal_text(piece) if to_terminal else piece, end="", flush=True)

    out = llava.run(request, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    on_text=None if args.json else stream)[0]
    if not args.json:
        print(flush=True)                 # the answer's line ends before the status lines (stderr) on a terminal
    t = out.timing
    stopped, why = stop_reason(out, args.max_new_tokens, llava.config.text.max_position_embeddings)
    # the prefill makes the first token; decode_tokens (--json's timing) are the ones after it
    n = len(out.output_ids)
    # a rate only where decode steps ran: with one token the prefill made it, and there is nothing to divide
    decode = (f"decode {t['decode_tokens_per_s']:.2f} tok/s ({t['decode_tokens']} token"
              f"{'s' * (t['decode_tokens'] != 1)} after the first)" if t["decode_tokens"] else "no decode step")
    print(f"minivar: prefill {t['prefill_s']:.2f}s (incl. the first token), {decode}, "
          f"{n} token{'s' * (n != 1)}, stopped {why}", file=sys.stderr)
    for name, report in out.reports.items():         # one status line per method
        print(method_summary(name, report), file=sys.stderr)
    image_mode = args.image_aspect_ratio or llava.family.default_image_mode
    inspected = inspection.finish(llava, out, image, image_mode, var, args.prompt,
                                  log=lambda msg: print(msg, file=sys.stderr)) if inspection is not None else {}
    if args.json:
        record = {"model": str(llava.directory), "device": str(llava.device), "dtype": str(llava.dtype).replace("torch.", ""),
                  # the LLaVA tokenizer's modes; null for a family with a tokenizer of its own (Qwen2-VL's)
                  "prompt_tokenization": args.prompt_tokenization if llava.family.tokenizer is None else None,
                  "prompt_ids": out.prompt_ids, "output_ids": out.output_ids, "text": out.text,
                  "finished": out.finished, "stopped": stopped, "timing": t}
        record.update(out.extra)                      # beam search: "num_beams", "sequence_score"
        record.update(out.reports)                    # "var", and every other method's report under its name
        record.update(inspected)                      # "masked", "pictures"
        print(json.dumps(record))
    return 0
