"""The evaluation loop: a benchmark's questions in, one answer line per question out; resumable and shardable.

A run directory (--out) holds
    run.json               the settings of the run (written atomically: temp file + rename)
    answers.jsonl          one JSON line per question, in LLaVA's answer-file style (question_id, prompt, text,
                           plus output_ids, finished, image, model_id), appended and flushed as it goes
    answers-I-of-N.jsonl   the same for shard I of N (0-based: --shard I/N, or torchrun's RANK/WORLD_SIZE)
    metrics.json           {"bench", "n", "metrics"}, written atomically once every question has an answer

Resuming: running the same command again skips the questions already answered, and says how many it kept. A line
cut off by a kill (no newline at its end) is dropped and its question asked again (the resume says so). A run may
grow to a larger --limit, never shrink: a smaller --limit on an existing run is refused (its metrics.json and the
answers kept would describe different question sets).

One writer: a run holds a lock on the answers file it appends to (RunLock), so two runs into one --out never
answer a question twice; a resume that finds duplicate lines (written before runs were locked) keeps each
question's first answer and says how many it dropped.

Which settings change answers (a resume must match them, else it is refused naming the setting): the benchmark,
the questions (a fingerprint of ids, prompts and image keys: moving the data folder is fine, changing it is not),
the model, the device type (cpu / cuda), the dtype, VAR's settings (its rule and heads too), the prompt template,
the prompt tokenization, the image aspect ratio, max_new_tokens and the batch size. The batch size is one of them because the prompts of a batch are left-padded
to a common length: in float16/bfloat16 that changes the rounding of the attention sums, and greedy decoding can
flip at a near tie (measured on the demo model: 2 of 4 batches of 4 prompts differ from one-by-one in bfloat16).
The limit, the shard and the GPU index do not change answers, because batches never depend on them: an image's
questions are cut into batches by their position among *all* that image's questions, and a batch with any
question still to answer is run whole (the answers not wanted, or already written, are not written again). So a
resumed run, a sharded run, a limited run and an uninterrupted run put every question through the same batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import MinivarError

from ..defaults import DEFAULT_MODEL

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
ANSWER_SETTINGS = ("benchmark", "questions", "model", "device", "dtype", "var", "methods", "conv_mode",
                   "image_aspect_ratio", "max_new_tokens", "batch_size", "prompt_tokenization", "decoding")
FLAGS = {"benchmark": "BENCH", "questions": "the questions in --data", "model": "--model", "device": "--device",
         "dtype": "--dtype", "var": "VAR (--var and its flags)",
         "methods": "the methods besides VAR and their flags", "conv_mode": "--conv-mode",
         "decoding": "--temperature / --top-p / --seed / --num-beams",
         "image_aspect_ratio": "--image-aspect-ratio", "max_new_tokens": "--max-new-tokens",
         "batch_size": "--batch-size", "limit": "--limit", "prompt_tokenization": "--prompt-tokenization"}


LOG = logging.getLogger("minivar.eval")


def stderr(message: str) -> None:
    """A progress or status message: logged (logger "minivar.eval", level INFO) without its "minivar: " prefix.
    From Python nothing is printed unless logging is configured; the command line (__main__) prints them on stderr
    as "minivar: ..." (see `cli_logging`)."""
    LOG.info(message.removeprefix("minivar: "))


class cli_logging:
    """While a command line runs: the harness's messages on (the current) stderr as "minivar: <message>", and
    Python warnings from minivar as "minivar: warning: <message>"; both restored afterwards."""

    def __enter__(self):
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("minivar: %(message)s"))
        self.level, self.propagate = LOG.level, LOG.propagate
        LOG.addHandler(self.handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
        self.showwarning = warnings.showwarning
        warnings.showwarning = lambda message, *a, **k: print(f"minivar: warning: {message}", file=sys.stderr,
                                                               flush=True)
        return self

    def __exit__(self, *exc):
        self.handler.flush()
        LOG.removeHandler(self.handler)
        LOG.setLevel(self.level)
        LOG.propagate = self.propagate
        warnings.showwarning = self.showwarning


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks and their questions

def get_benchmark(bench):
    """A Benchmark object as given, or looked up by name in minivar.eval.benchmarks."""
    if not isinstance(bench, str):
        return bench
    from . import benchmarks
    return benchmarks.get(bench)


def read_questions(bench, data: list[Path], images: Path | None) -> list:
    """The benchmark's questions from --data / --images, checked: paths exist, ids unique, not empty."""
    for path in data:
        if not Path(path).exists():
            raise MinivarError(f"--data '{path}' not found")
    if images is not None and not Path(images).is_dir():
        raise MinivarError(f"--images '{images}' is not a directory")
    questions = bench.read([Path(p) for p in data], images=Path(images) if images is not None else None)
    if not questions:
        raise MinivarError(f"no {bench.name} questions found in --data {' '.join(str(p) for p in data)}")
    seen = set()
    for q in questions:
        if q.question_id in seen:
            raise MinivarError(f"question id '{q.question_id}' occurs twice in --data {' '.join(str(p) for p in data)}")
        seen.add(q.question_id)
    return questions


def check_writable_directory(out: Path) -> None:
    """--out must be a directory this process can create and write into: checked before the model loads."""
    existing = out
    while not existing.exists():            # the nearest folder that exists must let us create the rest
        existing = existing.parent
    if not existing.is_dir():
        raise MinivarError(f"--out '{out}': '{existing}' is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MinivarError(f"--out '{out}': cannot write into '{existing}'")
    if existing == out:
        try:                                 # some folders pass os.access and still refuse files (/proc, read-only mounts)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".minivar-write-test-"):
                pass
        except OSError as e:
            raise MinivarError(f"--out '{out}': cannot write into it ({e.strerror or e})") from None
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".minivar-write-test-"):
                pass
        except OSError as e:
            raise MinivarError(f"--out '{out}': cannot create it ({e.strerror or e})") from None
        finally:                             # leave nothing behind before the run really starts
            for made in [out, *out.parents]:
                if made == existing:
                    break
                try:
                    made.rmdir()
                except OSError:
                    break


def fingerprint(questions) -> dict:
    """What identifies the question set: ids, prompts and image keys, in order (not where the files lie)."""
    h = hashlib.sha256()
    for q in questions:
        h.update(json.dumps([q.question_id, q.prompt, q.image_key]).encode() + b"\n")
    return {"count": len(questions), "sha256": h.hexdigest()}


def group_by_image(questions) -> list[list]:
    """Questions grouped by image_key, groups in the order of their first question (questions keep their order)."""
    groups: dict[str, list] = {}
    for q in questions:
        groups.setdefault(q.image_key, []).append(q)
    return list(groups.values())


def selected_ids(questions, limit: int | None) -> set[str]:
    """--limit N: the first N questions in the benchmark's order."""
    return {q.question_id for q in (questions if limit is None else questions[:limit])}


def shard_groups(groups: list[list], shard: tuple[int, int] | None) -> list[list]:
    """Shard i of n: every n-th image group from the i-th on (all groups, so that a shard does not depend on
    --limit); an image's questions stay together, and the shards are disjoint and cover everything."""
    if shard is None:
        return groups
    i, n = shard
    return groups[i::n]


def batches(group: list, batch_size: int) -> list[list]:
    return [group[k:k + batch_size] for k in range(0, len(group), batch_size)]


# ---------------------------------------------------------------------------------------------------------------
# Shards and devices

def parse_shard(text: str) -> tuple[int, int] | None:
    """'I/N' (0 ≤ I < N) → (I, N); N = 1 is the whole run (None)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise MinivarError(f"--shard '{text}' is not I/N (e.g. 0/4: the first of 4 shards, counted from 0)") from None
    if not (n >= 1 and 0 <= i < n):
        raise MinivarError(f"--shard '{text}': I must be in 0..N-1 and N ≥ 1")
    return None if n == 1 else (i, n)


def torchrun_shard(env=os.environ) -> tuple[int, int] | None:
    """Under torchrun (RANK and WORLD_SIZE set) each process takes shard RANK of WORLD_SIZE."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")


def run_device(device: str, env=os.environ, cuda: bool | None = None) -> str:
    """--device auto (or cuda) under torchrun means this process's GPU, cuda:LOCAL_RANK; where there is no CUDA
    (`cuda`: whether there is, default torch's answer) auto means the CPU, as it does without torchrun."""
    if device in ("auto", "cuda") and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        if cuda is None:
            import torch
            cuda = torch.cuda.is_available()
        if device == "auto" and not cuda:
            return "cpu"
        return f"cuda:{int(env['LOCAL_RANK'])}"
    return device


def answers_file(out: Path, shard: tuple[int, int] | None) -> Path:
    return out / ("answers.jsonl" if shard is None else f"answers-{shard[0]}-of-{shard[1]}.jsonl")


def answer_files(out: Path) -> list[Path]:
    return sorted([p for p in [out / "answers.jsonl"] if p.is_file()] + list(out.glob("answers-*-of-*.jsonl")))


# ---------------------------------------------------------------------------------------------------------------
# Files of a run directory

def write_json_atomic(path: Path, obj) -> None:
    """Write to a temp file beside `path`, then rename over it: readers see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")    # per process: torchrun ranks write at once
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_lines_atomic(path: Path, lines: list[str]) -> None:
    """An answers file rewritten whole (temp file + rename, as write_json_atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_json(out: Path) -> dict:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise MinivarError(f"'{out}' is not a run directory (no {RUN_FILE})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinivarError(f"'{path}' is not valid JSON ({e})") from None


def read_answers(path: Path, known_ids=None, repair: bool = False, first_wins: bool = False) -> dict[str, dict]:
    """question_id → answer record of one answers file. A last line without its newline was cut off by a kill: it is
    ignored (repair=True: cut from the file, so that appending starts on a fresh line). Any other bad line is an
    error naming the file and line, as is a question id not in `known_ids` or one answered twice differently
    (first_wins=True, a resume: a question answered twice keeps its first answer, whatever the later ones say)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    records: dict[str, dict] = {}
    for lineno, line in enumerate(data[:end].decode("utf-8", errors="replace").split("\n")[:-1], 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise MinivarError(f"'{path}' line {lineno} is not valid JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or "question_id" not in rec:
            raise MinivarError(f"'{path}' line {lineno} lacks a question_id or a text")
        qid = str(rec["question_id"])
        if known_ids is not None and qid not in known_ids:
            raise MinivarError(f"'{path}' line {lineno}: question id '{qid}' is not one of this run's questions")
        if qid in records and first_wins:
            continue
        if qid in records and records[qid]["text"] != rec["text"]:
            raise MinivarError(f"'{path}' line {lineno}: question id '{qid}' is answered twice, differently")
        records[qid] = rec
    return records


def merge_answers(files: list[Path], known_ids=None) -> dict[str, str]:
    """question_id → text over several answer files (shards, run directories); the same question answered with
    different texts in two files is refused."""
    texts: dict[str, str] = {}
    where: dict[str, Path] = {}
    for path in files:
        for qid, rec in read_answers(path, known_ids).items():
            if qid in texts and texts[qid] != rec["text"]:
                raise MinivarError(f"question id '{qid}' has different answers in '{where[qid]}' and '{path}'")
            texts[qid], where[qid] = rec["text"], path
    return texts


def first_difference(old, new, prefix: str = ""):
    """The dotted name of the first differing entry of two JSON values, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            diff = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff is not None:
                return diff
        return None
    return None if old == new else prefix.rstrip(".")


def data_files(paths: list[Path]) -> list[dict]:
    """Each --data path with its size (a folder: its file count and total bytes), for the record in run.json."""
    record = []
    for p in map(Path, paths):
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file()]
            record.append({"path": str(p.resolve()), "files": len(files), "bytes": sum(f.stat().st_size for f in files)})
        else:
            record.append({"path": str(p.resolve()), "bytes": p.stat().st_size})
    return record


# ---------------------------------------------------------------------------------------------------------------
# The model call

@dataclass(frozen=True)
class Generation:
    """How every question is answered: greedy, with these settings (VAR: a VARConfig, or None)."""
    max_new_tokens: int
    conv_mode: str
    image_aspect_ratio: str
    var: object = None
    prompt_tokenization: str = "llava"          # or "official" / "damro": as VAR's / DAMRO's released code
    methods: tuple = ()                         # the methods besides VAR (methods/method.py), in order
    temperature: float = 0.0                    # 0: greedy (LLaVA-1.5's evaluation); DAMRO's scripts sample at 1
    top_p: float = 1.0
    seed: int | None = None                     # seeds each batch's sampling (a batch is the same on every resume)
    num_beams: int = 1                          # > 1: beam search (OPERA: its own, 5 by default)

    @property
    def decoding(self):
        """run.json's "decoding": "greedy", {"num_beams": K} (beam search), or the sampling settings."""
        if self.num_beams > 1:
            return {"num_beams": self.num_beams}
        if self.temperature <= 0:
            return "greedy"
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


def answer_group(pipeline, image, prompts: list[str], settings: Generation) -> list:
    """Answers to several prompts about one image: the only place the harness calls the model. The image prefix
    (system text + image) is computed once and the questions run on it as one batch (Pipeline.generate_many)."""
    return pipeline.generate_many(image, prompts, max_new_tokens=settings.max_new_tokens,
                                  conv_mode=settings.conv_mode, image_aspect_ratio=settings.image_aspect_ratio,
                                  var=settings.var, methods=list(settings.methods),
                                  prompt_tokenization=settings.prompt_tokenization, temperature=settings.temperature,
                                  top_p=settings.top_p, seed=settings.seed, num_beams=settings.num_beams)


class Progress:
    """Questions done, rate, ETA and the running headline metric on stderr: a tqdm bar when tqdm is installed,
    else a plain line every few seconds. The headline is re-scored at most every `score_every_s` seconds."""

    def __init__(self, total: int, done: int, headline: str, score, score_every_s: float = 20.0):
        self.total, self.done, self.headline, self.score = total, done, headline, score
        self.start_done, self.t0 = done, time.monotonic()
        self.score_every_s, self.scored_at, self.value = score_every_s, float("-inf"), None
        self.printed_at = self.t0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, unit="q", file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
        except ImportError:
            self.bar = None

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if self.headline and (force or now - self.scored_at >= self.score_every_s):
            self.value, self.scored_at = self.score(), now
        shown = f"{self.headline} {self.value:.4f}" if isinstance(self.value, (int, float)) else ""
        if self.bar is not None:
            if shown:
                self.bar.set_postfix_str(shown, refresh=False)
            self.bar.update(n)
        elif force or now - self.printed_at >= 5.0:
            self.printed_at = now
            rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 360000 else "?"
            stderr(f"minivar: {self.done}/{self.total} questions, {rate:.2f} q/s, ETA {eta_text}"
                   + (f", {shown}" if shown else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def headline_of(bench, answered: list) -> float | None:
    """The benchmark's headline metric on the answers so far; None while the scorer cannot score them yet."""
    from .compare import flatten
    if not answered:
        return None
    try:
        return flatten(bench.score(answered)).get(bench.headline)
    except Exception:   # noqa: BLE001 - a partial answer set may not be scorable yet (a split with no "yes" so far,
        return None     # an MME image with one of its two answers): the progress line shows nothing, the run goes on


# ---------------------------------------------------------------------------------------------------------------
# One writer per answers file

class RunLock:
    """While a run writes into --out, a lock file beside its answers file (.answers.jsonl.lock, or
    .answers-I-of-N.jsonl.lock for a shard) holds its pid under an exclusive flock: a second run writing the same
    questions is refused, naming that pid. The kernel drops a flock when its process dies, so the lock file a killed
    run leaves behind is simply taken over; a run that ends removes it. A shard's lock also keeps out the runs whose
    questions overlap its own (an unsharded run, a shard of another split), and an unsharded run keeps out every
    shard. The folders made to hold the lock are removed again if the run writes nothing else (bad input found
    after it was taken, a failed model load). Where flock does not exist (Windows), runs are not locked."""

    def __init__(self, out: Path, shard: tuple[int, int] | None):
        self.out, self.shard = out, shard
        self.path = out / f".{answers_file(out, shard).name}.lock"
        self.fd = None
        self.made: list[Path] = []

    def __enter__(self):
        missing = [d for d in [self.out, *self.out.parents] if not d.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        self.made = missing                            # innermost first: the order they are removed in
        try:
            import fcntl
        except ImportError:                            # pragma: no cover - not on Linux or macOS
            return self
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    self.refuse(self.path)
                # a run that was ending may have removed the file between our open and our flock: then the lock
                # we hold is on a file nobody else sees; take the one at the path instead
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            self.fd = fd
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            for other in self.out.glob(".answers*.jsonl.lock"):
                if other != self.path and self.overlaps(other) and held(other):
                    self.refuse(other)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def overlaps(self, other: Path) -> bool:
        """Could the run holding `other` answer one of this run's questions?"""
        name = other.name[1:-len(".lock")]                 # answers.jsonl, or answers-I-of-N.jsonl
        shard = name[len("answers-"):-len(".jsonl")].replace("-of-", "/")
        try:
            theirs = None if name == "answers.jsonl" else parse_shard(shard)
        except MinivarError:                           # not a name a run gives its lock: keep out of its way
            return True
        mine = self.shard
        return mine is None or theirs is None or mine[1] != theirs[1] or mine[0] == theirs[0]

    def refuse(self, lock: Path) -> None:
        try:
            pid = lock.read_text().strip() or "unknown"
        except OSError:
            pid = "unknown"
        raise MinivarError(f"--out '{self.out}' is being written by another minivar-eval run (pid {pid}, "
                           f"{lock.name}): wait for it to end, or use another --out")

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)          # removed while still held: no one can take a stale copy
            os.close(self.fd)
            self.fd = None
        for d in self.made:                            # what this run created, if it wrote nothing in it
            try:
                d.rmdir()
            except OSError:
                break


def held(lock: Path) -> bool:
    """Is `lock` flocked by a live process? (Tried without waiting; released at once when it was free.)"""
    import fcntl
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# run

def run(bench, data: list[Path], out: Path, *, images: Path | None = None, model: str = DEFAULT_MODEL, var=None,
        methods=(),
        conv_mode: str | None = None, image_aspect_ratio: str | None = None, max_new_tokens: int | None = None,
        batch_size: int = 8, limit: int | None = None, shard: tuple[int, int] | None = None, device: str = "auto",
        dtype: str = "auto", partial: bool = False, log=stderr, load=None,
        prompt_tokenization: str = "llava", temperature: float = 0.0, top_p: float = 1.0,
        seed: int | None = None, num_beams: int = 1) -> dict | None:
    """Answer the benchmark's questions into `out` (see the module docstring); return {"bench", "n", "metrics"} once
    every question has an answer (with partial=True: the metrics of those answered so far), else None.

    bench: a name (looked up in minivar.eval.benchmarks) or a Benchmark; var: a VARConfig or None; methods: more
    methods (Method objects; run.json records each one's settings under "methods"); load: the model
    loader (default minivar.load). Everything is checked before the model loads and before anything is written."""
    from dataclasses import asdict

    from ..flags import check_seed_applies, contrastive_load
    from ..pipeline import check_beam_args, check_generation_args, check_tokenization, pick_device, pick_dtype
    from . import minivar_version

    bench = get_benchmark(bench)
    out = Path(out)
    if batch_size < 1:
        raise MinivarError(f"--batch-size must be ≥ 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise MinivarError(f"--limit must be ≥ 1, got {limit}")
    default_conv, default_image = model_eval_settings(model, bench)
    gen = Generation(bench.max_new_tokens if max_new_tokens is None else max_new_tokens,
                     conv_mode or default_conv, image_aspect_ratio or default_image, var,
                     prompt_tokenization, tuple(m for m in methods if m.name != "var"), temperature, top_p, seed,
                     num_beams)
    check_tokenization(prompt_tokenization, gen.conv_mode)
    check_generation_args(gen.max_new_tokens, temperature, top_p, seed)
    check_seed_applies(seed, temperature, list(methods), spell=lambda k: "--" + k.replace("_", "-"))
    check_beam_args(num_beams, temperature)
    if gen.max_new_tokens < 1:           # an empty answer would still be scored (POPE reads it as "yes")
        raise MinivarError(f"--max-new-tokens must be ≥ 1 for a benchmark run, got {gen.max_new_tokens}")
    if var is not None:
        var.validate()
    device = run_device(device)
    dev = pick_device(device)
    questions = read_questions(bench, data, images)
    settings = {"benchmark": bench.name, "questions": fingerprint(questions),
                "model": str(Path(model).resolve()) if Path(model).is_dir() else model,
                "device": dev.type, "dtype": str(pick_dtype(dtype, dev)).replace("torch.", ""),
                # as JSON will read it back (tuples become lists), so a resume compares like with like
                "var": json.loads(json.dumps(asdict(var))) if var is not None else None,
                "methods": ({m.name: json.loads(json.dumps(m.settings())) for m in gen.methods} or None),
                "conv_mode": gen.conv_mode,
                "image_aspect_ratio": gen.image_aspect_ratio, "max_new_tokens": gen.max_new_tokens,
                "prompt_tokenization": gen.prompt_tokenization,
                "batch_size": batch_size, "limit": limit, "decoding": gen.decoding,
                "data": data_files(data), "images": str(Path(images).resolve()) if images is not None else None,
                "minivar_version": minivar_version()}

    # A resume must ask for the same answers (see the module docstring); what it may change is the limit.
    if out.exists() and not out.is_dir():
        raise MinivarError(f"--out '{out}' is a file, not a directory")
    check_writable_directory(out)
    # One writer per answers file (RunLock); what it reads and writes from here on, it reads and writes alone.
    with RunLock(out, shard):
        previous = read_run_json(out) if (out / RUN_FILE).is_file() else None
        if previous is None and out.is_dir() and answer_files(out):
            raise MinivarError(f"--out '{out}' holds answer files but no {RUN_FILE}: use another --out")
        if previous is not None:
            before = {k: previous.get(k) for k in ANSWER_SETTINGS}
            if before["var"] is not None and previous.get("var_sink_dims_source") not in (None, "user"):
                before["var"] = before["var"] | {"sink_dims": None}     # the dims it found, not dims it was given
            diff = first_difference(before, {k: settings[k] for k in ANSWER_SETTINGS})
            if diff is not None:
                top = diff.split(".")[0]
                raise MinivarError(f"--out '{out}' holds a run with other settings: {diff} differs ({FLAGS[top]}); "
                                   f"rerun with the same settings to resume it, or use another --out")
        if previous is not None and len(selected_ids(questions, limit)) < len(selected_ids(questions, previous.get("limit"))):
            was = "no --limit" if previous.get("limit") is None else f"--limit {previous['limit']}"
            raise MinivarError(f"--out '{out}' holds a run of {len(selected_ids(questions, previous.get('limit')))} "
                               f"questions ({was}): --limit {limit} would shrink it; a run never shrinks: rerun with "
                               f"{was}, or use another --out for the smaller run")
        known = {q.question_id for q in questions}
        mine_file = answers_file(out, shard)
        # first_wins: two runs into one --out before runs were locked answered questions twice; each keeps its first
        done = read_answers(mine_file, known, first_wins=True) if mine_file.is_file() else {}
        duplicates = mine_file.read_bytes().count(b"\n") - len(done) if mine_file.is_file() else 0
        for other in answer_files(out):        # the other shards' files must be sound too (they are merged at the end)
            if other != mine_file:
                read_answers(other, known)

        wanted = selected_ids(questions, limit)
        todo_groups = [g for g in shard_groups(group_by_image(questions), shard)
                       if any(q.question_id in wanted and q.question_id not in done for q in g)]
        my_total = sum(q.question_id in wanted for g in shard_groups(group_by_image(questions), shard) for q in g)
        my_done = sum(qid in wanted for qid in done)

        pipeline = None
        if todo_groups:
            pipeline = (load or _load)(model, device=device, dtype=dtype,
                                       contrastive=contrastive_load(methods))
            log(f"minivar: loaded {model} in {pipeline.load_s:.2f}s on {pipeline.device} "
                f"({str(pipeline.dtype).replace('torch.', '')})")
            if var is not None:   # check VAR against the model and find its sink dims once, before anything is written
                # the finder reads the prompt's text only: one image token stands for the image
                ids = pipeline.prompt_ids(todo_groups[0][0].prompt, gen.conv_mode, num_image_tokens=1)
                t = pipeline.config.text
                var.validate(t.hidden_size, t.num_hidden_layers)
                dims, source = pipeline.sink_dims(var, ids, warn=log)
                # one place for the dims used: run.json's "var" (and every question runs with them, the finder once)
                var = dataclasses.replace(var, sink_dims=tuple(dims), find_sink_dims=False)
                gen = dataclasses.replace(gen, var=var)
                settings["var"] = settings["var"] | {"sink_dims": list(dims)}
                settings["var_sink_dims_source"] = source
            for m in gen.methods:
                m.check(pipeline)

        if pipeline is None and previous is not None and settings["var"] is not None \
                and previous.get("var_sink_dims_source") not in (None, "user"):
            # nothing left to answer, so no finder ran: keep the dims the answers were made with
            settings["var"], settings["var_sink_dims_source"] = previous["var"], previous["var_sink_dims_source"]

        # From here on the directory is written.
        out.mkdir(parents=True, exist_ok=True)
        if previous is not None and previous.get("limit") != limit:
            (out / METRICS_FILE).unlink(missing_ok=True)     # it scored another selection of questions
        write_json_atomic(out / RUN_FILE, (previous or {}) | settings)
        if mine_file.is_file():
            torn = not mine_file.read_bytes().endswith(b"\n") and mine_file.stat().st_size > 0
            read_answers(mine_file, known, repair=True, first_wins=True)     # drop a line cut off by a kill
            if duplicates:
                write_lines_atomic(mine_file, [json.dumps(rec) + "\n" for rec in done.values()])
            if previous is not None:
                log(f"minivar: resuming {out}: kept the {len(done)} answers in {mine_file.name}"
                    + ("; dropped a line cut off by a kill (its question is asked again)" if torn else "")
                    + (f"; dropped {duplicates} duplicate answer lines (a question answered more than once keeps "
                       f"its first answer)" if duplicates else "")
                    + f"; {sum(q.question_id in wanted and q.question_id not in done for g in todo_groups for q in g)} "
                      f"questions to answer")

        if todo_groups:
            by_id = {q.question_id: q for q in questions}
            progress = Progress(my_total, my_done, bench.headline,
                                lambda: headline_of(bench, [(by_id[qid], r["text"]) for qid, r in done.items()]))
            try:
                with open(mine_file, "a", encoding="utf-8") as f:
                    for group in todo_groups:
                        _answer_image(pipeline, group, gen, batch_size, wanted, done, f, progress, model)
                        os.fsync(f.fileno())
                progress.update(0, force=True)
            finally:
                progress.close()

        # Complete when every selected question of every shard has an answer.
        answers = merge_answers(answer_files(out), known)
        missing = [q for q in questions if q.question_id in wanted and q.question_id not in answers]
        answered = [(q, answers[q.question_id]) for q in questions if q.question_id in wanted and q.question_id in answers]
        if not missing:
            result = {"bench": bench.name, "n": len(answered), "metrics": bench.score(answered)}
            write_json_atomic(out / METRICS_FILE, result)
            log(f"minivar: {len(answered)} answers in {out}; metrics in {out / METRICS_FILE}")
            return result
        # (No metrics.json to remove here: one is only ever written for this selection, complete. Removing one anyway
        # could delete what the last torchrun rank has just written.)
        log(f"minivar: {len(missing)} of {len(wanted)} questions are not answered yet (other shards); "
            f"{METRICS_FILE} is written when they are")
        if partial and answered:
            return {"bench": bench.name, "n": len(answered), "metrics": bench.score(answered)}
        return None


def model_eval_settings(model: str, bench) -> tuple[str, str]:
    """The benchmark's template and image mode as the model's family speaks them (registry.Family.eval_settings),
    read from config.json before anything loads; a model whose config cannot be read yet keeps the benchmark's
    (its load then says what is wrong)."""
    from ..checkpoint import read_config, resolve
    from ..errors import MinivarError as _Error
    from ..models.registry import family_of
    try:
        cfg = read_config(resolve(model))
    except (_Error, OSError):
        return bench.conv_mode, bench.image_aspect_ratio
    return family_of(cfg).eval_settings(cfg, bench.conv_mode, bench.image_aspect_ratio)


def _load(model, device, dtype, contrastive=False):
    import minivar
    return minivar.load(model, device=device, dtype=dtype, contrastive=contrastive)


def _answer_image(pipeline, group, gen, batch_size, wanted, done, f, progress, model) -> None:
    """Answer one image's questions still to do, in batches cut from all its questions (see the module docstring)."""
    image = None
    for batch in batches(group, batch_size):
        todo = [q for q in batch if q.question_id in wanted and q.question_id not in done]
        if not todo:
            continue
        if image is None:
            image = group[0].load_image()          # once per image
        results = answer_group(pipeline, image, [q.prompt for q in batch], gen)
        lines = []
        for q, r in zip(batch, results):
            if q.question_id in wanted and q.question_id not in done:
                rec = {"question_id": q.question_id, "prompt": q.prompt, "text": r.text.strip(),
                       "output_ids": list(r.output_ids), "finished": r.finished, "image": q.image_key,
                       "model_id": model}
                done[q.question_id] = rec
                lines.append(json.dumps(rec) + "\n")
        f.write("".join(lines))                   # one write per batch; flushed so a kill loses at most this batch
        f.flush()
        progress.update(len(lines))


# ---------------------------------------------------------------------------------------------------------------
# Reading finished runs back (score, compare)

@dataclass
class RunData:
    """A run directory read back: its settings, benchmark, selected questions (in order) and answer texts."""
    out: Path
    settings: dict
    bench: object
    questions: list
    answers: dict

    @property
    def missing(self) -> list:
        return [q for q in self.questions if q.question_id not in self.answers]

    def answered(self) -> list:
        return [(q, self.answers[q.question_id]) for q in self.questions if q.question_id in self.answers]


def load_runs(dirs: list[Path]) -> RunData:
    """One or several run directories of the same run (e.g. shards written on different machines), merged."""
    dirs = [Path(d) for d in dirs]
    runs = [read_run_json(d) for d in dirs]
    base = runs[0]
    for d, other in zip(dirs[1:], runs[1:]):
        diff = first_difference({k: base.get(k) for k in ANSWER_SETTINGS + ("limit",)},
                                {k: other.get(k) for k in ANSWER_SETTINGS + ("limit",)})
        if diff is not None:
            raise MinivarError(f"'{dirs[0]}' and '{d}' are not parts of one run: {diff} differs")
    bench = get_benchmark(base["benchmark"])
    data = [Path(p["path"]) for p in base.get("data", [])]
    # Scoring needs no pixels: a reader that can skip looking for the images (need_images) is told so.
    if "need_images" in inspect.signature(bench.read).parameters:
        questions = bench.read(data, need_images=False)
    else:
        questions = read_questions(bench, data, Path(base["images"]) if base.get("images") else None)
    if fingerprint(questions) != base["questions"]:
        raise MinivarError(f"the questions in {' '.join(map(str, data))} changed since '{dirs[0]}' was run")
    known = {q.question_id for q in questions}
    files = [f for d in dirs for f in answer_files(d)]
    answers = merge_answers(files, known)
    wanted = selected_ids(questions, base.get("limit"))
    return RunData(dirs[0], base, bench, [q for q in questions if q.question_id in wanted], answers)


def score_runs(dirs: list[Path], partial: bool = False, log=stderr) -> dict:
    """{"bench", "n", "metrics"} of the merged answers of `dirs`; an incomplete run only with partial=True."""
    data = load_runs(dirs)
    missing = data.missing
    if missing and not partial:
        raise MinivarError(f"{len(missing)} of {len(data.questions)} questions have no answer in "
                           f"{' '.join(map(str, dirs))} (first: '{missing[0].question_id}'): finish the run "
                           f"(rerun its command, or the missing shards) or pass --partial")
    if missing:
        log(f"minivar: {len(missing)} of {len(data.questions)} questions have no answer; scoring the "
            f"{len(data.questions) - len(missing)} answered (--partial)")
    answered = data.answered()
    if not answered:
        raise MinivarError(f"no answers in {' '.join(map(str, dirs))}")
    return {"bench": data.bench.name, "n": len(answered), "metrics": data.bench.score(answered)}
