"""Qwen2-VL / Qwen2.5-VL through everything else minivar has: the command line (--json, sampling, streaming, pixel
caps), batches, generate_many, chunked prefill, the capture, minivar-eval, the lmms-eval plugin, VAR on a
planted-sink checkpoint (against a loop-level re-statement of the rule), DAMRO refused, VCD against a two-pass
reference. Tiny checkpoints made with transformers here (tests/test_qwen2_vl_model.py's helpers) and its local
byte-level BPE tokenizer: nothing is downloaded."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from test_qwen2_vl_model import QWEN_SPECIALS, QWEN_SPLIT, hf_model, write_checkpoint  # noqa: E402

import minivar  # noqa: E402
from minivar.errors import MinivarError  # noqa: E402
from minivar.models.qwen2_vl.processing import smart_resize  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
NAMES = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
         "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 24          # the tiny checkpoints' preprocessor_config.json


def write_tokenizer(directory: Path) -> dict:
    """The local byte-level BPE of test_qwen2_vl_model (Qwen's split regex, its special tokens after 266 entries)
    into `directory`; → {special token: id}."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is in the image? Describe it.", "You are a helpful assistant.", "system user assistant",
              "Is there a dog in the image? Answer the question using a single word or phrase. Yes No"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=266, initial_alphabet=pre_tokenizers.ByteLevel
                                                        .alphabet(), show_progress=False))
    tok.add_special_tokens(QWEN_SPECIALS)
    tok.save(str(directory / "tokenizer.json"))
    return {name: tok.token_to_id(name) for name in QWEN_SPECIALS}


def make_checkpoint(directory: Path, family: str = "qwen2_vl", seed: int = 0, plant=None) -> Path:
    """A tiny random checkpoint in the hub layout whose token ids are the local tokenizer's, with that tokenizer
    and a preprocessor_config.json capping images at MAX_PIXELS (24 tokens). plant(model, ids): changes to the
    weights before saving. The embedding has 300 rows, the tokenizer 280 entries (as Qwen's: more rows than
    tokens)."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(directory)
    hf = hf_model(family, seed=seed, token_ids={k: ids[v] for k, v in NAMES.items()})
    hf.config.text_config.eos_token_id = ids["<|im_end|>"]
    hf.config.text_config.pad_token_id = ids["<|endoftext|>"]
    if plant is not None:
        with torch.no_grad():
            plant(hf, ids)
    tokenizer = directory / "tokenizer.json"
    keep = tokenizer.read_bytes()
    write_checkpoint(hf, directory, "hub")
    tokenizer.write_bytes(keep)
    (directory / "preprocessor_config.json").write_text(json.dumps({"min_pixels": MIN_PIXELS,
                                                                     "max_pixels": MAX_PIXELS}))
    return directory


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module", params=FAMILIES)
def qwen_dir(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    return minivar.load(str(qwen_dir), device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------------------------
# The command line

def cli(capsys, *argv):
    from minivar import cli as cli_mod
    capsys.readouterr()
    rc = cli_mod.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    picture(200, 300, seed=1).save(path)
    return path


def base_args(qwen_dir, image_file, *more):
    return ("--model", qwen_dir, "--image", image_file, "--prompt", "What is in the image?", "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", 6, *more)


def test_cli_json_greedy_equals_the_pipeline_with_the_qwen_template(capsys, qwen_dir, image_file, pipe):
    rc, out, err = cli(capsys, *base_args(qwen_dir, image_file, "--json"))
    assert rc == 0, err
    record = json.loads(out)
    ref = pipe.generate(str(image_file), "What is in the image?", max_new_tokens=6)
    assert record["output_ids"] == ref.output_ids and record["prompt_ids"] == ref.prompt_ids
    assert record["text"] == ref.text
    # the qwen template by default, the image as its smart_resize grid: 300×200 → 336×224 is above MAX_PIXELS
    h, w = smart_resize(300, 200, 28, MIN_PIXELS, MAX_PIXELS)
    n = h * w // 28 ** 2
    tok = pipe.tokenizer
    assert record["prompt_ids"] == tok.encode_prompt("What is in the image?", "qwen", n)
    assert record["prompt_ids"].count(pipe.config.image_token_id) == n == 24


def test_cli_sampling_is_seeded_and_streams_what_json_gives(capsys, qwen_dir, image_file):
    runs = [json.loads(cli(capsys, *base_args(qwen_dir, image_file, "--json", "--temperature", 1.5, "--seed", s))[1])
            for s in (1, 1, 2)]
    assert runs[0]["output_ids"] == runs[1]["output_ids"] != runs[2]["output_ids"]
    rc, out, err = cli(capsys, *base_args(qwen_dir, image_file, "--temperature", 1.5, "--seed", 1))
    assert rc == 0 and out == runs[0]["text"] + "\n"          # streamed text == the whole answer decoded


@pytest.mark.parametrize("flags, size", [(("--max-pixels", 28 * 28 * 6), (300, 200)),
                                         (("--max-pixels", 3136), (300, 200)),
                                         (("--min-pixels", 28 * 28 * 20, "--max-pixels", 28 * 28 * 40), (300, 200))])
def test_cli_pixel_caps_change_the_token_count_as_smart_resize_says(capsys, qwen_dir, image_file, flags, size):
    rc, out, err = cli(capsys, *base_args(qwen_dir, image_file, "--json", *flags))
    assert rc == 0, err
    opts = dict(zip(flags[::2], flags[1::2]))
    h, w = smart_resize(*size, 28, opts.get("--min-pixels", MIN_PIXELS), opts.get("--max-pixels", MAX_PIXELS))
    n = json.loads(out)["prompt_ids"].count(minivar.load(str(qwen_dir), device="cpu").config.image_token_id)
    assert n == h * w // 784 and n != 24


def test_cli_bad_pixel_caps_are_one_line(capsys, qwen_dir, image_file):
    rc, out, err = cli(capsys, *base_args(qwen_dir, image_file, "--max-pixels", 100))
    assert rc == 2 and err.count("\n") == 1 and "--max-pixels 100" in err and "loaded" not in err


def test_cli_an_id_beyond_the_tokenizer_streams_nothing_and_does_not_crash(capsys, tmp_path, image_file):
    """Qwen's embedding has more rows than its tokenizer entries: a checkpoint whose head only ever picks such ids
    (rows < 280 zeroed, the others random) streams an empty answer."""
    def beyond_only(hf, ids):
        n_tok = max(ids.values()) + 1
        hf.lm_head.weight[:n_tok] = 0.0
    d = make_checkpoint(tmp_path / "beyond", plant=beyond_only)
    for more in ((), ("--json",)):
        rc, out, err = cli(capsys, *base_args(d, image_file, *more))
        assert rc == 0, err
    record = json.loads(out)
    assert len(record["output_ids"]) == 6 and min(record["output_ids"]) >= 280 and record["text"] == ""


def test_cli_damro_is_refused_in_one_line_before_generating(capsys, qwen_dir, image_file):
    rc, out, err = cli(capsys, *base_args(qwen_dir, image_file, "--damro"))
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "--damro" in err and "CLS token" in err and ("Qwen2-VL" in err or "Qwen2.5-VL" in err)
    assert "prefill" not in err


def test_cli_save_attention_is_refused_before_generating(capsys, qwen_dir, image_file, tmp_path):
    rc, out, err = cli(capsys, *base_args(qwen_dir, image_file, "--save-attention", tmp_path / "pics"))
    assert rc == 2 and out == "" and err.count("\n") == 1 and "--save-attention" in err and "prefill" not in err
