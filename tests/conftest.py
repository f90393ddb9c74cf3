"""Shared fixtures: a tiny random checkpoint in the llava-hf hub layout, and the real LLaMA tokenizer's path (from
../shared/testdata, the Hugging Face cache, or downloaded once: see find_llama_tokenizer).

Session-scoped objects are shared by every test: treat them as read-only (copy a checkpoint dir before changing it).
"""
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The shared test data beside the clone (tokenizer.json, real benchmark files); MINIVAR_TEST_SHARED names another
# folder, e.g. a missing one to see which tests skip without it (`pytest -rs`).
SHARED = Path(os.environ.get("MINIVAR_TEST_SHARED") or Path(__file__).resolve().parents[2] / "shared")
if str(REPO) not in sys.path:          # so `import minivar` works however pytest is started
    sys.path.insert(0, str(REPO))

from minivar.models.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: one thread is as fast, and much faster than two on a machine whose cores are busy
    (intra-op threads then wait on each other at every small op)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llava_config(**text_overrides) -> LlavaConfig:
    """CLIP 32-dim / 3 layers at 56 px (16 image tokens), LLaMA 64-dim / 2 layers; byte-level vocab of the demo."""
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, patch_size=14)
    text = TextConfig(**({"vocab_size": 261, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}
                         | text_overrides))
    return LlavaConfig(vision=vision, text=text, image_token_index=259, pad_token_id=260, torch_dtype="float32")


def to_hub_key(key: str) -> str:
    """minivar name → llava-hf hub name (only the vision tower differs: `vision_tower.vision_model.*`)."""
    return "vision_tower.vision_model." + key[len("vision_tower."):] if key.startswith("vision_tower.") else key


def unused_tensors(cfg: LlavaConfig, seed: int = 1) -> dict:
    """What a real llava-hf checkpoint carries that LLaVA never reads, in minivar names: CLIP's post_layernorm and
    the CLIP layers after the feature layer (the last one for layer −2)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    d = cfg.vision.hidden_size
    extra = {"vision_tower.post_layernorm.weight": torch.ones(d), "vision_tower.post_layernorm.bias": torch.zeros(d)}
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
              "self_attn.out_proj": (d, d), "mlp.fc1": (cfg.vision.intermediate_size, d),
              "mlp.fc2": (d, cfg.vision.intermediate_size), "layer_norm1": (d,), "layer_norm2": (d,)}
    for layer in range(cfg.vision_layers_used, cfg.vision.num_hidden_layers):
        for name, shape in shapes.items():
            p = f"vision_tower.encoder.layers.{layer}.{name}"
            if len(shape) == 2:
                extra[p + ".weight"] = torch.randn(shape, generator=g) * 0.02
                extra[p + ".bias"] = torch.zeros(shape[0])
            else:
                extra[p + ".weight"], extra[p + ".bias"] = torch.ones(shape), torch.zeros(shape)
    return extra


def build_model(cfg: LlavaConfig, state: dict):
    """A minivar Llava holding exactly `state` (minivar names), in eval mode; no checkpoint file involved."""
    import torch

    from minivar.models.llava import Llava
    with torch.device("meta"):
        model = Llava(cfg)
    model.load_state_dict(state, assign=True)
    return model.eval()


def write_checkpoint(directory: Path, tensors: dict, cfg: LlavaConfig, *, shards: int = 1, dtype=None, config=None,
                     tokenizer: bool = False) -> Path:
    """Write a checkpoint dir: config.json (cfg's, or the `config` dict as given), `tensors` (named as they should
    appear in the files; floats cast to `dtype` if given) as model.safetensors or `shards` shards + index, and with
    tokenizer=True the demo's byte-level tokenizer.json (<image> = 259)."""
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config if config is not None else cfg.to_hf(), indent=2))
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    if tokenizer:
        from minivar.demo import make_tokenizer
        make_tokenizer().save(str(directory / "tokenizer.json"))
    if shards == 1:
        save_file(cast, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(cast)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: cast[k] for k in part}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture(scope="session")
def tiny_config() -> LlavaConfig:
    return tiny_llava_config()


@pytest.fixture(scope="session")
def tiny_state(tiny_config) -> dict:
    """Random fp32 weights for exactly the parameters of a minivar Llava(tiny_config), in minivar's names."""
    from minivar.demo import random_state_dict
    return random_state_dict(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config, tiny_state) -> Path:
    """A complete, runnable checkpoint dir like llava-hf's: config.json, model.safetensors (fp32, hub key names,
    unused tensors included), tokenizer.json (the demo's byte-level tokenizer, <image> = 259). Do not modify."""
    state = {to_hub_key(k): v for k, v in (tiny_state | unused_tensors(tiny_config)).items()}
    return write_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), state, tiny_config, tokenizer=True)


@pytest.fixture(scope="session")
def demo_weights(tmp_path_factory) -> Path:
    """A weights dir holding the `--model demo` checkpoint (built once per session); use as MINIVAR_WEIGHTS."""
    from minivar import demo
    weights = tmp_path_factory.mktemp("weights")
    demo.ensure(weights / "demo")
    return weights


@pytest.fixture(scope="session")
def demo_pipe(demo_weights):
    """The `--model demo` pipeline on the CPU in fp32, loaded once per session. Read-only use."""
    import minivar
    return minivar.load("demo", device="cpu", dtype="float32", weights_dir=demo_weights)


LLAVA_HUB_ID = "llava-hf/llava-1.5-7b-hf"
ENABLE_REAL_TOKENIZER = (
    "the real LLaMA tokenizer is not available: run the tests once online (they fetch the 2 MB tokenizer.json of "
    f"{LLAVA_HUB_ID} into the Hugging Face cache), or put shared/testdata/llama-tokenizer/tokenizer.json next to "
    "the repo")


def find_llama_tokenizer(shared: Path = SHARED) -> tuple[Path | None, str]:
    """The real LLaVA-1.5 (LLaMA) tokenizer.json for the tests that need it, and where it came from: the shared test
    data next to the repo; else the local Hugging Face cache; else llava-hf's own file, downloaded once into that
    cache when online (HF_HUB_OFFLINE=1 forbids it). (None, why) when none of these has it."""
    path = shared / "testdata" / "llama-tokenizer" / "tokenizer.json"
    if path.is_file():
        return path, f"shared test data ({path})"
    import huggingface_hub
    cached = huggingface_hub.try_to_load_from_cache(LLAVA_HUB_ID, "tokenizer.json")
    if isinstance(cached, str):
        return Path(cached), f"the Hugging Face cache ({cached})"
    if not hub_reachable():
        return None, f"{ENABLE_REAL_TOKENIZER} (the hub is not reachable)"
    try:
        got = huggingface_hub.hf_hub_download(LLAVA_HUB_ID, "tokenizer.json", etag_timeout=10)
    except Exception as e:             # blocked, HF_HUB_OFFLINE=1, hub errors: all mean "not available"
        return None, f"{ENABLE_REAL_TOKENIZER} (download failed: {type(e).__name__})"
    return Path(got), f"downloaded from {LLAVA_HUB_ID} ({got})"


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the hub's host: offline, huggingface_hub would retry for half a minute before
    giving up, and the tests should skip in seconds instead."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def llama_tokenizer_path() -> Path:
    """The real LLaVA-1.5 tokenizer.json (see find_llama_tokenizer); skips, saying how to enable it, where absent."""
    path, why = find_llama_tokenizer()
    if path is None:
        pytest.skip(why)
    return path


def run_cli(argv) -> tuple[int, str, str]:
    """The command line (minivar.cli.main) in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from minivar import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:          # argparse's own errors exit from inside parse_args
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc, out, err, *names):
    """What every bad input must give: exit code 2, nothing on stdout, one error line on stderr naming `names`."""
    assert rc == 2, (rc, err)
    assert out == "", out
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("minivar: error: "), lines[0]        # one prefix for every error, argparse's too
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def demo_env(demo_weights):
    """`--model demo` resolves inside the session's demo weights dir (never the repo's weights/)."""
    from minivar import checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "WEIGHTS_DIR", demo_weights)
        yield demo_weights
