"""`minivar-eval reproduce hallucination`: the comparison every visual-hallucination paper makes by hand.

    minivar-eval reproduce hallucination --data-root data --out runs/hall [--benchmarks pope,chair] [--limit N]

POPE (its three COCO splits) and CHAIR (OPERA's protocol: 500 COCO val2014 images, "Please describe this image in
detail.", 512 new tokens) for the base model, VCD, OPERA, PAI, DAMRO and VAR on one model, each with its released
settings. Every run is `minivar-eval run`'s own (built as its command line, printed, resumable, shardable: see
reproduce.py), into --out/<bench>-<method>/. A method whose released scripts decode another way than the base
(VCD's and DAMRO's sample at temperature 1, with their own template and image crop) is compared with a base run
made the same way (vcd-base, damro-base), so each difference is the method's alone. Then one table: per benchmark,
metric and method, the paper's figures (with their source; "reported, not verified"), the measured base → method,
the difference with its paired-bootstrap 95 % interval over the scoring unit (compare.py), and n.

OPERA is the other half of minivar's issue 33 (beam search with its penalty and rollbacks, minivar.methods.opera):
where this build has no such module, or `run` lacks its flags, its runs are left out and the output says so.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MinivarError
from . import reproduce
from .reproduce import NOT_VERIFIED, PAPERS, Missing, Reported

TITLE = "visual hallucination: base, VCD, OPERA, PAI, DAMRO and VAR on POPE and CHAIR"
BENCHES = ("pope", "chair")
METRICS = {   # the table's rows per benchmark: (metrics key, label, scale)
    "pope": (("mean.accuracy", "accuracy (mean of 3 splits)", 100.0), ("mean.f1", "F1 (mean of 3 splits)", 100.0)),
    "chair": (("chair_s", "CHAIR_S (lower is better)", 100.0), ("chair_i", "CHAIR_I (lower is better)", 100.0)),
}

# The released scripts' decoding where it is not the base's greedy vicuna_v1 / pad protocol.
VCD_PROTOCOL = ("--conv-mode", "llava_v1", "--image-aspect-ratio", "crop", "--temperature", "1", "--seed", "55")
DAMRO_PROTOCOL = reproduce.DAMRO_PROTOCOL

VCD_SOURCE = "VCD paper (Leng et al., CVPR 2024) Table 1, LLaVA-1.5 POPE MSCOCO (an image in its README)"
PAI_SOURCE = "PAI paper (Liu et al., ECCV 2024, arXiv 2407.21771), LLaVA-1.5 tables"
OPERA_SOURCE = "OPERA's README (shikiw/OPERA), LLaVA-1.5 7B, POPE per split (averaged here over its 3 splits)"
OPERA_CHAIR_SOURCE = ("OPERA paper (Huang et al., CVPR 2024) CHAIR table, 512 tokens (its captions: shikiw/OPERA "
                      "log/chair_eval_results/llava-1.5/)")
NOT_TRANSCRIBED = "; not transcribed in minivar: read it there"


def _from_paper(paper: str, bench: str) -> tuple:
    """The figures reproduce.py already holds for `paper`'s `bench` (VAR's, DAMRO's)."""
    return next((e.reported for e in PAPERS[paper].entries if e.bench == bench), ())


def _none(bench: str, source: str) -> tuple:
    return tuple(Reported(m, label, None, None, source + NOT_TRANSCRIBED, scale) for m, label, scale in METRICS[bench])


@dataclass(frozen=True)
class Arm:
    """One setting of the comparison: its run flags per benchmark, and the arm it is compared with."""
    name: str                                   # the run folder is <bench>-<name>
    label: str
    flags: dict                                 # bench → `run` flags
    setting: str                                # what the flags mean, for the table
    base: str | None = None                     # the base arm it is compared with (None: a base itself)
    reported: dict = field(default_factory=dict)   # bench → Reported figures
    module: str | None = None                   # a method module this build must have
    needs: tuple = ()                           # `run` flags this build must have


def _same(flags: tuple) -> dict:
    return {b: tuple(flags) for b in BENCHES}


ARMS = (
    Arm("base", "base", _same(()), "greedy, vicuna_v1, pad (minivar's protocol: every benchmark's own)"),
    Arm("var", "VAR", _same(("--var",)), "hallucination preset ρ 0.5, greedy", "base",
        {"pope": _from_paper("var", "pope"), "chair": _from_paper("var", "chair")}, needs=("--var",)),
    Arm("pai", "PAI", _same(("--pai", "--pai-alpha", "0.2", "--pai-layers", "2-32", "--pai-gamma", "1.1")),
        "α 0.2, layers 2-32, γ 1.1 (its README's commands), greedy", "base",
        {"pope": _none("pope", PAI_SOURCE), "chair": _none("chair", PAI_SOURCE)}, "minivar.methods.pai",
        ("--pai", "--pai-alpha", "--pai-layers", "--pai-gamma")),
    Arm("opera", "OPERA", _same(("--opera", "--num-beams", "5", "--opera-scale", "50", "--opera-threshold", "15",
                                 "--opera-candidates", "5", "--opera-penalty", "1")),
        "5 beams, scale 50, threshold 15, 5 candidates, penalty 1 (its README's commands)", "base",
        {"pope": (Reported("mean.accuracy", "accuracy (mean of 3 splits)", None, (89.4 + 86.0 + 79.1) / 3,
                           OPERA_SOURCE),
                  Reported("mean.f1", "F1 (mean of 3 splits)", None, (89.6 + 86.4 + 81.0) / 3, OPERA_SOURCE)),
         "chair": _none("chair", OPERA_CHAIR_SOURCE)}, "minivar.methods.opera",
        ("--opera", "--num-beams", "--opera-scale", "--opera-threshold", "--opera-candidates", "--opera-penalty")),
    Arm("vcd-base", "base (VCD's protocol)", _same(VCD_PROTOCOL), "llava_v1, crop, T 1 seed 55 (VCD's scripts)"),
    Arm("vcd", "VCD", {"pope": ("--vcd", "--vcd-alpha", "1", "--vcd-beta", "0.2", "--vcd-noise-step", "500")
                       + VCD_PROTOCOL,
                       "chair": ("--vcd", "--vcd-alpha", "1", "--vcd-beta", "0.1", "--vcd-noise-step", "500")
                       + VCD_PROTOCOL},
        "α 1, β 0.2 (POPE: its llava1.5_pope.bash; CHAIR: its argparse β 0.1), noise step 500; llava_v1, crop, "
        "T 1 seed 55", "vcd-base", {"pope": _none("pope", VCD_SOURCE), "chair": _none("chair", VCD_SOURCE)},
        "minivar.methods.vcd", ("--vcd", "--vcd-alpha", "--vcd-beta", "--vcd-noise-step")),
    Arm("damro-base", "base (DAMRO's protocol)", _same(DAMRO_PROTOCOL),
        "llava_v1 with its scripts' prompt ids, crop, T 1 seed 42 (DAMRO's scripts)"),
    Arm("damro", "DAMRO", {e.bench: e.method_flags for e in PAPERS["damro"].entries if e.bench in BENCHES},
        "POPE α 0.5 k 4, CHAIR α 1.5 k 4, β 0.1; llava_v1 with its scripts' prompt ids, crop, T 1 seed 42 "
        "(its scripts)", "damro-base",
        {"pope": _from_paper("damro", "pope"), "chair": _from_paper("damro", "chair")}, "minivar.methods.damro",
        ("--damro", "--damro-alpha", "--damro-beta", "--damro-topk")),
)
ARM = {a.name: a for a in ARMS}
# a rough cost of each arm's run relative to the base's, for --dry-run's floor: a branch (VCD, PAI, DAMRO), VAR's
# written-out attention, OPERA's five beams and its attention reads
COST = {"base": 1.0, "vcd-base": 1.0, "damro-base": 1.0, "var": 1.25, "pai": 1.35, "vcd": 1.35, "damro": 1.35,
        "opera": 2.0}

NOTES = (
    "Every method runs with its released settings on minivar's benchmarks: POPE's prompt is LLaVA-1.5's ('Answer "
    "the question using a single word or phrase.'; VCD's script asks for 'one word'), CHAIR's is OPERA's; VCD and "
    "DAMRO sample at temperature 1 as their scripts do, against a base sampled the same way.",
    "Sampled runs (VCD's, DAMRO's and their bases) depend on the seed and the hardware: a rerun elsewhere can "
    "differ.",
    "VAR's paper and DAMRO's README measured CHAIR under their own protocols; PAI's released CHAIR script asks for "
    "'Please help me describe the image in detail.': only OPERA's CHAIR is this table's protocol.",
)


def available(arm: Arm, run_parser) -> str | None:
    """None when this build can make the arm's runs; else why not (one line)."""
    if arm.module is not None:
        try:
            found = importlib.util.find_spec(arm.module) is not None
        except ImportError:
            found = False
        if not found:
            return f"{arm.label}: {arm.module} is not in this build: its runs are left out"
    # argparse has no public list of a parser's flags; _option_string_actions is the one it keeps itself
    absent = [f for f in arm.needs if f not in run_parser._option_string_actions]
    if absent:
        return f"{arm.label}: `run` has no {' '.join(absent)} in this build: its runs are left out"
    return None


def selected(benchmarks: str | None) -> list[str]:
    if benchmarks is None:
        return list(BENCHES)
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    for name in names:
        if name not in BENCHES:
            raise MinivarError(f"--benchmarks: {name!r} is not one of reproduce hallucination's benchmarks "
                               f"({', '.join(BENCHES)})")
    if not names:
        raise MinivarError("--benchmarks is empty")
    return [b for b in BENCHES if b in names]


def run_dir(args, bench: str, arm: Arm) -> Path:
    return Path(args.out) / f"{bench}-{arm.name}"


def run_argv(args, bench: str, arm: Arm, data: list[Path], images: Path | None) -> list[str]:
    """`run`'s command line for one benchmark × arm (flags left at run's defaults are left out)."""
    argv = ["run", bench, "--data", *map(str, data)]
    if images is not None:
        argv += ["--images", str(images)]
    argv += ["--out", str(run_dir(args, bench, arm))]
    for flag, value in (("--model", args.model), ("--device", args.device), ("--dtype", args.dtype),
                        ("--batch-size", str(args.batch_size))):
        if str(value) != reproduce.RUN_DEFAULTS[flag]:
            argv += [flag, str(value)]
    if args.max_new_tokens is not None:
        argv += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if args.shard is not None:
        argv += ["--shard", args.shard]
    return argv + list(arm.flags[bench])


def cmd_hallucination(args) -> int:
    from . import harness
    from ..errors import for_command_line
    execute_run, prog_name, run_parser = args.execute_run, args.prog_name, args.run_parser
    benches = selected(args.benchmarks)
    if args.limit is not None and args.limit < 1:
        raise MinivarError(f"--limit must be ≥ 1, got {args.limit}")
    if args.resamples < 1:
        raise MinivarError(f"--resamples must be ≥ 1, got {args.resamples}")
    root = Path(args.data_root)
    if not root.is_dir():
        raise MinivarError(f"--data-root '{root}' is not a directory")
    reproduce.check_run_flags(args)
    prog = prog_name()
    arms, left_out = [], []
    for arm in ARMS:
        why = available(arm, run_parser)
        if why is None:
            arms.append(arm)
        else:
            left_out.append({"method": arm.name, "reason": why})
    found, skipped = [], []
    for bench in benches:
        try:
            data, images = reproduce.locate(bench, root)
        except Missing as e:
            skipped.append({"benchmark": bench, "reason": str(e)})
            continue
        found.append((bench, data, images))

    if args.dry_run:
        return dry_run(args, arms, found, skipped, left_out, prog)
    for item in skipped + left_out:
        harness.stderr(f"minivar: {item['reason']}" + ("; skipped" if "benchmark" in item else ""))
    if not found:
        raise MinivarError(f"no data of reproduce hallucination's benchmarks under --data-root '{root}' "
                           f"(layout: docs/eval.md, 'Data root')")
    failed = []
    for bench, data, images in found:
        for arm in arms:
            argv = run_argv(args, bench, arm, data, images)
            harness.stderr(f"minivar: {prog} {' '.join(reproduce._quote(a) for a in argv)}")
            try:
                execute_run(run_parser.parse_args(argv[1:]))
            except MinivarError as e:
                reason = f"{bench} {arm.label}: {for_command_line(str(e))}"
                harness.stderr(f"minivar: error: {reason}; the other runs go on")
                failed.append({"benchmark": bench, "method": arm.name, "reason": reason})
    table = make_table(args, [b for b, _, _ in found], arms, skipped + failed, left_out)
    if args.json:
        print(json.dumps(table))
    else:
        print_table(table)
    return 1 if failed else 0


def make_table(args, benches: list[str], arms: list[Arm], skipped: list[dict], left_out: list[dict]) -> dict:
    """One row per benchmark × metric × method (each method against its base), as a JSON-able object."""
    from . import harness
    from .compare import compare_runs, flatten
    rows, waiting = [], []
    names = {a.name for a in arms}
    for bench in benches:
        metrics = {}
        for arm in arms:
            path = run_dir(args, bench, arm) / harness.METRICS_FILE
            if path.is_file():
                metrics[arm.name] = json.loads(path.read_text())
        for arm in arms:
            if arm.base is None:
                continue
            base = ARM[arm.base]
            if arm.base not in names or arm.name not in metrics or arm.base not in metrics:
                waiting.append({"benchmark": bench, "method": arm.name,
                                "reason": f"{bench} {arm.label}: its run or its base's ({base.label}) has no "
                                          f"metrics yet (a failed run, or other shards still to come)"})
                continue
            dirs = {"base": run_dir(args, bench, base), "method": run_dir(args, bench, arm)}
            compared = compare_runs(harness.load_runs([dirs["base"]]), harness.load_runs([dirs["method"]]),
                                    args.resamples, 0, log=harness.stderr)
            b_all, m_all = flatten(metrics[base.name]["metrics"]), flatten(metrics[arm.name]["metrics"])
            reported = {r.metric: r for r in arm.reported.get(bench, ())}
            for metric, label, scale in METRICS[bench]:
                rep = reported.get(metric)
                ci = compared["metrics"].get(metric, {}).get("ci95", [None, None])
                b, m = b_all.get(metric), m_all.get(metric)

                def scaled(v):
                    return None if v is None else v * scale
                rows.append({
                    "benchmark": bench, "metric": metric, "label": label, "method": arm.name,
                    "method_label": arm.label, "setting": arm.setting, "base": base.name, "base_setting": base.setting,
                    "reported": {"base": rep.base if rep else None, "method": rep.method if rep else None,
                                 "source": rep.source if rep else None, "status": NOT_VERIFIED if rep else "no figure"},
                    "measured": {"base": scaled(b), "method": scaled(m)},
                    "delta": None if b is None or m is None else (m - b) * scale,
                    "ci95": [scaled(ci[0]), scaled(ci[1])], "n": metrics[arm.name]["n"],
                    "answers_changed": compared["answers_changed"],
                    "runs": {"base": str(dirs["base"]), "method": str(dirs["method"])}})
    return {"paper": "hallucination", "title": TITLE, "model": args.model, "limit": args.limit,
            "max_new_tokens": args.max_new_tokens, "quick_check": args.limit is not None or
            args.max_new_tokens is not None, "methods": {a.name: a.setting for a in arms},
            "rows": rows, "skipped": skipped, "left_out": left_out, "waiting": waiting, "notes": list(NOTES)}


def print_table(table: dict) -> None:
    num = reproduce._num
    print(f"reproduce hallucination: {table['title']}; model {table['model']}")
    if table["limit"] is not None:
        print(f"!!! --limit {table['limit']}: a QUICK CHECK on the first {table['limit']} questions of each "
              f"benchmark; the measured figures are NOT comparable with the reported ones !!!")
    if table["max_new_tokens"] is not None:
        print(f"!!! --max-new-tokens {table['max_new_tokens']}: not the benchmarks' protocol; NOT comparable with "
              f"the reported figures !!!")
    header = ["benchmark", "metric", "method", "vs", "reported base → method", "measured base → method",
              "Δ method − base [95% CI]", "n"]
    lines = []
    for row in table["rows"]:
        rep, mea = row["reported"], row["measured"]
        lo, hi = row["ci95"]
        ci = f"[{lo:+.2f}, {hi:+.2f}]" if lo is not None else "[-]"
        lines.append([row["benchmark"], row["label"], row["method_label"], row["base"],
                      f"{num(rep['base'])} → {num(rep['method'])}", f"{num(mea['base'])} → {num(mea['method'])}",
                      f"{'-' if row['delta'] is None else format(row['delta'], '+.2f')} {ci}", str(row["n"])])
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    for r in [header] + lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    for name, setting in table["methods"].items():
        print(f"setting: {name}: {setting}")
    for source in sorted({row["reported"]["source"] for row in table["rows"]} - {None}):
        print(f"reported: {source} ({NOT_VERIFIED})")
    if table["rows"]:
        print(f"measured: the runs' metrics.json under {Path(table['rows'][0]['runs']['base']).parent}; "
              f"Δ's interval: paired bootstrap over the scoring unit, each method against its base ('vs')")
    for item in table["left_out"] + table["skipped"] + table["waiting"]:
        print(f"not in the table: {item['reason']}")
    for note in table["notes"]:
        print(f"note: {note}")


def dry_run(args, arms, found, skipped, left_out, prog) -> int:
    import torch

    from . import harness
    from ..pipeline import pick_device, pick_dtype
    dev = pick_device(harness.run_device(args.device))
    dtype_bytes = torch.tensor([], dtype=pick_dtype(args.dtype, dev)).element_size()
    params = reproduce.model_params(args.model)
    plan = []
    for bench, data, images in found:
        try:
            questions = harness.read_questions(harness.get_benchmark(bench), data, images)
        except MinivarError as e:
            from ..errors import for_command_line
            skipped.append({"benchmark": bench, "reason": f"{bench}: {for_command_line(str(e))}"})
            continue
        if args.limit is not None:
            questions = questions[:args.limit]
        base_s = reproduce.estimate_seconds(bench, questions, params, dev.type, dtype_bytes, args.batch_size, "base")
        runs = [{"setting": arm.name, "out": str(run_dir(args, bench, arm)),
                 "command": f"{prog} {' '.join(reproduce._quote(a) for a in run_argv(args, bench, arm, data, images))}",
                 "exists": run_dir(args, bench, arm).exists(),
                 "estimated_s": None if base_s is None else base_s * COST[arm.name]} for arm in arms]
        plan.append({"benchmark": bench, "data": [str(p) for p in data],
                     "images": str(images) if images is not None else None, "questions": len(questions),
                     "runs": runs})
    result = {"paper": "hallucination", "model": args.model, "model_params": params, "device": dev.type,
              "limit": args.limit, "found": plan, "missing": skipped, "left_out": left_out,
              "estimate": "a floor from the model size and the device type, not a measurement"}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"reproduce hallucination --dry-run: nothing is made. Model {args.model} on {dev.type}"
          + (f"; --limit {args.limit}: a quick check" if args.limit is not None else ""))
    for item in plan:
        print(f"{item['benchmark']}: found {' '.join(item['data'])}"
              + (f" (images {item['images']})" if item["images"] else "") + f": {item['questions']} questions")
        for run in item["runs"]:
            t = ("time unknown" if run["estimated_s"] is None else
                 f"≈ {reproduce._duration(run['estimated_s'])} at best")
            print(f"  {run['setting']}: {t}{' (exists: resumed)' if run['exists'] else ''}\n    {run['command']}")
    for item in skipped:
        print(f"missing: {item['reason']}")
    for item in left_out:
        print(f"left out: {item['reason']}")
    return 0
