"""tools/nltk_data.py, the parts that need no network: the tagger pickle's restricted reading, WordNet's layout with
the lexnames file, skipping what is there, and the command line's errors. The whole build (downloads included) is
checked by running the script; CHAIR's real-NLTK tests then run on its output."""
import importlib.util
import os
import pickle
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("nltk_data_tool", REPO / "tools" / "nltk_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tagger_pickle_gives_weights_tagdict_and_classes(tool):
    weights = {"bias": {"NN": 1.5, "DT": -0.25}, "i suffix ogs": {"NNS": 2.0}}
    tagdict = {"the": "DT", "dogs": "NNS"}
    data = pickle.dumps((weights, tagdict, {"NN", "NNS", "DT"}), protocol=2)
    assert tool.read_tagger_pickle(data) == (weights, tagdict, {"NN", "NNS", "DT"})


class Boom:
    def __reduce__(self):
        return (os.getcwd, ())      # what a hostile pickle does with os.system


def test_the_tagger_pickle_may_not_call_anything(tool):
    with pytest.raises(tool.BuildError, match=r"not the tagger pickle expected: refusing \w+\.getcwd$"):
        tool.read_tagger_pickle(pickle.dumps(({}, {"a": "DT"}, {"DT"}, Boom()), protocol=2))
    with pytest.raises(tool.BuildError, match=r"its parts have other types$"):
        tool.read_tagger_pickle(pickle.dumps(({}, {"a": "DT"}, ["DT"]), protocol=2))   # classes as a list


def fake_wordnet(folder: Path) -> Path:
    folder.mkdir()
    for name in [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")] + \
            [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")] + ["cntlist.rev", "index.sense", "sents.vrb",
                                                                        "sentidx.vrb", "frames.vrb"]:
        (folder / name).write_text(f"contents of {name}\n")
    return folder


def test_wordnet_is_copied_with_lexnames_and_then_skipped(tool, tmp_path, monkeypatch):
    monkeypatch.setattr(tool, "WORDNET_SYSTEM_DIR", fake_wordnet(tmp_path / "system"))
    dest = tmp_path / "nltk_data"
    assert tool.build_wordnet(dest).startswith("wrote ")
    target = dest / "corpora" / "wordnet"
    assert sorted(p.name for p in target.iterdir()) == sorted(tool.WORDNET_FILES + ["lexnames"])  # not frames.vrb
    assert (target / "index.sense").read_text() == "contents of index.sense\n"
    lines = (target / "lexnames").read_text().splitlines()
    assert len(lines) == 45
    assert lines[:4] == ["00\tadj.all\t3", "01\tadj.pert\t3", "02\tadv.all\t4", "03\tnoun.Tops\t1"]
    assert lines[5] == "05\tnoun.animal\t1" and lines[29] == "29\tverb.body\t2" and lines[44] == "44\tadj.ppl\t3"
    # A second run keeps what is there (here: a file changed since) and does not look at the system copy again.
    (target / "data.noun").write_text("kept")
    monkeypatch.setattr(tool, "WORDNET_SYSTEM_DIR", tmp_path / "gone")
    assert tool.build_wordnet(dest) == f"already in {target}"
    assert (target / "data.noun").read_text() == "kept"


def test_bad_arguments_are_one_error_line(tool, capsys):
    assert tool.main(["a", "b"]) == 2
    assert tool.main(["--force"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["minivar: error: usage: python tools/nltk_data.py [DEST] (DEST defaults to ~/nltk_data)"] * 2
