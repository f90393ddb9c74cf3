"""The stream decoder (processing.StreamDecoder) for both kinds of tokenizer minivar meets: byte-level BPE (the demo's)
and sentencepiece with byte fallback (the real LLaMA tokenizer). Its contract: the pieces it hands out, joined, are
always a prefix of the final decode and, after flush(), equal it — whatever ids arrive."""
from pathlib import Path

import numpy as np
import pytest

from minivar.processing import Tokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "assets" / "example.jpg"


@pytest.fixture(scope="module")
def demo_tok(tmp_path_factory):
    from minivar.demo import make_tokenizer
    path = tmp_path_factory.mktemp("demo_tok") / "tokenizer.json"
    make_tokenizer().save(str(path))
    return Tokenizer(path, image_token_id=259)


def byte_ids(tok, text):
    """The demo tokenizer has no merges: one id per UTF-8 byte of `text`."""
    ids = tok._tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == len(text.encode())
    return ids


@pytest.fixture(scope="module")
def llama_tok(llama_tokenizer_path):
    return Tokenizer(llama_tokenizer_path, image_token_id=32000)


def stream_all(tok, ids):
    """Push every id and flush, checking after each push that what was printed so far is final text."""
    stream = tok.decode_token_stream()
    printed = ""
    for n, i in enumerate(ids, 1):
        printed += stream.push(i)
        assert tok.decode(ids[:n]).startswith(printed) or printed == ""
    printed += stream.flush()
    return printed


def demo_ids(tok, rng, n):
    """Byte-level ids: mostly the 256 byte tokens (3..258), with the specials (0..2, 259, 260) and runs of valid
    multi-byte UTF-8 (characters split across tokens) mixed in."""
    ids = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.5:
            ids.append(int(rng.integers(3, 259)))                        # any byte, valid UTF-8 or not
        elif kind < 0.6:
            ids.append(int(rng.choice([0, 1, 2, 259, 260])))
        else:                                                            # a whole character, byte by byte
            ch = chr(int(rng.choice([rng.integers(0x20, 0x7f), rng.integers(0xa0, 0x800),
                                     rng.integers(0x800, 0xd800), rng.integers(0x10000, 0x1fb00)])))
            ids.extend(byte_ids(tok, ch))
    return ids


def llama_ids(rng, n):
    """LLaMA ids: byte-fallback tokens (3..258), ordinary pieces, specials (0..2, 32000, 32001) and the lm_head's
    padding rows past the vocabulary (32002..32063), which decode to nothing."""
    pools = [(3, 259), (259, 32000), (0, 3), (32000, 32002), (32002, 32064)]
    weights = [0.45, 0.45, 0.04, 0.03, 0.03]
    return [int(rng.integers(*pools[rng.choice(len(pools), p=weights)])) for _ in range(n)]


def test_byte_level_streams_equal_the_final_decode_fuzz(demo_tok):
    rng = np.random.default_rng(0)
    for _ in range(150):
        ids = demo_ids(demo_tok, rng, int(rng.integers(1, 80)))
        assert stream_all(demo_tok, ids) == demo_tok.decode(ids), ids


def test_sentencepiece_streams_equal_the_final_decode_fuzz(llama_tok):
    rng = np.random.default_rng(1)
    for _ in range(150):
        ids = llama_ids(rng, int(rng.integers(1, 80)))
        assert stream_all(llama_tok, ids) == llama_tok.decode(ids), ids


def test_byte_level_holds_an_incomplete_character(demo_tok):
    euro = byte_ids(demo_tok, "€")                        # three byte tokens
    ids = byte_ids(demo_tok, "a") + euro + byte_ids(demo_tok, "b")
    stream = demo_tok.decode_token_stream()
    assert [stream.push(i) for i in ids] == ["a", "", "", "€", "b"]
    assert stream.flush() == ""
    # A character cut off by the end of generation is printed by flush() as the decoder shows it (U+FFFD).
    stream = demo_tok.decode_token_stream()
    assert stream.push(euro[0]) == "" and stream.flush() == demo_tok.decode(euro[:1]) == "\ufffd"


def test_sampling_with_streaming_on_the_demo(demo_pipe):
    """What crashed before: sampled demo text streams through a byte-level tokenizer, characters split across
    tokens. Many seeds; the streamed text equals the result's text every time."""
    for seed in range(8):
        pieces = []
        out = demo_pipe.generate(EXAMPLE, "Describe", temperature=0.8, top_p=0.9, seed=seed, max_new_tokens=40,
                                 on_text=pieces.append)
        assert "".join(pieces) == out.text
        assert all(pieces)                                 # on_text is never called with nothing
