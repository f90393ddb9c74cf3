"""LLaVA-NeXT end to end (issue 21, item 4): the command line, the Python API (generate_batch over images of
different token counts, generate_many, sampling, the capture), VAR with its image span over base, tiles and
newlines, DAMRO through the command line, minivar-eval on the harness's benchmarks and the lmms-eval plugin — on tiny
NeXT checkpoints made here with the demo's byte-level tokenizer (<image> = 259) and planted sinks. The model itself
is checked against transformers in test_llava_next.py; here the greedy answers of the command line are checked
against transformers' LlavaNextForConditionalGeneration loading the same directory."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import assert_one_line_error, run_cli, to_hub_key, write_checkpoint  # noqa: E402
from minivar import demo  # noqa: E402
from minivar.models.config import TextConfig, VisionConfig  # noqa: E402
from minivar.models.llava_next import LlavaNext, LlavaNextConfig, count_image_tokens  # noqa: E402
from test_llava_next import PINPOINTS, S, hf_inputs, hf_processor, image, picture  # noqa: E402,F401

IMG, PAD = 259, 260                         # the demo tokenizer's <image> and <pad>
DIMS = (11, 77)                             # (text sink dim, visual sink dim) planted
COMMON = 3
TAU = 5.0                                   # hidden 128: one massive dim caps φ at √128 ≈ 11.3 (τ = 20 is out of reach)
SINK_PATCHES = (5, 10)                      # patch indices of the 4×4 grid of every crop: base and tiles alike
PROMPT = "What is in the image?"
SIZES = {"wide": (150, 70), "tall": (60, 130), "square": (120, 120), "tiny": (9, 7)}   # w, h: 4 token counts


def next_config(text: str = "llama") -> LlavaNextConfig:
    """CLIP 64-dim / 3 layers at 56 px (4×4 features per crop), a 3-layer 128-dim decoder; Mistral: grouped-query
    attention (2 KV heads) and its sliding window."""
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=S, patch_size=14)
    t = TextConfig(vocab_size=261, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
                   num_key_value_heads=2 if text == "mistral" else None)
    return LlavaNextConfig(vision=vision, text=t, image_token_index=IMG, pad_token_id=PAD, torch_dtype="float32",
                           image_grid_pinpoints=tuple(tuple(p) for p in PINPOINTS), text_model_type=text,
                           sliding_window=4096 if text == "mistral" else None)


def next_state(cfg: LlavaNextConfig, seed: int = 0) -> dict:
    """Random weights for exactly LlavaNext(cfg)'s parameters, with the demo's planted sinks: BOS a text sink,
    the SINK_PATCHES of every crop visual sinks (their CLIP position embeddings are marked)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlavaNext(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {k: demo.random_tensor(k, shape, g) for k, shape in sorted(shapes.items())}
    for k in state:                  # attention matters for the output, so VAR shows in the greedy tokens
        if k.endswith("o_proj.weight"):
            state[k] *= 10
        if k.endswith("multi_modal_projector.linear_2.weight"):
            state[k] *= 20           # and the image matters: other images, other answers
    demo.plant_sinks(state, cfg, text_dim=DIMS[0], visual_dim=DIMS[1], common_dim=COMMON, patches=SINK_PATCHES)
    state["language_model.lm_head.weight"] *= 10      # wider logit gaps
    return state


def write_next(directory: Path, text: str = "llama") -> Path:
    """A llava-hf hub-layout checkpoint dir: config.json, preprocessor_config.json, model.safetensors,
    tokenizer.json."""
    cfg = next_config(text)
    state = {to_hub_key(k): v for k, v in next_state(cfg).items()}
    write_checkpoint(directory, state, cfg, config=cfg.to_hf(), tokenizer=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(cfg.to_hf_preprocessor(), indent=2))
    return directory


@pytest.fixture(scope="module")
def vicuna_dir(tmp_path_factory):
    return write_next(tmp_path_factory.mktemp("next_vicuna"), "llama")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return write_next(tmp_path_factory.mktemp("next_mistral"), "mistral")


@pytest.fixture(scope="module")
def pipe(vicuna_dir):
    import minivar
    return minivar.load(str(vicuna_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name → (PIL image, its file): sizes that give different token counts."""
    root = tmp_path_factory.mktemp("next_images")
    out = {}
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        img = picture(w, h, seed=i)
        img.save(root / f"{name}.png")
        out[name] = (img, root / f"{name}.png")
    return out


def cli_json(model_dir, image_file, *extra, prompt=PROMPT, n=6):
    rc, out, err = run_cli(["--model", model_dir, "--image", image_file, "--prompt", prompt, "--device", "cpu",
                            "--dtype", "float32", "--max-new-tokens", str(n), "--json", *extra])
    assert rc == 0, err
    return json.loads(out), err


def hf_greedy(model_dir, img, prompt_ids, n):
    """transformers' LlavaNextForConditionalGeneration on the same directory: greedy, no cache, stops at EOS (2)."""
    from transformers import LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    ref = LlavaNextForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=PINPOINTS)
    px, sizes = hf_inputs(proc, img)
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(ref(input_ids=ids, pixel_values=px, image_sizes=sizes).logits[0, -1].argmax())
            if nxt == 2:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The command line

@pytest.mark.parametrize("text, template, head", [("llama", "vicuna_v1", "A chat between"),
                                                  ("mistral", "mistral_instruct", "[INST] ")])
def test_cli_answers_with_the_family_defaults_as_transformers_does(request, images, text, template, head):
    model_dir = request.getfixturevalue("vicuna_dir" if text == "llama" else "mistral_dir")
    import minivar
    pipe = minivar.load(str(model_dir), device="cpu", dtype="float32")
    assert pipe.family.conv_mode_for(pipe.config) == template and pipe.family.default_image_mode == "anyres"
    for name in ("wide", "tall"):
        img, path = images[name]
        rec, err = cli_json(model_dir, path)
        n = count_image_tokens((img.height, img.width), pipe.config)
        assert rec["prompt_ids"] == pipe.prompt_ids(PROMPT, template, num_image_tokens=n)[0].tolist()
        assert rec["prompt_ids"].count(IMG) == n
        assert pipe.tokenizer.decode(rec["prompt_ids"]).startswith(head)
        assert rec["output_ids"] == hf_greedy(model_dir, img, rec["prompt_ids"], 6), name
        assert rec["text"] == pipe.tokenizer.decode(rec["output_ids"])
        assert "minivar: prefill" in err
    # the flags' other choices: llava_hf is a NeXT template; pad is LLaVA-1.5's image mode, not NeXT's
    rec, _ = cli_json(model_dir, images["wide"][1], "--conv-mode", "llava_hf")
    assert pipe.tokenizer.decode(rec["prompt_ids"]).startswith("USER: ")
    assert_one_line_error(*run_cli(["--model", model_dir, "--image", images["wide"][1], "--prompt", PROMPT,
                                    "--device", "cpu", "--image-aspect-ratio", "pad"]), "pad", "anyres")
