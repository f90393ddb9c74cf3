"""The offline demos: one tiny random-weight checkpoint per model family, with planted sinks, made on first use.

`--model demo` is LLaVA-1.5's (`demo-llava` names it too); every other family's is `--model demo-<model_type>`
(`demo-llava_next`, `demo-qwen2_vl`, `demo-qwen2_5_vl`, ...): each family that registers a builder (`Family.demo`,
models/family.py) has one. Each lets anyone run the whole pipeline of its family (image → vision tower → image
tokens → decoder → text, VAR included) without gigabytes of weights or a network, and is written into the weights
dir (checkpoint.WEIGHTS_DIR, e.g. weights/demo-qwen2_vl/) the first time it is named. Its text is noise: the
weights are random. What it shows is that every step runs, and — because visual and text sinks are planted into it
like those of a trained model — what VAR does (VAR's sink-dim finder finds the planted dims).

How the weights and sinks are made, and how to add a family's demo: models/demo.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import MinivarError
from .models.config import LlavaConfig
from .models.demo import (DEMO_COMMON_DIM, DEMO_SINK_DIMS, DEMO_SINK_PATCHES, DEMO_TEXT,  # noqa: F401
                          NEXT_SINK_PATCHES, demo_config, make_tokenizer, plant_sinks, plant_text_sinks, random_tensor,
                          random_weights, write_checkpoint)

DEMO = "demo"                    # LLaVA-1.5's demo; every other family's is "demo-<model_type>"


def name_for(model_type: str) -> str:
    """The --model name of a family's demo."""
    return DEMO if model_type == "llava" else f"demo-{model_type}"


def demos() -> dict:
    """{--model name: Family} of every family that registers a demo (models/registry.py), LLaVA-1.5's first."""
    from .models.registry import FAMILIES
    return {name_for(t): f for t, f in FAMILIES.items() if f.demo is not None}


def is_demo_name(model: str) -> bool:
    """True for the names the demos own: `demo` and anything starting `demo-` (never a hub id: those have a '/')."""
    return model == DEMO or model.startswith("demo-")


def lookup(model: str):
    """(the demo's name, its Family) for `model`; a name no family has is one error listing the demos."""
    table = demos()
    if model == "demo-llava":
        model = DEMO
    if model not in table:
        listed = ", ".join(f"{name} ({family.name})" for name, family in table.items())
        raise MinivarError(f"--model '{model}' is not a demo minivar has; the demos are {listed}")
    return model, table[model]


def resolve(model: str, weights_dir: Path) -> Path:
    """The directory of demo `model` inside `weights_dir`, built on first use."""
    name, family = lookup(model)
    return ensure(Path(weights_dir) / name, family.model_type)


def ensure(directory: Path, model_type: str = "llava") -> Path:
    """The demo checkpoint of family `model_type` in `directory`, built on first use."""
    from .models.registry import family_for
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        family = family_for(model_type)
        if family.demo is None:
            raise MinivarError(f"{family.name} has no demo")
        family.demo(directory, family)
    return directory


def build(directory: Path, seed: int = 0) -> Path:
    """Write LLaVA-1.5's demo into `directory`."""
    from .models import demo as making
    from .models.registry import family_for
    return making.build_llava(directory, family_for("llava"), seed)


def random_state_dict(cfg: LlavaConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights for every parameter of a minivar Llava with this config, in minivar's names (fp32)."""
    from .models.llava import Llava
    return random_weights(Llava, cfg, seed, std)


def sink_picture(size: tuple[int, int] = (336, 336), seed: int = 0):
    """A picture on which every demo shows visual sinks: random mid-grey texture with a few near-white 28×28
    blocks (content-planted sinks, Qwen's) — position-planted sinks (CLIP's) appear on any picture."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    w, h = size
    arr = torch.randint(60, 180, (h, w, 3), generator=g, dtype=torch.uint8)
    for r, c in ((0, 1), (2, 3), (5, 6)):
        if (r + 1) * 28 <= h and (c + 1) * 28 <= w:
            arr[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = 250
    return Image.fromarray(arr.numpy())
