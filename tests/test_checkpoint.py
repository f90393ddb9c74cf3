"""The loader: every key layout met in the wild loads to the same tensors, strictly; broken checkpoints and
unreachable models fail with one MinivarError naming the file or tensor; pickle files are never opened."""
import dataclasses
import fnmatch
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_llava_config, to_hub_key, unused_tensors, write_checkpoint
from minivar import checkpoint
from minivar.checkpoint import load_model, normalise_key, read_config, resolve
from minivar.errors import MinivarError

GOLDEN = Path(__file__).resolve().parent / "golden"


# ---------------------------------------------------------------------------------------------------------------
# Key layouts, as functions of minivar's name

hub = to_hub_key      # llava-hf hub (transformers 4.x)


def v5_hybrid(key):    # what 5.x save_pretrained writes: vision_tower.* without vision_model.
    return key


def v5_inmemory(key):  # 5.x module names: model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    return "model." + key


def v5_inmemory_vision_model(key):   # the same with CLIPVisionModel's inner vision_model. kept
    return v5_inmemory(hub(key))


def dup_model_model(key):   # some 5.x saves: language_model.model.model.*
    key = hub(key)
    return key.replace("language_model.model.", "language_model.model.model.", 1)


LAYOUTS = [hub, v5_hybrid, v5_inmemory, v5_inmemory_vision_model, dup_model_model]


def rotary_buffers(cfg):
    """Old (4.3x) checkpoints also stored the RoPE inv_freq buffers, and old CLIP ones the position_ids."""
    hd = cfg.text.head_dim
    extra = {f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq":
             1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd) for i in range(cfg.text.num_hidden_layers)}
    extra["vision_tower.embeddings.position_ids"] = torch.arange(cfg.vision.num_patches + 1)[None]
    return extra


@pytest.fixture(scope="module")
def full_state(tiny_config, tiny_state):
    """Everything a real checkpoint holds, in minivar names: the model's tensors plus the unused ones."""
    return tiny_state | unused_tensors(tiny_config) | rotary_buffers(tiny_config)


def assert_loaded_equal(model, reference: dict, dtype=torch.float32):
    state = model.state_dict()
    assert set(state) == set(reference)
    for k, v in state.items():
        assert v.dtype == dtype, k
        assert torch.equal(v, reference[k].to(dtype)), k


def test_normalise_key_maps_every_layout_onto_minivar_names(tiny_state):
    for layout in LAYOUTS:
        for key in tiny_state:
            assert normalise_key(layout(key)) == key, (layout.__name__, layout(key))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shards", [1, 3])
def test_every_layout_loads_to_identical_tensors(tmp_path, tiny_config, tiny_state, full_state, layout, shards):
    d = write_checkpoint(tmp_path / "ckpt", {layout(k): v for k, v in full_state.items()}, tiny_config, shards=shards)
    model = load_model(d)
    assert_loaded_equal(model, tiny_state)


@pytest.mark.parametrize("stored, requested", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16)])
def test_half_precision_checkpoints_load_in_the_requested_dtype(tmp_path, tiny_config, tiny_state, full_state,
                                                                stored, requested):
    d = write_checkpoint(tmp_path / "ckpt", {hub(k): v for k, v in full_state.items()}, tiny_config, shards=2,
                         dtype=stored)
    model = load_model(d, dtype=requested, pack=False)     # packed weights are opaque: tests/test_packed.py
    # the stored (rounded) values, converted exactly once
    assert_loaded_equal(model, {k: v.to(stored).to(requested) for k, v in tiny_state.items()}, dtype=requested)


def test_loaded_model_is_real_and_holds_only_what_it_runs(tiny_checkpoint, tiny_config):
    model = load_model(tiny_checkpoint)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert tensors and all(t.device.type == "cpu" for _, t in tensors), [n for n, t in tensors if t.is_meta]
    assert not any(t.requires_grad for _, t in tensors)
    assert not model.training
    # CLIP layer 2 (the last) and post_layernorm are in the file but not in the model: LLaVA reads layer −2
    assert len(model.vision_tower.encoder.layers) == tiny_config.vision_layers_used == 2
    assert not any("post_layernorm" in n or "encoder.layers.2." in n or "inv_freq" in n for n, _ in tensors)
    px = torch.randn(1, 3, 56, 56)
    assert torch.stack(model.image_features(px)).shape == (1, 16, 64)


def test_feature_layer_minus_one_needs_the_last_clip_layer(tmp_path, tiny_state, full_state):
    cfg = dataclasses.replace(tiny_llava_config(), vision_feature_layer=-1)
    d = write_checkpoint(tmp_path / "ckpt", {hub(k): v for k, v in full_state.items()}, cfg)
    model = load_model(d)
    assert len(model.vision_tower.encoder.layers) == 3
    assert torch.equal(model.state_dict()["vision_tower.encoder.layers.2.mlp.fc1.weight"],
                       full_state["vision_tower.encoder.layers.2.mlp.fc1.weight"])


@pytest.mark.parametrize("case", ["hub_sharded_fp16", "v5_hybrid_single", "v5_inmemory_bf16", "dup_model_model", "e2e"])
def test_transformers_written_checkpoints_load(case):
    """The golden dirs were written by transformers itself: the layouts above are not just our own idea of them."""
    model = load_model(GOLDEN / case)
    assert not any(p.is_meta for p in model.parameters())
    assert len(model.vision_tower.encoder.layers) == model.config.vision_layers_used


# ---------------------------------------------------------------------------------------------------------------
# Broken checkpoints: one MinivarError naming the file or tensor

@pytest.fixture
def ckpt(tmp_path, tiny_config, full_state):
    """A fresh, valid, 2-shard hub-layout checkpoint to break."""
    return write_checkpoint(tmp_path / "ckpt", {hub(k): v for k, v in full_state.items()}, tiny_config, shards=2)


def load_error(directory) -> str:
    with pytest.raises(MinivarError) as e:
        load_model(directory)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_no_config_json(ckpt):
    (ckpt / "config.json").unlink()
    msg = load_error(ckpt)
    assert "config.json" in msg and str(ckpt) in msg


def test_invalid_json_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llava", ')
    msg = load_error(ckpt)
    assert "config.json" in msg and "JSON" in msg


def test_missing_shard(ckpt):
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    msg = load_error(ckpt)
    assert "model-00002-of-00002.safetensors" in msg and "missing" in msg


@pytest.mark.parametrize("fraction", [0.5, 0.999, 0.0001])
def test_truncated_shard(ckpt, fraction):
    shard = ckpt / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * fraction)])
    msg = load_error(ckpt)
    assert "model-00001-of-00002.safetensors" in msg and "truncated" in msg


def test_truncated_single_file(tmp_path, tiny_config, full_state):
    d = write_checkpoint(tmp_path / "ckpt", {hub(k): v for k, v in full_state.items()}, tiny_config)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in load_error(d)


def test_garbage_shard(ckpt):
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    assert "model-00001-of-00002.safetensors" in load_error(ckpt)


@pytest.mark.parametrize("header", [b"[1, 2]", b'{"a": 7}', b'{"a": {"dtype": "F32", "shape": [1]}}',
                                    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}',
                                    b'{"a": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
                                    b'{"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
                                    b"\xff\xfe not json"])
def test_corrupt_header(tmp_path, tiny_config, header):
    """Valid length prefix, nonsense table: still one MinivarError naming the file, never a KeyError/TypeError."""
    d = write_checkpoint(tmp_path / "ckpt", {}, tiny_config)
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    assert "model.safetensors" in load_error(d)


def test_wrong_shape(tmp_path, tiny_config, full_state):
    bad = dict(full_state)
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    bad[name] = torch.zeros(100, 64)
    msg = load_error(write_checkpoint(tmp_path / "ckpt", {hub(k): v for k, v in bad.items()}, tiny_config, shards=2))
    assert name in msg and "(100, 64)" in msg and "(128, 64)" in msg


def test_missing_tensor(tmp_path, tiny_config, full_state):
    bad = dict(full_state)
    del bad["multi_modal_projector.linear_2.bias"]
    msg = load_error(write_checkpoint(tmp_path / "ckpt", {hub(k): v for k, v in bad.items()}, tiny_config))
    assert "multi_modal_projector.linear_2.bias" in msg and "missing" in msg


def test_unknown_extra_tensor(tmp_path, tiny_config, full_state):
    extra = dict(full_state)
    extra["language_model.model.layers.0.self_attn.q_norm.weight"] = torch.ones(64)
    msg = load_error(write_checkpoint(tmp_path / "ckpt", {hub(k): v for k, v in extra.items()}, tiny_config))
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in msg


def test_same_tensor_in_two_layouts(tmp_path, tiny_config, full_state):
    both = {hub(k): v for k, v in full_state.items()} | {"model.multi_modal_projector.linear_1.bias": torch.zeros(64)}
    msg = load_error(write_checkpoint(tmp_path / "ckpt", both, tiny_config))
    assert "multi_modal_projector.linear_1.bias" in msg and "twice" in msg


def test_tensor_listed_in_index_but_absent_from_its_shard(ckpt):
    index = ckpt / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["language_model.model.layers.0.mlp.gate_proj.extra"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(d))
    msg = load_error(ckpt)
    assert "language_model.model.layers.0.mlp.gate_proj.extra" in msg and "model-00001-of-00002.safetensors" in msg


def test_tensor_in_shard_but_not_in_index_is_an_error(ckpt):
    index = ckpt / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    del d["weight_map"]["language_model.lm_head.weight"]
    index.write_text(json.dumps(d))
    msg = load_error(ckpt)
    assert "language_model.lm_head.weight" in msg and "not listed" in msg


def test_invalid_index(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("[]")
    assert "model.safetensors.index.json" in load_error(ckpt)


class _Payload:
    """Unpickling this creates `path` (a stand-in for arbitrary code execution)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_bin_is_refused_and_never_unpickled(tmp_path, tiny_config):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()                 # the payload is live: unpickling it does create its file
    marker = tmp_path / "UNPICKLED"
    d = tmp_path / "liuhaotian-style"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_config.to_hf()))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    msg = load_error(d)
    assert ".bin" in msg and "safetensors" in msg and str(d) in msg
    assert not marker.exists()


def test_no_weights_at_all(tmp_path, tiny_config):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config.to_hf()))
    assert "model.safetensors" in load_error(tmp_path)


def test_read_config_of_another_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MinivarError, match="model_type 'llama'"):
        read_config(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# resolve(): local paths and hub ids

def test_resolve_local_dir(tiny_checkpoint, tmp_path):
    assert resolve(str(tiny_checkpoint), tmp_path / "weights") == tiny_checkpoint


@pytest.mark.parametrize("name", ["missing-dir", "a/b/c", "./x/y", "../up/there"])
def test_resolve_missing_local_path(tmp_path, monkeypatch, name):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: pytest.fail("a local path must never be looked up on the hub"))
    monkeypatch.chdir(tmp_path)
    for model in (str(tmp_path / name), name):
        with pytest.raises(MinivarError, match="not found") as e:
            resolve(model, tmp_path / "weights")
        assert model in str(e.value)


def test_resolve_file_instead_of_dir(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(MinivarError, match="directory"):
        resolve(str(f), tmp_path / "weights")


def test_hub_id_offline_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("Cannot connect to huggingface.co\nsecond line of a long story")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MinivarError) as e:
        resolve("llava-hf/llava-1.5-7b-hf", tmp_path / "weights")
    msg = str(e.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "--model" in msg and "\n" not in msg
    assert not (tmp_path / "weights" / "llava-1.5-7b-hf" / "config.json").exists()


def test_hub_download_fetches_only_safetensors_and_json(tmp_path, monkeypatch, tiny_checkpoint):
    import huggingface_hub
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        local = Path(kwargs["local_dir"])
        for f in tiny_checkpoint.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in kwargs["allow_patterns"]):
                shutil.copy(f, local / f.name)
        return str(local)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    weights = tmp_path / "weights"
    path = resolve("llava-hf/llava-1.5-7b-hf", weights)
    assert path == weights / "llava-1.5-7b-hf"
    (repo_id, kwargs), = calls
    assert repo_id == "llava-hf/llava-1.5-7b-hf"
    assert kwargs["local_dir"] == str(weights / "llava-1.5-7b-hf")
    patterns = kwargs["allow_patterns"]
    # json, safetensors, and a chat template saved on its own (chat_template.jinja: Qwen3-VL's template tokenizer)
    assert patterns and all(p.endswith((".json", ".safetensors", ".jinja")) for p in patterns)
    for needed in ("config.json", "model.safetensors", "model.safetensors.index.json",
                   "model-00001-of-00003.safetensors", "tokenizer.json"):
        assert any(fnmatch.fnmatch(needed, p) for p in patterns), needed
    for never in ("pytorch_model.bin", "model.pt", "model.ckpt", "model.pth", "flax_model.msgpack", "tf_model.h5"):
        assert not any(fnmatch.fnmatch(never, p) for p in patterns), never
    load_model(path)
    # a complete download is found again without the network
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded twice"))
    assert resolve("llava-hf/llava-1.5-7b-hf", weights) == path


def test_a_second_hub_id_with_the_same_repo_name_is_refused(tmp_path, monkeypatch, tiny_checkpoint):
    import huggingface_hub
    calls = []

    def fake_download(repo_id, local_dir, **kwargs):
        calls.append(repo_id)
        for f in tiny_checkpoint.iterdir():
            shutil.copy(f, Path(local_dir) / f.name)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    weights = tmp_path / "weights"
    path = resolve("llava-hf/llava-1.5-7b-hf", weights)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir())
    with pytest.raises(MinivarError, match=r"llava-1.5-7b-hf' holds 'llava-hf/llava-1.5-7b-hf', not "
                                           r"'someone/llava-1.5-7b-hf'.*--model DIR"):
        resolve("someone/llava-1.5-7b-hf", weights)
    assert calls == ["llava-hf/llava-1.5-7b-hf"]                       # nothing downloaded over the first
    assert sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir()) == before
    assert resolve("llava-hf/llava-1.5-7b-hf", weights) == path and len(calls) == 1
    assert resolve("LLaVA-HF/llava-1.5-7b-hf", weights) == path and len(calls) == 1     # hub ids ignore case
    # a folder put there by hand (no recorded id) is still taken as it is
    (path / checkpoint.SOURCE_FILE).unlink()
    assert resolve("someone/llava-1.5-7b-hf", weights) == path and len(calls) == 1


def test_interrupted_download_is_not_taken_as_complete(tmp_path, monkeypatch, tiny_checkpoint):
    import huggingface_hub
    calls = []

    def interrupted(repo_id, local_dir, **kwargs):
        calls.append(repo_id)
        shutil.copy(tiny_checkpoint / "config.json", Path(local_dir) / "config.json")
        raise KeyboardInterrupt if len(calls) == 1 else ConnectionError("connection reset")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", interrupted)
    weights = tmp_path / "weights"
    with pytest.raises(KeyboardInterrupt):              # Ctrl-C in the middle of the download
        resolve("llava-hf/llava-1.5-7b-hf", weights)
    assert (weights / "llava-1.5-7b-hf" / "config.json").is_file()
    with pytest.raises(MinivarError, match="--model"):  # tried again, not taken as complete; fails again
        resolve("llava-hf/llava-1.5-7b-hf", weights)
    assert len(calls) == 2

    def complete(repo_id, local_dir, **kwargs):
        calls.append(repo_id)
        for f in tiny_checkpoint.iterdir():
            shutil.copy(f, Path(local_dir) / f.name)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", complete)
    assert resolve("llava-hf/llava-1.5-7b-hf", weights) == weights / "llava-1.5-7b-hf"
    assert resolve("llava-hf/llava-1.5-7b-hf", weights) == weights / "llava-1.5-7b-hf"
    assert len(calls) == 3                               # downloaded once more, then found complete
    load_model(weights / "llava-1.5-7b-hf")


def test_demo_resolves_inside_the_default_weights_dir(monkeypatch, demo_weights):
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", demo_weights)
    d = resolve("demo")
    assert d == demo_weights / "demo" and (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    assert read_config(d).num_image_tokens == 576


def test_offline_hub_that_returns_the_empty_local_dir_is_an_error(tmp_path, monkeypatch):
    """Offline, huggingface_hub can hand back the local directory instead of raising: minivar must notice."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, local_dir, **k: local_dir)
    with pytest.raises(MinivarError, match="could not download 'llava-hf/llava-1.5-7b-hf'.*--model"):
        resolve("llava-hf/llava-1.5-7b-hf", tmp_path)
    assert not (tmp_path / "llava-1.5-7b-hf").exists()     # nothing half-made is left behind


def test_weights_readme_states_the_demo_size(demo_weights):
    import re
    readme = (Path(__file__).resolve().parents[1] / "weights" / "README.md").read_text()
    stated = int(re.search(r"`--model demo`\s+builds .*?\(about (\d+) MB\)", readme, re.S).group(1))
    size = sum(f.stat().st_size for f in (demo_weights / "demo").iterdir()) / 1e6
    assert abs(size - stated) <= 0.1 * stated, (size, stated)
