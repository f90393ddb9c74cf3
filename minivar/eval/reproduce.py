"""`minivar-eval reproduce var|damro`: a paper's evaluation end to end, base and method, in one command
(`reproduce hallucination`, several methods in one table, is hallucination.py's, built on this module).

    minivar-eval reproduce var --data-root data --out runs/var [--benchmarks pope,mme] [--limit N] [--dry-run]

For each of the paper's benchmarks whose data is under --data-root (the layout below, docs/eval.md), it makes two
runs, base and method, into --out/<bench>-<setting>/ by building `run`'s own command line and running it through
`run`'s own code (`__main__.execute_run`): they are exactly the runs `minivar-eval run` makes, resumable and
shardable in the same way, and each is printed as that command. Then it prints one table: benchmark, metric, the
paper's figure base → method (with its source; "reported, not verified"), the measured base → method (the runs'
metrics.json), the difference with its paired-bootstrap 95% interval (compare.py) and n.

Data root (each folder may also hold the hub copy `minivar-eval download BENCH --to DATA/BENCH` fetches):
    pope/     coco_pope_{adversarial,random,popular}.json        (+ coco/val2014/ for the images)
    coco/     val2014/ (COCO_val2014_*.jpg), annotations/ (instances_val2014.json, captions_val2014.json: CHAIR)
    mme/      MME_Benchmark_release_version/
    mmvp/     Questions.csv + MMVP Images/
    cvbench/  test_2d.parquet + test_3d.parquet
    gqa/      llava_gqa_testdev_balanced.jsonl + testdev_balanced_questions.json + images/
A benchmark whose data is missing is one line naming the file and where to get it; the others still run.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MinivarError

NOT_VERIFIED = "reported, not verified"
RUN_DEFAULTS = {"--model": "llava-hf/llava-1.5-7b-hf", "--device": "auto", "--dtype": "auto", "--batch-size": "8"}


@dataclass(frozen=True)
class Reported:
    """One figure of a paper's table: metric (a flattened metrics key), how the paper scales it, base → method."""
    metric: str
    label: str
    base: float | None
    method: float | None
    source: str
    scale: float = 100.0             # the paper's figure = scale × the scorer's value (percent: 100; MME: 1)


@dataclass(frozen=True)
class Entry:
    """A benchmark of a paper: the extra run flags of its method (the base gets `base_flags`) and its figures."""
    bench: str
    method_flags: tuple
    setting: str                     # what the method flags mean, for the table
    reported: tuple
    base_flags: tuple = ()


@dataclass(frozen=True)
class Paper:
    name: str
    method: str                      # the method's name in tables and run folders
    title: str
    entries: tuple
    notes: tuple = field(default=())     # (benchmarks it is about, () for every run; the note's text)
    base_setting: str = "base"


VAR_SOURCE = "VAR paper (Kang et al., ICLR 2025), LLaVA-1.5-7B, via secondary copies"
DAMRO_SOURCE = "DAMRO's README (coder-gx/DAMRO), LLaVA-1.5-7B"
# DAMRO's scripts: LLaVA's conv_llava_v1 prompt, the hub processor's pixels (resize + centre crop), sampling at T = 1
# from seed 42 — for base and DAMRO alike.
DAMRO_PROTOCOL = ("--conv-mode", "llava_v1", "--prompt-tokenization", "damro", "--image-aspect-ratio", "crop",
                  "--temperature", "1", "--seed", "42")

PAPERS = {
    # VAR: the paper's six benchmarks in minivar; `--var` takes the benchmark family's preset ρ (the harness's).
    "var": Paper("var", "var", "See What You Are Told: Visual Attention Sink in Large Multimodal Models (VAR)", (
        Entry("pope", ("--var",), "hallucination preset ρ 0.5",
              (Reported("mean.f1", "F1 (mean of 3 splits)", 85.90, 86.53, VAR_SOURCE + ", its visual-hallucination table"),)),
        Entry("chair", ("--var",), "hallucination preset ρ 0.5",
              (Reported("chair_s", "CHAIR_S (lower is better)", 45.0, 43.2, VAR_SOURCE + ", its visual-hallucination table"),
               Reported("chair_i", "CHAIR_I (lower is better)", 14.7, 13.8, VAR_SOURCE + ", its visual-hallucination table"))),
        Entry("mme", ("--var",), "general preset ρ 0.8",
              (Reported("perception", "Perception", 1495.5, 1513.8, VAR_SOURCE + ", its general vision-language table", 1.0),)),
        Entry("gqa", ("--var",), "general preset ρ 0.8",
              (Reported("accuracy", "accuracy", 62.0, 63.5, VAR_SOURCE + ", its general vision-language table"),)),
        Entry("mmvp", ("--var",), "vision preset ρ 0.9",
              (Reported("pair_accuracy", "pair accuracy", 3.33, 9.33, VAR_SOURCE + ", its vision-centric table"),)),
        Entry("cvbench", ("--var",), "vision preset ρ 0.9",
              (Reported("2d", "2D", 56.8, 57.6, VAR_SOURCE + ", its vision-centric table"),
               Reported("3d", "3D", 58.4, 59.0, VAR_SOURCE + ", its vision-centric table"))),
    ), notes=(
        ((), "The VAR paper's figures came from code with the state and precision defects docs/official-rule.md "
             "lists (sink state never reset between samples, among others): no setting reproduces them exactly."),
        (("chair",), "The paper does not publish its CHAIR protocol: minivar's CHAIR is OPERA's (500 images, 512 "
                     "tokens), so its CHAIR figures are not comparable with these."))),
    # DAMRO: its released scripts' settings per benchmark, sampled at T = 1 from seed 42; the base is sampled alike.
    "damro": Paper("damro", "damro", "DAMRO: Dive into the Attention Mechanism of LVLM to Reduce Object Hallucination", (
        Entry("pope", ("--damro", "--damro-alpha", "0.5", "--damro-beta", "0.1", "--damro-topk", "4") + DAMRO_PROTOCOL,
              "α 0.5 k 4 β 0.1, llava_v1 with DAMRO's ids, crop, T 1 seed 42",
              (Reported("mean.accuracy", "accuracy (mean of splits)", 82.08, 85.31, DAMRO_SOURCE + ", its POPE results"),
               Reported("mean.f1", "F1 (mean of splits)", 80.48, 84.72, DAMRO_SOURCE + ", its POPE results")),
              DAMRO_PROTOCOL),
        Entry("chair", ("--damro", "--damro-alpha", "1.5", "--damro-beta", "0.1", "--damro-topk", "4") + DAMRO_PROTOCOL,
              "α 1.5 k 4 β 0.1, llava_v1 with DAMRO's ids, crop, T 1 seed 42",
              (Reported("chair_s", "CHAIR_S (lower is better)", 12.4, 6.0, DAMRO_SOURCE + ", its CHAIR results"),
               Reported("chair_i", "CHAIR_I (lower is better)", 7.2, 3.6, DAMRO_SOURCE + ", its CHAIR results")),
              DAMRO_PROTOCOL),
        Entry("mme", ("--damro", "--damro-alpha", "2", "--damro-beta", "0.1", "--damro-topk", "10") + DAMRO_PROTOCOL,
              "α 2 k 10 β 0.1, llava_v1 with DAMRO's ids, crop, T 1 seed 42",
              (Reported("perception", "Perception", None, None, "no figure in DAMRO's README (a figure only)", 1.0),)
              + tuple(Reported(f"subtasks.{t}", f"{t} (subtask)", None, None,
                               "no figure in DAMRO's README (a figure only)", 1.0)
                      for t in ("existence", "count", "position", "color")),
              DAMRO_PROTOCOL),
    ), notes=(
        (("chair",), "DAMRO's CHAIR protocol (its images, prompt and length) is its own: minivar's CHAIR is OPERA's, "
                     "so the CHAIR figures are not comparable with these."),
        ((), "Both runs sample (temperature 1, seed 42) as DAMRO's scripts do: a rerun on other hardware can differ."),
        (("mme",), "DAMRO's paper reports an MME subset (its hallucination subtasks, shown here one by one)."),
        ((), "Both runs prompt with llava_v1, tokenized as DAMRO's scripts' slow tokenizer does "
             "(--prompt-tokenization damro), and centre-crop the image as those scripts do; they also run the model "
             "in fp32 and allow 1024 new tokens, where minivar takes --dtype auto and each benchmark's length.")),
        base_setting="sampled-base"),
}

# What a benchmark needs under the data root, and where to get it (one line each when missing).
COCO_IMAGES = "cocodataset.org: val2014.zip (the COCO val2014 images, 6.2 GB) unpacked into DATA/coco/val2014/"
WHERE = {
    "pope": "github.com/AoiDragon/POPE output/coco/ at commit e3e3926 (LLaVA-1.5's version, a few MB), or "
            "`minivar-eval download pope --to DATA/pope` (lmms-lab/POPE, images inside, ≈ 0.5 GB; a later version)",
    "coco": "cocodataset.org: annotations_trainval2014.zip (241 MB; instances_val2014.json, captions_val2014.json "
            "into DATA/coco/annotations/) and val2014.zip (6.2 GB, into DATA/coco/val2014/)",
    "mme": "the MME authors (MME_Benchmark_release_version, on request, ≈ 1 GB), or "
           "`minivar-eval download mme --to DATA/mme` (lmms-lab/MME, ≈ 1 GB)",
    "mmvp": "`minivar-eval download mmvp --to DATA/mmvp` (MMVP/MMVP: Questions.csv + MMVP Images/, ≈ 0.1 GB)",
    "cvbench": "`minivar-eval download cvbench --to DATA/cvbench` (nyu-visionx/CV-Bench, ≈ 1 GB)",
    "gqa": "the GQA site (downloads.cs.stanford.edu/nlp/data/gqa/: questions1.2.zip 1.4 GB for "
           "testdev_balanced_questions.json, images.zip 20 GB for images/) and LLaVA's eval.zip for "
           "llava_gqa_testdev_balanced.jsonl",
}


class Missing(Exception):
    """A benchmark's data is not under the data root: the message names the file and where to get it."""


def locate(bench: str, root: Path) -> tuple[list[Path], Path | None]:
    """(--data paths, --images folder) of `bench` under the data root, in the documented layout; Missing if absent."""
    def missing(path: Path, what: str) -> Missing:
        return Missing(f"{bench}: missing {path}; get it from {what.replace('DATA', str(root))}")

    def need(path: Path, what: str) -> Path:
        if not path.exists():
            raise missing(path, what)
        return path

    def shards(folder: Path) -> bool:
        return folder.is_dir() and (any(folder.glob("*.parquet")) or any(folder.glob("*/*.parquet")))

    if bench == "pope":
        folder = root / "pope"
        if folder.is_dir() and not any(folder.glob("coco_pope_*.json")) and shards(folder):
            return [folder], None                                       # the hub copy, images inside
        files = [need(folder / f"coco_pope_{split}.json", WHERE["pope"]) for split in ("adversarial", "random",
                                                                                      "popular")]
        return files, need(root / "coco" / "val2014", COCO_IMAGES)
    if bench == "chair":
        annotations = root / "coco" / "annotations"
        for name in ("instances_val2014.json", "captions_val2014.json"):
            need(annotations / name, WHERE["coco"])
        return [annotations], need(root / "coco" / "val2014", COCO_IMAGES)
    if bench == "mme":
        folder = root / "mme"
        if (folder / "MME_Benchmark_release_version").is_dir():
            return [folder / "MME_Benchmark_release_version"], None
        if folder.is_dir() and shards(folder):
            return [folder], None
        raise missing(folder / "MME_Benchmark_release_version", WHERE["mme"])
    if bench == "mmvp":
        folder = root / "mmvp"
        if folder.is_dir() and shards(folder):
            return [folder], None
        need(folder / "Questions.csv", WHERE["mmvp"])
        need(folder / "MMVP Images", WHERE["mmvp"])
        return [folder], None
    if bench == "cvbench":
        folder = root / "cvbench"
        if folder.is_dir() and (any(folder.glob("test*.parquet")) or any(folder.glob("test*.jsonl"))):
            return [folder], None
        raise missing(folder / "test_2d.parquet", WHERE["cvbench"])
    if bench == "gqa":
        folder = root / "gqa"
        files = [need(folder / name, WHERE["gqa"]) for name in ("llava_gqa_testdev_balanced.jsonl",
                                                                "testdev_balanced_questions.json")]
        return files, need(folder / "images", WHERE["gqa"])
    raise MinivarError(f"unknown benchmark {bench!r}")


# ---------------------------------------------------------------------------------------------------------------
# The command line

def add_parser(sub, helps: dict, run_parser: argparse.ArgumentParser, execute_run, prog_name) -> argparse.ArgumentParser:
    """The `reproduce` subcommand on __main__'s subparsers. __main__ hands over what reproduce builds on — run's
    help texts (helps: model, device, dtype), run's parser and run's own code — so this module never imports it."""
    MODEL_HELP, DEVICE_HELP, DTYPE_HELP = helps["model"], helps["device"], helps["dtype"]
    r = sub.add_parser("reproduce", allow_abbrev=False, help="a paper's evaluation end to end: base and method runs, "
                                                             "then one table against the published figures",
                       description="Run a paper's benchmarks found under --data-root, base and method, into --out "
                                   "(one run folder per benchmark and setting, exactly the runs `run` makes: rerun "
                                   "to resume), then print one table: reported base → method, measured base → "
                                   "method, the difference with its 95% paired-bootstrap interval, n.")
    r.add_argument("paper", choices=sorted(PAPERS) + ["hallucination"], metavar="{var,damro,hallucination}",
                   help="var: the VAR paper's six benchmarks; damro: DAMRO's POPE, CHAIR and MME; hallucination: "
                        "POPE and CHAIR for base, VCD, OPERA, PAI, DAMRO and VAR in one table (hallucination.py)")
    r.add_argument("--data-root", required=True, type=Path, metavar="DIR",
                   help="the data folder: pope/ mme/ coco/ mmvp/ cvbench/ gqa/ (docs/eval.md, 'Data root')")
    r.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="where the run folders go: DIR/<bench>-<setting>/ (created; resumed)")
    r.add_argument("--benchmarks", default=None, metavar="B,B",
                   help="a comma-separated subset of the paper's benchmarks (default: all of them)")
    r.add_argument("--limit", type=int, default=None, metavar="N",
                   help="a quick check: only the first N questions of each benchmark (said in the table)")
    r.add_argument("--model", default=RUN_DEFAULTS["--model"], help=MODEL_HELP)
    r.add_argument("--device", default="auto", help=DEVICE_HELP)
    r.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto", help=DTYPE_HELP)
    r.add_argument("--batch-size", type=int, default=8, help="as `run --batch-size` (default 8)")
    r.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="override every benchmark's answer length (a smoke test; said in the table: the "
                        "figures then follow another protocol)")
    r.add_argument("--shard", default=None, metavar="I/N",
                   help="as `run --shard` (under torchrun RANK/WORLD_SIZE give it): every rank runs the command")
    r.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    r.add_argument("--json", action="store_true", help="print the table as one JSON object")
    r.add_argument("--dry-run", action="store_true",
                   help="make nothing: list the runs, the data found or missing, and an estimated time per run")
    # run's parser and code travel with the parsed arguments (cmd_reproduce reads them)
    r.set_defaults(run_parser=run_parser, execute_run=execute_run, prog_name=prog_name)
    return r


def selected(paper: Paper, benchmarks: str | None) -> list[Entry]:
    if benchmarks is None:
        return list(paper.entries)
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    known = {e.bench: e for e in paper.entries}
    for name in names:
        if name not in known:
            raise MinivarError(f"--benchmarks: {name!r} is not one of reproduce {paper.name}'s benchmarks "
                               f"({', '.join(known)})")
    if not names:
        raise MinivarError("--benchmarks is empty")
    return [known[n] for n in known if n in names]


def run_argv(args, entry: Entry, setting: str, data: list[Path], images: Path | None) -> list[str]:
    """`run`'s command line for one benchmark × setting (flags left at run's defaults are left out)."""
    flags = entry.method_flags if setting != "base" else entry.base_flags
    argv = ["run", entry.bench, "--data", *map(str, data)]
    if images is not None:
        argv += ["--images", str(images)]
    argv += ["--out", str(run_dir(args, entry, setting))]
    for flag, value in (("--model", args.model), ("--device", args.device), ("--dtype", args.dtype),
                        ("--batch-size", str(args.batch_size))):
        if str(value) != RUN_DEFAULTS[flag]:
            argv += [flag, str(value)]
    if args.max_new_tokens is not None:
        argv += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if args.shard is not None:
        argv += ["--shard", args.shard]
    return argv + spoken(args.model, list(flags))


def spoken(model: str, flags: list[str]) -> list[str]:
    """The protocol's --conv-mode / --image-aspect-ratio where the model's family speaks them (DAMRO's llava_v1 and
    crop are LLaVA's); a local checkpoint of another family keeps its own template and image mode, and its own
    tokenization (DAMRO's `--prompt-tokenization damro` is that of LLaVA's LLaMA templates)."""
    from ..checkpoint import read_config
    from ..errors import MinivarError
    from ..models.registry import family_of
    if not Path(model).is_dir():
        return flags
    try:
        family = family_of(read_config(Path(model)))
    except MinivarError:
        return flags                      # the run says what is wrong with it
    foreign_template = any(f == "--conv-mode" and v not in family.conv_modes for f, v in zip(flags, flags[1:]))
    out, i = [], 0
    while i < len(flags):
        if (flags[i] == "--conv-mode" and flags[i + 1] not in family.conv_modes) or \
                (flags[i] == "--image-aspect-ratio" and flags[i + 1] not in family.image_modes) or \
                (flags[i] == "--prompt-tokenization" and foreign_template):
            i += 2
            continue
        out.append(flags[i])
        i += 1
    return out


def run_dir(args, entry: Entry, setting: str) -> Path:
    paper = PAPERS[args.paper]
    name = paper.base_setting if setting == "base" else paper.method
    return Path(args.out) / f"{entry.bench}-{name}"


def check_method_available(paper: Paper, run_parser: argparse.ArgumentParser) -> None:
    """DAMRO runs need the DAMRO method and its harness flags; without them, one clear line (never a fake run)."""
    if paper.name != "damro":
        return
    import importlib.util
    try:
        found = importlib.util.find_spec("minivar.methods.damro") is not None
    except ImportError:
        found = False
    flags = ("--damro", "--damro-alpha", "--damro-beta", "--damro-topk", "--temperature", "--seed")
    # argparse has no public list of a parser's flags; _option_string_actions is the one it keeps itself
    absent = [f for f in flags if f not in run_parser._option_string_actions]
    if not found or absent:
        lacking = "no minivar.methods.damro" if not found else f"`run` has no {' '.join(absent)}"
        raise MinivarError(f"DAMRO is not available in this build ({lacking}): reproduce damro needs the method "
                           f"and its run flags")


def check_run_flags(args) -> None:
    """The flags every run shares, checked once up front (else each benchmark's run would fail alike)."""
    from . import harness
    from ..pipeline import pick_device, pick_dtype
    if args.batch_size < 1:
        raise MinivarError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise MinivarError(f"--max-new-tokens must be ≥ 1 for a benchmark run, got {args.max_new_tokens}")
    if args.shard is not None:
        harness.parse_shard(args.shard)
    pick_dtype(args.dtype, pick_device(harness.run_device(args.device)))


def cmd_reproduce(args) -> int:
    from . import harness
    execute_run, prog_name, run_parser = args.execute_run, args.prog_name, args.run_parser
    paper = PAPERS[args.paper]
    entries = selected(paper, args.benchmarks)
    if args.limit is not None and args.limit < 1:
        raise MinivarError(f"--limit must be ≥ 1, got {args.limit}")
    if args.resamples < 1:
        raise MinivarError(f"--resamples must be ≥ 1, got {args.resamples}")
    root = Path(args.data_root)
    if not root.is_dir():
        raise MinivarError(f"--data-root '{root}' is not a directory")
    check_method_available(paper, run_parser)
    check_run_flags(args)
    prog = prog_name()

    found, skipped = [], []
    for entry in entries:
        try:
            data, images = locate(entry.bench, root)
        except Missing as e:
            skipped.append({"benchmark": entry.bench, "reason": str(e)})
            continue
        found.append((entry, data, images))

    if args.dry_run:
        return dry_run(args, paper, found, skipped, prog)
    for item in skipped:
        harness.stderr(f"minivar: {item['reason']}; skipped")
    if not found:
        raise MinivarError(f"no data of reproduce {paper.name}'s benchmarks under --data-root '{root}' "
                           f"(layout: docs/eval.md, 'Data root')")

    failed = []
    done = []
    for entry, data, images in found:
        try:
            for setting in ("base", "method"):
                argv = run_argv(args, entry, setting, data, images)
                harness.stderr(f"minivar: {prog} {' '.join(_quote(a) for a in argv)}")
                execute_run(run_parser.parse_args(argv[1:]))
            done.append(entry)
        except MinivarError as e:
            from ..errors import for_command_line
            reason = f"{entry.bench}: {for_command_line(str(e))}"
            harness.stderr(f"minivar: error: {reason}; the other benchmarks go on")
            failed.append({"benchmark": entry.bench, "reason": reason})

    table = make_table(args, paper, done, skipped + failed)
    if args.json:
        print(json.dumps(table))
    else:
        print_table(table)
    return 1 if failed else 0


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


# ---------------------------------------------------------------------------------------------------------------
# The table

def make_table(args, paper: Paper, entries: list[Entry], skipped: list[dict]) -> dict:
    """The table as a JSON-able object: one row per reported metric of every benchmark whose two runs are complete."""
    from . import harness
    from .compare import compare_runs, flatten
    rows, waiting = [], []
    for entry in entries:
        dirs = {s: run_dir(args, entry, s) for s in ("base", "method")}
        metrics = {}
        for setting, d in dirs.items():
            path = d / harness.METRICS_FILE
            if path.is_file():
                metrics[setting] = json.loads(path.read_text())
        if len(metrics) < 2:            # other shards still to come: the rank that finishes last makes the table
            waiting.append({"benchmark": entry.bench, "reason": f"{entry.bench}: waiting for the other shards "
                                                                f"(rerun to make the table when they are done)"})
            continue
        compared = compare_runs(harness.load_runs([dirs["base"]]), harness.load_runs([dirs["method"]]),
                                args.resamples, 0, log=harness.stderr)
        base, method = flatten(metrics["base"]["metrics"]), flatten(metrics["method"]["metrics"])
        for rep in entry.reported:
            ci = compared["metrics"].get(rep.metric, {}).get("ci95", [None, None])
            b, m = base.get(rep.metric), method.get(rep.metric)
            scaled = (lambda v: None if v is None else v * rep.scale)
            rows.append({
                "benchmark": entry.bench, "metric": rep.metric, "label": rep.label, "setting": entry.setting,
                "reported": {"base": rep.base, "method": rep.method, "source": rep.source, "status": NOT_VERIFIED},
                "measured": {"base": scaled(b), "method": scaled(m)},
                "delta": None if b is None or m is None else (m - b) * rep.scale,
                "ci95": [scaled(ci[0]), scaled(ci[1])], "n": metrics["base"]["n"],
                "answers_changed": compared["answers_changed"],
                "runs": {"base": str(dirs["base"]), "method": str(dirs["method"])}})
    return {"paper": paper.name, "title": paper.title, "method": paper.method, "model": args.model,
            "limit": args.limit, "max_new_tokens": args.max_new_tokens,
            "quick_check": args.limit is not None or args.max_new_tokens is not None,
            "rows": rows, "skipped": skipped, "waiting": waiting, "notes": notes_about(paper, entries)}


def notes_about(paper: Paper, entries: list[Entry]) -> list[str]:
    """The paper's notes about what ran: those about every run (when any ran) and those about a benchmark that ran."""
    ran = {entry.bench for entry in entries}
    return [text for about, text in paper.notes if ran and (not about or ran & set(about))]


def _num(v, places: int = 2) -> str:
    return "-" if v is None else f"{v:.{places}f}"


def print_table(table: dict) -> None:
    method = table["method"].upper()
    print(f"reproduce {table['paper']}: {table['title']}; model {table['model']}")
    if table["limit"] is not None:
        print(f"!!! --limit {table['limit']}: a QUICK CHECK on the first {table['limit']} questions of each "
              f"benchmark; the measured figures are NOT comparable with the reported ones !!!")
    if table["max_new_tokens"] is not None:
        print(f"!!! --max-new-tokens {table['max_new_tokens']}: not the benchmarks' protocol; NOT comparable with "
              f"the reported figures !!!")
    header = ["benchmark", "metric", f"reported base → {method}", f"measured base → {method}",
              f"Δ {method} − base [95% CI]", "n"]
    lines = []
    for row in table["rows"]:
        rep, mea = row["reported"], row["measured"]
        lo, hi = row["ci95"]
        ci = f"[{lo:+.2f}, {hi:+.2f}]" if lo is not None else "[-]"
        lines.append([row["benchmark"], row["label"], f"{_num(rep['base'])} → {_num(rep['method'])}",
                      f"{_num(mea['base'])} → {_num(mea['method'])}",
                      f"{'-' if row['delta'] is None else format(row['delta'], '+.2f')} {ci}", str(row["n"])])
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    for r in [header] + lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    sources = sorted({row["reported"]["source"] for row in table["rows"]})
    for source in sources:
        print(f"reported: {source} ({NOT_VERIFIED})")
    for row in table["rows"][:1]:
        print(f"measured: the runs' metrics.json under {Path(row['runs']['base']).parent}; "
              f"Δ's interval: paired bootstrap over the scoring unit")
    for item in table["skipped"] + table["waiting"]:
        print(f"not in the table: {item['reason']}")
    for note in table["notes"]:
        print(f"note: {note}")


# ---------------------------------------------------------------------------------------------------------------
# --dry-run: what would run, and a rough time per run

# Decode steps per batch a typical answer takes: a word or a letter and EOS; CHAIR a caption (OPERA's ≈ 87 words).
DECODE_STEPS = {"chair": 130}
KNOWN_PARAMS = {"llava-hf/llava-1.5-7b-hf": 7.06e9, "llava-hf/llava-1.5-13b-hf": 13.35e9}
# A floor, not a measurement: prefill FLOP/s and weight-read bandwidth a run gets at best on each device type.
DEVICE_SPEED = {"cuda": (300e12, 2.0e12), "cpu": (0.3e12, 30e9)}
METHOD_COST = {"base": 1.0, "var": 1.25, "damro": 1.35}     # VAR: explicit attention; DAMRO: a second branch


def model_params(model: str) -> float | None:
    """The model's parameter count, without loading it: known hub ids, the demo's config, a local dir's files."""
    if model in KNOWN_PARAMS:
        return KNOWN_PARAMS[model]
    from ..demo import demo_config, is_demo_name, random_state_dict
    if model == "demo":
        import torch
        with torch.device("meta"):
            return float(sum(t.numel() for t in random_state_dict(demo_config()).values()))
    path = Path(model)
    if is_demo_name(model):             # another family's demo: counted from its files once it is built
        from ..checkpoint import WEIGHTS_DIR
        path = Path(WEIGHTS_DIR) / model
    if path.is_dir():
        files = list(path.glob("*.safetensors"))
        if files:
            import struct
            total = 0
            for f in files:                        # the safetensors header lists every tensor's shape
                with open(f, "rb") as fh:
                    header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
                total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
            return float(total)
    lowered = model.lower()
    for size in ("13b", "7b"):
        if size in lowered:
            return KNOWN_PARAMS[f"llava-hf/llava-1.5-{size}-hf"]
    return None


def estimate_seconds(bench: str, questions: list, params: float | None, device_type: str, dtype_bytes: int,
                     batch_size: int, setting: str) -> float | None:
    """Prefill: 2·params FLOP per token (576 image tokens + the text); decode: one read of the weights per step."""
    from .harness import batches, group_by_image
    if params is None:
        return None
    flops, bandwidth = DEVICE_SPEED[device_type]
    tokens = sum(576 + 40 + len(q.prompt) // 4 for q in questions)
    steps = sum(len(batches(g, batch_size)) for g in group_by_image(questions)) * DECODE_STEPS.get(bench, 3)
    return (2 * params * tokens / flops + steps * params * dtype_bytes / bandwidth) * METHOD_COST[setting]


def dry_run(args, paper: Paper, found, skipped, prog) -> int:
    import torch

    from . import harness
    from ..pipeline import pick_device, pick_dtype
    dev = pick_device(harness.run_device(args.device))      # checked in check_run_flags
    dtype_bytes = torch.tensor([], dtype=pick_dtype(args.dtype, dev)).element_size()
    params = model_params(args.model)
    plan = []
    for entry, data, images in found:
        bench = harness.get_benchmark(entry.bench)
        try:
            questions = harness.read_questions(bench, data, images)
        except MinivarError as e:
            from ..errors import for_command_line
            skipped.append({"benchmark": entry.bench, "reason": f"{entry.bench}: {for_command_line(str(e))}"})
            continue
        if args.limit is not None:
            questions = questions[:args.limit]
        runs = []
        for setting in ("base", "method"):
            argv = run_argv(args, entry, setting, data, images)
            out = run_dir(args, entry, setting)
            cost = "base" if setting == "base" else paper.method
            seconds = estimate_seconds(entry.bench, questions, params, dev.type, dtype_bytes, args.batch_size, cost)
            runs.append({"setting": paper.base_setting if setting == "base" else paper.method,
                         "command": f"{prog} {' '.join(_quote(a) for a in argv)}", "out": str(out),
                         "exists": out.exists(), "estimated_s": seconds})
        plan.append({"benchmark": entry.bench, "data": [str(p) for p in data],
                     "images": str(images) if images is not None else None, "questions": len(questions),
                     "runs": runs})
    result = {"paper": paper.name, "model": args.model, "model_params": params, "device": dev.type,
              "limit": args.limit, "found": plan, "missing": skipped,
              "estimate": "a floor from the model size and the device type, not a measurement"}
    if args.json:
        print(json.dumps(result))
        return 0
    size = f"{params / 1e9:.2f} B parameters" if params and params >= 1e8 else \
        (f"{params / 1e6:.1f} M parameters" if params else "size unknown")
    print(f"reproduce {paper.name} --dry-run: nothing is made. Model {args.model} ({size}) on {dev.type}"
          + (f"; --limit {args.limit}: a quick check" if args.limit is not None else ""))
    for item in plan:
        print(f"{item['benchmark']}: found {' '.join(item['data'])}"
              + (f" (images {item['images']})" if item["images"] else "") + f": {item['questions']} questions")
        for run in item["runs"]:
            t = "time unknown" if run["estimated_s"] is None else f"≈ {_duration(run['estimated_s'])} at best"
            state = " (exists: resumed)" if run["exists"] else ""
            print(f"  {run['setting']}: {t}{state}\n    {run['command']}")
    for item in skipped:
        print(f"missing: {item['reason']}")
    print("times: a floor from the model size and the device type (prefill FLOPs, decode weight reads), "
          "not a measurement; time a --limit run first")
    return 0


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
