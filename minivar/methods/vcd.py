"""VCD (Leng et al., CVPR 2024: "Mitigating Object Hallucinations in Large Vision-Language Models through Visual
Contrastive Decoding"), as its released code computes it (github.com/DAMO-NLP-SG/VCD, `vcd_utils/vcd_add_noise.py`,
`vcd_utils/vcd_sample.py`; docs/damro.md has the differences).

The contrast branch is the same prompt with the preprocessed pixels noised by the forward diffusion process:

    β_t  = sigmoid(linspace(−6, 6, 1000))_t · (0.5e−2 − 1e−5) + 1e−5      t = 0 … 999
    ᾱ_t  = Π_{s ≤ t} (1 − β_s)
    x'   = sqrt(ᾱ_t) · x + sqrt(1 − ᾱ_t) · ε,  ε ~ N(0, I),  t = noise_step (500)

and each step combines the two branches with the rule DAMRO shares (contrastive.combine), α 1, β 0.1.

Seeding: ε is drawn on the CPU in float32 from a torch.Generator (`add_diffusion_noise(x, t, generator)`: the caller
seeds it). `noised_images` gives each image a fresh generator seeded from the run's seed (--seed; 0 when none) and
the image's own pixels (`image_noise_seed`), so an image gets the same noise alone, in a batch, resumed or on
another device, and two images different noise. The released code draws ε with `torch.randn_like` from the global
generator that `set_seed(args.seed)` seeded once per run: each image's noise there depends on the draws before it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import MinivarError
from ..models.images import ImageInput
from .contrastive import ContrastiveRun, call_rows, check_alpha_beta
from .method import Branch, Method

NUM_STEPS = 1000                  # the released schedule's length
DEFAULT_NOISE_SEED = 0            # the noise generator's seed when the caller gives none (greedy runs)


@dataclass(frozen=True)
class VCDConfig:
    """VCD's settings; defaults are its evaluation script's argparse defaults (cd_alpha 1, cd_beta 0.1,
    noise_step 500)."""
    alpha: float = 1.0
    beta: float = 0.1
    noise_step: int = 500

    def validate(self, model_config=None) -> "VCDConfig":
        check_alpha_beta(self.alpha, self.beta, "VCDConfig")
        if isinstance(self.noise_step, bool) or not isinstance(self.noise_step, int) or \
                not 0 <= self.noise_step < NUM_STEPS:
            raise MinivarError(f"`VCDConfig.noise_step` must be an integer in 0..{NUM_STEPS - 1}, got {self.noise_step!r}")
        return self

    def settings(self) -> dict:
        return {"alpha": float(self.alpha), "beta": float(self.beta), "noise_step": int(self.noise_step)}


def diffusion_schedule(num_steps: int = NUM_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) [num_steps] float32, the released schedule (a sigmoid-shaped β from 1e−5 to 5e−3)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps)) * (0.5e-2 - 1e-5) + 1e-5
    alphas_prod = torch.cumprod(1 - betas, dim=0)
    return torch.sqrt(alphas_prod), torch.sqrt(1 - alphas_prod)


def noise_generator(seed: int | None) -> torch.Generator:
    """The CPU generator VCD's noise is drawn from: seeded by `seed` (the run's --seed), DEFAULT_NOISE_SEED if None."""
    return torch.Generator("cpu").manual_seed(DEFAULT_NOISE_SEED if seed is None else int(seed))


def add_diffusion_noise(pixel_values: torch.Tensor, noise_step: int, generator: torch.Generator) -> torch.Tensor:
    """The noised pixels, same shape/dtype/device as `pixel_values`: sqrt(ᾱ_t)·x + sqrt(1−ᾱ_t)·ε in float32, ε drawn
    on the CPU from `generator` (the released code noises the float32 processor output, then casts to half)."""
    if not 0 <= noise_step < NUM_STEPS:
        raise MinivarError(f"`VCDConfig.noise_step` must be in 0..{NUM_STEPS - 1}, got {noise_step}")
    a, s = diffusion_schedule()
    x = pixel_values.detach().to("cpu", torch.float32)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return (a[noise_step] * x + s[noise_step] * noise).to(pixel_values.device, pixel_values.dtype)


def image_noise_seed(seed: int | None, pixel_values: torch.Tensor) -> int:
    """The seed of one image's noise: the run's seed mixed with the image's own pixels (their float32 bytes), so
    two images get different noise, and one image the same noise whatever its batch, order or device."""
    h = hashlib.sha256(str(DEFAULT_NOISE_SEED if seed is None else int(seed)).encode())
    h.update(pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1          # a non-negative 63-bit seed


def noised_images(pixel_values: torch.Tensor, noise_step: int, seed: int | None) -> torch.Tensor:
    """[B, 3, S, S] → the contrast images, each noised from its own generator (image_noise_seed)."""
    return torch.cat([add_diffusion_noise(pixel_values[b:b + 1], noise_step,
                                          torch.Generator("cpu").manual_seed(image_noise_seed(seed, pixel_values[b])))
                      for b in range(pixel_values.shape[0])])


class VCD(Method):
    """VCD on minivar's generation: the contrast branch (the same prompt, the image noised) runs as rows of the same
    batched forward as the full prompts; the token choice is contrastive.combine. seed: the noise's (--seed)."""
    name = "vcd"
    adds_branch = True

    def __init__(self, config: VCDConfig | None = None, seed: int | None = None):
        self.config = VCDConfig() if config is None else config
        self.seed = seed

    def settings(self) -> dict:
        # the noise's seed changes the answers even when decoding is greedy: part of what a resume must match
        return self.config.settings() | {"noise_seed": DEFAULT_NOISE_SEED if self.seed is None else int(self.seed)}

    def check(self, pipeline) -> None:
        self.config.validate(pipeline.config)

    def branch(self, call) -> list[Branch]:
        self.config.validate()
        noised = [ImageInput(noised_images(im.pixel_values[None], self.config.noise_step, self.seed)[0],
                             im.num_tokens, im.panels, dict(im.meta)) for im in call.images]
        call.image_features()              # the full branch's features, as without VCD (their own tower call)
        feats = call.model.image_features(noised)
        return [Branch(r, f, im) for r, f, im in zip(call_rows(call), feats, noised)]

    def start(self, call) -> ContrastiveRun:
        return VCDRun(self.config, keep_candidates=call.capture)


class VCDRun(ContrastiveRun):
    def __init__(self, config: VCDConfig, keep_candidates: bool = False):
        super().__init__(config.alpha, config.beta, "VCD", keep_candidates)
        self.config = config

    def report(self, b: int, generated_rows: int) -> dict:
        return self.config.settings()


# The command lines' options (argparse dests), for flags.py: --vcd [--vcd-alpha A] [--vcd-beta B]
# [--vcd-noise-step N]; the noise is seeded by --seed (dest "seed").
OPTIONS = ("vcd_alpha", "vcd_beta", "vcd_noise_step")


def from_options(opts: dict, spell) -> VCD | None:
    """The VCD method the options ask for (None without `vcd`), its ranges checked now. spell(dest) → how the caller
    writes an option in errors."""
    given = {k: v for k, v in opts.items() if v is not None and v is not False}
    if not given.get("vcd"):
        stray = [k for k in OPTIONS if k in given]
        if stray:
            raise MinivarError(f"{spell(stray[0])} only applies with {spell('vcd')}")
        return None
    try:
        cfg = VCDConfig(**{f: given[d] for f, d in (("alpha", "vcd_alpha"), ("beta", "vcd_beta"),
                                                    ("noise_step", "vcd_noise_step")) if d in given})
        return VCD(cfg.validate(), seed=given.get("seed"))
    except MinivarError as e:
        message = str(e)
        for field in ("alpha", "beta", "noise_step"):
            message = message.replace(f"`VCDConfig.{field}`", spell("vcd_" + field))
        raise MinivarError(message) from None
