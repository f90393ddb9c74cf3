"""Beam search against transformers' own `generate(num_beams=K)` (its defaults: length_penalty 1.0, early_stopping
False) on tiny random LLaVA and Qwen2-VL checkpoints made with transformers: the same token sequences and the same
sequence scores, for several K, with an EOS some beams reach early, batched (left-padded); and through the pipeline
with VAR acting in every beam."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from minivar.checkpoint import load_model  # noqa: E402
from minivar.generate import generate  # noqa: E402

IMAGE_ID, PAD_ID = 290, 291


def hf_llava(directory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=56, patch_size=14),
        text_config=LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
                                initializer_range=0.2),
        image_token_index=IMAGE_ID, image_seq_length=16)
    torch.manual_seed(0)
    ref = LlavaForConditionalGeneration(cfg).eval()
    ref.save_pretrained(directory)
    return ref


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("beam_llava")
    ref = hf_llava(directory)
    return ref, load_model(directory, torch.float32)


def llava_batch(seeds=(0, 1), cut=(0, 3)):
    """Two prompts of different lengths (the second left-padded), their pixels and mask."""
    rows, pixels = [], []
    for seed, c in zip(seeds, cut):
        g = torch.Generator().manual_seed(seed)
        rows.append([1] + torch.randint(3, 280, (4,), generator=g).tolist() + [IMAGE_ID] * 16
                    + torch.randint(3, 280, (7 - c,), generator=g).tolist())
        pixels.append(torch.randn(3, 56, 56, generator=g))
    T = max(map(len, rows))
    ids = torch.tensor([[PAD_ID] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, torch.stack(pixels)


def hf_beams(ref, n, K, eos, **inputs):
    out = ref.generate(**inputs, do_sample=False, num_beams=K, max_new_tokens=n, eos_token_id=eos,
                       pad_token_id=PAD_ID, output_scores=True, return_dict_in_generate=True)
    T = inputs["input_ids"].shape[1]
    seqs = []
    for row in out.sequences[:, T:].tolist():
        seqs.append(row[:row.index(eos)] if eos is not None and eos in row else row)
    return seqs, out.sequences_scores.tolist()


def eos_reached_early(ref, K, **inputs):
    """An EOS id that some beams reach within the first tokens: a token of the best unconstrained answer."""
    seqs, _ = hf_beams(ref, 8, K, None, **inputs)
    return seqs[0][2]


@pytest.mark.parametrize("K", [2, 5])
def test_llava_beams_equal_transformers_batched_with_an_early_eos(llava_pair, K):
    ref, mine = llava_pair
    ids, mask, px = llava_batch()
    n = 10
    with torch.no_grad():
        eos = eos_reached_early(ref, K, input_ids=ids, attention_mask=mask, pixel_values=px)
        want, want_scores = hf_beams(ref, n, K, eos, input_ids=ids, attention_mask=mask, pixel_values=px)
    got = generate(mine, ids.repeat_interleave(K, 0), px.repeat_interleave(K, 0), max_new_tokens=n, eos_token_id=eos,
                   attention_mask=mask.repeat_interleave(K, 0), num_beams=K)
    assert got.output_ids == want
    assert got.scores == pytest.approx(want_scores, abs=1e-4)
    assert any(len(s) < n for s in want)                    # the EOS ended an answer early
    assert got.finished == [len(s) < n for s in want]


def test_llava_beams_without_eos_run_to_max_new_tokens(llava_pair):
    ref, mine = llava_pair
    ids, mask, px = llava_batch(seeds=(3,), cut=(0,))
    with torch.no_grad():
        want, want_scores = hf_beams(ref, 7, 4, None, input_ids=ids, attention_mask=mask, pixel_values=px)
    got = generate(mine, ids.repeat(4, 1), px.repeat(4, 1, 1, 1), max_new_tokens=7, eos_token_id=None, num_beams=4)
    assert got.output_ids == want and got.scores == pytest.approx(want_scores, abs=1e-4)
    assert got.finished == [False]


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    from test_qwen2_vl_model import hf_model, load_qwen2_vl, write_checkpoint
    hf = hf_model("qwen2_vl")
    return hf, load_qwen2_vl(write_checkpoint(hf, tmp_path_factory.mktemp("beam_qwen"), "hub"))


@pytest.mark.parametrize("K", [3])
def test_qwen2_vl_beams_equal_transformers_batched_with_an_early_eos(qwen_pair, K):
    from test_qwen2_vl_model import hf_inputs, image, left_pad, prompt_ids
    hf, ours = qwen_pair
    images = [image((1, 4, 6)), image((1, 2, 2), seed=1)]
    rows = [prompt_ids(images[:1], seed=0), prompt_ids(images[1:], seed=1, n_text=(6, 2))]
    ids, mask = left_pad(rows)
    inputs = hf_inputs(ids, mask, images)
    n = 9
    with torch.no_grad():
        eos = eos_reached_early(hf, K, **inputs)
        want, want_scores = hf_beams(hf, n, K, eos, **inputs)
    got = generate(ours, ids.repeat_interleave(K, 0), [im for im in images for _ in range(K)], max_new_tokens=n,
                   eos_token_id=eos, attention_mask=mask.repeat_interleave(K, 0), num_beams=K)
    assert got.output_ids == want
    assert got.scores == pytest.approx(want_scores, abs=1e-4)
    assert any(len(s) < n for s in want)


def test_pipeline_beams_with_var_batched_equal_one_by_one_and_report_along_the_answer(tiny_checkpoint):
    """VAR acts in every beam of every sample (τ low enough that the tiny model has sinks); a batch equals each
    sample alone, VAR's report included: its decode counters are read along the rows the answer ran in."""
    import minivar
    from PIL import Image
    from minivar.methods.var import VARConfig
    pipe = minivar.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    var = VARConfig(sink_dims=(3, 7), tau=1.0, rho=0.0, min_image_attention=0.0)
    images = [Image.new("RGB", (40, 30), (120, 30, 200)), Image.new("RGB", (30, 40), (10, 200, 20))]
    prompts = ["Describe it.", "What is in the image, please?"]
    both = pipe.generate_batch(images, prompts, max_new_tokens=6, num_beams=3, var=var)
    alone = [pipe.generate(im, p, max_new_tokens=6, num_beams=3, var=var) for im, p in zip(images, prompts)]
    assert [r.output_ids for r in both] == [r.output_ids for r in alone]
    assert [r.extra["sequence_score"] for r in both] == pytest.approx([r.extra["sequence_score"] for r in alone],
                                                                      abs=1e-5)
    assert [r.var["redistributed"] for r in both] == [r.var["redistributed"] for r in alone]
    assert sum(both[0].var["redistributed"]["decode"]) > 0
    plain = pipe.generate(images[0], prompts[0], max_new_tokens=6, num_beams=3)
    assert plain.extra["sequence_score"] != pytest.approx(both[0].extra["sequence_score"], abs=1e-6)   # VAR acted


def test_llava_next_beams_equal_transformers_and_opera_runs(tmp_path):
    """LLaVA-NeXT (anyres tiles): --num-beams through the command line equals transformers' beam search on the same
    directory; --opera runs on it and reports."""
    import json
    from conftest import run_cli
    from test_llava_next import PINPOINTS, S, hf_inputs, picture
    from test_llava_next_pipeline import write_next
    from transformers import LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    directory = write_next(tmp_path / "next")
    img = picture(150, 70)
    img.save(tmp_path / "x.png")
    base = ["--model", directory, "--image", tmp_path / "x.png", "--prompt", "What is in the image?", "--device",
            "cpu", "--dtype", "float32", "--max-new-tokens", "6", "--json"]
    rc, out, err = run_cli(base + ["--num-beams", "3"])
    assert rc == 0, err
    got = json.loads(out)
    ref = LlavaNextForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32).eval()
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=PINPOINTS)
    px, sizes = hf_inputs(proc, img)
    ids = torch.tensor([got["prompt_ids"]])
    with torch.no_grad():
        want, scores = hf_beams(ref, 6, 3, 2, input_ids=ids, pixel_values=px, image_sizes=sizes,
                                attention_mask=torch.ones_like(ids))
    assert got["output_ids"] == want[0] and got["sequence_score"] == pytest.approx(scores[0], abs=1e-4)
    rc, out, err = run_cli(base + ["--opera", "--num-beams", "2", "--opera-candidates", "2"])
    assert rc == 0, err
    assert json.loads(out)["opera"]["penalised_steps"] > 0
