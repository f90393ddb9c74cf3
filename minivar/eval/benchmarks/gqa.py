"""GQA testdev-balanced (Hudson & Manning 2019), as LLaVA-1.5 evaluates it.

Reproduces LLaVA's `scripts/convert_gqa_for_eval.py` (prediction = answer.rstrip('.').lower(), nothing more) followed
by GQA's official `eval.py` accuracy: exact string equality with the ground-truth answer over the balanced questions.
`binary` and `open` are eval.py's split by `types.structural` ("query" questions are open, the rest binary).

Layout read: LLaVA's question file `llava_gqa_testdev_balanced.jsonl` (question_id as a string, the prompt with the
short-answer instruction already in `text`, `image`) + GQA's `testdev_balanced_questions.json` (one JSON object:
question id -> entry with `answer`, `types`, `isBalanced`) + the GQA `images/` folder (`images=`). `paths` may name
the two files, or a folder holding them (directly or in `data/`, LLaVA's playground layout); the images default to
`images/` beside the official questions file.
"""
from __future__ import annotations

from pathlib import Path

from minivar.errors import MinivarError

from .base import Benchmark, Question
from .common import as_paths, file_image, need, no_image, read_json, read_jsonl

LLAVA_FILE = "llava_gqa_testdev_balanced.jsonl"
OFFICIAL_FILE = "testdev_balanced_questions.json"


def normalize(text: str) -> str:
    """convert_gqa_for_eval.py's only post-processing: trailing dots off, lower case ("The man" stays "the man")."""
    return text.rstrip(".").lower()


class GQA(Benchmark):
    """GQA testdev-balanced with LLaVA-1.5's prompt; official accuracy after LLaVA's conversion."""
    name = "gqa"
    family = "general"
    max_new_tokens = 128
    headline = "accuracy"

    def read(self, paths, images: Path | None = None, *, need_images: bool = True, **options):
        if options:
            raise MinivarError(f"gqa: unknown option {sorted(options)[0]!r}")
        llava_file = official_file = None
        for p in as_paths(paths):
            if p.is_dir():
                for folder in (p, p / "data"):
                    if llava_file is None and (folder / LLAVA_FILE).is_file():
                        llava_file = folder / LLAVA_FILE
                    if official_file is None and (folder / OFFICIAL_FILE).is_file():
                        official_file = folder / OFFICIAL_FILE
            elif p.suffix == ".jsonl":
                llava_file = p
            elif p.suffix == ".json":
                official_file = p
            else:
                raise MinivarError(f"{p}: not a GQA file (expected {LLAVA_FILE} and {OFFICIAL_FILE})")
        if llava_file is None:
            raise MinivarError(f"GQA needs LLaVA's question file {LLAVA_FILE} (not found in the data paths)")
        if official_file is None:
            raise MinivarError(f"GQA needs the official {OFFICIAL_FILE} for the answers (not found in the data paths)")
        if images is None:
            images = official_file.parent / "images"
        if need_images and not Path(images).is_dir():
            raise MinivarError(f"GQA images folder {images} not found (--images)")

        official = read_json(official_file)
        if not isinstance(official, dict):
            raise MinivarError(f"{official_file}: expected one JSON object mapping question ids to entries")
        questions, seen = [], set()
        for lineno, rec in read_jsonl(llava_file):
            where = f"{llava_file}:{lineno}"
            need(rec, ("question_id", "image", "text"), where)
            qid = str(rec["question_id"])
            if qid in seen:
                raise MinivarError(f"{where}: question id {qid} appears twice")
            seen.add(qid)
            entry = official.get(qid)
            if entry is None:
                raise MinivarError(f"{where}: question {qid} is not in {official_file}")
            if not isinstance(entry, dict):
                raise MinivarError(f"{official_file}: entry {qid} is not an object")
            need(entry, ("answer", "types"), f"{official_file} entry {qid}")
            if "structural" not in (entry["types"] or {}):
                raise MinivarError(f"{official_file} entry {qid}: missing key 'types.structural'")
            load = file_image(Path(images) / rec["image"], qid) if need_images else no_image(qid)
            questions.append(Question(
                question_id=qid, prompt=rec["text"], image_key=rec["image"], load_image=load,
                meta={"answer": entry["answer"], "structural": entry["types"]["structural"],
                      "balanced": bool(entry.get("isBalanced", True))}))
        if not questions:
            raise MinivarError(f"{llava_file}: no questions")
        return questions

    def score(self, answered: list[tuple[Question, str]]) -> dict:
        every, binary, open_ = [], [], []
        for q, text in answered:
            if not q.meta["balanced"]:        # eval.py scores only the balanced questions
                continue
            ok = 1.0 if normalize(text) == q.meta["answer"] else 0.0
            every.append(ok)
            (open_ if q.meta["structural"] == "query" else binary).append(ok)

        def mean(xs):
            return sum(xs) / len(xs) if xs else 0.0
        return {"accuracy": mean(every), "binary": mean(binary), "open": mean(open_)}
