"""`python -m minivar.eval`: run a benchmark, score runs or answer files, compare two runs, download data.

    python -m minivar.eval run pope --data data/pope --out runs/pope-var --var [--limit 100] [--shard 0/4]
    python -m minivar.eval score runs/pope-var [--json] [--partial]
    python -m minivar.eval score --bench pope --data coco_pope_random.json ... --answers answers.jsonl [--json]
    python -m minivar.eval compare runs/pope-base runs/pope-var [--json]
    python -m minivar.eval download pope [--to DIR]

Results go to stdout (--json: exactly one JSON object); progress and messages to stderr. Bad input of any kind
prints one line `minivar: error: ...` and exits with code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import __version__
from ..defaults import DEFAULT_MODEL
from ..flags import (CONV_MODES, IMAGE_MODES, PROMPT_TOKENIZATION_HELP, PROMPT_TOKENIZATIONS, HelpFormatter,
                     add_beam_flags, add_contrastive_flags, overview)
from ..errors import MinivarError, run_command

BENCHMARK_NAMES = ("pope", "mme", "chair", "mmvp", "cvbench", "gqa")
MODEL_HELP = (f"hub id, a local checkpoint directory, or an offline demo ('demo' for LLaVA-1.5, 'demo-<model_type>' "
              f"for the others: `minivar-eval --help` lists them; tiny random weights); default {DEFAULT_MODEL}, "
              f"a 14 GB download on first use")
INTRO = ("Evaluate a vision-language model, with or without VAR, DAMRO or VCD, on POPE, MME, CHAIR, MMVP, CV-Bench "
         "and GQA; score, compare, download benchmarks, reproduce a paper's evaluation.")
MAX_NEW_TOKENS_HELP = "POPE, MME, GQA 128; CHAIR, MMVP, CV-Bench 512"
LIMIT_HELP = ("only the first N questions, in the order the data files list them (a quick check; a finished run "
              "never shrinks: a smaller --limit on it is refused)")
DEVICE_HELP = ("auto (default: cuda if there is one, else cpu) | cpu | cuda | cuda:K; under torchrun auto and cuda "
               "mean cuda:LOCAL_RANK where CUDA is available, and auto means cpu where it is not")
DTYPE_HELP = "auto (default: float16 on CUDA, bfloat16 on CPU) | float32 | float16 | bfloat16"


class _Parser(argparse.ArgumentParser):
    overview = False            # the top-level parser's help lists the families and methods

    def error(self, message):  # one line, not usage + message
        print(f"minivar: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def format_help(self):  # the families come from the registry, which imports torch: only when help is printed
        if self.overview:
            self.description = f"{INTRO}\n\n{overview()}"
        return super().format_help()


def prog_name(argv0: str | None = None) -> str:
    """The command as the user typed it, for usage lines and hints: `minivar-eval` (the installed script) or
    `python -m minivar.eval` (anything else: `-m` makes argv[0] this file's path)."""
    name = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    return "minivar-eval" if name.startswith("minivar-eval") else "python -m minivar.eval"


def build_parser() -> argparse.ArgumentParser:
    from . import reproduce
    p = _Parser(prog=prog_name(), allow_abbrev=False, description=INTRO, formatter_class=HelpFormatter)
    p.overview = True
    p.add_argument("--version", action="version", version=f"minivar {__version__}",
                   help="print minivar's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,score,compare,download,reproduce}")

    r = sub.add_parser("run", allow_abbrev=False, help="answer a benchmark's questions into a run directory",
                       description="Answer a benchmark's questions into --out (resumable: rerun the same command).")
    r.add_argument("bench", metavar="BENCH", help=f"one of {', '.join(BENCHMARK_NAMES)}")
    r.add_argument("--data", nargs="+", required=True, type=Path, metavar="PATH", help="the benchmark's files or folder")
    r.add_argument("--images", type=Path, default=None, metavar="DIR", help="the image folder, where not in --data")
    r.add_argument("--out", required=True, type=Path, metavar="DIR", help="the run directory (created; resumed)")
    r.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    v = r.add_argument_group("VAR (as in run.py; --var without --var-preset takes the benchmark's preset)")
    v.add_argument("--var", action="store_true", help="apply VAR")
    v.add_argument("--var-preset", choices=["general", "hallucination", "vision"], default=None,
                   help="ρ preset: general 0.8, hallucination 0.5, vision 0.9 (default: the benchmark's family)")
    v.add_argument("--tau", type=float, default=None, help="sink threshold τ on φ (default 20)")
    v.add_argument("--rho", type=float, default=None, help="non-sink image-attention floor ρ (overrides the preset)")
    v.add_argument("--p", type=float, default=None, help="fraction of sink attention moved (default 0.6)")
    v.add_argument("--min-image-attention", type=float, default=None, help="image-attention floor (default 0.2)")
    v.add_argument("--sink-dims", default=None, help="comma-separated dims, or 'auto' to run the sink-dim finder")
    v.add_argument("--var-rule", choices=["paper", "official"], default=None,
                   help="paper: the paper's rule (default); official: as the authors' released code computes it, "
                        "--rho and --p in its convention (the preset's ρ becomes rho = 1 − ρ; docs/official-rule.md)")
    v.add_argument("--var-heads", choices=["image-centric", "all"], default=None,
                   help="image-centric (default) or all: every head of the touched rows (the paper's ablation)")
    v.add_argument("--var-layers", metavar="A-B", default=None,
                   help="the layers VAR may modify (default: the rule's, paper 0..L−2, official 2..L−1)")
    g = r.add_argument_group("generation (default: the benchmark's LLaVA-1.5 evaluation settings; greedy)")
    g.add_argument("--conv-mode", choices=CONV_MODES, default=None,
                   help="prompt template: vicuna_v1 (LLaVA-1.5's evaluation), llava_hf (the hub model card's), "
                        "llava_v1 (LLaVA's conv_llava_v1, as DAMRO's and VCD's scripts prompt), "
                        "mistral_instruct (LLaVA-NeXT-Mistral's), qwen (Qwen2-VL's), qwen3 (Qwen3-VL's own) (default: the benchmark's "
                        "vicuna_v1 where the model speaks it, else the model's own)")
    g.add_argument("--image-aspect-ratio", choices=IMAGE_MODES, default=None,
                   help="pad: pad to square with the CLIP mean colour (LLaVA-1.5's, the default); crop: centre crop; "
                        "anyres (LLaVA-NeXT) and smart_resize (Qwen2-VL): those families' own, their default")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy, as LLaVA-1.5's evaluation (default); > 0 samples (DAMRO's scripts: 1)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass, with --temperature > 0 only (default: 1.0)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling (per batch of questions) and of VCD's noise (default: none; VCD: 0)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"most tokens per answer (default: the benchmark's, {MAX_NEW_TOKENS_HELP})")
    g.add_argument("--prompt-tokenization", choices=PROMPT_TOKENIZATIONS, default="llava",
                   help=f"{PROMPT_TOKENIZATION_HELP} (default: llava)")
    add_contrastive_flags(r)
    add_beam_flags(r)
    e = r.add_argument_group("execution")
    e.add_argument("--batch-size", type=int, default=8, help="questions about one image answered together (default 8)")
    e.add_argument("--limit", type=int, default=None, metavar="N", help=LIMIT_HELP)
    e.add_argument("--shard", default=None, metavar="I/N",
                   help="run part I of N (0-based; split by image); under torchrun RANK/WORLD_SIZE give it")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto", help=DTYPE_HELP)
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object when the run is complete")
    e.add_argument("--partial", action="store_true", help="print the metrics of the answers so far even if incomplete")

    s = sub.add_parser("score", allow_abbrev=False, help="score run directories, or an answer file",
                       description="Score run directories (their answer files merged), or with --bench an answer "
                                   "file in LLaVA's or the VAR code's format.")
    s.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                   help="run directories of one run (several: its shards, merged), as `run --out` made them")
    s.add_argument("--bench", default=None, help="score --answers FILE against --data of this benchmark")
    s.add_argument("--data", nargs="+", type=Path, default=None, metavar="PATH",
                   help="with --bench: the benchmark's files or folder, as `run --data` takes them")
    s.add_argument("--questions", type=Path, default=None, metavar="FILE",
                   help="the question file the answers were made from (POPE: llava_pope_test.jsonl)")
    s.add_argument("--answers", type=Path, default=None, metavar="FILE",
                   help="with --bench: the answer file to score (LLaVA's model_vqa_loader or the VAR code's format)")
    s.add_argument("--json", action="store_true", help="print one JSON object {bench, n, metrics}")
    s.add_argument("--partial", action="store_true", help="score an incomplete run's answers")

    c = sub.add_parser("compare", allow_abbrev=False, help="compare two runs (paired bootstrap intervals)",
                       description="B − A for every metric, with a 95% paired-bootstrap interval.")
    c.add_argument("run_a", type=Path, metavar="RUN_DIR_A", help="the baseline run directory (A)")
    c.add_argument("run_b", type=Path, metavar="RUN_DIR_B",
                   help="the run compared with it (B), on the same questions: B − A is reported")
    c.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    c.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (default 0)")
    c.add_argument("--json", action="store_true", help="print one JSON object")

    d = sub.add_parser("download", allow_abbrev=False, help="fetch a benchmark's hub copy into data/BENCH")
    d.add_argument("bench", metavar="BENCH", help=f"one of {', '.join(BENCHMARK_NAMES)}")
    d.add_argument("--to", type=Path, default=None, metavar="DIR", help="target folder (default data/BENCH)")

    reproduce.add_parser(sub, {"model": MODEL_HELP, "device": DEVICE_HELP, "dtype": DTYPE_HELP}, r, execute_run,
                         prog_name)
    p.run_parser = r            # reproduce checks which flags `run` takes (the methods this build has)
    return p


RESUME = "rerun the same command to resume"


class Terminated(BaseException):
    """SIGTERM (what Slurm and `timeout` send) arrived: ended like Ctrl-C, with exit code 143. A BaseException, as
    KeyboardInterrupt is: the signal can land inside any `except Exception` (the progress line's partial scoring, an
    image's decoding), which must not swallow it and carry on."""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .harness import cli_logging
    from .hallucination import cmd_hallucination
    from .reproduce import cmd_reproduce  # noqa: E402
    commands = {"run": cmd_run, "score": cmd_score, "compare": cmd_compare, "download": cmd_download,
                # reproduce hallucination (several methods, one table) is hallucination.py's; var and damro reproduce's
                "reproduce": lambda a: (cmd_hallucination if a.paper == "hallucination" else cmd_reproduce)(a)}

    def work(a):
        try:
            return commands[a.command](a)
        except Terminated:
            print(f"minivar: terminated (SIGTERM): {RESUME}", file=sys.stderr)
            return 143

    def on_sigterm(signum, frame):
        raise Terminated()

    import signal
    import threading
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    try:
        with cli_logging():
            return run_command(work, args, f"minivar: interrupted ({RESUME})")
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def method_settings(args, bench):
    """The methods the flags ask for, built as run.py builds them (flags.py): --var without --var-preset
    takes the paper's preset for the benchmark's family (hallucination ρ 0.5, vision ρ 0.9, general ρ 0.8), under
    either rule (the released rule's rho = 1 − ρ); checked before the model loads."""
    from minivar.flags import DAMRO_OPTIONS, OPERA_OPTIONS, PAI_OPTIONS, VAR_OPTIONS, VCD_OPTIONS, methods_from_options
    return methods_from_options({k: getattr(args, k) for k in ("var", "seed", "num_beams") + VAR_OPTIONS
                                 + DAMRO_OPTIONS + VCD_OPTIONS + PAI_OPTIONS + OPERA_OPTIONS},
                                preset=bench.family or "general")[0]


def var_settings(args, bench):
    """The VARConfig the VAR flags ask for (None without --var)."""
    from minivar.flags import var_of
    return var_of(method_settings(args, bench))


def cmd_run(args) -> int:
    result = execute_run(args)
    if result is not None:
        show(result, args.json)
    return 0


def execute_run(args) -> dict | None:
    """What `run` does with its parsed flags, without printing the result: harness.run's return value.
    (`reproduce` makes its runs through here, so they are exactly the runs `run` makes.)"""
    from . import harness
    bench = harness.get_benchmark(args.bench)
    from minivar.flags import num_beams_of, var_of
    methods = method_settings(args, bench)
    num_beams = num_beams_of(vars(args))
    var = var_of(methods)
    shard = harness.parse_shard(args.shard) if args.shard is not None else harness.torchrun_shard()
    result = harness.run(bench, args.data, args.out, images=args.images, model=args.model, var=var,
                         methods=[m for m in methods if m.name != "var"],
                         conv_mode=args.conv_mode, image_aspect_ratio=args.image_aspect_ratio,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit, shard=shard,
                         device=args.device, dtype=args.dtype, partial=args.partial,
                         prompt_tokenization=args.prompt_tokenization, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, num_beams=num_beams)
    return result


def cmd_score(args) -> int:
    from . import harness
    if args.bench is not None:
        if args.runs:
            raise MinivarError("give run directories or --bench/--data/--answers, not both")
        if args.data is None or args.answers is None:
            raise MinivarError("score --bench needs --data PATH and --answers FILE")
        if args.partial:
            raise MinivarError("--partial applies to run directories; an answer file must cover its questions")
        for path in args.data + [args.answers] + ([args.questions] if args.questions else []):
            if not path.exists():
                raise MinivarError(f"'{path}' not found")
        from .benchmarks import answers
        metrics = answers.score_answer_file(args.bench, args.data, args.answers, args.questions)
        result = {"bench": args.bench, "n": len(answers.read_answer_file(args.answers)), "metrics": metrics}
    else:
        if not args.runs:
            raise MinivarError("score needs RUN_DIR ... or --bench BENCH --data PATH --answers FILE")
        for flag, value in (("--data", args.data), ("--answers", args.answers), ("--questions", args.questions)):
            if value is not None:
                raise MinivarError(f"{flag} applies with --bench (scoring an answer file), not to run directories")
        result = harness.score_runs(args.runs, partial=args.partial)
    show(result, args.json)
    return 0


def cmd_compare(args) -> int:
    from . import harness
    from .compare import compare_runs
    result = compare_runs(harness.load_runs([args.run_a]), harness.load_runs([args.run_b]), args.resamples, args.seed,
                          log=harness.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    changed = result["answers_changed"]
    print(f"{result['bench']}: {result['n']} questions, {changed} answer{'' if changed == 1 else 's'} changed; "
          f"B − A with 95% paired-bootstrap intervals ({result['resamples']} resamples, seed {result['seed']})")
    print(f"  A = {result['a']}\n  B = {result['b']}")
    width = max(len(k) for k in result["metrics"]) if result["metrics"] else 6
    print(f"{'metric':<{width}}  {'A':>10}  {'B':>10}  {'B − A':>10}  95% interval")
    for key, m in result["metrics"].items():
        lo, hi = m["ci95"]
        ci = f"[{lo:+.4f}, {hi:+.4f}]" if lo is not None else "-"
        print(f"{key:<{width}}  {m['a']:>10.4f}  {m['b']:>10.4f}  {m['delta']:>+10.4f}  {ci}")
    return 0


def cmd_download(args) -> int:
    from .download import download
    # CHAIR and GQA have no hub copy: their sources are printed and nothing is downloaded, which a script must not
    # take for success.
    return 0 if download(args.bench, args.to, prog=prog_name()) is not None else 1


def show(result: dict, as_json: bool) -> None:
    """{"bench", "n", "metrics"} as one JSON object, or as a table of the flattened metrics."""
    if as_json:
        print(json.dumps(result))
        return
    from .compare import flatten
    flat = flatten(result["metrics"])
    width = max([len(k) for k in flat] + [6])
    print(f"{result['bench']}: {result['n']} questions")
    for key, value in flat.items():
        print(f"{key:<{width}}  {value}" if isinstance(value, int) else f"{key:<{width}}  {value:.4f}")


if __name__ == "__main__":
    sys.exit(main())
