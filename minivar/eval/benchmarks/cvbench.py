"""CV-Bench (Tong et al. 2024, Cambrian-1): 2D (ADE20K, COCO: count, relation) and 3D (Omni3D: depth, distance)
multiple-choice questions.

Reproduces the CV-Bench authors' scripts: the prompt of `cambrian: eval/eval/{ade,coco,omni}/*_eval.py`
(`prompt + "\\nAnswer with the option's letter from the given choices directly."`, vicuna_v1, pad, greedy,
max_new_tokens 512), the answer parsing of `ade_test.py`/`coco_test.py`/`omni_test.py` (lower-case, strip, cut after
the last "answer is"/"answer is:"/"answer:", strip trailing "." (3D: ".:,") and one "(" / ")", then keep the FIRST
character; 3D also accepts the text of the right choice), and the aggregate of the dataset card:
2D = mean of the ADE20K and COCO accuracies (not the pooled 2D accuracy), 3D = Omni3D accuracy,
overall = (2D + 3D) / 2. With only some sources answered (a --limit run) each figure averages the sources present,
and is null where none is.

Layouts read (`nyu-visionx/CV-Bench`): `test_2d.parquet` + `test_3d.parquet` (or the older single `test.parquet`),
images embedded; or `test_2d.jsonl` + `test_3d.jsonl` (or `test.jsonl`) with the `img/` folder the card describes
(`filename` is relative to the dataset root; `images=` names another root). Question ids: "<type>-<idx>", e.g. "2D-0".
"""
from __future__ import annotations

from pathlib import Path

from minivar.errors import MinivarError

from .base import Benchmark, Question
from .common import (OPTION_LETTER, as_paths, bytes_image, file_image, glob_sorted, need, no_image, read_jsonl,
                     read_parquet)

COLUMNS = ("idx", "type", "task", "choices", "answer", "prompt", "source")
SOURCES_2D, SOURCES_3D = ("ADE20K", "COCO"), ("Omni3D",)


def extract_choice(text: str, three_d: bool) -> str:
    """ade_test.py / coco_test.py extract_mcq_answer; omni_test.py's strips ".:," instead of "."."""
    text = text.lower().strip()
    for keyword in ("answer is", "answer is:", "answer:"):
        if keyword in text:
            text = text.split(keyword)[-1]
    text = text.strip().rstrip(".:," if three_d else ".").lstrip("(").rstrip(")")
    return text[0] if len(text) > 1 else text


def is_correct(text: str, answer: str, choices: list[str], source: str) -> bool:
    three_d = source in SOURCES_3D
    choice = extract_choice(text, three_d)
    if choice == answer:
        return True
    # omni_test.py also compares with the choice text as given (only a one-character choice can ever match).
    index = ord(answer) - ord("a")
    return three_d and 0 <= index < len(choices) and choice == choices[index]


class CVBench(Benchmark):
    """CV-Bench with the Cambrian prompt and parser; the official 2D/3D/overall formula."""
    name = "cvbench"
    family = "vision"
    max_new_tokens = 512
    headline = "overall"

    def read(self, paths, images: Path | None = None, *, need_images: bool = True, **options):
        """`paths`: the dataset folder, or its test*.parquet / test*.jsonl files."""
        if options:
            raise MinivarError(f"cvbench: unknown option {sorted(options)[0]!r}")
        parquet, jsonl = [], []
        for p in as_paths(paths):
            if p.is_dir():
                # The hub snapshot has both forms side by side and no img/ folder: prefer the parquet with images.
                found = glob_sorted(p, "test*.parquet")
                if found:
                    parquet += found
                    continue
                found = glob_sorted(p, "test*.jsonl")
                if not found:
                    raise MinivarError(f"{p}: not a CV-Bench folder (expected test_2d/test_3d .parquet or .jsonl)")
                jsonl += found
            elif p.suffix == ".parquet":
                parquet.append(p)
            elif p.suffix == ".jsonl":
                jsonl.append(p)
            else:
                raise MinivarError(f"{p}: not CV-Bench data (expected test*.parquet or test*.jsonl)")
        records = []                                  # (where, row, image loader factory)
        for where, row in read_parquet(parquet, list(COLUMNS), optional=("image",)):
            records.append((where, row, lambda qid, w=where, cell=row.get("image"): bytes_image(cell, w, qid)))
        for f in jsonl:
            root = Path(images) if images is not None else f.parent
            for lineno, row in read_jsonl(f):
                where = f"{f}:{lineno}"
                need(row, COLUMNS + ("filename",), where)
                records.append((where, row, lambda qid, path=root / row["filename"]: file_image(path, qid)))

        questions, seen = [], set()
        for where, row, loader in records:
            need(row, COLUMNS, where)
            qid = f"{row['type']}-{row['idx']}"
            if qid in seen:
                raise MinivarError(f"{where}: CV-Bench question {qid} appears twice")
            seen.add(qid)
            answer = str(row["answer"]).strip()
            if len(answer) != 3 or answer[0] != "(" or answer[2] != ")":
                raise MinivarError(f"{where}: CV-Bench answer {row['answer']!r} is not like '(A)'")
            if row["source"] not in SOURCES_2D + SOURCES_3D:
                raise MinivarError(f"{where}: unknown CV-Bench source {row['source']!r} (ADE20K, COCO, Omni3D)")
            if not isinstance(row["choices"], list):
                raise MinivarError(f"{where}: CV-Bench choices are not a list")
            questions.append(Question(
                question_id=qid, prompt=row["prompt"] + OPTION_LETTER,
                image_key=str(row.get("filename") or qid),
                load_image=loader(qid) if need_images else no_image(qid),
                meta={"source": row["source"], "task": row["task"], "type": row["type"],
                      "answer": answer[1].lower(), "choices": list(row["choices"])}))
        if not questions:
            raise MinivarError("no CV-Bench questions read")
        return questions

    def score(self, answered: list[tuple[Question, str]]) -> dict:
        by_source: dict[str, list[bool]] = {}
        by_task: dict[str, list[bool]] = {}
        for q, text in answered:
            ok = is_correct(text, q.meta["answer"], q.meta["choices"], q.meta["source"])
            by_source.setdefault(q.meta["source"], []).append(ok)
            by_task.setdefault(q.meta["task"], []).append(ok)
        sources = {s: sum(v) / len(v) for s, v in by_source.items()}
        tasks = {t: sum(v) / len(v) for t, v in by_task.items()}

        def mean(values):
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None
        two_d = mean(sources.get(s) for s in SOURCES_2D)
        three_d = mean(sources.get(s) for s in SOURCES_3D)
        return {"2d": two_d, "3d": three_d, "overall": mean([two_d, three_d]), "sources": sources, "tasks": tasks}
