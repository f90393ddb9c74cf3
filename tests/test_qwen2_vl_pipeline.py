"""Qwen2-VL / Qwen2.5-VL through everything else minivar has: the command line (--json, sampling, streaming, pixel
caps), batches, generate_many, chunked prefill, the capture, minivar-eval, the lmms-eval plugin, VAR on a
planted-sink checkpoint (against a loop-level re-statement of the rule), DAMRO refused, VCD against a two-pass
reference. Tiny checkpoints made with transformers here (tests/test_qwen2_vl_model.py's helpers) and its local
byte-level BPE tokenizer: nothing is downloaded."""
import json
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
    assert record["prompt_tokenization"] is None           # LLaVA's tokenization modes do not apply to Qwen
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


# ---------------------------------------------------------------------------------------------------------------
# The Python API: batches, shared prefixes, chunks, the capture

SIZES = [(90, 60), (40, 200), (300, 300)]      # wide, tall (→ 4×22 patches), large (capped at MAX_PIXELS)
PROMPTS = ["What is in the image?", "Describe it.", "Is there a dog in the image? Answer the question using a "
           "single word or phrase."]


def test_batch_of_images_of_different_sizes_equals_one_by_one(pipe):
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    counts = [pipe.image(im).num_tokens for im in images]
    assert len(set(counts)) == 3                                  # left padding of different lengths
    batch = pipe.generate_batch(images, PROMPTS, max_new_tokens=8)
    alone = [pipe.generate(im, p, max_new_tokens=8) for im, p in zip(images, PROMPTS)]
    assert [r.output_ids for r in batch] == [r.output_ids for r in alone]
    assert [r.prompt_ids for r in batch] == [r.prompt_ids for r in alone]
    # sampling too: each row its own draws from one seeded generator, so compare a batch with itself only
    s1 = pipe.generate_batch(images, PROMPTS, max_new_tokens=8, temperature=1.0, seed=4)
    s2 = pipe.generate_batch(images, PROMPTS, max_new_tokens=8, temperature=1.0, seed=4)
    assert [r.output_ids for r in s1] == [r.output_ids for r in s2]


def test_batch_with_var_equals_one_by_one(planted):
    """The planted-sink checkpoint (below): images of three sizes, sinks at different tokens, VAR acting."""
    from minivar.methods.var import VARConfig
    images = [planted_picture((1, 11)), planted_picture((0,), size=(84, 56)), planted_picture((3, 7), size=(56, 140))]
    assert [planted.image(im).num_tokens for im in images] == [12, 6, 10]
    var = VARConfig(sink_dims=(TEXT_DIM, VISUAL_DIM), tau=TAU)
    batch = planted.generate_batch(images, PROMPTS, max_new_tokens=6, var=var)
    alone = [planted.generate(im, p, max_new_tokens=6, var=var) for im, p in zip(images, PROMPTS)]
    assert [r.output_ids for r in batch] == [r.output_ids for r in alone]
    for b, a, n in zip(batch, alone, (2, 1, 2)):
        assert b.var["sinks"] == a.var["sinks"] and b.var["redistributed"] == a.var["redistributed"]
        assert b.var["image_span"] == a.var["image_span"] and len(a.var["visual_sinks"]["0"]) == n
        assert sum(a.var["redistributed"]["prefill"]) > 0


def test_generate_many_shares_the_prefix_and_equals_one_by_one(pipe):
    img = picture(120, 80, seed=3)
    prompts = ["What is in the image?", "Describe it.", "What is in the image? Describe it."]
    many = pipe.generate_many(img, prompts, max_new_tokens=8)
    alone = [pipe.generate(img, p, max_new_tokens=8) for p in prompts]
    assert [r.output_ids for r in many] == [r.output_ids for r in alone]
    assert many[0].timing["prefix_tokens"] > pipe.image(img).num_tokens      # the image is in the shared prefix


def test_generate_many_with_var_equals_one_by_one(planted):
    from minivar.methods.var import VARConfig
    var = VARConfig(sink_dims=(TEXT_DIM, VISUAL_DIM), tau=TAU)
    prompts = ["What is in the image?", "Describe it.", "What is in the image? Describe it."]
    many = planted.generate_many(planted_picture(), prompts, max_new_tokens=8, var=var)
    alone = [planted.generate(planted_picture(), p, max_new_tokens=8, var=var) for p in prompts]
    assert [r.output_ids for r in many] == [r.output_ids for r in alone]
    assert [r.var["redistributed"] for r in many] == [r.var["redistributed"] for r in alone]
    assert [r.var["sinks"] for r in many] == [r.var["sinks"] for r in alone]
    assert all(sum(r.var["redistributed"]["decode"]) > 0 for r in alone)


def test_chunked_prefill_with_var_equals_one_call(planted):
    """The prompt in three chunks (the image split between two) at its M-RoPE positions, VAR's sink sets growing
    chunk by chunk: the same logits and the same sinks as one call."""
    from minivar.methods.var import VARConfig, VARState, Sinks
    model, cfg = planted.model, planted.config
    im = planted.image(planted_picture())
    ids = planted.prompt_ids("What is in the image?", num_image_tokens=im.num_tokens)
    T = ids.shape[1]
    var = VARConfig(sink_dims=(TEXT_DIM, VISUAL_DIM), tau=TAU)     # the planted sinks (below)

    def state():
        t = cfg.text
        return VARState(var, Sinks(var.sink_dims, var.tau, t.num_hidden_layers, model.image_positions(ids)),
                        max_len=T)

    with torch.inference_mode():
        one = state()
        whole = model(ids, [im], cache=model.new_cache(1, T, torch.float32, "cpu"), hooks=one)
        positions = model.positions(ids, [im])
        features = model.image_features([im])[0]
        start = int(model.image_positions(ids)[0].nonzero()[0])
        cuts = [0, start + 2, T - 5, T]
        chunked, cache, parts, used = state(), model.new_cache(1, T, torch.float32, "cpu"), [], 0
        for a, b in zip(cuts, cuts[1:]):
            n = int(model.image_positions(ids[:, a:b]).sum())
            parts.append(model(ids[:, a:b], image_features=features[used:used + n] if n else None,
                               positions=positions[:, :, a:b], cache=cache, input_pos=a, hooks=chunked))
            used += n
    assert (torch.cat(parts, 1) - whole).abs().max().item() <= 1e-4
    assert chunked.report(0)["sinks"] == one.report(0)["sinks"]
    assert chunked.report(0)["redistributed"] == one.report(0)["redistributed"]
    assert sum(one.report(0)["redistributed"]["prefill"]) > 0


def test_capture_records_the_attention_and_the_sinks_of_the_image_pad_span(pipe):
    from minivar.methods.var import VARConfig
    img = picture(90, 60)
    im = pipe.image(img)
    var = VARConfig(sink_dims=(3, 17), tau=2.0)
    cap = pipe.capture(img, "What is in the image?", layers=[0, 1], heads=[0, 3], var=var, residuals=True)
    ids = torch.tensor([cap.result.prompt_ids])
    T = ids.shape[1]
    before, after = cap.attention_probs[1]["before"], cap.attention_probs[1]["after"]
    assert before.shape == (1, 2, T, T) and after.shape == (1, 2, T, T)
    assert torch.allclose(after.sum(-1), torch.ones(1, 2, T), atol=1e-5)
    span = cap.result.var["image_span"]
    pads = (ids[0] == pipe.config.image_token_id).nonzero().flatten().tolist()
    assert span == [pads[0], pads[-1] + 1] and span[1] - span[0] == im.num_tokens
    # the capture's attention before VAR is the model's own: recompute layer 0's from its residual input
    ref = pipe.generate(img, "What is in the image?", max_new_tokens=1)
    assert cap.result.prompt_ids == ref.prompt_ids


# ---------------------------------------------------------------------------------------------------------------
# VAR on planted-sink Qwen2-VL and Qwen2.5-VL checkpoints

TEXT_DIM, VISUAL_DIM = 11, 40        # the planted massive dims (of the decoder's 64)
TAU = 5.0                            # hidden 64: one massive dim caps φ at √64 = 8, so τ = 20 cannot be reached
SINK_TOKENS = (1, 11)                # merged tokens (row 0, col 1) and (row 2, col 3) of a 3×4 token image


def plant_sinks(hf, ids):
    """Massive values in the decoder's input: the first token's embedding (<|im_start|>: a text sink in both
    dims, so the finder sees both) and the image tokens whose 28×28 block is bright in red. The ViT blocks are made
    the identity (their output projections zeroed; Qwen2.5-VL's window attention then changes nothing either),
    patch dim 0 sums the red channel, and the merger (after its LayerNorm / RMSNorm) turns a large dim 0 into a
    massive VISUAL_DIM; a red value at the mean (123) marks nothing."""
    emb = hf.model.language_model.embed_tokens.weight
    emb[ids["<|im_start|>"], TEXT_DIM] = 100.0
    emb[ids["<|im_start|>"], VISUAL_DIM] = 100.0
    visual = hf.model.visual
    for block in visual.blocks:
        out = block.mlp.fc2 if hasattr(block.mlp, "fc2") else block.mlp.down_proj     # Qwen2-VL's, Qwen2.5-VL's
        for lin in (block.attn.proj, out):
            lin.weight.zero_()
            lin.bias.zero_()
    w = visual.patch_embed.proj.weight                          # [32, 3, 2, 14, 14]
    w[0].zero_()
    w[0, 0] = 0.08                                             # dim 0: ≈ 60 for a bright patch, ≈ 0 at the mean
    first, last = visual.merger.mlp[0], visual.merger.mlp[2]
    first.weight[0].zero_()
    first.weight[0, 0] = 1.0                                   # the block's first patch's dim 0 (≈ 5 after ln_q) ...
    first.bias[0] = -3.0                                       # ... through GELU only when bright
    last.weight[:, 0] = 0.0
    last.weight[VISUAL_DIM, 0] = 50.0                          # → a massive VISUAL_DIM


def planted_picture(tokens=SINK_TOKENS, seed=0, size=(112, 84)) -> Image.Image:
    """w×h, multiples of 28 kept by smart_resize (112×84: 6×8 patches, 3×4 merged tokens): red at 123 except the
    chosen tokens' 28×28 blocks at 255; green and blue random."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    arr[..., 0] = 123
    for t in tokens:
        r, c = divmod(t, w // 28)
        arr[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28, 0] = 255
    return Image.fromarray(arr.numpy())


@pytest.fixture(scope="module", params=FAMILIES)
def planted(request, tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("planted"), request.param, plant=plant_sinks)
    return minivar.load(str(d), device="cpu", dtype="float32")


def var_by_loops(h, before, image, dims, tau, rho, p, min_image_attention, touched_layer: bool):
    """design.md §3 for one layer of one prompt, in loops over plain numbers (no minivar code):
    h [T, D] the layer's residual input, before [H, T, T] its attention probabilities, image: the image-pad
    positions I. → (S, V, selected (head, row) pairs, the probabilities after VAR as nested lists).
      φ_j = max_{d∈D} |h_j[d]| / sqrt(mean_k h_j[k]² + 1e-6);  S = {j : φ_j ≥ τ};  V = S ∩ I.
      Rows i ≥ end of I; no visual sink, or the last layer: nothing changes.
      A = Σ_{j∈I} α_ij, r = Σ_{j∈I∖V} α_ij / A; selected iff A ≥ 0.2 and r ≥ ρ.
      Selected rows: α'_ij = (1−p) α_ij on S; α'_ij = α_ij + Ω α_ij / Σ_{k∈I∖V} α_ik on I∖V, Ω = p Σ_{j∈S} α_ij."""
    h, probs = h.tolist(), before.tolist()
    T, D = len(h), len(h[0])
    phi = [max(abs(h[j][d]) for d in dims) / (sum(x * x for x in h[j]) / D + 1e-6) ** 0.5 for j in range(T)]
    S = [j for j in range(T) if phi[j] >= tau]
    V = [j for j in S if j in image]
    nonsink_image = [j for j in image if j not in V]
    after = [[row[:] for row in head] for head in probs]
    selected = []
    if not touched_layer or not V:
        return S, V, selected, after
    for head in range(len(probs)):
        for i in range(max(image) + 1, T):
            a = probs[head][i]
            A = sum(a[j] for j in image)
            rest = sum(a[j] for j in nonsink_image)
            if A >= min_image_attention and rest > 0 and rest / A >= rho:
                selected.append((head, i))
                omega = p * sum(a[j] for j in S)
                for j in S:
                    after[head][i][j] = (1 - p) * a[j]
                for j in nonsink_image:
                    after[head][i][j] = a[j] + omega * a[j] / rest
    return S, V, selected, after


@pytest.mark.parametrize("rho", [0.8, 0.5])
def test_var_on_planted_sinks_equals_the_rule_written_as_loops(planted, rho):
    """Sinks, visual sinks, selected (head, row) pairs and redistributed probabilities of every layer, from the
    capture of a real run, against var_by_loops on that layer's residual input and attention before VAR; the
    planted positions are the sinks, the image span is the image-pad tokens, the last layer is left alone."""
    from minivar.methods.var import VARConfig
    var = VARConfig(tau=TAU, rho=rho)
    notes = []                                    # the finder's line (tested with the command line below)
    cap = planted.capture(planted_picture(), "What is in the image?", layers="all", residuals=True, var=var,
                          warn=notes.append)
    ids = cap.result.prompt_ids
    image = [j for j, t in enumerate(ids) if t == planted.config.image_token_id]
    im_start = [j for j, t in enumerate(ids) if t == planted.tokenizer.ids["<|im_start|>"]]
    report = cap.result.var
    assert report["sink_dims"] == [TEXT_DIM, VISUAL_DIM] and report["sink_dims_source"] == "finder"
    assert report["image_span"] == [image[0], image[-1] + 1] and len(image) == 12
    L = planted.config.text.num_hidden_layers
    total = 0
    for layer in range(L):
        S, V, selected, after = var_by_loops(cap.residuals[layer][0], cap.attention_probs[layer]["before"][0], image,
                                             report["sink_dims"], TAU, rho, var.p, var.min_image_attention,
                                             touched_layer=layer < L - 1)
        assert V == [image[t] for t in SINK_TOKENS]                    # the planted image tokens
        assert S == sorted(im_start + V)                               # and every <|im_start|>
        assert report["sinks"][str(layer)] == S and report["visual_sinks"][str(layer)] == V
        got = cap.selected(layer)[0]                                   # [H, T]
        assert sorted(map(tuple, got.nonzero().tolist())) == selected
        assert report["redistributed"]["prefill"][layer] == len(selected)
        assert (cap.attention_probs[layer]["after"][0] - torch.tensor(after)).abs().max().item() <= 1e-6
        total += len(selected)
    assert report["redistributed"]["prefill"][L - 1] == 0 and total > 10


def test_var_sink_dims_from_the_finder_and_from_the_flag_agree(capsys, planted, tmp_path):
    img = tmp_path / "planted.png"
    planted_picture().save(img)
    args = ("--model", planted.directory, "--image", img, "--prompt", "What is in the image?", "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", 5, "--json", "--var", "--tau", TAU)
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    assert "sink-dim finder found dims [11, 40] (--sink-dims 11,40 passes them" in err
    assert "sink dims 11,40 (finder)" in err
    found = json.loads(out)
    rc, out, err = cli(capsys, *args, "--sink-dims", "11,40")
    given = json.loads(out)
    assert rc == 0 and "finder" not in err and given["var"]["sink_dims_source"] == "user"
    assert given["output_ids"] == found["output_ids"] and given["var"]["redistributed"] == found["var"]["redistributed"]
    plain = json.loads(cli(capsys, *args[:-3])[1])
    assert plain["output_ids"] != found["output_ids"]             # VAR changed the answer


# ---------------------------------------------------------------------------------------------------------------
# DAMRO refused, VCD against a two-pass reference

def test_damro_is_refused_by_the_api_in_one_line(pipe):
    from minivar.methods.damro import DAMRO
    with pytest.raises(MinivarError, match="--damro: DAMRO needs a vision encoder with a CLS token") as e:
        pipe.generate(picture(90, 60), "What is in the image?", methods=[DAMRO()], max_new_tokens=2)
    assert "\n" not in str(e.value) and pipe.family.name in str(e.value)


def vcd_two_pass(pipe, image, prompt, cfg, seed, max_new_tokens, temperature=0.0):
    """The released way: the full branch (the image) and the contrast branch (its pixels noised: the flattened
    patches are Qwen's preprocessed pixel tensor) each run alone with a cache of their own — prefill from the
    image's own M-RoPE positions, decode steps after its rope deltas — combined per step by contrastive.combine."""
    from minivar.generate import sample_next
    from minivar.methods import vcd
    from minivar.methods.contrastive import combine
    from minivar.models.images import ImageInput
    model = pipe.model
    im = pipe.image(image)
    noised = ImageInput(vcd.noised_images(im.pixel_values[None], cfg.noise_step, seed)[0], im.num_tokens, im.panels,
                        dict(im.meta))
    ids = pipe.prompt_ids(prompt, num_image_tokens=im.num_tokens)
    T = ids.shape[1]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    caches = [model.new_cache(1, T + max_new_tokens, torch.float32, "cpu") for _ in range(2)]
    with torch.inference_mode():
        logits = [model(ids, [x], cache=c, output="last") for x, c in zip((im, noised), caches)]
        out = []
        for step in range(max_new_tokens):
            t = int(sample_next(combine(logits[0], logits[1], cfg.alpha, cfg.beta), temperature, 1.0, generator))
            if t in pipe.stop_ids:
                break
            out.append(t)
            logits = [model(torch.tensor([[t]]), cache=c, input_pos=T + step, output="last") for c in caches]
    return out


@pytest.mark.parametrize("seed, temperature", [(None, 0.0), (7, 0.0), (7, 1.0)])
def test_vcd_equals_the_two_pass_reference(pipe, seed, temperature):
    """generate_batch runs both branches as rows of one batch (the contrast rows carry the noised image, so their
    M-RoPE positions are its grid's): equal to the branches run one after the other, per sample, for images of
    different sizes."""
    from minivar.methods.vcd import VCD, VCDConfig
    cfg = VCDConfig(alpha=3.0, beta=0.05)          # a strong contrast, so the noised branch decides tokens
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:2])]
    kw = dict(max_new_tokens=8, temperature=temperature, seed=seed)
    if temperature == 0.0:
        batch = pipe.generate_batch(images, PROMPTS[:2], methods=[VCD(cfg, seed=seed)], **kw)
        assert [r.output_ids for r in batch] == [vcd_two_pass(pipe, im, p, cfg, seed, 8)
                                                  for im, p in zip(images, PROMPTS[:2])]
    one = pipe.generate(images[0], PROMPTS[0], methods=[VCD(cfg, seed=seed)], **kw)
    assert one.output_ids == vcd_two_pass(pipe, images[0], PROMPTS[0], cfg, seed, 8, temperature)
    assert one.reports["vcd"] == cfg.settings()
    plain = pipe.generate(images[0], PROMPTS[0], **kw)
    if temperature == 0.0:
        assert plain.output_ids != one.output_ids          # the contrast does change the answer


# ---------------------------------------------------------------------------------------------------------------
# minivar-eval run on the harness's benchmarks (real-format data as the eval tests write it)

@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    from test_reproduce import make_root
    return make_root(tmp_path_factory.mktemp("evaldata"))


BENCH_DATA = {"pope": ("pope", "--images", "coco/val2014"), "mme": ("mme/MME_Benchmark_release_version",),
              "gqa": ("gqa",), "mmvp": ("mmvp",), "cvbench": ("cvbench",)}


@pytest.mark.parametrize("bench", sorted(BENCH_DATA))
def test_eval_run_uses_the_qwen_template_and_each_benchmarks_suffix(pipe, eval_root, tmp_path, bench):
    """`minivar-eval run` on a Qwen checkpoint: run.json records the family's own template and image mode; every
    answer is what the pipeline gives for the benchmark's prompt (its suffix included) with the qwen template."""
    from test_eval_harness import answers, cli as eval_cli
    data, *rest = BENCH_DATA[bench]
    extra = [eval_root / rest[1]] if rest else []
    out = tmp_path / bench
    rc, stdout, err = eval_cli(["run", bench, "--data", eval_root / data, *rest[:1], *extra, "--out", out,
                                "--model", pipe.directory, "--device", "cpu", "--dtype", "float32",
                                "--max-new-tokens", "3", "--limit", "4", "--json"])
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["conv_mode"] == "qwen" and run["image_aspect_ratio"] == "smart_resize"
    recs = answers(out / "answers.jsonl")
    assert len(recs) == json.loads(stdout)["n"] >= 3
    suffix = {"pope": "\nAnswer the question using a single word or phrase.",
              "mme": "\nAnswer the question using a single word or phrase.",
              "gqa": "\nAnswer the question using a single word or phrase.",
              "mmvp": "\nAnswer with the option's letter from the given choices directly.",
              "cvbench": "\nAnswer with the option's letter from the given choices directly."}[bench]
    from minivar.eval.benchmarks import get
    questions = {q.question_id: q for q in get(bench).read([eval_root / data], **(
        {"images": eval_root / rest[1]} if rest else {}))}
    for rec in recs[:2]:
        assert rec["prompt"].endswith(suffix)
        q = questions[rec["question_id"]]
        ref = pipe.generate(q.load_image(), rec["prompt"], max_new_tokens=3)
        assert rec["output_ids"] == ref.output_ids


# ---------------------------------------------------------------------------------------------------------------
# The lmms-eval plugin

@pytest.fixture(scope="module")
def lmm(qwen_dir):
    pytest.importorskip("lmms_eval")
    from minivar.lmms_plugin import Minivar
    return Minivar(pretrained=str(qwen_dir), device="cpu", dtype="float32", batch_size=2)


def instances(kind, items):
    """lmms-eval Instances for docs 0, 1, ...: (context, gen_kwargs | target, doc_to_visual, doc_id, task, split)."""
    from lmms_eval.api.instance import Instance
    return [Instance(request_type=kind, arguments=(context, arg, visual, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1})
            for i, (context, visual, arg) in enumerate(items)]


def test_plugin_defaults_to_the_family_template_and_image_mode(lmm, qwen_dir):
    from minivar.lmms_plugin import Minivar
    assert (lmm.conv_mode, lmm.image_aspect_ratio) == ("qwen", "smart_resize")
    for args, name in (({"conv_mode": "vicuna_v1"}, "conv_mode"), ({"image_aspect_ratio": "pad"}, "image_aspect_ratio")):
        with pytest.raises(MinivarError, match=f"--model_args {name}=.*Qwen2") as e:
            Minivar(pretrained=str(qwen_dir), device="cpu", dtype="float32", **args)
        assert "\n" not in str(e.value)


def test_plugin_generate_until_equals_the_pipeline(lmm):
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    lmm.task_dict = {"t": {"test": list(range(3))}}
    reqs = instances("generate_until", [(p, (lambda d, im=im: [im]), {"max_new_tokens": 5, "do_sample": False})
                                        for p, im in zip(PROMPTS, images)])
    out = lmm.generate_until(reqs)
    for p, im, o in zip(PROMPTS, images, out):
        direct = lmm.pipeline.generate(im, p, max_new_tokens=5)
        assert o.text == direct.text.strip()
        assert o.token_counts.input_tokens == len(direct.prompt_ids)


def test_plugin_loglikelihood_gives_each_image_its_own_token_count(lmm):
    """Images of three sizes (16, 10 and 20 image tokens) in batches of two: each loss is the continuation's summed
    loss after the qwen prompt with that image's own count, the continuation tokenized after "assistant\\n"."""
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate([(300, 300), (140, 56), (112, 140)])]
    counts = [lmm.pipeline.image(im).num_tokens for im in images]
    assert counts == [16, 10, 20]
    pairs = [("Is there a dog in the image?", c) for c in ("Yes", "No")] + [("Describe it.", " It is")]
    lmm.task_dict = {"t": {"test": list(range(3))}}
    reqs = instances("loglikelihood", [(q, (lambda d, im=im: [im]), c) for (q, c), im in zip(pairs, images)])
    out = [r.text for r in lmm.loglikelihood(reqs)]
    tok = lmm.pipeline.tokenizer
    for (q, c), im, n, (loss, greedy) in zip(pairs, images, counts, out):
        prompt = tok.encode_prompt(q, "qwen", n)
        tail = tok._tok.encode("assistant\n", add_special_tokens=False).ids
        cont = tok._tok.encode("assistant\n" + c, add_special_tokens=False).ids[len(tail):]
        assert prompt[-len(tail):] == tail and cont
        assert lmm.encode_pair(q, c, n) == (prompt, cont)
        logits = lmm.pipeline.logits(torch.tensor([prompt + cont]), [lmm.pipeline.image(im)])[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        assert loss == pytest.approx(-logp[range(len(cont)), cont].sum().item(), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all()) and loss > 0


def test_cli_masks_the_planted_visual_sinks_and_runs_var_with_vcd(capsys, planted, tmp_path):
    img = tmp_path / "planted.png"
    planted_picture().save(img)
    base = ("--model", planted.directory, "--image", img, "--prompt", "What is in the image?", "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", 4, "--json", "--tau", TAU, "--sink-dims", "11,40")
    rc, out, err = cli(capsys, *base, "--mask-visual-sinks")
    assert rc == 0, err
    masked = json.loads(out)["masked"]
    start = json.loads(out)["prompt_ids"].index(planted.config.image_token_id)
    assert masked["patches"] == {str(layer): list(SINK_TOKENS) for layer in range(3)}
    assert masked["positions"]["0"] == [start + t for t in SINK_TOKENS]
    rc, out, err = cli(capsys, *base, "--var", "--vcd", "--seed", 3)
    record = json.loads(out)
    assert rc == 0 and sum(record["var"]["redistributed"]["prefill"]) > 0 and record["vcd"]["noise_step"] == 500
    from minivar.methods.var import VARConfig
    from minivar.methods.vcd import VCD
    ref = planted.generate(planted_picture(), "What is in the image?", max_new_tokens=4, seed=3,
                           var=VARConfig(tau=TAU, sink_dims=(TEXT_DIM, VISUAL_DIM)), methods=[VCD(seed=3)])
    assert record["output_ids"] == ref.output_ids


def test_eval_run_with_var_finds_the_planted_dims_once(planted, eval_root, tmp_path):
    from test_eval_harness import cli as eval_cli
    out = tmp_path / "pope"
    rc, stdout, err = eval_cli(["run", "pope", "--data", eval_root / "pope", "--images", eval_root / "coco/val2014",
                                "--out", out, "--model", planted.directory, "--device", "cpu", "--dtype", "float32",
                                "--max-new-tokens", "2", "--limit", "4", "--var", "--tau", str(TAU), "--json"])
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["var"]["sink_dims"] == [TEXT_DIM, VISUAL_DIM] and run["var_sink_dims_source"] == "finder"
    assert run["conv_mode"] == "qwen" and err.count("sink-dim finder found dims [11, 40]") == 1


@pytest.mark.parametrize("tokens, size, rows, cols", [(SINK_TOKENS, (112, 84), 3, 4), ((3, 7), (56, 140), 5, 2)])
def test_cli_pictures_draw_the_grid_of_each_image_whatever_its_shape(capsys, planted, tmp_path, tokens, size, rows,
                                                                      cols):
    """--save-attention with VAR on a wide and a tall image: the numbers hold the image's own panel of rows × cols
    merged tokens over the smart_resized view, the planted sinks at their (panel, row, col), and the pictures redraw
    from attention.json (python -m minivar.viz)."""
    from minivar import viz
    img = tmp_path / "planted.png"
    planted_picture(tokens, size=size).save(img)
    pics = tmp_path / "pics"
    rc, out, err = cli(capsys, "--model", planted.directory, "--image", img, "--prompt", "What is in the image?",
                       "--device", "cpu", "--dtype", "float32", "--max-new-tokens", 3, "--var", "--tau", TAU,
                       "--sink-dims", "11,40", "--save-attention", pics)
    assert rc == 0, err
    numbers, views = viz.load_numbers(pics / "attention.json")
    assert [(p["rows"], p["cols"], p["newline"]) for p in numbers["panels"]] == [(rows, cols, False)]
    assert [v.size for v in views] == [size] and numbers["image_aspect_ratio"] == "smart_resize"
    assert numbers["visual_sinks"] == {str(layer): list(tokens) for layer in range(3)}
    assert numbers["visual_sink_cells"] == {str(layer): [[0, *divmod(t, cols)] for t in tokens] for layer in range(3)}
    assert sum(numbers["heads"]["selected_fraction"][0]) > 0                      # VAR acted in layer 0
    assert viz.main([str(pics / "attention.json"), str(tmp_path / "redrawn")]) == 0
    assert sorted(p.name for p in (tmp_path / "redrawn").glob("*.png")) == sorted(p.name for p in pics.glob("*.png"))


def test_vcd_through_generate_many_equals_one_by_one(pipe):
    """VCD's contrast prefix (the noised image) shared by the questions too: each prefix at its image's M-RoPE
    positions."""
    from minivar.methods.vcd import VCD, VCDConfig
    cfg = VCDConfig(alpha=3.0, beta=0.05)
    img = picture(120, 80, seed=3)
    prompts = ["What is in the image?", "Describe it.", "What is in the image? Describe it."]
    many = pipe.generate_many(img, prompts, max_new_tokens=6, methods=[VCD(cfg, seed=2)])
    alone = [pipe.generate(img, p, max_new_tokens=6, methods=[VCD(cfg, seed=2)]) for p in prompts]
    assert [r.output_ids for r in many] == [r.output_ids for r in alone]
    assert many[0].output_ids == vcd_two_pass(pipe, img, prompts[0], cfg, 2, 6)
