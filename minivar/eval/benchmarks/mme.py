"""MME (Fu et al. 2023): 14 yes/no subtasks, two questions (one "Yes", one "No") per image.

Reproduces LLaVA's `convert_answer_to_mme.py` followed by MME's official `eval_tool/calculation.py`: an answer is
lower-cased (not stripped), "yes"/"no" as a whole, else the first four characters decide ("Not sure" -> no,
"Yes and no" -> yes, "  yes" -> other); per subtask the score is acc*100 + acc+*100, where acc+ is the share of images
whose two questions are both right; Perception and Cognition are the sums of their subtasks' scores.

Layouts read:
- `MME_Benchmark_release_version/`: `<subtask>/questions_answers_YN/<id>.txt` + `<subtask>/images/<id>.jpg` for
  artwork, celebrity, landmark, posters and scene; `<subtask>/<id>.txt` beside `<id>.jpg|png` for the other nine.
  Each txt holds two lines `question<TAB>Yes|No`.
- the `lmms-lab/MME` parquet shards (`data/test-*.parquet`: question_id, image, question, answer, category).

Prompt as LLaVA's `llava_mme.jsonl`: the question without " Please answer yes or no." (right-stripped, which also
handles the 7 questions with two spaces before it) + "\nAnswer the question using a single word or phrase.".
Question ids: LLaVA's `llava_mme.jsonl` gives both questions of an image the same id, the relative image path
(e.g. "artwork/images/10002.jpg"); ids must be unique here, so the questions are "<path>#1" and "<path>#2" in the
order of the txt file (the order of llava_mme.jsonl). The scoring unit is the image path.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from minivar.errors import MinivarError

from .base import Benchmark, Question
from .common import SHORT_ANSWER, as_paths, bytes_image, file_image, glob_sorted, no_image, read_parquet

# calculation.py's eval_type_dict: the order matters only for the float sums, which follow it.
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
WITH_SUBFOLDERS = ("artwork", "celebrity", "landmark", "posters", "scene")
SUFFIX = " Please answer yes or no."


def prompt_of(question: str) -> str:
    return question.replace(SUFFIX, "").rstrip() + SHORT_ANSWER


def parse_answer(text: str) -> str:
    """calculation.py's parse_pred_ans on the 4th column of a results line, which still ends in "\\n"."""
    p = (text + "\n").lower()
    if p in ("yes", "no"):         # never true with the newline kept: as in the official tool
        return p
    prefix = p[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


class MME(Benchmark):
    """MME with LLaVA-1.5's prompt; scored as MME's calculation.py (acc + acc+ per subtask)."""
    name = "mme"
    family = "general"
    max_new_tokens = 128
    headline = "perception"

    def read(self, paths, images: Path | None = None, *, need_images: bool = True, **options):
        """`paths`: the MME_Benchmark_release_version folder, or lmms-lab/MME parquet shards / their folder."""
        if options:
            raise MinivarError(f"mme: unknown option {sorted(options)[0]!r}")
        questions: list[Question] = []
        parquet = []
        for p in as_paths(paths):
            if p.is_dir() and any((p / s).is_dir() for s in SUBTASKS):
                questions += self._read_release(p, need_images)
            elif p.is_dir():
                shards = glob_sorted(p / "data", "*.parquet") or glob_sorted(p, "*.parquet")
                if not shards:
                    raise MinivarError(f"{p}: not an MME folder (expected MME_Benchmark_release_version with the "
                                       f"subtask folders, or lmms-lab/MME parquet shards)")
                parquet += shards
            elif p.suffix == ".parquet":
                parquet.append(p)
            else:
                raise MinivarError(f"{p}: not MME data (expected the MME_Benchmark_release_version folder or "
                                   f".parquet shards)")
        if parquet:
            questions += self._read_parquet(parquet, need_images)
        self._check(questions)
        return questions

    def _read_release(self, root: Path, need_images: bool) -> list[Question]:
        questions = []
        absent = [subtask for subtask in SUBTASKS if not (root / subtask).is_dir()]
        if absent:      # a subset runs (each subtask is scored on its own); Perception/Cognition then sum fewer
            warnings.warn(f"{root}: {len(absent)} of the 14 MME subtask folders are missing ({', '.join(absent)}): "
                          f"reading the others; Perception and Cognition sum only the subtasks read, so they are "
                          f"not comparable with published totals", stacklevel=2)
        for subtask in SUBTASKS:
            folder = root / subtask
            if subtask in absent:
                continue
            qa_dir, image_dir = ((folder / "questions_answers_YN", folder / "images")
                                 if subtask in WITH_SUBFOLDERS else (folder, folder))
            txts = glob_sorted(qa_dir, "*.txt")
            if not txts:
                raise MinivarError(f"{qa_dir}: no MME question files (<id>.txt)")
            for txt in txts:
                image = self._image_file(image_dir, txt.stem, subtask)
                if need_images and not image.is_file():
                    raise MinivarError(f"image {image.relative_to(root)} of MME questions {txt} not found")
                relpath = image.relative_to(root).as_posix()
                pairs = []
                try:
                    lines = txt.read_text(encoding="utf-8").splitlines()
                except (OSError, UnicodeDecodeError) as e:
                    raise MinivarError(f"{txt}: cannot read ({e})") from None
                for lineno, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    cells = line.split("\t")
                    if len(cells) != 2:
                        raise MinivarError(f"{txt}:{lineno}: expected 'question<TAB>Yes|No'")
                    pairs.append((lineno, cells[0], cells[1].strip()))
                for k, (lineno, question, answer) in enumerate(pairs, 1):
                    qid = f"{relpath}#{k}"
                    load = file_image(image, qid, check=False) if need_images else no_image(qid)
                    questions.append(self._question(qid, relpath, question, answer, subtask, load, f"{txt}:{lineno}"))
        return questions

    @staticmethod
    def _image_file(folder: Path, stem: str, subtask: str) -> Path:
        for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG"):
            if (folder / (stem + ext)).is_file():
                return folder / (stem + ext)
        # Not there: the release's own extension (PNG for the cognition subtasks), so the error names a real file.
        return folder / (stem + (".png" if subtask in COGNITION else ".jpg"))

    def _read_parquet(self, shards: list[Path], need_images: bool) -> list[Question]:
        questions, count = [], {}
        for where, row in read_parquet(shards, ["question_id", "question", "answer", "category"],
                                       optional=("image",)):
            relpath = str(row["question_id"])
            count[relpath] = count.get(relpath, 0) + 1
            qid = f"{relpath}#{count[relpath]}"
            load = bytes_image(row.get("image"), where, qid) if need_images else no_image(qid)
            questions.append(self._question(qid, relpath, row["question"], row["answer"], row["category"], load,
                                            where))
        return questions

    @staticmethod
    def _question(qid, relpath, question, answer, subtask, load, where) -> Question:
        if answer.lower() not in ("yes", "no"):
            raise MinivarError(f"{where}: MME answer {answer!r} is not Yes or No")
        if subtask not in SUBTASKS:
            raise MinivarError(f"{where}: unknown MME subtask {subtask!r}")
        return Question(question_id=qid, prompt=prompt_of(question), image_key=relpath, load_image=load,
                        unit=relpath, meta={"subtask": subtask, "label": answer.lower(), "question": question})

    @staticmethod
    def _check(questions: list[Question]) -> None:
        per_image: dict[str, int] = {}
        for q in questions:
            per_image[q.unit] = per_image.get(q.unit, 0) + 1
        for image, n in per_image.items():
            if n != 2:      # acc+ is defined on exactly two questions per image
                raise MinivarError(f"MME image {image} has {n} questions (expected 2)")

    def score(self, answered: list[tuple[Question, str]]) -> dict:
        # unit -> list of (subtask, correct); grouped by the unit, not by file adjacency (same result in order).
        units: dict[str, list] = {}
        for q, text in answered:
            units.setdefault(q.scoring_unit, []).append((q.meta["subtask"], parse_answer(text) == q.meta["label"]))
        per_task: dict[str, list] = {}
        for unit, results in units.items():
            if len(results) != 2:
                raise MinivarError(f"MME image {unit} has {len(results)} answered questions (expected 2)")
            per_task.setdefault(results[0][0], []).append(results)
        subtasks = {}
        for task in SUBTASKS:
            if task not in per_task:
                continue
            images = per_task[task]
            acc = sum(ok for pair in images for _, ok in pair) / (2 * len(images))
            acc_plus = sum(all(ok for _, ok in pair) for pair in images) / len(images)
            subtasks[task] = acc * 100 + acc_plus * 100
        # calculation.py starts from an int 0 (`scores = 0`); a float here prints a total with no subtask in the
        # same format as the other (0.0000 beside 0.0000)
        total = {"perception": 0.0, "cognition": 0.0}
        for task, score in subtasks.items():
            total["perception" if task in PERCEPTION else "cognition"] += score
        return {"perception": total["perception"], "cognition": total["cognition"], "subtasks": subtasks}
