"""Benchmark readers and official scorers (minivar/eval/benchmarks): golden numbers of the official scripts on real
data (../shared/testdata/eval), and tiny fixtures written here in exactly the real formats."""
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import SHARED
from minivar.errors import MinivarError
from minivar.eval.benchmarks import BENCHMARKS, get
from minivar.eval.benchmarks.answers import read_answer_file, score_answer_file
from minivar.eval.benchmarks.cvbench import CVBench
from minivar.eval.benchmarks.mme import MME, SUBTASKS, WITH_SUBFOLDERS
from minivar.eval.benchmarks.mme import parse_answer as mme_parse
from minivar.eval.benchmarks.pope import parse_answer as pope_parse

SHARED_EVAL = SHARED / "testdata" / "eval"
SUFFIX = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def shared(*parts) -> Path:
    path = SHARED_EVAL.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found (needs the shared test data next to the repo)")
    return path


def image_bytes(color=(200, 10, 10), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(color, "JPEG" if path.suffix == ".jpg" else "PNG"))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))      # json.dumps separators, as the real files
    return path


def write_parquet(path: Path, columns: dict, types: dict | None = None) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])     # the HF `Image` feature
    arrays = {}
    for name, values in columns.items():
        kind = (types or {}).get(name) or (image_type if name == "image" else None)
        arrays[name] = pa.array(values, type=kind)
    pq.write_table(pa.table(arrays), path)
    return path


def answered_with(questions, answers: dict):
    return [(q, answers[q.question_id]) for q in questions]


# ------------------------------------------------------------------------------------------------ registry
def test_registry_and_unknown_name():
    assert list(BENCHMARKS) == ["pope", "mme", "chair", "mmvp", "cvbench", "gqa"]
    for name in ("pope", "mme", "mmvp", "cvbench", "gqa"):
        bench = get(name)
        assert bench.name == name and bench.conv_mode == "vicuna_v1" and bench.image_aspect_ratio == "pad"
    assert (get("pope").family, get("mmvp").family, get("cvbench").family, get("mme").family,
            get("gqa").family) == ("hallucination", "vision", "vision", "general", "general")
    assert (get("pope").max_new_tokens, get("mme").max_new_tokens, get("gqa").max_new_tokens,
            get("mmvp").max_new_tokens, get("cvbench").max_new_tokens) == (128, 128, 128, 512, 512)
    with pytest.raises(MinivarError, match="unknown benchmark 'vqa'.*pope, mme, chair, mmvp, cvbench, gqa"):
        get("vqa")


# ------------------------------------------------------------------------------------------------ real data
def test_pope_reproduces_eval_pope_on_llava_13b_answers():
    pope = shared("pope")
    expected = json.loads((pope / "expected-llava-v1.5-13b.json").read_text())
    got = score_answer_file("pope", [pope], pope / "llava-v1.5-13b-answers.jsonl",
                            questions_path=pope / "llava_pope_test.jsonl")
    for split in ("adversarial", "random", "popular"):
        for key, value in expected[split].items():
            assert got[split][key] == value, (split, key)
    assert got["mean"]["f1"] == expected["mean_f1"]
    assert round(got["mean"]["f1"], 5) == 0.85947
    # The same answers matched by question id (LLaVA's offsets are minivar's POPE ids) give the same numbers.
    assert score_answer_file("pope", [pope], pope / "llava-v1.5-13b-answers.jsonl") == got


def test_pope_reader_ids_and_prompts_equal_llava_question_file(tmp_path):
    pope = shared("pope")
    questions = get("pope").read([pope], images=tmp_path, need_images=False)
    llava = [json.loads(line) for line in (pope / "llava_pope_test.jsonl").read_text().splitlines()]
    mine = {q.question_id: q for q in questions}
    assert len(mine) == len(llava) == 8910
    for rec in llava:
        q = mine[str(rec["question_id"])]
        assert q.prompt == rec["text"] and q.meta["split"] == rec["category"] and q.image_key == rec["image"]


def test_mme_reproduces_calculation_py_on_llava_13b_answers():
    mme = shared("mme")
    got = score_answer_file("mme", [mme / "MME_Benchmark_release_version"], mme / "llava-v1.5-13b-answers.jsonl")
    assert got["perception"] == pytest.approx(1531.3187274909965, abs=1e-9)
    assert got["cognition"] == pytest.approx(295.3571428571429, abs=1e-9)
    table = {"existence": 185.0, "count": 155.0, "position": 133.33333333333334, "color": 170.0,
             "posters": 160.54421768707482, "celebrity": 152.94117647058823, "scene": 161.25, "landmark": 170.5,
             "artwork": 117.75, "OCR": 125.0, "commonsense_reasoning": 127.85714285714286,
             "numerical_calculation": 42.5, "text_translation": 77.5, "code_reasoning": 47.5}
    assert set(got) == {"perception", "cognition", "subtasks"}
    assert got["subtasks"].keys() == table.keys()
    for task, score in table.items():
        assert got["subtasks"][task] == pytest.approx(score, abs=1e-9), task


def test_mme_reader_prompts_equal_llava_mme_jsonl():
    mme = shared("mme")
    questions = get("mme").read([mme / "MME_Benchmark_release_version"])
    llava: dict[str, list[str]] = {}
    for line in (mme / "llava_mme.jsonl").read_text().splitlines():
        rec = json.loads(line)
        llava.setdefault(rec["question_id"], []).append(rec["text"])
    mine: dict[str, list[str]] = {}
    for q in questions:
        mine.setdefault(q.unit, []).append(q.prompt)
        assert q.question_id == f"{q.unit}#{len(mine[q.unit])}" and q.image_key == q.unit
    assert len(questions) == 2374 and mine == llava       # same ids, same two prompts per image, same order
    # read_answer_file numbers LLaVA's repeated MME ids the same way, so they map onto minivar's ids.
    answers = read_answer_file(mme / "llava-v1.5-13b-answers.jsonl")
    assert set(answers) == {q.question_id for q in questions}


# ------------------------------------------------------------------------------------------------ POPE
@pytest.mark.parametrize("text, parsed", [
    ("No, there is not.", "no"), ("Yes.", "yes"), ("No.", "no"), ("No", "no"), ("no", "no"), ("not", "no"),
    ("There is no dog in the image", "no"), ("Yes, there is no doubt.", "no"),
    ("NO", "yes"), ("Nope", "yes"), ("", "yes"), ("No</s>", "yes"), ("No\nthere is", "yes"),
    ("Yes. No.", "yes"), ("No,", "no")])
def test_pope_parse_is_eval_pope_rule(text, parsed):
    # first sentence (cut at the first '.'), commas removed, split on single spaces, case-sensitive words
    assert pope_parse(text) == parsed


def write_pope(root: Path, splits=("adversarial", "random"), labels=("yes", "no", "yes", "no")) -> Path:
    for split in splits:
        write_jsonl(root / f"coco_pope_{split}.json", [
            {"question_id": i + 1, "image": f"COCO_val2014_{(i // 2) + 1:012d}.jpg",
             "text": f"Is there a {obj} in the image?", "label": label}
            for i, (obj, label) in enumerate(zip(["dog", "cat", "car", "imange"], labels))])
    for k in (1, 2):
        write_image(root / "val2014" / f"COCO_val2014_{k:012d}.jpg")
    return root


def test_pope_reader_annotation_layout(tmp_path):
    root = write_pope(tmp_path)
    questions = get("pope").read([root], images=root / "val2014")
    assert [q.question_id for q in questions] == ["1", "2", "3", "4", "10000001", "10000002", "10000003",
                                                  "10000004"]
    q = questions[5]
    assert q.prompt == "Is there a cat in the image?" + SUFFIX
    assert q.meta == {"split": "random", "label": "no"} and q.scoring_unit == q.question_id
    assert q.image_key == "COCO_val2014_000000000001.jpg"
    assert q.load_image().size == (4, 3)
    # one annotation file named directly, filtered by split
    only = get("pope").read([root], images=root / "val2014", splits="random")
    assert len(only) == 4 and {q.meta["split"] for q in only} == {"random"}


def test_pope_scorer_hand_computed(tmp_path):
    root = write_pope(tmp_path, labels=("yes", "no", "yes", "no"))
    questions = get("pope").read([root], images=root / "val2014")
    answers = {"1": "Yes.", "2": "No, there is not.", "3": "No</s>", "4": "Yes",          # TP TN TP FP
               "10000001": "No", "10000002": "no", "10000003": "yes", "10000004": "NO"}   # FN TN TP FP
    got = get("pope").score(answered_with(questions, answers))
    assert got["adversarial"] == {"accuracy": 0.75, "precision": 2 / 3, "recall": 1.0, "f1": 0.8,
                                  "yes_ratio": 0.75, "n": 4, "TP": 2, "FP": 1, "TN": 1, "FN": 0}
    assert got["random"] == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5,
                             "n": 4, "TP": 1, "FP": 1, "TN": 1, "FN": 1}
    assert got["mean"] == pytest.approx({"accuracy": 0.625, "precision": 7 / 12, "recall": 0.75, "f1": 0.65,
                                         "yes_ratio": 0.625})
    # no predicted yes at all: eval_pope.py would divide by zero; the ratios are 0
    silent = get("pope").score([(q, "No") for q in questions if q.meta["split"] == "random"])
    assert silent["random"]["precision"] == 0.0 and silent["random"]["f1"] == 0.0


def test_pope_reader_parquet_layouts(tmp_path):
    rows = {"id": ["0", "1", "2"], "question_id": ["1", "2", "1"],
            "question": ["Is there a dog in the image?", "Is there a cat in the image?", "Is there a cup in the image?"],
            "answer": ["yes", "no", "no"], "image_source": ["COCO_val2014_000000000001"] * 3,
            "image": [{"bytes": image_bytes(), "path": None}] * 3, "category": ["adversarial", "adversarial", "popular"]}
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    # the Full config holds the same rows again: a folder with both must not read them twice
    write_parquet(tmp_path / "Full" / "adversarial-00000-of-00001.parquet", rows)
    questions = get("pope").read([tmp_path])
    assert [q.question_id for q in questions] == ["1", "2", "20000001"]
    assert questions[2].prompt == "Is there a cup in the image?" + SUFFIX
    assert questions[2].image_key == "COCO_val2014_000000000001.jpg"
    assert questions[0].load_image().getpixel((0, 0)) == (200, 10, 10)
    assert len(get("pope").read([tmp_path / "Full"])) == 3


def test_pope_bad_inputs(tmp_path):
    root = write_pope(tmp_path)
    pope = get("pope")
    with pytest.raises(MinivarError, match="val2014 images folder"):
        pope.read([root])
    (root / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(MinivarError, match=r"COCO_val2014_000000000002\.jpg of question 3 not found"):
        pope.read([root / "coco_pope_adversarial.json"], images=root / "val2014")
    bad = tmp_path / "bad"
    write_jsonl(bad / "coco_pope_popular.json", [{"question_id": 1, "image": "a.jpg", "text": "?", "label": "Yes"}])
    with pytest.raises(MinivarError, match=r"coco_pope_popular\.json:1: POPE label 'Yes' is not yes or no"):
        pope.read([bad], need_images=False)
    write_jsonl(bad / "coco_pope_popular.json", [{"question_id": 1, "image": "a.jpg", "text": "?"}])
    with pytest.raises(MinivarError, match=r"coco_pope_popular\.json:1: missing key 'label'"):
        pope.read([bad], need_images=False)
    (bad / "coco_pope_popular.json").write_text('{"question_id": 1}\n{"question_id": 2, \n')
    with pytest.raises(MinivarError, match=r"coco_pope_popular\.json:2: not a JSON object"):
        pope.read([bad], need_images=False)
    write_jsonl(bad / "coco_pope_popular.json", [{"question_id": "q1", "image": "a.jpg", "text": "?", "label": "no"}])
    with pytest.raises(MinivarError, match=r"coco_pope_popular\.json:1: POPE question_id 'q1' is not a whole number"):
        pope.read([bad], need_images=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinivarError, match="no POPE data here"):
        pope.read([tmp_path / "empty"])
    with pytest.raises(MinivarError, match="not a POPE file"):
        pope.read([write_jsonl(tmp_path / "llava_pope_test.jsonl", [])])
    with pytest.raises(MinivarError, match="no such file"):
        pope.read([tmp_path / "nowhere"])


def test_pope_parquet_missing_column(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet",
                  {"question_id": ["1"], "question": ["?"], "answer": ["yes"], "category": ["random"]})
    with pytest.raises(MinivarError, match=r"test-00000-of-00001\.parquet: no column 'image_source'"):
        get("pope").read([tmp_path])


# ------------------------------------------------------------------------------------------------ answer files
def test_answer_files_llava_and_var(tmp_path):
    llava = write_jsonl(tmp_path / "llava.jsonl", [
        {"question_id": 1, "prompt": "Is there a dog?" + SUFFIX, "text": "No", "answer_id": "x", "model_id": "m",
         "metadata": {}}])
    assert read_answer_file(llava) == {"1": "No"}
    var = write_jsonl(tmp_path / "var.jsonl", [
        {"question_id": 1, "prompt": "Is there a dog?", "label": "yes", "response": "No</s>", "image": "a.jpg",
         "model_id": "m"},
        {"question_id": "2", "prompt": "Is there a cat?", "label": "no", "response": "<s> Yes, there is.</s>",
         "image": "b.jpg", "model_id": "m"}])
    assert read_answer_file(var) == {"1": "No", "2": "Yes, there is."}     # as skip_special_tokens + strip
    write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "answer": "No"}])
    with pytest.raises(MinivarError, match=r"bad\.jsonl:1: no answer \('text' or 'response' string\)"):
        read_answer_file(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "No"}])
    with pytest.raises(MinivarError, match=r"bad\.jsonl:1: missing or invalid 'question_id'"):
        read_answer_file(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "No"}\nNo\n')
    with pytest.raises(MinivarError, match=r"bad\.jsonl:2: not a JSON object"):
        read_answer_file(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "dup.jsonl", [{"question_id": 1, "prompt": "a", "text": "No"},
                                         {"question_id": 1, "prompt": "a", "text": "Yes"}])
    with pytest.raises(MinivarError, match=r"dup\.jsonl:2: question_id 1 answered twice \(first at line 1\)"):
        read_answer_file(tmp_path / "dup.jsonl")
    with pytest.raises(MinivarError, match="answers file .*missing.jsonl not found"):
        read_answer_file(tmp_path / "missing.jsonl")


def test_score_answer_file_pope_errors(tmp_path):
    root = write_pope(tmp_path / "data")
    questions = write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": offset + i, "image": "x.jpg", "text": f"Is there a {obj} in the image?" + SUFFIX,
         "category": split}
        for split, offset in (("adversarial", 0), ("random", 10000000))
        for i, obj in enumerate(["dog", "cat", "car", "imange"], 1)])
    answers = [{"question_id": offset + i, "prompt": "", "text": text}
               for offset in (0, 10000000) for i, text in enumerate(["Yes", "No", "Yes", "Yes"], 1)]
    write_jsonl(tmp_path / "answers.jsonl", answers)
    got = score_answer_file("pope", [root], tmp_path / "answers.jsonl", questions_path=questions)
    assert got["adversarial"]["accuracy"] == 0.75 and got["random"]["FP"] == 1
    write_jsonl(tmp_path / "short.jsonl", answers[:2] + answers[4:])
    with pytest.raises(MinivarError, match=r"short\.jsonl: 2 of the 4 POPE adversarial questions have no answer"):
        score_answer_file("pope", [root], tmp_path / "short.jsonl", questions_path=questions)
    with pytest.raises(MinivarError, match=r"short\.jsonl: 2 of the 8 questions have no answer \(first: question 3\)"):
        score_answer_file("pope", [root], tmp_path / "short.jsonl")
    # answers made for another POPE version: same count, other questions at the same positions
    write_jsonl(tmp_path / "other.jsonl", [answers[1], answers[0]] + answers[2:])
    with pytest.raises(MinivarError, match=r"other\.jsonl:1: answer to 'Is there a cat.*lines up with POPE "
                                           r"adversarial question 1"):
        score_answer_file("pope", [root], tmp_path / "other.jsonl", questions_path=questions)
    # VAR's per-split answer files number each split 1..N and decode with special tokens: scored split by split
    var = write_jsonl(tmp_path / "var_random.jsonl", [
        {"question_id": i, "prompt": f"Is there a {obj} in the image?", "label": "-", "response": text + "</s>",
         "image": "x.jpg", "model_id": "m"}
        for i, (obj, text) in enumerate(zip(["dog", "cat", "car", "imange"], ["Yes", "No", "Yes", "Yes"]), 1)])
    by_var = score_answer_file("pope", [root / "coco_pope_random.json"], var)
    assert by_var["random"] == got["random"] and list(by_var) == ["random", "mean"]
    write_jsonl(tmp_path / "swapped.jsonl", [{**answers[0], "prompt": "Is there a cat in the image?" + SUFFIX}])
    with pytest.raises(MinivarError, match=r"swapped\.jsonl:1: the answer to 'Is there a cat in the image\?\\nAnswer"
                                           r".*' has the id of POPE adversarial question 1 'Is there a dog"):
        score_answer_file("pope", [root / "coco_pope_adversarial.json"], tmp_path / "swapped.jsonl")
    write_jsonl(tmp_path / "stray.jsonl", answers + [{"question_id": 99, "text": "No"}])
    with pytest.raises(MinivarError, match=r"stray\.jsonl:9: question_id 99 is not in"):
        score_answer_file("pope", [root], tmp_path / "stray.jsonl", questions_path=questions)


# ------------------------------------------------------------------------------------------------ MME
@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No", "no"), ("yes", "yes"), ("Not sure", "no"), ("None", "no"), ("Yes and no", "yes"),
    (" yes", "yes"), ("  yes", "other"), ("I think yes", "other"), ("", "other"), ("y", "other")])
def test_mme_parse_is_calculation_py_rule(text, parsed):
    # lower-cased, never stripped; "yes"/"no" within the first four characters (so " yes" is yes, "  yes" other)
    assert mme_parse(text) == parsed


def write_mme(root: Path) -> Path:
    """A release folder with every subtask: one image each, two (Yes, No) questions; color has a double space."""
    for task in SUBTASKS:
        ext = ".png" if task in ("commonsense_reasoning", "numerical_calculation", "text_translation",
                                 "code_reasoning") else ".jpg"
        qa, img = ((root / task / "questions_answers_YN", root / task / "images") if task in WITH_SUBFOLDERS
                   else (root / task, root / task))
        write_image(img / f"0001{ext}")
        space = "  " if task == "color" else " "
        qa.mkdir(parents=True, exist_ok=True)
        (qa / "0001.txt").write_text(f"Is it a {task}?{space}Please answer yes or no.\tYes\n"
                                     f"Is it a cat? Please answer yes or no.\tNo\n")
    return root


def test_mme_reader_release_layout(tmp_path):
    questions = get("mme").read([write_mme(tmp_path / "MME_Benchmark_release_version")])
    assert len(questions) == 28
    ids = [q.question_id for q in questions]
    assert ids[:2] == ["existence/0001.jpg#1", "existence/0001.jpg#2"]
    assert "artwork/images/0001.jpg#1" in ids and "code_reasoning/0001.png#2" in ids
    color = [q for q in questions if q.meta["subtask"] == "color"]
    assert color[0].prompt == "Is it a color?" + SUFFIX          # double space before "Please" dropped too
    assert color[0].meta == {"subtask": "color", "label": "yes", "question": "Is it a color?  Please answer yes or no."}
    assert color[0].unit == color[1].unit == "color/0001.jpg"
    assert color[0].load_image().size == (4, 3)


def test_mme_scorer_hand_computed(tmp_path):
    root = write_mme(tmp_path / "MME_Benchmark_release_version")
    mme = get("mme")
    questions = mme.read([root])
    # every image right on both questions except: existence gets one of two right, count none
    texts = {q.question_id: ("Yes" if q.meta["label"] == "yes" else "No") for q in questions}
    texts["existence/0001.jpg#2"] = "Not sure"        # -> no: still right (label No)
    texts["existence/0001.jpg#1"] = "  yes"           # -> other ("  ye" has no yes): wrong
    texts["count/0001.jpg#1"] = "No"
    texts["count/0001.jpg#2"] = "Yes and no"          # -> yes: wrong
    got = mme.score(answered_with(questions, texts))
    assert got["subtasks"]["existence"] == 50.0        # acc 1/2 -> 50, acc+ 0
    assert got["subtasks"]["count"] == 0.0
    assert got["subtasks"]["color"] == 200.0
    assert got["perception"] == 50.0 + 0.0 + 8 * 200.0 and got["cognition"] == 800.0
    # the double-space question is found from LLaVA's prompt as convert_answer_to_mme.py finds it
    answers = [{"question_id": q.unit, "prompt": q.prompt, "text": texts[q.question_id]} for q in questions]
    write_jsonl(tmp_path / "llava.jsonl", answers)
    assert score_answer_file("mme", [root], tmp_path / "llava.jsonl") == got
    write_jsonl(tmp_path / "short.jsonl", answers[:-1])
    with pytest.raises(MinivarError, match=r"short\.jsonl: 1 of the 28 questions have no answer"):
        score_answer_file("mme", [root], tmp_path / "short.jsonl")
    with pytest.raises(MinivarError, match="has 1 answered questions"):
        mme.score(answered_with(questions[:3], texts))


def test_mme_reader_parquet(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00004-a25dbe3b44c4fda6.parquet", {
        "question_id": ["code_reasoning/0020.png"] * 2, "image": [{"bytes": image_bytes(), "path": None}] * 2,
        "question": ["Is a python code shown? Please answer yes or no.", "Is a c++ code shown? Please answer yes or no."],
        "answer": ["Yes", "No"], "category": ["code_reasoning"] * 2})
    questions = get("mme").read([tmp_path])
    assert [q.question_id for q in questions] == ["code_reasoning/0020.png#1", "code_reasoning/0020.png#2"]
    assert questions[1].prompt == "Is a c++ code shown?" + SUFFIX and questions[1].meta["label"] == "no"
    assert get("mme").score([(questions[0], "Yes"), (questions[1], "No")])["cognition"] == 200.0


def test_mme_bad_inputs(tmp_path):
    root = write_mme(tmp_path / "MME_Benchmark_release_version")
    (root / "scene" / "images" / "0001.jpg").unlink()
    with pytest.raises(MinivarError, match=r"image scene/images/0001\.jpg of MME questions .*0001\.txt not found"):
        get("mme").read([root])
    assert len(get("mme").read([root], need_images=False)) == 28
    (root / "OCR" / "0001.txt").write_text("Is it? Please answer yes or no.\tMaybe\nIs it? Please answer yes or no.\tNo\n")
    with pytest.raises(MinivarError, match=r"OCR/0001\.txt:1: MME answer 'Maybe' is not Yes or No"):
        get("mme").read([root], need_images=False)
    (root / "OCR" / "0001.txt").write_text("Is it? Please answer yes or no.\n")
    with pytest.raises(MinivarError, match=r"OCR/0001\.txt:1: expected 'question<TAB>Yes\|No'"):
        get("mme").read([root], need_images=False)
    (root / "OCR" / "0001.txt").write_text("Is it? Please answer yes or no.\tYes\n")
    with pytest.raises(MinivarError, match=r"MME image OCR/0001\.jpg has 1 questions \(expected 2\)"):
        get("mme").read([root], need_images=False)
    (root / "OCR" / "0001.txt").write_text("Is it? Please answer yes or no.\tYes\nIs it? Please answer yes or no.\tNo\n")
    import shutil
    shutil.rmtree(root / "landmark")       # a subset of the subtasks runs, with a warning (tests/test_eval_trust.py)
    with pytest.warns(UserWarning, match="landmark"):
        assert len(get("mme").read([root], need_images=False)) == 26
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinivarError, match="not an MME folder"):
        get("mme").read([tmp_path / "empty"])


# ------------------------------------------------------------------------------------------------ GQA
def write_gqa(root: Path) -> Path:
    entries = {"201307251": ("Is it overcast?", "no", "verify", "n161313"),
               "201640614": ("Who is wearing a shirt?", "man", "query", "n161313"),
               "20644644": ("Which room is it?", "living room", "query", "n250821")}
    write_jsonl(root / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": qid, "image": f"{img}.jpg", "text": q + SUFFIX, "category": "default"}
        for qid, (q, _, _, img) in entries.items()])
    official = {qid: {"semantic": [{"operation": "select", "dependencies": [], "argument": "scene"}],
                      "entailed": [], "equivalent": [qid], "question": q, "imageId": img, "isBalanced": True,
                      "groups": {"global": "room", "local": "02q-room"}, "answer": a, "semanticStr": "select: scene",
                      "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                      "types": {"detailed": "place", "semantic": "global", "structural": s}, "fullAnswer": a}
                for qid, (q, a, s, img) in entries.items()}
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "testdev_balanced_questions.json").write_text(json.dumps(official))
    write_image(root / "data" / "images" / "n161313.jpg")
    write_image(root / "data" / "images" / "n250821.jpg")
    return root


def test_gqa_reader_and_scorer(tmp_path):
    root = write_gqa(tmp_path)
    gqa = get("gqa")
    questions = gqa.read([root])            # LLaVA's playground layout: images default to data/images
    assert [q.question_id for q in questions] == ["201307251", "201640614", "20644644"]
    assert questions[0].prompt == "Is it overcast?" + SUFFIX and questions[0].image_key == "n161313.jpg"
    assert questions[2].load_image().size == (4, 3)
    # "No." -> "no" right; "The man" != "man" (no article stripping); "Living Room..." -> "living room" right
    got = gqa.score(answered_with(questions, {"201307251": "No.", "201640614": "The man",
                                              "20644644": "Living Room.."}))
    assert got == {"accuracy": 2 / 3, "binary": 1.0, "open": 0.5}
    got = gqa.score(answered_with(questions, {"201307251": "yes", "201640614": "man", "20644644": "2"}))
    assert got == {"accuracy": 1 / 3, "binary": 0.0, "open": 0.5}
    write_jsonl(tmp_path / "answers.jsonl", [{"question_id": "201307251", "prompt": "", "text": "No"},
                                             {"question_id": "20644644", "prompt": "", "text": "living room"},
                                             {"question_id": "201640614", "prompt": "", "text": "man"}])
    assert score_answer_file("gqa", [root], tmp_path / "answers.jsonl")["accuracy"] == 1.0


def test_gqa_bad_inputs(tmp_path):
    root = write_gqa(tmp_path)
    gqa = get("gqa")
    (root / "data" / "images" / "n250821.jpg").unlink()
    with pytest.raises(MinivarError, match=r"n250821\.jpg of question 20644644 not found"):
        gqa.read([root])
    with pytest.raises(MinivarError, match="needs the official testdev_balanced_questions.json"):
        gqa.read([root / "llava_gqa_testdev_balanced.jsonl"])
    official = root / "data" / "testdev_balanced_questions.json"
    entries = json.loads(official.read_text())
    del entries["20644644"]
    official.write_text(json.dumps(entries))
    with pytest.raises(MinivarError, match=r"llava_gqa_testdev_balanced\.jsonl:3: question 20644644 is not in"):
        gqa.read([root], need_images=False)
    official.write_text("[1, 2")
    with pytest.raises(MinivarError, match=r"testdev_balanced_questions\.json:1: not valid JSON"):
        gqa.read([root], need_images=False)


# ------------------------------------------------------------------------------------------------ MMVP
def write_mmvp(root: Path, header="Index") -> Path:
    rows = [(1, "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(a)"),
            (2, "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(b)"),
            (3, "Is the dog, if any, facing left or right?", "(a) Left (b) Right", "(b)"),
            (4, "Is the dog, if any, facing left or right?", "(a) Left (b) Right", "(a)")]
    import csv
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "Questions.csv", "w", newline="", encoding="utf-8-sig") as f:    # with a byte-order mark
        writer = csv.writer(f)
        writer.writerow([header, "Question", "Options", "Correct Answer"])
        writer.writerows(rows)
    for i in range(1, 5):
        write_image(root / "MMVP Images" / f"{i}.jpg", (i * 50, 0, 0))
    return root


def test_mmvp_reader_csv(tmp_path):
    root = write_mmvp(tmp_path / "MMVP", header="lndex")
    questions = get("mmvp").read([root])
    assert [q.question_id for q in questions] == ["1", "2", "3", "4"]
    assert [q.unit for q in questions] == ["pair-1", "pair-1", "pair-2", "pair-2"]
    assert questions[0].prompt == ("Are the butterfly's wings closer to being open or closed? Options:\nA. Open\n"
                                   "B. Closed" + LETTER)
    assert questions[2].prompt.startswith("Is the dog, if any, facing left or right? Options:\nA. Left\nB. Right")
    assert questions[3].meta == {"answer": "a", "options": ["left", "right"]}
    assert questions[3].load_image().getpixel((0, 0))[0] == pytest.approx(200, abs=8)    # photo 4 = row 4
    assert len(get("mmvp").read([root / "Questions.csv"], images=root / "MMVP Images")) == 4


def test_mmvp_scorer_letter_grader_and_pairs(tmp_path):
    questions = get("mmvp").read([write_mmvp(tmp_path / "MMVP")])
    answers = {"1": "A", "2": "Closed",              # pair 1: both right ("Closed" = text of (b))
               "3": "The answer is B.", "4": "A. Left"}   # pair 2: "A. Left" is neither "a" nor "left": wrong
    got = get("mmvp").score(answered_with(questions, answers))
    assert got == {"pair_accuracy": 0.5, "question_accuracy": 0.75}
    got = get("mmvp").score(answered_with(questions, {"1": "(a)", "2": "b.", "3": "(B)", "4": "left"}))
    assert got == {"pair_accuracy": 1.0, "question_accuracy": 1.0}
    got = get("mmvp").score(answered_with(questions, {"1": "B", "2": "B", "3": "B", "4": "B"}))
    assert got == {"pair_accuracy": 0.0, "question_accuracy": 0.5}      # always-B: half the questions, no pair


def test_mmvp_reader_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    write_parquet(tmp_path / "lmms" / "data" / "train-00000-of-00001.parquet", {
        "Index": [1, 2], "Question": ["Open or closed?"] * 2, "Options": ["(a) Open (b) Closed"] * 2,
        "Correct Answer": ["(a)", "(b)"], "image": [{"bytes": image_bytes(), "path": None}] * 2},
        types={"Index": pa.int32()})
    questions = get("mmvp").read([tmp_path / "lmms"])
    assert [q.unit for q in questions] == ["pair-1", "pair-1"] and questions[1].meta["answer"] == "b"
    assert questions[0].prompt == "Open or closed? Options:\nA. Open\nB. Closed" + LETTER
    assert questions[0].load_image().size == (4, 3)


def test_mmvp_labels_option_on_the_full_benchmark(tmp_path):
    import csv
    root = tmp_path / "MMVP"
    root.mkdir()
    with open(root / "Questions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        for i in range(1, 301):       # lmms-eval's corrected copy: 99/100 and 279/280 swapped
            answer = "(a)" if (i % 2 == 1) != (i in (99, 100, 279, 280)) else "(b)"
            writer.writerow([i, f"Question {(i + 1) // 2}?", "(a) Yes (b) No", answer])
    mmvp = get("mmvp")

    def letters(**options):
        questions = mmvp.read([root], need_images=False, **options)
        return [questions[i - 1].meta["answer"] for i in (97, 98, 99, 100, 279, 280)]
    assert letters() == ["a", "b", "a", "b", "a", "b"]                  # the papers' labels by default
    assert letters(labels="corrected") == ["a", "b", "b", "a", "b", "a"]
    assert letters(labels="as-read") == ["a", "b", "b", "a", "b", "a"]
    with pytest.raises(MinivarError, match="labels must be original, corrected or as-read, not 'fixed'"):
        mmvp.read([root], need_images=False, labels="fixed")


def test_mmvp_bad_inputs(tmp_path):
    root = write_mmvp(tmp_path / "MMVP")
    (root / "MMVP Images" / "3.jpg").unlink()
    with pytest.raises(MinivarError, match=r"MMVP Images/3\.jpg of question 3 not found"):
        get("mmvp").read([root])
    csv_path = root / "Questions.csv"
    lines = csv_path.read_text(encoding="utf-8-sig").splitlines()
    csv_path.write_text("\n".join(lines[:3] + ["3,Left or right?,(a) Left (b) Right,(c)", lines[4]]) + "\n")
    with pytest.raises(MinivarError, match=r"Questions\.csv:4: MMVP answer '\(c\)' is not \(a\) or \(b\)"):
        get("mmvp").read([root], need_images=False)
    csv_path.write_text("\n".join(lines[:3] + ["3,Left or right?", lines[4]]) + "\n")
    with pytest.raises(MinivarError, match=r"Questions\.csv:4: expected 4 columns"):
        get("mmvp").read([root], need_images=False)
    csv_path.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(MinivarError, match=r"Questions\.csv:1: no header row"):
        get("mmvp").read([root], need_images=False)
    csv_path.write_text("\n".join(lines[:4]) + "\n")
    with pytest.raises(MinivarError, match="3 questions: pairs need an even number"):
        get("mmvp").read([root], need_images=False)


# ------------------------------------------------------------------------------------------------ CV-Bench
def cvbench_rows():
    """2 ADE20K count, 4 COCO relation (2D), 2 Omni3D depth (3D); idx restart per file as two files may."""
    def row(idx, kind, task, source, choices, answer):
        letters = "ABCD"
        prompt = f"Question {idx}? Select from the following choices." + "".join(
            f"\n({letters[i]}) {c}" for i, c in enumerate(choices))
        return {"idx": idx, "type": kind, "task": task, "question": f"Question {idx}?", "choices": choices,
                "answer": answer, "prompt": prompt, "filename": f"img/{kind}/{task.lower()}/{source.lower()}_{idx}.png",
                "source": source, "source_dataset": f"{source} set", "source_filename": f"{idx}.jpg",
                "target_class": None, "target_size": None, "bbox": None}
    two = [row(0, "2D", "Count", "ADE20K", ["3", "2", "1", "0"], "(C)"),
           row(1, "2D", "Count", "ADE20K", ["3", "2", "1", "0"], "(A)"),
           *[row(i, "2D", "Relation", "COCO", ["left", "right"], "(B)") for i in range(2, 6)]]
    three = [row(0, "3D", "Depth", "Omni3D", ["sink", "bottle"], "(A)"),
             row(1, "3D", "Depth", "Omni3D", ["sink", "bottle"], "(B)")]
    return two, three


def test_cvbench_reader_jsonl_and_img(tmp_path):
    two, three = cvbench_rows()
    for name, rows in (("test_2d", two), ("test_3d", three)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        for r in rows:
            write_image(tmp_path / r["filename"])
    questions = get("cvbench").read([tmp_path])
    assert [q.question_id for q in questions] == ["2D-0", "2D-1", "2D-2", "2D-3", "2D-4", "2D-5", "3D-0", "3D-1"]
    q = questions[0]
    assert q.prompt == ("Question 0? Select from the following choices.\n(A) 3\n(B) 2\n(C) 1\n(D) 0" + LETTER)
    assert q.meta == {"source": "ADE20K", "task": "Count", "type": "2D", "answer": "c", "choices": ["3", "2", "1", "0"]}
    assert q.image_key == "img/2D/count/ade20k_0.png" and q.load_image().size == (4, 3)
    (tmp_path / two[3]["filename"]).unlink()
    with pytest.raises(MinivarError, match=r"coco_3\.png of question 2D-3 not found"):
        get("cvbench").read([tmp_path])
    assert len(get("cvbench").read([tmp_path / "test_3d.jsonl"])) == 2


def test_cvbench_reader_parquet(tmp_path):
    two, three = cvbench_rows()
    for name, rows in (("test_2d", two), ("test_3d", three)):
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        columns["image"] = [{"bytes": image_bytes(), "path": None}] * len(rows)
        write_parquet(tmp_path / f"{name}.parquet", columns)
        write_jsonl(tmp_path / f"{name}.jsonl", rows)       # the hub snapshot has both, and no img/ folder
    questions = get("cvbench").read([tmp_path])
    assert [q.question_id for q in questions] == ["2D-0", "2D-1", "2D-2", "2D-3", "2D-4", "2D-5", "3D-0", "3D-1"]
    assert questions[6].prompt == "Question 0? Select from the following choices.\n(A) sink\n(B) bottle" + LETTER
    assert questions[6].meta["choices"] == ["sink", "bottle"] and questions[6].meta["answer"] == "a"
    assert questions[7].load_image().size == (4, 3)


def test_cvbench_official_averaging_and_parser():
    two, three = cvbench_rows()
    questions = [_cv_question(r) for r in two + three]
    answers = {"2D-0": "C. 1", "2D-1": "(A)",                               # ADE20K 2/2
               "2D-2": "The answer is (B)", "2D-3": "I think B", "2D-4": "A", "2D-5": "answer: c"}   # COCO 1/4
    answers |= {"3D-0": "(A) sink", "3D-1": "Sink."}                       # Omni3D 1/2: "sink." -> "s"
    got = get("cvbench").score(answered_with(questions, answers))
    assert got["sources"] == {"ADE20K": 1.0, "COCO": 0.25, "Omni3D": 0.5}
    assert got["2d"] == 0.625                       # mean of the sources, not the pooled 3/6
    assert got["3d"] == 0.5 and got["overall"] == 0.5625
    assert got["tasks"] == {"Count": 1.0, "Relation": 0.25, "Depth": 0.5}
    only_3d = get("cvbench").score([(q, "A") for q in questions if q.meta["type"] == "3D"])
    assert only_3d["2d"] is None and only_3d["3d"] == 0.5 and only_3d["overall"] == 0.5


def _cv_question(row):
    from minivar.eval.benchmarks.base import Question
    return Question(question_id=f"{row['type']}-{row['idx']}", prompt=row["prompt"], image_key=row["filename"],
                    load_image=lambda: None,
                    meta={"source": row["source"], "task": row["task"], "type": row["type"],
                          "answer": row["answer"][1].lower(), "choices": row["choices"]})


def test_cvbench_bad_inputs(tmp_path):
    two, _ = cvbench_rows()
    write_jsonl(tmp_path / "test_2d.jsonl", [two[0], {**two[1], "answer": "C"}])
    with pytest.raises(MinivarError, match=r"test_2d\.jsonl:2: CV-Bench answer 'C' is not like '\(A\)'"):
        get("cvbench").read([tmp_path], need_images=False)
    write_jsonl(tmp_path / "test_2d.jsonl", [{k: v for k, v in two[0].items() if k != "source"}])
    with pytest.raises(MinivarError, match=r"test_2d\.jsonl:1: missing key 'source'"):
        get("cvbench").read([tmp_path], need_images=False)
    write_jsonl(tmp_path / "test_2d.jsonl", [{**two[0], "source": "KITTI"}])
    with pytest.raises(MinivarError, match="unknown CV-Bench source 'KITTI'"):
        get("cvbench").read([tmp_path], need_images=False)
    (tmp_path / "test_2d.jsonl").unlink()
    with pytest.raises(MinivarError, match="not a CV-Bench folder"):
        get("cvbench").read([tmp_path])


def test_parquet_needs_pyarrow_message(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "test_2d.parquet").write_bytes(b"PAR1")
    with pytest.raises(MinivarError, match=r"needs pyarrow: pip install -r requirements-eval\.txt"):
        CVBench().read([tmp_path])


def test_scorers_read_only_id_unit_meta():
    """A bootstrap copy (fresh question_id / unit, no prompt, no image) scores like the original."""
    from dataclasses import replace

    from minivar.eval.benchmarks.base import Question
    q1 = Question("a#1", "", "", lambda: None, unit="img", meta={"subtask": "OCR", "label": "yes", "question": ""})
    q2 = Question("a#2", "", "", lambda: None, unit="img", meta={"subtask": "OCR", "label": "no", "question": ""})
    copies = [replace(q, question_id=q.question_id + "~1", unit="img~1", prompt="x") for q in (q1, q2)]
    original = MME().score([(q1, "Yes"), (q2, "Yes")])
    assert MME().score([(copies[0], "Yes"), (copies[1], "Yes")]) == original
    assert original["subtasks"]["OCR"] == 50.0
    both = MME().score([(q1, "Yes"), (q2, "No"), (copies[0], "Yes"), (copies[1], "Yes")])
    assert both["subtasks"]["OCR"] == 75.0 + 50.0      # acc 3/4, acc+ 1/2 over the two resampled images
