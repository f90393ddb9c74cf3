"""POPE (Li et al. 2023): yes/no object-existence questions on COCO val2014, three splits.

Reproduces LLaVA's `llava/eval/eval_pope.py` (the same rule as POPE's own `evaluate.py`): an answer is cut at its
first '.', commas are removed, it is split on single spaces, and it means "no" iff a word is exactly "No", "no" or
"not"; everything else (including "NO", "Nope", "No</s>" and "") means "yes". Per split it reports accuracy,
precision, recall, F1, the predicted-yes ratio and the counts; `mean` averages each metric over the splits
(LLaVA-1.5's single "POPE" figure is mean.f1).

Layouts read:
- the official annotation files `coco_pope_<split>.json` (JSON Lines despite the name; the split is named by the
  file) + the COCO val2014 images folder (`images=`);
- the `lmms-lab/POPE` parquet shards (`data/test-*.parquet` or `Full/<split>-*.parquet`) with embedded images.

Question ids follow LLaVA's combined file `llava_pope_test.jsonl`: POPE's id plus 0 (adversarial), 10000000 (random)
or 20000000 (popular), so LLaVA's answer files match by id; any other split name gives "<split>-<id>".
"""
from __future__ import annotations

from pathlib import Path

from minivar.errors import MinivarError

from .base import Benchmark, Question
from .common import (SHORT_ANSWER, as_paths, bytes_image, file_image, glob_sorted, need, no_image, read_jsonl,
                     read_parquet)

LLAVA_OFFSETS = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
ANNOTATION_PREFIX, ANNOTATION_SUFFIX = "coco_pope_", ".json"


def question_id(split: str, pope_id, where: str = "") -> str:
    """The id LLaVA's `llava_pope_test.jsonl` gives POPE question `pope_id` of `split`."""
    if split not in LLAVA_OFFSETS:
        return f"{split}-{pope_id}"
    if isinstance(pope_id, bool) or not (isinstance(pope_id, int) or str(pope_id).strip().isdigit()):
        raise MinivarError(f"{where}: POPE question_id {pope_id!r} is not a whole number")
    return str(LLAVA_OFFSETS[split] + int(pope_id))


def parse_answer(text: str) -> str:
    """eval_pope.py's rule, verbatim in effect: "no" iff the first sentence has the word No / no / not."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")     # single spaces only, no strip and no lower-casing: as official
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def split_metrics(pairs: list[tuple[str, str]]) -> dict:
    """(predicted yes/no, label) pairs of one split -> eval_pope.py's numbers (a label other than "no" is yes)."""
    tp = sum(p == "yes" and g != "no" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g != "no" for p, g in pairs)
    # eval_pope.py divides by zero on a split with no predicted (or no true) yes; a tiny sample can do that, so the
    # undefined ratio is reported as 0.0 instead of crashing.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(pairs)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": n, "TP": tp, "FP": fp, "TN": tn, "FN": fn}


class Pope(Benchmark):
    """POPE with LLaVA-1.5's prompt; scored per split exactly as eval_pope.py."""
    name = "pope"
    family = "hallucination"
    max_new_tokens = 128
    headline = "mean.f1"
    metrics_averaged = ("accuracy", "precision", "recall", "f1", "yes_ratio")

    def read(self, paths, images: Path | None = None, *, splits=None, need_images: bool = True, **options):
        """`paths`: annotation files / parquet shards, or folders holding them. `splits`: keep only these splits."""
        if options:
            raise MinivarError(f"pope: unknown option {sorted(options)[0]!r}")
        if isinstance(splits, str):
            splits = [splits]
        annotation, parquet = [], []
        for p in as_paths(paths):
            if p.is_dir():
                found = glob_sorted(p, ANNOTATION_PREFIX + "*" + ANNOTATION_SUFFIX)
                if not found and (p / "coco").is_dir():      # a POPE checkout's output/ folder
                    found = glob_sorted(p / "coco", ANNOTATION_PREFIX + "*" + ANNOTATION_SUFFIX)
                if found:
                    annotation += found
                    continue
                # lmms-lab/POPE holds the same 9000 rows twice (default config data/, config Full/): read one copy.
                shards = glob_sorted(p / "data", "*.parquet") or glob_sorted(p / "Full", "*.parquet") \
                    or glob_sorted(p, "*.parquet")
                if not shards:
                    raise MinivarError(f"{p}: no POPE data here (expected coco_pope_<split>.json files or "
                                       f"lmms-lab/POPE parquet shards)")
                parquet += shards
            elif p.suffix == ".parquet":
                parquet.append(p)
            elif p.name.startswith(ANNOTATION_PREFIX) and p.name.endswith(ANNOTATION_SUFFIX):
                annotation.append(p)
            else:
                raise MinivarError(f"{p}: not a POPE file (expected coco_pope_<split>.json or a .parquet shard)")
        if annotation and images is None and need_images:
            raise MinivarError("POPE annotation files need the COCO val2014 images folder (--images)")
        if images is not None and need_images and not Path(images).is_dir():
            raise MinivarError(f"images folder {images} not found")

        questions: list[Question] = []
        for f in annotation:
            split = f.name[len(ANNOTATION_PREFIX):-len(ANNOTATION_SUFFIX)]
            if splits is not None and split not in splits:
                continue
            for lineno, rec in read_jsonl(f):
                where = f"{f}:{lineno}"
                need(rec, ("question_id", "image", "text", "label"), where)
                qid = question_id(split, rec["question_id"], where)
                load = file_image(Path(images) / rec["image"], qid) if need_images else no_image(qid)
                questions.append(self._question(qid, rec["text"], rec["image"], load, split, rec["label"], where))
        for where, row in read_parquet(parquet, ["question_id", "question", "answer", "image_source", "category"],
                                       optional=("image",)):
            split = row["category"]
            if splits is not None and split not in splits:
                continue
            qid = question_id(split, row["question_id"], where)
            load = bytes_image(row.get("image"), where, qid) if need_images else no_image(qid)
            questions.append(self._question(qid, row["question"], row["image_source"] + ".jpg", load, split,
                                            row["answer"], where))
        if not questions:
            raise MinivarError(f"no POPE questions read (splits {sorted(splits)})" if splits is not None
                               else "no POPE questions read")
        seen = set()
        for q in questions:
            if q.question_id in seen:
                raise MinivarError(f"POPE question id {q.question_id} appears twice (the same split read twice?)")
            seen.add(q.question_id)
        return questions

    def _question(self, qid, text, image, load, split, label, where) -> Question:
        if label not in ("yes", "no"):
            raise MinivarError(f"{where}: POPE label {label!r} is not yes or no")
        if split == "mean":                  # the scorer's `mean` key would be overwritten
            raise MinivarError(f"{where}: a POPE split may not be called 'mean'")
        return Question(question_id=qid, prompt=text + SHORT_ANSWER, image_key=image, load_image=load,
                        meta={"split": split, "label": label})

    def score(self, answered: list[tuple[Question, str]]) -> dict:
        per_split: dict[str, list] = {}
        for q, text in answered:
            per_split.setdefault(q.meta["split"], []).append((parse_answer(text), q.meta["label"]))
        out = {split: split_metrics(pairs) for split, pairs in per_split.items()}
        if out:
            out["mean"] = {k: sum(m[k] for m in out.values()) / len(out) for k in self.metrics_averaged}
        return out
