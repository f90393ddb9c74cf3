"""CHAIR (minivar/eval/benchmarks/chair.py): the reader on tiny COCO annotation files in the real format, the
scorer's numbers computed by hand, chair.py's quirks, bad inputs, the shipped OPERA id list, and the real NLTK step
where NLTK and its data are installed.

Most tests replace the NLTK step (tokenize + tag + lemmatize) with STAND-IN below: a regular-expression tokenizer
and a handful of plural forms. Everything after that step (double words, synonyms, the toilet-seat rule, counting)
is CHAIR's own code and is tested for real. The captions are chosen so that NLTK gives the same lemmas (checked by
test_real_nltk_gives_the_hand_computed_numbers where NLTK's data is installed).
"""
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import SHARED
from minivar.errors import MinivarError
from minivar.eval.benchmarks import chair as chair_module
from minivar.eval.benchmarks.chair import PROMPT, Chair, caption_objects, read_image_ids
from minivar.eval.benchmarks.chair_words import DOUBLE_WORDS, OBJECT_WORDS, SYNONYMS_TXT

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval" / "chair"
IDS = [1001, 1002, 1003, 1004]

# STAND-IN for the NLTK step, not NLTK: words and punctuation marks as tokens, a few plurals as lemmas.
_STAND_IN_PLURALS = {"dogs": "dog", "glasses": "glass", "tracks": "track", "walls": "wall", "cows": "cow"}


def stand_in_lemmatizer(text: str) -> list[tuple[str, str]]:
    return [(t, _STAND_IN_PLURALS.get(t, t)) for t in re.findall(r"[a-z]+|[^\sa-z]", text)]


# The fixture's ground truth: 1001 has a dog instance and "A man walks his dogs" (person from the caption);
# 1002 a toilet ("toilet seat" in its caption is a toilet, not a chair); 1003 a dining table and a hot dog, plus
# the cell phone its caption names; 1004 has no object at all. 1005 (a bird) is in the files but not asked for.
TRUTH = {1001: ["dog", "person"], 1002: ["toilet"], 1003: ["cell phone", "dining table", "hot dog"], 1004: []}

# Model captions, by hand (stand-in tokens; "[x]" = merged double word):
# 1001: a baby bird sits next to a puppy and a man . the dog is happy .   17 lemmas, [baby bird] -> 16 tokens;
#       objects bird (hallucinated: "baby bird" is a bird, not a person), dog, person, dog      -> 4 mentions, 1 wrong
# 1002: the toilet has a seat and a motor bike is parked near a chair .   15 lemmas, [motor bike] -> 14 tokens;
#       toilet; seat dropped (toilet present); "motor bike" is no COCO word; chair (hallucinated) -> 2 mentions, 1 wrong
# 1003: two hot dogs on the dining table .                                  8 lemmas, [hot dog] -> 7 tokens;
#       hot dog, table -> dining table; cell phone not mentioned                               -> 2 mentions, 0 wrong
# 1004: a wine glass and two wine glasses .                                8 lemmas, 2x [wine glass] -> 6 tokens;
#       wine glass twice, both hallucinated (each mention counts)                              -> 2 mentions, 2 wrong
CAPTIONS = {1001: "A baby bird sits next to a puppy and a man. The dog is happy.",
            1002: "The toilet has a seat and a motor bike is parked near a chair.",
            1003: "Two hot dogs on the dining table.",
            1004: "A wine glass and two wine glasses."}
EXPECTED = {"chair_s": 3 / 4,              # 1001, 1002, 1004 hallucinate
            "chair_i": 4 / 10,             # (1 + 1 + 0 + 2) / (4 + 2 + 2 + 2)
            "recall": 5 / 6,               # (2 + 1 + 2 + 0) distinct true objects mentioned / (2 + 1 + 3 + 0)
            "len": (16 + 14 + 7 + 6) / 4}


@pytest.fixture(scope="module")
def val2014(tmp_path_factory) -> Path:
    """A val2014 folder with a tiny JPEG for each fixture image."""
    folder = tmp_path_factory.mktemp("val2014")
    for i, image_id in enumerate(IDS + [1005]):
        Image.new("RGB", (32, 24), (40 * i, 100, 200)).save(folder / f"COCO_val2014_{image_id:012d}.jpg")
    return folder


def read(paths=(FIXTURES,), images=None, image_ids=FIXTURES / "image_ids.txt", lemmatize=stand_in_lemmatizer):
    return Chair(lemmatize).read(list(paths), images=images, image_ids=image_ids)


def answered(questions, captions=CAPTIONS):
    return [(q, captions[q.meta["image_id"]]) for q in questions]


# ---------------------------------------------------------------------------------------------------------------
# Reader

def test_reader_makes_one_caption_question_per_image(val2014):
    questions = read(images=val2014)
    assert [q.question_id for q in questions] == ["1001", "1002", "1003", "1004"]
    assert [q.image_key for q in questions] == [f"COCO_val2014_{i:012d}.jpg" for i in IDS]
    assert all(q.prompt == PROMPT == "Please describe this image in detail." for q in questions)
    assert {q.meta["image_id"]: q.meta["objects"] for q in questions} == TRUTH
    assert len({q.scoring_unit for q in questions}) == 4
    img = questions[2].load_image()
    assert img.size == (32, 24) and img.getpixel((5, 5))[1:] == pytest.approx((100, 200), abs=8)
    json.dumps([q.meta for q in questions])                 # meta travels in --json output


def test_benchmark_settings():
    bench = Chair()
    assert (bench.name, bench.family, bench.headline, bench.max_new_tokens) == ("chair", "hallucination",
                                                                                 "chair_s", 512)


def test_reader_accepts_the_two_files_and_an_id_list():
    by_files = read(paths=[FIXTURES / "captions_val2014.json", FIXTURES / "instances_val2014.json"],
                    image_ids=[1003, 1001])
    assert [(q.question_id, q.meta["objects"]) for q in by_files] == [("1003", TRUTH[1003]), ("1001", TRUTH[1001])]


def test_reading_without_images_needs_no_pixels_until_asked():
    question = read()[0]
    with pytest.raises(MinivarError, match="image id 1001: no images folder"):
        question.load_image()


def test_default_ids_are_operas_500(tmp_path):
    """Without image_ids the reader asks for OPERA's 500 images: here none of them is in the tiny annotations."""
    with pytest.raises(MinivarError, match=r"CHAIR image id 757 is not in the COCO annotations"):
        read(image_ids=None)


# ---------------------------------------------------------------------------------------------------------------
# Scorer

def test_scores_match_the_hand_computed_values():
    questions = read()
    scores = Chair(stand_in_lemmatizer).score(answered(questions))
    assert scores.keys() == EXPECTED.keys()
    for key, value in EXPECTED.items():
        assert scores[key] == pytest.approx(value, abs=1e-12), key


def test_scores_depend_only_on_meta_so_units_can_be_resampled():
    """A bootstrap copy (fresh ids, same meta) scores the same as the original; one image twice counts twice."""
    from dataclasses import replace
    q = read()
    copies = [replace(q[0], question_id="b0", unit="b0"), replace(q[0], question_id="b1", unit="b1"),
              replace(q[2], question_id="b2", unit="b2")]
    scores = Chair(stand_in_lemmatizer).score(answered(copies))
    assert scores["chair_s"] == pytest.approx(2 / 3)
    assert scores["chair_i"] == pytest.approx(2 / 10)           # (1 + 1 + 0) / (4 + 4 + 2)
    assert scores["recall"] == pytest.approx(6 / 7)             # (2 + 2 + 2) / (2 + 2 + 3)
    assert scores["len"] == pytest.approx((16 + 16 + 7) / 3)


def test_captions_without_objects_score_zero_not_a_division_error():
    q = read()[3:]                                              # 1004: no true object either
    scores = Chair(stand_in_lemmatizer).score([(q[0], "An empty room.")])
    assert scores == {"chair_s": 0.0, "chair_i": 0.0, "recall": 0.0, "len": 4.0}


def test_nothing_to_score_is_an_error():
    with pytest.raises(MinivarError, match="no captions"):
        Chair(stand_in_lemmatizer).score([])


@pytest.mark.parametrize("caption, words, objects", [
    ("a motor bike and a motorbike", ["motorbike"], ["motorcycle"]),          # " motor bike" (2 spaces) never matches
    ("a cheesecake and a cupcake", ["cupcake"], ["cake"]),                    # " cheesecake" likewise
    ("the seat of the toilet", ["toilet"], ["toilet"]),                       # toilet-seat rule
    ("a seat by the window", ["seat"], ["chair"]),
    ("a toilet seat", ["toilet"], ["toilet"]),                                # double word -> toilet
    ("a baby bird and a baby", ["bird", "baby"], ["bird", "person"]),         # qualifier rule vs the person word
    ("two adult cows", ["cow"], ["cow"]),
    ("a passenger jet , a passenger train and a passenger", ["jet", "train", "passenger"],
     ["airplane", "train", "person"]),
    ("a bow tie and a bow", ["tie", "bow"], ["tie", "tie"]),
    ("hot dogs and a teddy bear", ["hot dog", "teddy bear"], ["hot dog", "teddy bear"]),
    ("train tracks near home plate", [], []),                                 # merged, so "train" does not count
    ("a passenger train track", ["train"], ["train"]),                        # merging is greedy from the left
    ("a dog , another dog and a puppy", ["dog", "dog", "puppy"], ["dog", "dog", "dog"]),
    ("An iPhone on a Table", ["table"], ["dining table"]),                    # lower-cased: "iphone" is no synonym
    ("a stop sign and a fire hydrant", ["stop sign", "fire hydrant"], ["stop sign", "fire hydrant"]),
])
def test_caption_to_objects_follows_chair_py(caption, words, objects):
    found = caption_objects(caption, stand_in_lemmatizer)
    assert (found.words, found.objects) == (words, objects)


def test_len_counts_tokens_after_merging_including_punctuation():
    found = caption_objects("Two hot dogs, a toilet seat.", stand_in_lemmatizer)
    assert found.tokens == ["two", "hot dog", ",", "a", "toilet", "."]


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary and the shipped id list

def test_synonym_table_is_operas_verbatim_text():
    assert hashlib.md5(SYNONYMS_TXT.encode()).hexdigest() == "8fd8e0aa03bbef2655aa300d491067d8"
    assert len(SYNONYMS_TXT) == 3578
    assert set(OBJECT_WORDS.values()) - {""} == set(COCO_CATEGORY_NAMES)      # node words = COCO's names
    assert OBJECT_WORDS[" motor bike"] == "motorcycle" and "motor bike" not in OBJECT_WORDS
    assert OBJECT_WORDS["televison"] == "tv" and OBJECT_WORDS["bison"] == "cow"
    assert DOUBLE_WORDS["toilet seat"] == "toilet" and DOUBLE_WORDS["wine glas"] == "wine glass"
    assert DOUBLE_WORDS["baby cub"] == "cub" and DOUBLE_WORDS["passenger train"] == "train"
    assert len(DOUBLE_WORDS) == 27 + 24 + 2 + 2     # 27 distinct phrases, 12 animals x 2, 2 vehicles, 2 new rules


# The 80 category names of COCO 2014's instances files, in category-id order.
COCO_CATEGORY_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]


def _appendix(letter: str) -> str:
    path = SHARED / "eval-formats.md"
    if not path.is_file():
        pytest.skip(f"{path} not found (needs the shared docs next to the repo)")
    text = path.read_text(encoding="utf-8")
    start = text.index("```text", text.index(f"## Appendix {letter}.")) + len("```text")
    return text[start:text.index("```", start)]


def test_synonyms_equal_appendix_a():
    assert SYNONYMS_TXT == _appendix("A")


def test_shipped_ids_are_the_500_of_appendix_b():
    ids = read_image_ids(None)
    assert len(ids) == 500 == len(set(ids)) and all(isinstance(i, int) for i in ids)
    assert hashlib.md5(",".join(map(str, sorted(ids))).encode()).hexdigest() == "d82beea7b3baa89a242054ef1aae08fd"
    assert ids == [int(x) for x in re.split(r"[,\s]+", _appendix("B").strip())]
    assert chair_module.DEFAULT_IMAGE_IDS.read_text().startswith("# ")          # says where the ids come from


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file / record at fault

def _copy_fixtures(tmp_path) -> Path:
    folder = tmp_path / "annotations"
    shutil.copytree(FIXTURES, folder)
    return folder


def _edit(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _one_line_error(match, **kwargs):
    with pytest.raises(MinivarError) as e:
        read(**kwargs)
    message = str(e.value)
    assert "\n" not in message and re.search(match, message), message
    return message


def test_missing_image_names_file_and_id(tmp_path, val2014):
    images = tmp_path / "val2014"
    shutil.copytree(val2014, images)
    (images / "COCO_val2014_000000001003.jpg").unlink()
    _one_line_error(r"COCO_val2014_000000001003\.jpg \(CHAIR image id 1003\) not found", images=images)
    _one_line_error(r"images folder .*nowhere not found", images=tmp_path / "nowhere")


def test_corrupt_image_names_the_id(tmp_path, val2014):
    images = tmp_path / "val2014"
    shutil.copytree(val2014, images)
    (images / "COCO_val2014_000000001002.jpg").write_bytes(b"not a jpeg")
    question = read(images=images)[1]
    with pytest.raises(MinivarError, match="image id 1002: .*COCO_val2014_000000001002.jpg"):
        question.load_image()


def test_missing_annotation_files(tmp_path):
    folder = _copy_fixtures(tmp_path)
    (folder / "captions_val2014.json").unlink()
    _one_line_error(r"captions_val2014\.json not found", paths=[folder])
    _one_line_error(r"needs a COCO captions_val2014\.json", paths=[folder / "instances_val2014.json"])
    (folder / "notes.csv").write_text("x")
    _one_line_error(r"notes\.csv is not a COCO annotations folder", paths=[FIXTURES, folder / "notes.csv"])
    _one_line_error(r"needs a COCO instances_val2014\.json", paths=[folder / "image_ids.txt"])
    _one_line_error(r"absent\.json not found", paths=[folder / "absent.json"])
    _one_line_error(r"needs the COCO 2014 annotations folder", paths=[])


def test_malformed_json(tmp_path):
    folder = _copy_fixtures(tmp_path)
    (folder / "instances_val2014.json").write_text('{"images": [')
    _one_line_error(r"instances_val2014\.json: not valid JSON \(line 1", paths=[folder])
    (folder / "instances_val2014.json").write_text("[]")
    _one_line_error(r"instances_val2014\.json: expected a COCO annotation object", paths=[folder])


def test_malformed_records(tmp_path):
    folder = _copy_fixtures(tmp_path)
    instances, captions = folder / "instances_val2014.json", folder / "captions_val2014.json"
    original = instances.read_text()
    _edit(instances, lambda d: d.pop("categories"))
    _one_line_error(r"instances_val2014\.json: missing the list 'categories'", paths=[folder])
    instances.write_text(original)
    _edit(instances, lambda d: d["categories"].append({"supercategory": "x", "id": 99, "name": "unicorn"}))
    _one_line_error(r"instances_val2014\.json: category 99 'unicorn' is not one of the 80", paths=[folder])
    instances.write_text(original)
    _edit(instances, lambda d: d["annotations"][0].update(category_id=5))
    _one_line_error(r"annotation 1 of image 1001 has category_id 5", paths=[folder])
    instances.write_text(original)
    _edit(captions, lambda d: d["annotations"][0].update(image_id="1001"))      # a string id, as in pitfall 1
    _one_line_error(r"captions_val2014\.json: caption annotation .* has no int 'image_id'", paths=[folder])


def test_ids_not_in_the_annotations_or_malformed(tmp_path):
    _one_line_error(r"CHAIR image id 4242 is not in the COCO annotations", image_ids=[1001, 4242])
    bad = tmp_path / "ids.txt"
    bad.write_text("1001\n1002, 1003\n# comment\nCOCO_val2014_000000001004\n")
    _one_line_error(r"ids\.txt line 4: 'COCO_val2014_000000001004' is not a COCO image id", image_ids=bad)
    bad.write_text("1001\n1002 1001\n")
    _one_line_error(r"ids\.txt: image id 1001 is listed twice", image_ids=bad)
    bad.write_text("# nothing\n")
    _one_line_error(r"ids\.txt: no image ids", image_ids=bad)
    _one_line_error(r"image id file .*absent\.txt not found", image_ids=tmp_path / "absent.txt")
    _one_line_error(r"'1001' is not a COCO image id \(an int\)", image_ids=["1001"])


def test_ids_file_accepts_commas_spaces_and_comments(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# pasted from a paper\n1003, 1001\n  1004 # and one more\n")
    assert read_image_ids(ids) == [1003, 1001, 1004]


def test_unknown_option_is_an_error():
    with pytest.raises(MinivarError, match="no option limit"):
        Chair(stand_in_lemmatizer).read([FIXTURES], image_ids=[1001], limit=3)


# ---------------------------------------------------------------------------------------------------------------
# The real NLTK step

def test_without_nltk_the_error_says_how_to_install_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "nltk", None)          # `import nltk` now raises ImportError
    with pytest.raises(MinivarError, match=r"pip install nltk, then python -m nltk\.downloader punkt_tab "
                                           r"averaged_perceptron_tagger_eng wordnet$"):
        Chair().read([FIXTURES], image_ids=[1001])


def test_without_nltk_data_the_error_names_it_and_the_download(monkeypatch, tmp_path):
    nltk = pytest.importorskip("nltk")
    import nltk.tokenize
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # an empty data folder: nothing can be found
    if hasattr(nltk.tokenize, "_get_punkt_tokenizer"):       # NLTK >= 3.9 caches the loaded tokenizer
        nltk.tokenize._get_punkt_tokenizer.cache_clear()
    try:
        with pytest.raises(MinivarError) as e:
            Chair().score([(read()[0], "a dog")])
    finally:
        if hasattr(nltk.tokenize, "_get_punkt_tokenizer"):
            nltk.tokenize._get_punkt_tokenizer.cache_clear()
    message = str(e.value)
    assert "\n" not in message and "\x1b" not in message
    assert re.search(r"CHAIR needs NLTK data that is not installed \('(punkt|wordnet|averaged)\w*' is missing\): "
                     r"python -m nltk\.downloader punkt", message), message
    assert "python tools/nltk_data.py" in message            # the way when NLTK's own servers are unreachable


@pytest.mark.parametrize("version, packages", [
    ("3.10.4", "punkt_tab averaged_perceptron_tagger_eng wordnet"),
    ("3.9.1", "punkt_tab averaged_perceptron_tagger_eng wordnet"),
    ("3.8.2", "punkt_tab averaged_perceptron_tagger wordnet omw-1.4"),
    ("3.8.1", "punkt averaged_perceptron_tagger wordnet omw-1.4"),
])
def test_the_download_command_fits_the_nltk_version(version, packages):
    assert chair_module._nltk_data_packages(version) == packages


@pytest.fixture(scope="module")
def real_nltk():
    """NLTK's own step, or a skip where NLTK or its data (punkt_tab, the perceptron tagger, WordNet) is absent."""
    pytest.importorskip("nltk")
    try:
        return chair_module.nltk_lemmatizer()
    except MinivarError as e:
        pytest.skip(str(e))


def test_real_nltk_gives_the_hand_computed_numbers(real_nltk):
    questions = read(lemmatize=real_nltk)
    assert {q.meta["image_id"]: q.meta["objects"] for q in questions} == TRUTH
    scores = Chair(real_nltk).score(answered(questions))
    for key, value in EXPECTED.items():
        assert scores[key] == pytest.approx(value, abs=1e-12), key


def test_real_nltk_lemmatizes_by_part_of_speech(real_nltk):
    assert real_nltk("three mice were sitting on benches") == [
        ("three", "three"), ("mice", "mouse"), ("were", "be"), ("sitting", "sit"), ("on", "on"),
        ("benches", "bench")]
    # WordNet keeps "men" as a word of its own, so chair.py does not count it as a person; "people" it does.
    found = caption_objects("Two men and some people ride motorbikes past the buses.", real_nltk)
    assert (found.words, found.objects) == (["people", "motorbike", "bus"], ["person", "motorcycle", "bus"])


# What OPERA's chair.py (HEAD 61426ef, unmodified; NLTK 3.10.4 with its punkt_tab, averaged_perceptron_tagger_eng
# and WordNet 3.0 data) printed for fixtures/eval/chair/captions_golden.jsonl (detailed captions written for these
# tests, in OPERA's caption-file format) with the fixture annotations (and empty train2014 files, which it demands):
# overall metrics, and per caption its `mscoco_generated_words` and len(`words`).
GOLDEN_OPERA = {"CHAIRs": 0.875, "CHAIRi": 0.6458333333333334, "Recall": 0.9166666666666666, "Len": 0.38875}
GOLDEN_OPERA_CAPTIONS = [
    (["person", "dog", "dog", "person", "car", "bicycle", "bench", "bird"], 49),
    (["person", "dog", "traffic light", "fire hydrant", "stop sign", "person", "bus", "cell phone"], 41),
    (["toilet", "toilet", "toilet", "sink", "chair"], 50),
    (["toilet", "sink", "potted plant", "hair drier", "toothbrush", "bottle"], 30),
    (["hot dog", "dining table", "cell phone", "wine glass", "bottle", "knife", "fork", "dining table", "person"], 57),
    (["hot dog", "dining table", "cup", "sandwich", "laptop", "teddy bear", "remote", "couch"], 32),
    (["clock", "bed", "tv", "vase"], 37),
    ([], 15)]


def test_real_nltk_equals_operas_chair_py_on_detailed_captions(real_nltk):
    records = [json.loads(line) for line in (FIXTURES / "captions_golden.jsonl").read_text().splitlines()]
    questions = {q.meta["image_id"]: q for q in read(lemmatize=real_nltk)}
    for record, (objects, length) in zip(records, GOLDEN_OPERA_CAPTIONS, strict=True):
        found = caption_objects(record["caption"], real_nltk)
        assert (found.objects, len(found.tokens)) == (objects, length), record["caption"]
    scores = Chair(real_nltk).score([(questions[r["image_id"]], r["caption"]) for r in records])
    assert scores == pytest.approx({"chair_s": GOLDEN_OPERA["CHAIRs"], "chair_i": GOLDEN_OPERA["CHAIRi"],
                                    "recall": GOLDEN_OPERA["Recall"], "len": GOLDEN_OPERA["Len"] * 100}, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Captions made elsewhere (OPERA's caption files) and the ids file given with --data

def test_caption_file_in_operas_format_scores_like_the_captions(tmp_path):
    jsonl = tmp_path / "greedy.jsonl"
    jsonl.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in CAPTIONS.items()))
    as_list = tmp_path / "greedy.json"
    as_list.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in CAPTIONS.items()]))
    questions = read()
    for path in (jsonl, as_list):
        captions = chair_module.read_caption_file(path)
        assert captions == {str(i): c for i, c in CAPTIONS.items()}
        scores = Chair(stand_in_lemmatizer).score([(q, captions[q.question_id]) for q in questions])
        assert scores == pytest.approx(EXPECTED)


@pytest.mark.parametrize("name, text, match", [
    ("c.jsonl", '{"image_id": "1001", "caption": "a dog"}\n', r"c\.jsonl line 1: record .* has no int 'image_id'"),
    ("c.jsonl", '{"image_id": 1001, "caption": "a"}\n\n{"image_id": 1001, "caption": "b"}\n',
     r"c\.jsonl line 3: image 1001 has a second caption"),
    ("c.jsonl", '{"image_id": 1001, "caption": "a"}\n{"image_id": 1002,\n', r"c\.jsonl: line 2 is not valid JSON"),
    ("c.json", '{"image_id": 1001, "caption": "a"}', r"c\.json: expected a JSON list"),
    ("c.json", '[{"image_id": 1001}]', r"c\.json item 1: record .* has no str 'caption'"),
    ("c.txt", "", r"c\.txt: expected \.jsonl or \.json"),
])
def test_bad_caption_files(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(MinivarError, match=match):
        chair_module.read_caption_file(tmp_path / name)


def test_ids_file_may_come_with_the_annotations(tmp_path):
    ids = tmp_path / "mine.txt"
    ids.write_text("1004\n1002\n")
    questions = read(paths=[FIXTURES, ids], image_ids=None)
    assert [q.question_id for q in questions] == ["1004", "1002"]
    _one_line_error(r"image ids given twice", paths=[FIXTURES, ids], image_ids=[1001])
    _one_line_error(r"takes one image id file, not 2", paths=[FIXTURES, ids, FIXTURES / "image_ids.txt"])
