"""VCD: the noised pixels against a direct re-statement of DAMO-NLP-SG/VCD's vcd_add_noise.py, the seeding, the
contrastive loop against the released two-forward loop on transformers' LLaVA, and VCD's bad inputs."""
import pytest
import torch

from minivar.errors import MinivarError
from minivar.methods import vcd
from minivar.methods.contrastive import PromptBranch, contrastive_generate
from minivar.methods.vcd import VCDConfig


def released_add_diffusion_noise(image_tensor, noise_step):
    """vcd_utils/vcd_add_noise.py, restated line by line (noise from the global generator)."""
    num_steps = 1000
    betas = torch.linspace(-6, 6, num_steps)
    betas = torch.sigmoid(betas) * (0.5e-2 - 1e-5) + 1e-5
    alphas = 1 - betas
    alphas_prod = torch.cumprod(alphas, dim=0)
    alphas_bar_sqrt = torch.sqrt(alphas_prod)
    one_minus_alphas_bar_sqrt = torch.sqrt(1 - alphas_prod)
    x_0 = image_tensor.clone()
    noise = torch.randn_like(x_0)
    return alphas_bar_sqrt[noise_step] * x_0 + one_minus_alphas_bar_sqrt[noise_step] * noise


@pytest.mark.parametrize("noise_step", [0, 1, 250, 500, 999])
@pytest.mark.parametrize("seed", [0, 42])
def test_noise_equals_the_released_formula_for_a_fixed_generator(noise_step, seed):
    x = torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(seed)                       # the released code draws from the global generator
    want = released_add_diffusion_noise(x, noise_step)
    got = vcd.add_diffusion_noise(x, noise_step, torch.Generator().manual_seed(seed))
    assert torch.equal(got, want)
    if noise_step == 500:           # the default step: signal × 0.863, noise std 0.505 (variance-preserving)
        a, s = vcd.diffusion_schedule()
        assert abs(float(a[500]) - 0.8630) < 1e-4 and abs(float(a[500] ** 2 + s[500] ** 2) - 1) < 1e-6


def test_noise_is_seeded_per_image_and_keeps_dtype():
    g = torch.Generator().manual_seed(1)
    px = torch.randn(3, 3, 28, 28, generator=g)
    batch = vcd.noised_images(px, 500, seed=42)
    alone = vcd.noised_images(px[1:2], 500, seed=42)
    assert torch.equal(batch[1:2], alone)                       # a sample's noise does not depend on its batch
    assert not torch.equal(vcd.noised_images(px, 500, seed=43), batch)
    assert torch.equal(vcd.noised_images(px, 500, seed=None), vcd.noised_images(px, 500, seed=vcd.DEFAULT_NOISE_SEED))
    a, s = vcd.diffusion_schedule()
    eps = (batch - a[500] * px) / s[500]                       # the noise each image got
    assert not torch.allclose(eps[0], eps[1], atol=0.1)         # two images, two draws
    same = vcd.noised_images(torch.stack([px[0], px[0]]), 500, seed=42)
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], batch[0])
    half = vcd.noised_images(px.to(torch.bfloat16), 500, seed=42)
    assert half.dtype == torch.bfloat16 and half.shape == px.shape


def test_vcd_loop_equals_the_released_loop_on_transformers(tmp_path):
    """vcd_sample.py restated on transformers 5.x (full and noised branches, two caches, the shared rule,
    softmax + multinomial) vs minivar's contrastive loop on the same checkpoint."""
    pytest.importorskip("transformers")
    import torch.nn.functional as F

    from minivar.checkpoint import load_model
    from test_damro import IMAGE_ID, hf_tiny
    ref = hf_tiny(seed=1, image_size=56)
    ref.save_pretrained(tmp_path)
    mine = load_model(tmp_path, torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([1, 40, 41]), torch.full((16,), IMAGE_ID), torch.randint(3, 250, (6,), generator=g)])[None]
    px = torch.randn(1, 3, 56, 56, generator=g)
    cfg = VCDConfig().validate()
    noised = vcd.noised_images(px, cfg.noise_step, seed=42)
    for seed in (None, 42):
        got = contrastive_generate(mine, PromptBranch(ids, px), PromptBranch(ids, noised), alpha=cfg.alpha, beta=cfg.beta,
                                   max_new_tokens=10, eos_token_id=None, temperature=0.0 if seed is None else 1.0,
                                   seed=seed)[0]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.inference_mode():
            full = ref(input_ids=ids, pixel_values=px, use_cache=True)
            cd = ref(input_ids=ids, pixel_values=noised, use_cache=True)
            want = []
            for _ in range(10):
                l_full, l_cd = full.logits[:, -1], cd.logits[:, -1]
                cutoff = torch.log(torch.tensor(cfg.beta)) + l_full.max(dim=-1, keepdim=True).values
                scores = ((1 + cfg.alpha) * l_full - cfg.alpha * l_cd).masked_fill(l_full < cutoff, -float("inf"))
                nxt = scores.argmax(-1) if seed is None else \
                    torch.multinomial(F.softmax(scores, -1), 1, generator=generator).squeeze(1)
                want.append(int(nxt))
                full = ref(input_ids=nxt[:, None], past_key_values=full.past_key_values, use_cache=True)
                cd = ref(input_ids=nxt[:, None], past_key_values=cd.past_key_values, use_cache=True)
        assert got == want
    # the test can fail: a strong contrast with the noised image does steer the answer
    from minivar.generate import generate
    strong = contrastive_generate(mine, PromptBranch(ids, px), PromptBranch(ids, noised), alpha=4.0, beta=0.01,
                                  max_new_tokens=10, eos_token_id=None)[0]
    assert strong != generate(mine, ids, px, max_new_tokens=10, eos_token_id=None).output_ids[0]


@pytest.mark.parametrize("kwargs,name", [
    ({"noise_step": 1000}, "VCDConfig.noise_step"), ({"noise_step": -1}, "VCDConfig.noise_step"),
    ({"noise_step": 2.5}, "VCDConfig.noise_step"), ({"beta": 0.0}, "VCDConfig.beta"),
    ({"beta": 2.0}, "VCDConfig.beta"), ({"alpha": -1.0}, "VCDConfig.alpha"),
])
def test_bad_settings_are_one_error_naming_the_parameter(kwargs, name):
    with pytest.raises(MinivarError, match=f"`{name}`") as e:
        VCDConfig(**kwargs).validate()
    assert "\n" not in str(e.value)


def test_defaults_are_the_released_script_defaults():
    assert VCDConfig().settings() == {"alpha": 1.0, "beta": 0.1, "noise_step": 500}


@pytest.mark.parametrize("seed", [None, 42])
def test_batched_branches_equal_the_branches_one_after_the_other(demo_pipe, seed):
    """VCD on minivar's generation (both branches, one forward per step) == the two-cache loop on the same noise."""
    from PIL import Image

    from minivar.methods.contrastive import left_pad
    pipe = demo_pipe
    prompts = ("What is it?", "Is there a dog in the image? Answer briefly.")
    g = torch.Generator().manual_seed(5)
    imgs = [Image.fromarray((torch.rand(60, 90, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    kw = dict(max_new_tokens=8, temperature=0.0 if seed is None else 1.0, seed=seed)
    batched = pipe.generate_batch(imgs, list(prompts), methods=[vcd.VCD(VCDConfig(), seed=seed)], **kw)
    ids, mask = left_pad([pipe.prompt_ids(p)[0].tolist() for p in prompts], pipe.config.pad_token_id)
    px = torch.cat([pipe.pixels(im) for im in imgs])
    noised = vcd.noised_images(px, 500, seed=seed)
    sequential = contrastive_generate(pipe.model, PromptBranch(ids, px, attention_mask=mask),
                                      PromptBranch(ids, noised, attention_mask=mask), alpha=1.0, beta=0.1,
                                      eos_token_id=pipe.tokenizer.eos_id, **kw)
    assert [r.output_ids for r in batched] == sequential
    assert batched[0].reports["vcd"] == {"alpha": 1.0, "beta": 0.1, "noise_step": 500}


def test_many_questions_on_one_image_equal_one_by_one(demo_pipe):
    from PIL import Image
    pipe = demo_pipe
    img = Image.fromarray((torch.rand(50, 70, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy())
    prompts = ["Is there a cat?", "What colour is the sky in this picture?"]
    many = pipe.generate_many(img, prompts, methods=[vcd.VCD(seed=3)], max_new_tokens=6)
    assert [r.output_ids for r in many] == \
        [pipe.generate(img, p, methods=[vcd.VCD(seed=3)], max_new_tokens=6).output_ids for p in prompts]


def test_options_build_the_method_or_one_error_naming_the_flag():
    spell = lambda dest: "--" + dest.replace("_", "-")                         # noqa: E731
    assert vcd.from_options({}, spell) is None
    m = vcd.from_options({"vcd": True, "vcd_alpha": 0.5, "seed": 7}, spell)
    assert m.settings() == {"alpha": 0.5, "beta": 0.1, "noise_step": 500, "noise_seed": 7} and m.seed == 7
    assert vcd.VCD().settings()["noise_seed"] == vcd.DEFAULT_NOISE_SEED
    for opts, msg in [({"vcd_beta": 0.2}, "--vcd-beta only applies with --vcd"),
                      ({"vcd": True, "vcd_noise_step": 1000}, "--vcd-noise-step must be"),
                      ({"vcd": True, "vcd_beta": 1.5}, "--vcd-beta must be")]:
        with pytest.raises(MinivarError, match=msg):
            vcd.from_options(opts, spell)
