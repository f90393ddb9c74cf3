"""Parity with transformers' LlavaForConditionalGeneration, framework-free: the expected logits and greedy tokens in
tests/golden/ were produced by transformers (tests/make_golden.py) from the very checkpoints stored next to them,
in each key layout met in the wild (hub sharded fp16, 5.x save, 5.x in-memory bf16, duplicated .model.model)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minivar import processing
from minivar.checkpoint import load_model
from minivar.generate import generate

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[1]
LAYOUT_CASES = ["hub_sharded_fp16", "v5_hybrid_single", "v5_inmemory_bf16", "dup_model_model"]


@pytest.fixture(scope="module", params=LAYOUT_CASES)
def layout_case(request):
    case = GOLDEN / request.param
    return load_model(case, torch.float32), load_file(str(case / "expected.safetensors"))


def test_prefill_logits_match_transformers(layout_case):
    model, exp = layout_case
    with torch.inference_mode():
        logits = model(exp["input_ids"], exp["pixel_values"])
    assert logits.shape == exp["logits"].shape
    assert (logits - exp["logits"]).abs().max().item() <= 1e-4


def test_image_features_match_transformers(layout_case):
    model, exp = layout_case
    with torch.inference_mode():
        feats = torch.stack(model.image_features(exp["pixel_values"]))
    assert (feats - exp["image_features"]).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers(layout_case):
    model, exp = layout_case
    out = generate(model, exp["input_ids"], exp["pixel_values"], max_new_tokens=16)
    assert out.output_ids[0] == exp["greedy"][0].tolist()


# ---------------------------------------------------------------------------------------------------------------
# End to end: real tokenizer, both templates, pad and crop on a non-square image, 576 image tokens.

@pytest.fixture(scope="module")
def e2e():
    case = GOLDEN / "e2e"
    info = json.loads((case / "expected.json").read_text())
    return load_model(case, torch.float32), load_file(str(case / "expected.safetensors")), info


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_preprocessing_equals_reference(e2e, mode):
    _, exp, _ = e2e
    img = processing.load_image(REPO / "assets" / "example.jpg")
    assert img.size == (512, 352)   # non-square: the pad offset and crop window matter
    px = processing.preprocess(img, 336, mode)
    assert (px - exp[f"{mode}.pixel_values"][0]).abs().max().item() <= 1e-6


SUBCASES = ["pad_vicuna_v1", "pad_llava_hf", "crop_vicuna_v1", "crop_llava_hf"]


@pytest.mark.parametrize("sub", SUBCASES)
def test_prompt_ids_equal_reference(e2e, sub, llama_tokenizer_path):
    _, exp, info = e2e
    tok = processing.Tokenizer(llama_tokenizer_path, 32000)
    ids = tok.encode_prompt(info["prompt"], info["subcases"][sub]["template"], 576)
    assert ids == exp[f"{sub}.input_ids"][0].tolist()


@pytest.mark.parametrize("sub", SUBCASES)
def test_e2e_logits_and_greedy_match_transformers(e2e, sub):
    model, exp, info = e2e
    mode = info["subcases"][sub]["mode"]
    ids = exp[f"{sub}.input_ids"]
    px = processing.preprocess(processing.load_image(REPO / "assets" / "example.jpg"), 336, mode)[None]
    with torch.inference_mode():
        logits = model(ids, px)
    tail = exp[f"{sub}.logits_tail"]
    assert (logits[:, -tail.shape[1]:] - tail).abs().max().item() <= 1e-4
    out = generate(model, ids, px, max_new_tokens=16)
    assert out.output_ids[0] == exp[f"{sub}.greedy"][0].tolist()
