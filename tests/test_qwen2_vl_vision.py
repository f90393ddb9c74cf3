"""Qwen2-VL / Qwen2.5-VL vision towers and image processor against transformers' own classes (tiny random towers
built at test time; the PIL image processor), plus the bad inputs each refuses with one line."""
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig, Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel  # noqa: E402

from minivar.errors import MinivarError  # noqa: E402
from minivar.models.qwen2_vl.config import Qwen2VisionConfig, Qwen25VisionConfig  # noqa: E402
from minivar.models.qwen2_vl.processing import (QwenImageConfig, preprocess_image, smart_resize,  # noqa: E402
                                                vision_inputs)
from minivar.models.qwen2_vl.vision import Qwen2VisionTransformer  # noqa: E402
from minivar.models.qwen2_vl.vision_2_5 import Qwen25VisionTransformer, window_index  # noqa: E402
from minivar.processing import to_rgb  # noqa: E402

# Small pixel bounds keep the towers' inputs tiny: 4..36 merged tokens per image.
TINY_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 36 * 28 * 28}
QWEN2_TINY = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2)
# window_size 56 px = 2×2 merged tokens: every test image is cut into several windows; blocks 0 and 2 stay windowed.
QWEN25_TINY = dict(depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=2, window_size=56,
                   fullatt_block_indexes=[1, 3])


def picture(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' init (std 0.02 gives near-uniform attention, which would hide order bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if ("norm" in name or "ln_q" in name) and p.dim() == 1 else 0.1 * noise)


def tower_pair(kind: str, seed: int = 0):
    if kind == "qwen2_vl":
        hf = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**QWEN2_TINY)).eval()
        ours = Qwen2VisionTransformer(Qwen2VisionConfig.from_hf(hf.config.to_dict()))
    else:
        hf = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**QWEN25_TINY)).eval()
        ours = Qwen25VisionTransformer(Qwen25VisionConfig.from_hf(hf.config.to_dict()))
    randomise(hf, seed)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours.eval()


# (width, height) sets, each one call: below min_pixels, above max_pixels, extreme ratios, square, two sizes at once
IMAGE_SETS = {
    "below-min": [(30, 20)],
    "above-max": [(500, 400)],
    "wide-1000x60": [(1000, 60)],
    "tall-60x1000": [(60, 1000)],
    "square": [(112, 112)],
    "two-sizes": [(200, 90), (70, 150)],
    "three-mixed": [(1000, 60), (56, 56), (333, 250)],
}


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("sizes", list(IMAGE_SETS.values()), ids=list(IMAGE_SETS))
def test_tower_equals_transformers(kind, sizes):
    hf, ours = tower_pair(kind)
    images = [preprocess_image(picture(w, h, seed=i), QwenImageConfig(**TINY_PIXELS)) for i, (w, h) in enumerate(sizes)]
    pixel_values, grid_thw = vision_inputs(images)
    with torch.no_grad():
        want = hf(pixel_values, grid_thw).pooler_output
        got = ours(pixel_values, grid_thw)
    assert got.shape == (sum(im.num_tokens for im in images), 64)
    assert want.abs().max() > 0.1                        # not a degenerate output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_tower_video_grids_equal_transformers(kind):
    """grid_t > 1 (a clip): each frame attends alone, as transformers' cu_seqlens say."""
    hf, ours = tower_pair(kind, seed=1)
    grid_thw = torch.tensor([[2, 6, 4], [1, 4, 10], [3, 2, 2]])
    pixel_values = torch.randn(int(grid_thw.prod(1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(pixel_values, grid_thw), hf(pixel_values, grid_thw).pooler_output,
                                   atol=1e-5, rtol=0)
        # a list of triples works as well as a tensor
        torch.testing.assert_close(ours(pixel_values, grid_thw.tolist()), ours(pixel_values, grid_thw))


def test_each_image_attends_only_to_itself():
    """One call with two images gives each image what it gets alone (no attention across images)."""
    for kind in ("qwen2_vl", "qwen2_5_vl"):
        _, ours = tower_pair(kind, seed=2)
        a, b = (preprocess_image(picture(w, h, seed=s), QwenImageConfig(**TINY_PIXELS)) for w, h, s in
                ((140, 84, 4), (84, 196, 5)))
        with torch.no_grad():
            both = ours(*vision_inputs([a, b]))
            alone = torch.cat([ours(*vision_inputs([a])), ours(*vision_inputs([b]))])
        torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)


def test_windows_split_the_grid_and_invert():
    """The window order is a permutation staying inside each image; 2×2-token windows of a 3×5 grid: 2·3 windows."""
    order, lengths = window_index([(1, 6, 10), (1, 4, 4)], merge=2, window=2)
    n0 = 3 * 5
    assert sorted(order.tolist()) == list(range(n0 + 4))
    assert set(order[:n0].tolist()) == set(range(n0))
    assert lengths == [16, 16, 8, 8, 8, 4] + [16]   # patches per window: full, full, cut column; cut row ...
    assert order[:4].tolist() == [0, 1, 5, 6]       # the first window: merged tokens (0,0), (0,1), (1,0), (1,1)
    assert torch.equal(order[torch.argsort(order)], torch.arange(n0 + 4))


def test_window_attention_differs_from_full():
    """The tiny 2.5 config's windows matter: with every block on full attention the output changes."""
    _, ours = tower_pair("qwen2_5_vl", seed=3)
    full = Qwen25VisionTransformer(Qwen25VisionConfig.from_hf(QWEN25_TINY | {"fullatt_block_indexes": [0, 1, 2, 3]}))
    full.load_state_dict(ours.state_dict(), strict=True)
    inputs = vision_inputs([preprocess_image(picture(168, 112), QwenImageConfig(**TINY_PIXELS))])
    with torch.no_grad():
        assert (ours(*inputs) - full(*inputs)).abs().max() > 1e-3


def test_vision_config_from_hf_layouts():
    # the hub's Qwen2-VL-7B vision_config (4.x: no rope_parameters, in_chans / spatial_patch_size that nothing reads)
    hub = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
           "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2}
    cfg = Qwen2VisionConfig.from_hf(hub)
    assert (cfg.width, cfg.out_dim, cfg.head_dim, cfg.intermediate_size, cfg.rope_theta) == (1280, 3584, 80, 5120, 1e4)
    # 5.x: the sub-config a full Qwen2VLConfig writes, rope_parameters included; defaults equal transformers'
    full = Qwen2VLConfig(vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 48, "num_heads": 2}).to_dict()
    cfg = Qwen2VisionConfig.from_hf(full["vision_config"])
    assert (cfg.depth, cfg.embed_dim, cfg.hidden_size, cfg.hidden_act) == (2, 32, 48, "quick_gelu")
    assert Qwen2VisionConfig.from_hf({}) == Qwen2VisionConfig.from_hf(Qwen2VLVisionConfig().to_dict())
    # Qwen2.5-VL-7B's hub vision_config
    hub25 = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
             "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
             "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
             "tokens_per_second": 2, "temporal_patch_size": 2}
    cfg = Qwen25VisionConfig.from_hf(hub25)
    assert (cfg.width, cfg.out_dim, cfg.window_tokens, cfg.fullatt_block_indexes) == (1280, 3584, 4, (7, 15, 23, 31))
    assert Qwen25VisionConfig.from_hf({}) == Qwen25VisionConfig.from_hf(Qwen2_5_VLVisionConfig().to_dict())
    assert Qwen2VisionConfig.from_hf({"rope_parameters": {"rope_theta": 500.0, "rope_type": "axial"}}).rope_theta == 500


@pytest.mark.parametrize("bad, words", [
    ({"hidden_act": "relu6"}, "hidden_act"),
    ({"embed_dim": 30, "num_heads": 2}, "divisible by 4"),
    ({"depth": 0}, "depth"),
    ({"rope_parameters": {"rope_type": "yarn"}}, "rope type"),
    ({"patch_size": [14, 16]}, "patch_size"),
])
def test_vision_config_bad_values(bad, words):
    with pytest.raises(MinivarError, match=words) as e:
        Qwen2VisionConfig.from_hf(bad, "some/model")
    assert "\n" not in str(e.value) and "some/model" in str(e.value)


def test_tower_bad_inputs():
    _, ours = tower_pair("qwen2_vl")
    with pytest.raises(MinivarError, match="grid_thw"):
        ours(torch.zeros(6, 1176), [(1, 2, 3)])                     # w not a multiple of the merge size
    with pytest.raises(MinivarError, match=r"pixel_values.*\(16, 1176\)"):
        ours(torch.zeros(12, 1176), [(1, 4, 4)])


# ----------------------------------------------------------------------------------------------------------------
# Image processor
# ----------------------------------------------------------------------------------------------------------------

def hf_processor(**kwargs):
    return Qwen2VLImageProcessorPil(**kwargs)


def assert_same_as_hf(img, cfg: QwenImageConfig, hf, hf_img=None, **overrides):
    got = preprocess_image(img, cfg, **overrides)
    want = hf(hf_img if hf_img is not None else img, return_tensors="pt")
    (t, h, w), = want["image_grid_thw"].tolist()
    assert got.meta["grid_thw"] == (t, h, w)
    assert torch.equal(got.pixel_values, want["pixel_values"])     # bit-identical
    assert got.num_tokens == t * h * w // 4 and got.panels == (("image", h // 2, w // 2, False),)
    return got


SIZES = [(30, 20), (20, 30), (56, 56), (640, 480), (479, 641), (1000, 60), (61, 999), (4000, 20), (999, 777), (13, 13)]


@pytest.mark.parametrize("w, h", SIZES)
def test_processor_equals_transformers(w, h):
    pixels = {"min_pixels": 3136, "max_pixels": 64 * 28 * 28}
    assert_same_as_hf(picture(w, h, seed=w), QwenImageConfig.from_hf(pixels), hf_processor(**pixels))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "RGBA", "LA"])
def test_processor_modes(mode):
    """Modes without transparency give transformers' pixels exactly; 16-bit and alpha go through minivar's to_rgb
    (as for LLaVA) — transformers clips 16-bit and composites alpha on white, so it is fed to_rgb's image."""
    pixels = {"min_pixels": 3136, "max_pixels": 40 * 28 * 28}
    cfg, hf = QwenImageConfig.from_hf(pixels), hf_processor(**pixels)
    if mode == "I;16":
        img = Image.fromarray(np.random.default_rng(1).integers(0, 65536, (90, 130), dtype=np.uint16))
    elif mode in ("RGBA", "LA"):
        img = picture(130, 90, mode=mode)
        img.putalpha(Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 130), dtype=np.uint8)))
    else:
        img = picture(130, 90, mode=mode)
    assert img.mode == mode
    if mode in ("L", "P", "CMYK"):
        assert_same_as_hf(img, cfg, hf)
    else:
        assert_same_as_hf(img, cfg, hf, hf_img=to_rgb(img))


def test_processor_config_spellings_and_overrides():
    img = picture(900, 500, seed=7)
    # 4.x / hub spelling (top level), 5.x spelling (size), both (the top level wins, as in transformers)
    for d in ({"min_pixels": 3136, "max_pixels": 30 * 28 * 28},
              {"size": {"shortest_edge": 3136, "longest_edge": 30 * 28 * 28}},
              {"size": {"shortest_edge": 3136, "longest_edge": 99 * 28 * 28}, "max_pixels": 30 * 28 * 28}):
        cfg = QwenImageConfig.from_hf(d)
        assert (cfg.min_pixels, cfg.max_pixels) == (3136, 30 * 28 * 28)
        assert_same_as_hf(img, cfg, hf_processor(**d))
    # early 4.x saves spelled size {min_pixels, max_pixels}
    assert QwenImageConfig.from_hf({"size": {"min_pixels": 1000, "max_pixels": 9000}}).max_pixels == 9000
    # hub defaults: max_pixels 12845056; the class defaults when the file says nothing
    assert QwenImageConfig.from_hf({"max_pixels": 12845056}).max_pixels == 12845056
    assert (QwenImageConfig.from_hf({}).min_pixels, QwenImageConfig.from_hf({}).max_pixels) == (3136, 1003520)
    # the caller's min_pixels / max_pixels override the file's
    cfg = QwenImageConfig.from_hf({"min_pixels": 3136, "max_pixels": 12845056})
    got = assert_same_as_hf(img, cfg, hf_processor(min_pixels=3136, max_pixels=20 * 28 * 28), max_pixels=20 * 28 * 28)
    assert got.num_tokens <= 20
    big = preprocess_image(picture(40, 40), cfg, min_pixels=16 * 28 * 28)
    assert big.num_tokens == 16 and big.meta["image_size"] == (40, 40) and big.meta["resized_size"] == (112, 112)
    # other mean/std, rescale factor and resampling filter (2: bilinear) from the file
    d = {"min_pixels": 3136, "max_pixels": 30 * 28 * 28, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0],
         "rescale_factor": 1 / 127.5, "resample": 2}
    assert_same_as_hf(img, QwenImageConfig.from_hf(d), hf_processor(**d))


def test_smart_resize_equals_transformers():
    rng = np.random.default_rng(0)
    cases = [(h, w, 3136, 12845056) for h, w in ((1, 1), (28, 28), (42, 70), (200, 1), (1, 200), (5000, 5000))]
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) <= 200:
            lo = int(rng.integers(1, 200_000))
            cases.append((h, w, lo, lo + int(rng.integers(784, 2_000_000))))
    for h, w, lo, hi in cases:
        assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize("call, words", [
    (lambda: smart_resize(10, 2010), "aspect ratio of 201.0"),
    (lambda: preprocess_image(picture(402, 2)), "aspect ratio"),
    (lambda: preprocess_image(picture(100, 100), min_pixels=5000, max_pixels=4000), "`min_pixels` 5000 is larger"),
    (lambda: preprocess_image(picture(100, 100), max_pixels=700), "below one 28x28 block"),
    (lambda: preprocess_image(picture(100, 100), min_pixels=0), "`min_pixels` must be a positive integer"),
    (lambda: preprocess_image(picture(100, 100), max_pixels=1.5e6), "`max_pixels` must be a positive integer"),
    (lambda: QwenImageConfig.from_hf({"min_pixels": 9000, "max_pixels": 3000}, "q/m"), "q/m.*larger"),
    (lambda: QwenImageConfig.from_hf({"size": {"shortest_edge": 3136}}, "q/m"), "longest_edge"),
    (lambda: QwenImageConfig.from_hf({"image_mean": [0.5, 0.5]}, "q/m"), "image_mean"),
    (lambda: QwenImageConfig.from_hf({"resample": "bicubic"}, "q/m"), "resample"),
    (lambda: preprocess_image(Image.new("RGB", (0, 5))), "zero size"),
    (lambda: vision_inputs([]), "empty"),
])
def test_processor_bad_inputs(call, words):
    with pytest.raises(MinivarError, match=words) as e:
        call()
    assert "\n" not in str(e.value)


def test_family_dispatch_and_hub_token_counts():
    from minivar.models.qwen2_vl.config import vision_config_from_hf
    from minivar.models.qwen2_vl.vision_2_5 import build_vision_tower
    v2 = vision_config_from_hf(QWEN2_TINY, "qwen2_vl")
    v25 = vision_config_from_hf(QWEN25_TINY, "qwen2_5_vl")
    assert type(build_vision_tower(v2)) is Qwen2VisionTransformer
    assert type(build_vision_tower(v25)) is Qwen25VisionTransformer
    with pytest.raises(MinivarError, match="model_type 'llava'"):
        vision_config_from_hf({}, "llava", "x")
    # the hub's preprocessor_config.json (Qwen2-VL-7B-Instruct): a 448×448 image is 16·16 = 256 tokens
    hub = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
    im = preprocess_image(picture(448, 448), QwenImageConfig.from_hf(hub))
    assert (im.num_tokens, im.meta["grid_thw"], im.pixel_values.shape) == (256, (1, 32, 32), (1024, 1176))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_tower_bf16_close_to_transformers(kind):
    """In bf16 (the dtype the checkpoints ship in) both round alike: within ~2 bf16 steps at |x| ≈ 3."""
    hf, ours = tower_pair(kind)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    pixel_values, grid_thw = vision_inputs([preprocess_image(picture(w, h), QwenImageConfig(**TINY_PIXELS))
                                            for w, h in ((200, 90), (70, 150))])
    with torch.no_grad():
        got, want = ours(pixel_values, grid_thw), hf(pixel_values, grid_thw).pooler_output
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.04, rtol=0)
