"""Answer files written by other code, and scoring them (the `score --bench NAME --answers FILE` path).

Two formats are read, one JSON object per line:
- LLaVA's `llava/eval/model_vqa_loader.py`: {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"};
  `text` was decoded with skip_special_tokens and stripped.
- the official VAR code (`VisAttnSink: src/inference.py`): {"question_id", "prompt", "label", "response", "image",
  "model_id"}; `response` is `tokenizer.batch_decode(outputs.sequences)[0]` WITHOUT skip_special_tokens, e.g.
  "No</s>". Its POPE scorer then reads a `text` key the file does not have; here the LLaMA special tokens are removed
  and the text stripped, which is what LLaVA's decoding gives (eval_pope.py would count "No</s>" as yes).
  MMVP's own evaluate_mllm.py also writes `response` (with "</s>" already removed).

For POPE with LLaVA's combined question file (`questions_path`, e.g. llava_pope_test.jsonl) scoring reproduces
`llava/eval/eval_pope.py`: each answer's split is its question's `category` there, and within a split answers are
matched to the annotation labels by position (answer-file order against annotation-file order), as eval_pope.py's
zip does. Unlike eval_pope.py, a count that differs, or a position where the question text differs (answers made
for another POPE version), is an error instead of silently misaligned numbers.
Without it, POPE answers match by id (LLaVA's offset ids are minivar's), and a per-split file numbering its split
1..N (VAR's) matches when that one split is scored; an answer whose prompt lacks its question's text is an error.
For MME, LLaVA's answers carry the image path as question_id for both questions of an image; they are matched to
questions by (image, question text) as LLaVA's `convert_answer_to_mme.py` does.
Everything else is matched by question_id. Answers to questions not read are ignored; a question without an answer
is an error naming how many are missing.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from minivar.errors import MinivarError

from .base import Question
from .common import read_jsonl

SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")     # LLaMA's, plus the <pad> llava-hf adds


@dataclass(frozen=True)
class Answer:
    line: int
    question_id: str
    text: str
    prompt: str | None


def clean_response(response: str) -> str:
    """A VAR `response` as skip_special_tokens=True + strip would have decoded it."""
    for token in SPECIAL_TOKENS:
        response = response.replace(token, "")
    return response.strip()


def read_answers(path) -> list[Answer]:
    """Every answer of a LLaVA or VAR answer file, in file order (ids may repeat: LLaVA's MME files)."""
    path = Path(path)
    if not path.is_file():
        raise MinivarError(f"answers file {path} not found")
    out = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        qid = rec.get("question_id")
        if qid is None or isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise MinivarError(f"{where}: missing or invalid 'question_id'")
        if isinstance(rec.get("text"), str):
            text = rec["text"]
        elif isinstance(rec.get("response"), str):
            text = clean_response(rec["response"])
        else:
            raise MinivarError(f"{where}: no answer ('text' or 'response' string)")
        prompt = rec.get("prompt")
        out.append(Answer(lineno, str(qid), text, prompt if isinstance(prompt, str) else None))
    return out


def read_answer_file(path) -> dict[str, str]:
    """question_id -> answer text.

    An id that occurs more than once with different prompts (LLaVA's MME answer files give both questions of an
    image the image path) is numbered in file order, "<id>#1", "<id>#2": minivar's MME question ids. An id repeated
    with the same prompt is a duplicated answer: an error.
    """
    answers = read_answers(path)
    by_id: dict[str, list[Answer]] = {}
    for a in answers:
        by_id.setdefault(a.question_id, []).append(a)
    out = {}
    for qid, group in by_id.items():
        if len(group) == 1:
            out[qid] = group[0].text
            continue
        prompts = [a.prompt for a in group]
        if None in prompts or len(set(prompts)) < len(prompts):
            raise MinivarError(f"{path}:{group[1].line}: question_id {qid} answered twice "
                               f"(first at line {group[0].line})")
        for k, a in enumerate(group, 1):
            out[f"{qid}#{k}"] = a.text
    return out


def score_answer_file(bench_name: str, data_paths, answers_path, questions_path=None) -> dict:
    """Score an existing answer file against the benchmark's data: the dict `get(bench_name).score` returns."""
    from . import get
    from .mme import MME
    from .pope import Pope
    bench = get(bench_name)
    # Scoring needs no pixels: readers that can skip locating the images are told so.
    options = {"need_images": False} if "need_images" in inspect.signature(bench.read).parameters else {}
    questions = bench.read(data_paths, **options)
    answers = read_answers(answers_path)
    path = Path(answers_path)
    if questions_path is not None:
        if not isinstance(bench, Pope):
            raise MinivarError(f"a question file (questions_path) is only used for pope, not {bench_name}")
        answered = _match_pope_by_position(questions, answers, Path(questions_path), path)
    elif isinstance(bench, Pope):
        answered = _match_by_id(questions, answers, path, _pope_finder(questions, path))
    elif isinstance(bench, MME):
        answered = _match_by_id(questions, answers, path, _mme_finder(questions))
    else:
        by_id = {q.question_id: q for q in questions}
        answered = _match_by_id(questions, answers, path, lambda a: by_id.get(a.question_id))
    return bench.score(answered)


def _match_by_id(questions: list[Question], answers: list[Answer], path: Path, find):
    """Each question's answer via `find(answer) -> Question | None`; every question needs exactly one."""
    given: dict[str, tuple[Question, str, int]] = {}
    for a in answers:
        q = find(a)
        if q is None:
            continue                    # an answer to a question not read (another split, subset): ignored
        if q.question_id in given:
            raise MinivarError(f"{path}:{a.line}: question {q.question_id} answered twice "
                               f"(first at line {given[q.question_id][2]})")
        given[q.question_id] = (q, a.text, a.line)
    missing = [q.question_id for q in questions if q.question_id not in given]
    if missing:
        raise MinivarError(f"{path}: {len(missing)} of the {len(questions)} questions have no answer "
                           f"(first: question {missing[0]})")
    return [(given[q.question_id][0], given[q.question_id][1]) for q in questions]


def _pope_finder(questions: list[Question], path: Path):
    """POPE answers by id: LLaVA's offset ids, or, when one split is scored, the bare POPE ids 1..N that per-split
    answer files (VAR's inference.py, POPE's own) carry. An answer whose prompt lacks its question's text is an
    error: ids alone cannot tell one split (or POPE version) from another."""
    from .common import SHORT_ANSWER
    from .pope import LLAVA_OFFSETS, question_id
    by_id = {q.question_id: q for q in questions}
    splits = {q.meta["split"] for q in questions}
    only = splits.pop() if len(splits) == 1 else None

    def find(a: Answer):
        q = by_id.get(a.question_id)
        if q is None and only is not None and a.question_id.isdigit() and int(a.question_id) < LLAVA_OFFSETS["random"]:
            q = by_id.get(question_id(only, a.question_id))
        # Any prompt format that records the question contains its text (LLaVA's, VAR's, a full chat prompt).
        if q is not None and a.prompt and q.prompt.removesuffix(SHORT_ANSWER) not in a.prompt:
            raise MinivarError(f"{path}:{a.line}: the answer to {a.prompt!r} has the id of POPE {q.meta['split']} "
                               f"question {q.question_id} {q.prompt!r} (answers for another split or version?)")
        return q
    return find


def _mme_finder(questions: list[Question]):
    """MME answers by minivar id ("<image>#k"), else as LLaVA's: image path + the question text."""
    by_id = {q.question_id: q for q in questions}
    by_text = {(q.unit, q.meta["question"]): q for q in questions}

    def find(a: Answer):
        q = by_id.get(a.question_id)
        if q is None and a.prompt is not None:
            q = by_text.get((a.question_id, _mme_question(a.prompt, a.question_id, by_text)))
        return q
    return find


def _mme_question(prompt: str, image: str, by_text: dict) -> str:
    """convert_answer_to_mme.py: the prompt back to the ground-truth file's question (7 have a double space)."""
    instruction = "Answer the question using a single word or phrase."
    if instruction in prompt:
        prompt = prompt.replace(instruction, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt = prompt + " Please answer yes or no."
        if (image, prompt) not in by_text:
            prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
    return prompt


def _match_pope_by_position(questions: list[Question], answers: list[Answer], questions_path: Path, path: Path):
    """eval_pope.py's matching: split from the question file's category, then position within the split."""
    category, text = {}, {}
    for lineno, rec in read_jsonl(questions_path):
        if "question_id" not in rec or "category" not in rec:
            raise MinivarError(f"{questions_path}:{lineno}: missing key "
                               f"{'question_id' if 'question_id' not in rec else 'category'!r}")
        category[str(rec["question_id"])] = rec["category"]
        text[str(rec["question_id"])] = rec.get("text")
    for a in answers:
        if a.question_id not in category:
            raise MinivarError(f"{path}:{a.line}: question_id {a.question_id} is not in {questions_path}")
    splits: dict[str, list[Question]] = {}
    for q in questions:
        splits.setdefault(q.meta["split"], []).append(q)
    answered = []
    for split, split_questions in splits.items():
        cur = [a for a in answers if category[a.question_id] == split]
        if len(cur) < len(split_questions):
            raise MinivarError(f"{path}: {len(split_questions) - len(cur)} of the {len(split_questions)} POPE "
                               f"{split} questions have no answer")
        if len(cur) > len(split_questions):
            raise MinivarError(f"{path}: {len(cur)} answers for the {len(split_questions)} POPE {split} questions "
                               f"(the annotation file is from another POPE version?)")
        for q, a in zip(split_questions, cur):
            if text[a.question_id] is not None and text[a.question_id] != q.prompt:
                raise MinivarError(f"{path}:{a.line}: answer to {text[a.question_id]!r} lines up with POPE {split} "
                                   f"question {q.question_id} {q.prompt!r} (files from different POPE versions?)")
            answered.append((q, a.text))
    return answered
