"""LlavaConfig.from_hf: llava-hf's sparse config.json must be filled with transformers' defaults, exactly.

The 7B/13B dicts are the real llava-hf files (4.x format, defaults omitted); the 5.x dict is what transformers 5.x
writes for the same model (`rope_parameters`, `dtype`, every field spelled out). When transformers is installed,
every field is also compared with transformers' own LlavaConfig parsing of the same dicts.
"""
import copy
import json
from pathlib import Path

import pytest

from minivar.models.config import LlavaConfig
from minivar.errors import MinivarError

GOLDEN = Path(__file__).resolve().parent / "golden"

VISION_336 = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
              "vocab_size": 32000}

# llava-hf/llava-1.5-7b-hf config.json, verbatim
LLAVA_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": VISION_336, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

# llava-hf/llava-1.5-13b-hf config.json: the 13B text config spells out its (non-default) shape
LLAVA_13B = copy.deepcopy(LLAVA_7B)
LLAVA_13B["text_config"] = {"_name_or_path": "lmsys/vicuna-13b-v1.5", "architectures": ["LlamaForCausalLM"],
                            "hidden_size": 5120, "intermediate_size": 13824, "max_position_embeddings": 4096,
                            "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40,
                            "num_key_value_heads": 40, "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                            "vocab_size": 32064}

# the 7B as transformers 5.x writes it (LlavaConfig(**LLAVA_7B).to_diff_dict() with transformers 5.23)
LLAVA_7B_V5 = {
    "transformers_version": "5.23.0", "architectures": ["LlavaForConditionalGeneration"], "dtype": "float16",
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 768, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "num_channels": 3, "image_size": 336, "patch_size": 14,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "attention_dropout": 0.0,
                      "initializer_range": 0.02, "initializer_factor": 1.0, "vocab_size": 32000,
                      "model_type": "clip_vision_model"},
    "text_config": {"architectures": ["LlamaForCausalLM"], "dtype": "float16", "vocab_size": 32064,
                    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
                    "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-05,
                    "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
                    "pretraining_tp": 1, "tie_word_embeddings": False,
                    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "attention_bias": False,
                    "attention_dropout": 0.0, "mlp_bias": False, "head_dim": 128,
                    "_name_or_path": "lmsys/vicuna-7b-v1.5", "model_type": "llama"},
    "image_token_index": 32000, "image_seq_length": 576, "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default", "vision_feature_layer": -2, "multimodal_projector_bias": True,
    "tie_word_embeddings": False, "ignore_index": -100, "model_type": "llava", "pad_token_id": 32001,
    "vocab_size": 32064,
}


def effective(cfg: LlavaConfig) -> dict:
    """What the model is built from: derived values (kv heads, head dim) instead of the 'unset' None of a sparse file."""
    t = cfg.text
    text = {f: getattr(t, f) for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "n_kv_heads", "head_dim", "hidden_act",
                                       "max_position_embeddings", "rms_norm_eps", "rope_theta", "attention_bias",
                                       "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id")}
    return {"text": text, "vision": cfg.vision, "image_token_index": cfg.image_token_index,
            "pad_token_id": cfg.pad_token_id, "projector_hidden_act": cfg.projector_hidden_act,
            "projector_bias": cfg.projector_bias, "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "num_image_tokens": cfg.num_image_tokens, "vision_layers_used": cfg.vision_layers_used}


def assert_7b_shape(cfg: LlavaConfig):
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (4096, 11008, 32, 32)
    assert t.n_kv_heads == 32 and t.head_dim == 128
    assert t.rope_theta == 10000.0
    assert t.rms_norm_eps == 1e-5            # from the file (LlamaConfig's default is 1e-6)
    assert t.max_position_embeddings == 4096  # from the file (LlamaConfig's default is 2048)
    assert t.vocab_size == 32064
    assert t.hidden_act == "silu" and not t.tie_word_embeddings and not t.attention_bias and not t.mlp_bias
    assert (t.bos_token_id, t.eos_token_id) == (1, 2)
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 4096, 24, 16)
    assert (v.image_size, v.patch_size, v.num_channels) == (336, 14, 3)
    assert v.hidden_act == "quick_gelu" and v.layer_norm_eps == 1e-5
    assert cfg.image_token_index == 32000 and cfg.pad_token_id == 32001
    assert cfg.num_image_tokens == 576
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.vision_layers_used == 23      # the last of the 24 CLIP layers is never run
    assert cfg.projector_hidden_act == "gelu" and cfg.projector_bias
    assert cfg.torch_dtype == "float16"


def test_llava_7b_sparse_config_gets_transformers_defaults():
    cfg = LlavaConfig.from_hf(copy.deepcopy(LLAVA_7B), name_or_path="llava-hf/llava-1.5-7b-hf")
    assert_7b_shape(cfg)
    assert cfg.name_or_path == "llava-hf/llava-1.5-7b-hf"


def test_llava_7b_v5_config_reads_rope_parameters_and_dtype():
    cfg = LlavaConfig.from_hf(copy.deepcopy(LLAVA_7B_V5))
    assert_7b_shape(cfg)
    assert effective(cfg) == effective(LlavaConfig.from_hf(copy.deepcopy(LLAVA_7B)))


def test_rope_theta_from_either_format():
    d4 = copy.deepcopy(LLAVA_7B)
    d4["text_config"]["rope_theta"] = 500000.0
    d5 = copy.deepcopy(LLAVA_7B_V5)
    d5["text_config"]["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    assert LlavaConfig.from_hf(d4).text.rope_theta == 500000.0
    assert LlavaConfig.from_hf(d5).text.rope_theta == 500000.0


def test_llava_13b_shape():
    cfg = LlavaConfig.from_hf(copy.deepcopy(LLAVA_13B))
    t = cfg.text
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (5120, 13824, 40, 40)
    assert t.head_dim == 128 and t.n_kv_heads == 40
    assert t.rms_norm_eps == 1e-5 and t.max_position_embeddings == 4096 and t.vocab_size == 32064
    # vision tower and projector input are the 7B's
    assert cfg.vision == LlavaConfig.from_hf(copy.deepcopy(LLAVA_7B)).vision
    assert cfg.num_image_tokens == 576 and cfg.vision_layers_used == 23


def test_sparse_dicts_fill_the_same_defaults_as_transformers():
    # no vision_config: transformers builds LLaVA's ViT-L/14-336; an empty one: CLIPVisionConfig's ViT-B/32
    assert LlavaConfig.from_hf({"model_type": "llava"}).vision.hidden_size == 1024
    assert LlavaConfig.from_hf({"model_type": "llava"}).num_image_tokens == 576
    assert LlavaConfig.from_hf({"vision_config": {}}).vision.hidden_size == 768
    bare = LlavaConfig.from_hf({"model_type": "llava", "text_config": {}})
    assert bare.text.rms_norm_eps == 1e-6 and bare.text.max_position_embeddings == 2048   # LlamaConfig's own


def test_image_token_id_spelling_and_feature_layer_list():
    d = copy.deepcopy(LLAVA_7B_V5)
    del d["image_token_index"]
    d["image_token_id"] = 32005
    d["vision_feature_layer"] = [-2, -5]
    cfg = LlavaConfig.from_hf(d)
    assert cfg.image_token_index == 32005
    assert cfg.vision_feature_layer == (-2, -5) and cfg.vision_layers_used == 23


def test_to_hf_round_trips(tiny_config):
    for cfg in (tiny_config, LlavaConfig.from_hf(copy.deepcopy(LLAVA_13B), name_or_path="x")):
        again = LlavaConfig.from_hf(json.loads(json.dumps(cfg.to_hf())), name_or_path=cfg.name_or_path)
        assert effective(again) == effective(cfg) and again.torch_dtype == cfg.torch_dtype


@pytest.mark.parametrize("model_type", ["llava_next", "llama", "clip_vision_model", "qwen2_vl"])
def test_other_model_types_are_refused(model_type):
    d = copy.deepcopy(LLAVA_7B)
    d["model_type"] = model_type
    with pytest.raises(MinivarError, match=model_type):
        LlavaConfig.from_hf(d, name_or_path="some/dir")


@pytest.mark.parametrize("change, match", [
    (lambda d: d["text_config"].update(rope_scaling={"type": "linear", "factor": 2.0}), "rope"),
    (lambda d: d["text_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda d: d.update(projector_hidden_act="relu"), "projector_hidden_act"),
    (lambda d: d.update(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
])
def test_unsupported_settings_are_refused(change, match):
    d = copy.deepcopy(LLAVA_7B)
    change(d)
    with pytest.raises(MinivarError, match=match):
        LlavaConfig.from_hf(d)


def test_non_object_config_is_refused():
    with pytest.raises(MinivarError, match="not a JSON object"):
        LlavaConfig.from_hf([1, 2, 3], name_or_path="x")


# ---------------------------------------------------------------------------------------------------------------
# Against transformers

def _golden_configs():
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(GOLDEN.glob("*/config.json"))}


def _cases():
    cases = {"7b": LLAVA_7B, "7b_v5": LLAVA_7B_V5, "13b": LLAVA_13B, "no_vision_config": {"model_type": "llava"},
             "empty_sub_configs": {"model_type": "llava", "vision_config": {}, "text_config": {}},
             "rope_theta_4x": {"text_config": {"rope_theta": 500000.0, "num_key_value_heads": 8}},
             "feature_layers": {"vision_feature_layer": [-2, -5], "vision_feature_select_strategy": "full"}}
    cases.update({f"golden_{k}": v for k, v in _golden_configs().items()})
    return cases


@pytest.mark.parametrize("name", sorted(_cases()))
def test_every_field_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    d = _cases()[name]
    ours = LlavaConfig.from_hf(copy.deepcopy(d))
    ref = transformers.LlavaConfig(**copy.deepcopy(d))
    t, v = ref.text_config, ref.vision_config
    rope = getattr(t, "rope_parameters", None) or {}
    expected_text = {
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "n_kv_heads": t.num_key_value_heads, "head_dim": getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        "hidden_act": t.hidden_act, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": rope.get("rope_theta", getattr(t, "rope_theta", None)),
        "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias, "tie_word_embeddings": ref.tie_word_embeddings,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
    }
    expected_vision = {k: getattr(v, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_channels", "image_size", "patch_size",
                                                  "hidden_act", "layer_norm_eps")}
    layer = ref.vision_feature_layer
    expected_top = {"image_token_index": ref.image_token_index, "projector_hidden_act": ref.projector_hidden_act,
                    "projector_bias": ref.multimodal_projector_bias,
                    "vision_feature_layer": tuple(layer) if isinstance(layer, (list, tuple)) else layer,
                    "vision_feature_select_strategy": ref.vision_feature_select_strategy}
    assert {k: getattr(ours.text, k) for k in expected_text} == expected_text
    assert {k: getattr(ours.vision, k) for k in expected_vision} == expected_vision
    assert {k: getattr(ours, k) for k in expected_top} == expected_top
    if "image_seq_length" in d or name in ("7b", "13b", "no_vision_config"):
        # transformers stores 576 as a constant; minivar derives it from image and patch size
        assert ours.num_image_tokens == ref.image_seq_length
