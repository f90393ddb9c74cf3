"""MMVP (Tong et al. 2024): 150 pairs of CLIP-blind images, one two-option question per image.

Prompt and grading are the Cambrian authors' deterministic protocol (`cambrian: eval/eval/mmvp/mmvp_eval.py` and
`mmvp_test.py`), since the paper's GPT-4-0314 grader (`MMVP: scripts/gpt_grader.py`) cannot be run any more:
- prompt: `Question + " Options:\\nA. <first>\\nB. <second>\\nAnswer with the option's letter from the given choices
  directly."`, vicuna_v1, pad-to-square, greedy, max_new_tokens 512;
- an answer is lower-cased and stripped, cut after the last "answer is" / "answer is:" / "answer:", stripped of
  trailing ".:," and of one "(" / ")" on either side; it is right iff it equals the letter ("a"/"b") or the text of
  the right option in lower case. "A", "(a)", "a.", "Open", "The answer is A" are right; "A. Open" is not.
- `pair_accuracy` (the MMVP metric): the share of pairs with both questions right; `question_accuracy` per question.

Layouts read:
- the `MMVP/MMVP` dataset folder: `Questions.csv` (header + 300 rows `Index,Question,Options,Correct Answer`; the
  first row is the header whatever it says, e.g. "lndex") + `MMVP Images/<n>.jpg`, where n is the row's position
  (1-based), as MMVP's own evaluate_mllm.py numbers the photos;
- the `lmms-lab-eval/MMVP` parquet shards (`data/train-*.parquet`, images embedded). That copy swaps the labels of
  rows 99/100 and 279/280 (the fixes of MMVP issues #14/#30); the CSV keeps the labels the papers used.
  Option `labels`: "original" (default: the papers' labels, from either copy), "corrected" (lmms-eval's fixes) or
  "as-read"; it acts only on the full 300-question benchmark.
Rows (1,2), (3,4), ... are the pairs; the scoring unit is the pair ("pair-<k>").
"""
from __future__ import annotations

import csv
from pathlib import Path

from minivar.errors import MinivarError

from .base import Benchmark, Question
from .common import OPTION_LETTER, as_paths, bytes_image, file_image, glob_sorted, no_image, read_parquet

CSV_NAME, IMAGE_DIR = "Questions.csv", "MMVP Images"
# The two pairs whose labels MMVP issues #14/#30 found swapped: photo id -> (original label, corrected label).
DISPUTED = {99: ("(a)", "(b)"), 100: ("(b)", "(a)"), 279: ("(a)", "(b)"), 280: ("(b)", "(a)")}


def prompt_of(question: str, options: str) -> str:
    """mmvp_eval.py's process(): "(a) Open (b) Closed" -> "\\nA. Open\\nB. Closed"."""
    parts = [part.strip() for part in options.split("(b)")]
    parts = [part.replace("(a)", "A.").replace("(b)", "B.") for part in parts]
    if len(parts) > 1:
        parts[1] = "B. " + parts[1]
    return question + " Options:" + "".join("\n" + part for part in parts) + OPTION_LETTER


def option_texts(options: str) -> list[str]:
    """mmvp_eval.py's give_options(): the text after each "(x)", stripped."""
    return [part.split(")")[1].strip() for part in options.split("(")[1:]]


def extract_choice(text: str) -> str:
    """mmvp_test.py's extract_mcq_answer (no cut to one character, unlike CV-Bench's)."""
    text = text.lower().strip()
    for keyword in ("answer is", "answer is:", "answer:"):
        if keyword in text:
            text = text.split(keyword)[-1]
    return text.strip().rstrip(".:,").lstrip("(").rstrip(")")


class MMVP(Benchmark):
    """MMVP with the Cambrian prompt and letter grader; pair accuracy."""
    name = "mmvp"
    family = "vision"
    max_new_tokens = 512
    headline = "pair_accuracy"

    def read(self, paths, images: Path | None = None, *, need_images: bool = True, labels: str = "original",
             **options):
        """`paths`: Questions.csv (images from `images=` or `MMVP Images/` beside it), its folder, or parquet."""
        if options:
            raise MinivarError(f"mmvp: unknown option {sorted(options)[0]!r}")
        if labels not in ("original", "corrected", "as-read"):
            raise MinivarError(f"mmvp: labels must be original, corrected or as-read, not {labels!r}")
        rows, parquet = [], []          # rows: (where, question, options, answer, image loader factory)
        for p in as_paths(paths):
            if p.is_dir() and (p / CSV_NAME).is_file():
                p = p / CSV_NAME
            if p.is_file() and p.suffix.lower() == ".csv":
                folder = Path(images) if images is not None else p.parent / IMAGE_DIR
                if need_images and not folder.is_dir():
                    raise MinivarError(f"MMVP images folder {folder} not found (--images)")
                rows += self._read_csv(p, folder)
            elif p.is_dir():
                shards = glob_sorted(p / "data", "*.parquet") or glob_sorted(p, "*.parquet")
                if not shards:
                    raise MinivarError(f"{p}: not an MMVP folder (expected {CSV_NAME} + '{IMAGE_DIR}/' or "
                                       f"lmms-lab-eval/MMVP parquet shards)")
                parquet += shards
            elif p.suffix == ".parquet":
                parquet.append(p)
            else:
                raise MinivarError(f"{p}: not MMVP data (expected {CSV_NAME} or .parquet shards)")
        if parquet:
            for where, row in read_parquet(parquet, ["Question", "Options", "Correct Answer"], optional=("image",)):
                rows.append((where, row["Question"], row["Options"], row["Correct Answer"],
                             lambda qid, w=where, cell=row.get("image"): bytes_image(cell, w, qid)))
        if not rows:
            raise MinivarError("no MMVP questions read")
        if len(rows) % 2:
            raise MinivarError(f"MMVP has {len(rows)} questions: pairs need an even number")

        questions = []
        for position, (where, question, options, answer, loader) in enumerate(rows):
            qid = str(position + 1)
            letter = answer.strip().lower()
            if len(rows) == 300 and position + 1 in DISPUTED and labels != "as-read":
                letter = DISPUTED[position + 1][labels == "corrected"]
            if letter not in ("(a)", "(b)"):
                raise MinivarError(f"{where}: MMVP answer {answer!r} is not (a) or (b)")
            texts = option_texts(options)
            if "(a)" not in options or "(b)" not in options or len(texts) < 2:
                raise MinivarError(f"{where}: MMVP options {options!r} are not '(a) ... (b) ...'")
            questions.append(Question(
                question_id=qid, prompt=prompt_of(question, options), image_key=qid,
                load_image=loader(qid) if need_images else no_image(qid), unit=f"pair-{position // 2 + 1}",
                meta={"answer": letter[1], "options": [t.lower() for t in texts]}))
        return questions

    @staticmethod
    def _read_csv(path: Path, folder: Path) -> list:
        try:
            # utf-8-sig drops a byte-order mark; the csv module handles commas inside quoted questions.
            with open(path, newline="", encoding="utf-8-sig") as f:
                table = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise MinivarError(f"{path}: cannot read ({e})") from None
        if table and table[0] and table[0][0].strip().isdigit():
            raise MinivarError(f"{path}:1: no header row (expected Index,Question,Options,Correct Answer)")
        rows = []
        for lineno, cells in enumerate(table[1:], 2):        # row 0 is the header, whatever its first cell says
            if not any(c.strip() for c in cells):
                continue
            if len(cells) < 4:
                raise MinivarError(f"{path}:{lineno}: expected 4 columns (Index,Question,Options,Correct Answer)")
            photo = folder / f"{len(rows) + 1}.jpg"          # MMVP's evaluate_mllm.py: photo id = row position + 1

            def loader(qid, photo=photo):
                return file_image(photo, qid)
            rows.append((f"{path}:{lineno}", cells[1], cells[2], cells[3], loader))
        return rows

    def score(self, answered: list[tuple[Question, str]]) -> dict:
        pairs: dict[str, list[bool]] = {}
        for q, text in answered:
            choice = extract_choice(text)
            right = q.meta["options"][ord(q.meta["answer"]) - ord("a")]
            pairs.setdefault(q.scoring_unit, []).append(choice == q.meta["answer"] or choice == right)
        results = [ok for pair in pairs.values() for ok in pair]
        for unit, pair in pairs.items():
            if len(pair) != 2:
                raise MinivarError(f"MMVP pair {unit} has {len(pair)} answered questions (expected 2)")
        return {"pair_accuracy": sum(all(p) for p in pairs.values()) / len(pairs) if pairs else 0.0,
                "question_accuracy": sum(results) / len(results) if results else 0.0}
