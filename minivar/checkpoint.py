"""Find, read and strictly load llava-hf safetensors checkpoints.

`resolve()` turns `--model` into a local directory (downloading a hub id into weights/<name> if needed).
`load_model()` reads config.json and the (possibly sharded) safetensors, maps every key layout met in the wild
onto minivar's names, checks that every parameter is present exactly once with the right shape, and assigns the
tensors into a model built on the meta device — so a 7B never exists twice in memory. Pickle `.bin` files are
never opened: unpickling can run arbitrary code.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .defaults import DEFAULT_MODEL  # noqa: F401  (written once, in defaults.py)
from .errors import MinivarError
from .models import llava
from .models.packed import pack_linears
from .models.registry import family_for, family_of


def default_weights_dir(package_root: Path | None = None) -> Path:
    """Where checkpoints go: $MINIVAR_WEIGHTS if set; in a source checkout (also an editable install) its weights/
    folder, recognised by the README it carries; for an installed package the user's cache, ~/.cache/minivar
    ($XDG_CACHE_HOME/minivar) — never site-packages."""
    if os.environ.get("MINIVAR_WEIGHTS"):
        return Path(os.environ["MINIVAR_WEIGHTS"])
    checkout = (package_root or Path(__file__).resolve().parents[1]) / "weights"
    if (checkout / "README.md").is_file():
        return checkout
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivar"


WEIGHTS_DIR = default_weights_dir()
DOWNLOAD_PATTERNS = ["*.json", "*.jinja", "*.safetensors"]   # config, tokenizer.json, chat template, weights
SOURCE_FILE = ".hub-id"                             # in a downloaded folder: the hub id it came from

def normalise_key(key: str, rules=None) -> str:
    """A checkpoint's tensor name → the module's, by the family's (pattern, replacement) rules in order
    (default: LLaVA-1.5's)."""
    for pattern, repl in (rules if rules is not None else llava.KEY_RULES):
        key = re.sub(pattern, repl, key)
    return key


# ---------------------------------------------------------------------------------------------------------------
# Where the files are

def resolve(model: str, weights_dir: Path | None = None) -> Path:
    """A local directory for `model`: the path itself, an earlier download in weights/, or a fresh hub download."""
    named = "`weights_dir`" if weights_dir else None
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    from . import demo
    path = Path(model).expanduser()
    # the offline demos: tiny random checkpoints, built on first use (demo.py); a demo's name beats a folder of
    # that name, and an unknown `demo-…` that is no folder is one error listing the demos
    if demo.is_demo_name(model) and (model in demo.demos() or model == "demo-llava" or not path.is_dir()):
        name, family = demo.lookup(model)
        return demo.ensure(writable_weights_dir(weights_dir, named) / name, family.model_type)
    if path.is_dir():
        return path
    if path.exists():
        raise MinivarError(f"--model '{model}' is a file; give the checkpoint directory (with config.json)")
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", model) is not None and not model.startswith(".")
    if not looks_like_hub_id:
        raise MinivarError(f"model directory '{model}' not found")
    local = writable_weights_dir(weights_dir, named) / model.split("/")[-1]
    source = local / SOURCE_FILE          # which hub id the folder holds: two ids may share a repo name
    if source.is_file() and source.read_text().strip().casefold() != model.casefold():   # the hub ignores case
        raise MinivarError(f"'{local}' holds '{source.read_text().strip()}', not '{model}': move or rename that folder, "
                           f"set MINIVAR_WEIGHTS to another folder, or download '{model}' elsewhere and pass --model DIR")
    if (local / "config.json").is_file() and not (local / ".incomplete").exists():
        return local
    return download(model, local)


def writable_weights_dir(weights_dir: Path, named: str | None = None) -> Path:
    """The weights folder, made if missing; a MinivarError naming where it came from (`weights_dir`,
    MINIVAR_WEIGHTS, or the default) when it is a file or cannot be made."""
    if named is None:
        env = os.environ.get("MINIVAR_WEIGHTS")
        named = "MINIVAR_WEIGHTS" if env and Path(env) == weights_dir else "the weights folder"
    existing = weights_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == weights_dir else f"lies below the file '{existing}'"
        raise MinivarError(f"{named} '{weights_dir}' {where}; set it to a folder")
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MinivarError(f"{named} '{weights_dir}': cannot create it ({e.strerror or e}); set it to a folder "
                           f"you can write") from None
    return weights_dir


def download(repo_id: str, local: Path) -> Path:
    """Download only what minivar reads (json, safetensors) with huggingface_hub's progress bars."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover - it is in requirements.txt
        raise MinivarError("huggingface_hub is not installed; pip install huggingface-hub, or pass --model DIR") from None
    fresh = not local.exists()
    local.mkdir(parents=True, exist_ok=True)
    marker = local / ".incomplete"   # an interrupted download is never mistaken for a complete checkpoint
    marker.touch()
    (local / SOURCE_FILE).write_text(repo_id + "\n")
    offline_hint = "if you are offline, download it elsewhere and pass --model /path/to/checkpoint-dir"
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()   # its warnings would be a second message; ours below says what failed
    try:
        snapshot_download(repo_id, local_dir=str(local), allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as e:  # network errors come in many classes; all mean the same to the user
        _forget(local, fresh)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinivarError(f"could not download '{repo_id}' from the Hugging Face hub ({type(e).__name__}: "
                           f"{reason[:200]}); {offline_hint}") from None
    finally:
        hub_logging.set_verbosity(verbosity)
    # Offline, huggingface_hub may hand back the (empty) local directory instead of raising: check what arrived.
    if not (local / "config.json").is_file() or not any(local.glob("*.safetensors")):
        _forget(local, fresh)
        raise MinivarError(f"could not download '{repo_id}' from the Hugging Face hub (no config.json or safetensors "
                           f"arrived); {offline_hint}")
    marker.unlink()
    return local


def _forget(local: Path, fresh: bool) -> None:
    """After a failed download, remove the directory if this attempt created it and nothing else is in it."""
    if fresh and all(p.name in (".incomplete", SOURCE_FILE) for p in local.iterdir()):
        for name in (".incomplete", SOURCE_FILE):
            (local / name).unlink(missing_ok=True)
        local.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# Reading

def read_config(directory: Path):
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MinivarError(f"'{path}' not found: a checkpoint directory needs config.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinivarError(f"'{path}' is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise MinivarError(f"config.json of '{directory}' is not a JSON object")
    return family_for(d.get("model_type", "llava"), str(directory), d).config(d, str(directory))


def safetensors_files(directory: Path) -> dict[str, Path]:
    """Map tensor name → shard file, from model.safetensors.index.json or the single model.safetensors."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MinivarError(f"'{index}' is not a valid safetensors index ({e})") from None
        files = {}
        for name, shard in weight_map.items():
            if not (directory / shard).is_file():
                raise MinivarError(f"shard '{directory / shard}' listed in {index.name} is missing")
            files[name] = directory / shard
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return {name: single for name in _keys_of(single)}
    if any(directory.glob("*.bin")):
        raise MinivarError(f"'{directory}' has only pickle .bin weights; minivar reads safetensors only "
                           f"(unpickling can run arbitrary code): use the llava-hf safetensors checkpoint")
    raise MinivarError(f"no model.safetensors or model.safetensors.index.json in '{directory}'")


# safetensors layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
# then the raw tensor bytes. Reading it directly (instead of through a memory map) means every byte is copied once,
# straight into the tensor the model keeps: peak memory stays at one copy of the weights.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a safetensors file and where its data starts; checks it fits in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MinivarError(f"'{path}' is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if not isinstance(header, dict):
        raise MinivarError(f"'{path}' is not a readable safetensors file (corrupt header)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            ok = isinstance(info["dtype"], str) and all(isinstance(x, int) and x >= 0 for x in (begin, end, *info["shape"]))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or begin > end:
            raise MinivarError(f"'{path}' is not a readable safetensors file (corrupt entry for '{name}')")
        if data_start + end > size:
            raise MinivarError(f"'{path}' is truncated: tensor '{name}' ends at byte {data_start + end}, "
                               f"the file has {size}")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise MinivarError(f"tensor '{name}' in '{path}' has unsupported dtype {info['dtype']}")
    return header, data_start


def _keys_of(path: Path) -> list[str]:
    return list(read_header(path)[0])


def read_tensor(f, info: dict, data_start: int) -> torch.Tensor:
    """Read one tensor's bytes from an open safetensors file into a fresh tensor."""
    begin, end = info["data_offsets"]
    t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
    if t.numel() * t.element_size() != end - begin:
        raise ValueError(f"{end - begin} bytes stored for shape {info['shape']} {info['dtype']}")
    f.seek(data_start + begin)
    # Touch the fresh pages first (in parallel): letting read() fault them in one by one is several times slower.
    t.view(-1).view(torch.uint8).zero_()
    if end > begin and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - begin:
        raise ValueError("file ended early")
    return t


def read_state_dict(directory: Path, cfg, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """All tensors the model needs, renamed to minivar's names, cast to `dtype` on `device`, one shard at a time."""
    family = family_of(cfg)

    def normalise(name):
        return normalise_key(name, family.key_rules)

    files = safetensors_files(directory)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path, names in by_file.items():
        header, data_start = read_header(path)
        for name in header.keys() - set(names):      # a shard holding tensors its index does not list
            if not family.unused_key(normalise(name), cfg):
                raise MinivarError(f"tensor '{name}' is in '{path}' but not listed in model.safetensors.index.json")
        with open(path, "rb", buffering=0) as f:
            for name in names:
                if name not in header:
                    raise MinivarError(f"tensor '{name}' is listed in the index but missing from '{path}'")
                key = normalise(name)
                if family.unused_key(key, cfg):
                    continue
                if key in state:
                    raise MinivarError(f"tensor '{key}' appears twice in the checkpoint ('{origin[key]}' and '{name}')")
                if not SAFETENSORS_DTYPES[header[name]["dtype"]].is_floating_point:
                    raise MinivarError(f"tensor '{name}' in '{path}' has dtype {header[name]['dtype']}, "
                                       f"expected floating point")
                try:
                    t = read_tensor(f, header[name], data_start)
                except (OSError, ValueError) as e:
                    raise MinivarError(f"could not read tensor '{name}' from '{path}' (truncated or corrupt?): {e}") from None
                if family.convert is not None:
                    t = family.convert(key, t, cfg)
                state[key] = t.to(device=device, dtype=dtype)
                origin[key] = name
    return state


def load_model(directory: Path, dtype: torch.dtype = torch.float32, device="cpu", cfg=None,
               expect: str | None = None, pack: bool = True, pack_decoder: bool = False):
    """Build the model without allocating (meta device) and assign the checkpoint's tensors into it, strictly.
    expect: a model_type the checkpoint must be (one error naming what it holds otherwise).
    pack: on a CPU in bf16, the vision tower's Linear weights are pre-packed for oneDNN (models/packed.py: the
    same numbers, faster); False keeps plain nn.Linear everywhere.
    pack_decoder: the decoder's too (its layers, and lm_head unless tied to the embedding) — for runs whose every
    decode step has several rows (DAMRO, VCD: a full and a contrast row); a single prompt's one-row steps are
    faster on plain weights (models/packed.py)."""
    directory = Path(directory)
    cfg = cfg or read_config(directory)
    family = family_of(cfg)
    if expect is not None and family.model_type != expect:
        raise MinivarError(f"'{directory}' holds a {family.name} checkpoint (model_type '{family.model_type}'), "
                           f"not {family_for(expect).name}")
    with torch.device("meta"):
        model = family.model(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = read_state_dict(directory, cfg, dtype, device)
    head, embedding = family.tied
    if cfg.text.tie_word_embeddings and head not in state:
        # a tied checkpoint stores the shared matrix once, as the embedding (not LLaVA-1.5; Qwen2-VL-2B, 2.5-VL-3B)
        state[head] = state.get(embedding)
    for key in state:
        if key not in expected:
            raise MinivarError(f"unexpected tensor '{key}' in '{directory}' (not part of a {family.name} model with this config)")
    for key, shape in expected.items():
        if state.get(key) is None:
            raise MinivarError(f"tensor '{key}' is missing from the checkpoint in '{directory}'")
        if state[key].shape != shape:
            raise MinivarError(f"tensor '{key}' in '{directory}' has shape {tuple(state[key].shape)}, "
                               f"config.json implies {tuple(shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    del state                   # the model holds the tensors now; packing below frees each plain weight it replaces
    model = model.eval().requires_grad_(False)
    if pack:                    # packs only bf16 Linears on a CPU (and only where oneDNN runs bf16)
        pack_linears(getattr(model, family.vision_module, None))
    if pack and pack_decoder:   # a head tied to the embedding stays plain: packing would copy the shared matrix
        tied_head = family.tied[0].rsplit(".", 1)[0] if cfg.text.tie_word_embeddings else None
        pack_linears(model, under=tuple(path for path in family.decoder_modules if path != tied_head))
    return model
