#!/usr/bin/env python
"""Write the golden files under tests/golden/ that minivar's framework-free parity tests read.

Needs transformers (`pip install transformers && python tests/make_golden.py`). Every tiny checkpoint is built by
transformers' own LlavaForConditionalGeneration from fixed seeds, saved in one of the key layouts met in the wild, and
reloaded with from_pretrained to prove transformers reads it back to the same numbers. The references (logits, image
features, greedy tokens) are transformers' eager fp32 forward on the *stored* (rounded) weights.
"""

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration)

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "testdata" / "llama-tokenizer" / "tokenizer.json"
IMAGE = HERE.parent / "assets" / "example.jpg"
COPY_TOKENIZER = False  # the tokenizer.json is 3.6 MB; tests read it from shared/ (see README)
E2E_SEED = 14  # seeds chosen so every greedy step has a top-2 logit gap > 1e-2
E2E_TAIL = 2  # positions of logits stored for the e2e sub-cases
NEW_TOKENS = 16
EOS = 2
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = {"vicuna_v1": SYSTEM + " USER: <image>\n{p} ASSISTANT:", "llava_hf": "USER: <image>\n{p} ASSISTANT:"}
PROMPT = "What is shown in this image?"

# (vision dims, text dims, image token, pad) for the two tiny shapes
LAYOUT = dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, patch_size=14),
              text=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                        vocab_size=1024, max_position_embeddings=256, rms_norm_eps=1e-5),
              image_token_index=1000, pad_token_id=1001)
E2E = dict(vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                       image_size=336, patch_size=14),
           text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=32064, max_position_embeddings=1024, rms_norm_eps=1e-5),
           image_token_index=32000, pad_token_id=32001)


def n_patches(shape):
    return (shape["vision"]["image_size"] // shape["vision"]["patch_size"]) ** 2


def build(shape, seed):
    """A tiny eager fp32 LLaVA whose weights are redrawn with a seeded generator so logits are far from ties."""
    text = LlamaConfig(num_key_value_heads=shape["text"]["num_attention_heads"], **shape["text"])
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**shape["vision"]), text_config=text,
                      image_token_index=shape["image_token_index"], pad_token_id=shape["pad_token_id"],
                      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=n_patches(shape), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim == 1 and name.endswith("weight"):  # RMSNorm / LayerNorm gains: 1 ± 0.2
                p.copy_(1 + 0.2 * r)
            elif "embed" in name and "patch" not in name:  # token / position / class embeddings
                p.copy_(r)
            else:  # linear and conv weights: unit-variance outputs; lm_head ×3 for well-separated logits
                p.copy_(r / math.sqrt(p[0].numel()) * (3.0 if name == "lm_head.weight" else 1.0))
    return model


def round_to(model, dtype):
    """Round every weight to the stored dtype and back, so references use exactly the stored numbers."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def hub_name(k, inner="model."):
    """5.x in-memory name → llava-hf hub name (`inner="model.model."` gives the duplicated-prefix variant)."""
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    for a, b in (("model.vision_tower.", "vision_tower.vision_model."),
                 ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("model.language_model.", "language_model." + inner)):
        if k.startswith(a):
            return b + k[len(a):]
    raise KeyError(k)


def write_weights(sd, out, n_shards=1):
    """Write safetensors like transformers does: one model.safetensors, or N shards + model.safetensors.index.json."""
    sd = {k: v.contiguous() for k, v in sorted(sd.items())}
    if n_shards == 1:
        return save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    shards, acc = [dict() for _ in range(n_shards)], 0
    for k, v in sd.items():  # cut by cumulative bytes
        shards[min(n_shards - 1, acc * n_shards // total)][k] = v
        acc += v.numel() * v.element_size()
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def sparse_hub_config(shape):
    """A transformers-4.x style config.json as on the llava-hf hub: only values that differ from the defaults."""
    t, v = shape["text"], shape["vision"]
    return {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
            "image_token_index": shape["image_token_index"], "model_type": "llava",
            "pad_token_id": shape["pad_token_id"], "projector_hidden_act": "gelu",
            "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                            **{k: t[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "max_position_embeddings")},
                            "model_type": "llama", "rms_norm_eps": t["rms_norm_eps"], "torch_dtype": "float16",
                            "vocab_size": t["vocab_size"]},
            "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
            "vision_config": {**v, "model_type": "clip_vision_model", "projection_dim": 768, "vocab_size": 32000},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": t["vocab_size"]}


def v5_config(model, out, dtype):
    """config.json exactly as transformers 5.x save_pretrained writes it for a model stored in `dtype`."""
    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).to(dtype).save_pretrained(tmp)  # a copy: casting buffers (RoPE inv_freq) is lossy
        shutil.copy(Path(tmp) / "config.json", out / "config.json")


@torch.no_grad()
def references(model, input_ids, pixel_values):
    """Eager fp32 logits, projected image features and 16 greedy tokens (checked against a no-cache argmax loop)."""
    T = input_ids.shape[1]
    logits = model(input_ids=input_ids, pixel_values=pixel_values).logits.float()
    feats = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-2,
                                     vision_feature_select_strategy="default").pooler_output
    gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                         do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=EOS,
                         pad_token_id=model.config.pad_token_id)[:, T:]
    ids, gaps = input_ids, []
    for _ in range(NEW_TOKENS):  # plain argmax, full recompute, no EOS handling
        top = model(input_ids=ids, pixel_values=pixel_values).logits[0, -1].float().topk(2)
        gaps.append((top.values[0] - top.values[1]).item())
        ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    assert torch.equal(ids[:, T:], gen), "generate() differs from the plain argmax loop (EOS suppressed?)"
    assert min(gaps) > 1e-2, f"near-tie in greedy decoding: {min(gaps)}"
    assert len(set(gen[0].tolist())) >= 4, f"greedy tokens collapse: {gen[0].tolist()}"
    info = {"eos_in_greedy": EOS in gen[0].tolist(), "min_top2_gap": min(gaps), "greedy_list": gen[0].tolist()}
    return {"logits": logits, "image_features": torch.stack(list(feats)).float(), "greedy": gen}, info


def verify(case_dir, expected, input_ids, pixel_values, model):
    """Reload with transformers (eager, fp32): same weights, same logits. Returns a note on how it loaded."""
    loaded, info = LlavaForConditionalGeneration.from_pretrained(
        case_dir, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    problems = {k: sorted(v)[:3] for k, v in info.items() if v}
    assert not problems, f"{case_dir.name}: transformers does not load this layout cleanly: {problems}"
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), f"{case_dir.name}: weight {k} differs after reload"
    with torch.no_grad():
        logits = loaded.eval()(input_ids=input_ids, pixel_values=pixel_values).logits
    got = logits[:, -expected.shape[1]:]
    assert torch.equal(got, expected), f"{case_dir.name}: logits differ by {(got - expected).abs().max()}"
    return f"transformers {transformers.__version__} from_pretrained loads it with no missing/unexpected keys"


def layout_inputs(seed):
    g = torch.Generator().manual_seed(seed + 100)
    text = lambda n: torch.randint(3, 1000, (n,), generator=g)  # never BOS/EOS/image (1000)/pad (1001)
    ids = torch.cat([torch.tensor([1]), text(5), torch.full((n_patches(LAYOUT),), 1000), text(12)])[None]
    return ids, torch.randn(1, 3, 56, 56, generator=g)


def write_case(name, layout, dtype_name, seed, save, notes):
    """One layout-model case: `save(model, dir)` writes checkpoint + config, references are on stored weights."""
    out = GOLDEN / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = round_to(build(LAYOUT, seed), getattr(torch, dtype_name))
    save(model, out)
    input_ids, pixel_values = layout_inputs(seed)
    ref, info = references(model, input_ids, pixel_values)
    tensors = {"input_ids": input_ids, "pixel_values": pixel_values, **ref}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"))
    load_note = verify(out, ref["logits"], input_ids, pixel_values, model)
    meta = {"case": name, "dtype_stored": dtype_name, "layout": layout, "seed": seed,
            "transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "seq_len": input_ids.shape[1], "image_token_index": 1000, "image_seq_length": n_patches(LAYOUT),
            **info, "notes": notes + " " + load_note + "."}
    (out / "expected.json").write_text(json.dumps(meta, indent=2) + "\n")


def expand2square(img, color=(122, 116, 104)):
    """Original LLaVA-1.5 'pad' mode: centre the image on a square of the mean colour."""
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h),) * 2, color)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def write_e2e():
    out = GOLDEN / "e2e"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = round_to(build(E2E, E2E_SEED), torch.float16)
    write_weights({hub_name(k): v.half() for k, v in model.state_dict().items()}, out)
    (out / "config.json").write_text(json.dumps(sparse_hub_config(E2E), indent=2, sort_keys=True) + "\n")
    if COPY_TOKENIZER:
        shutil.copy(TOKENIZER, out / "tokenizer.json")
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 do_convert_rgb=True, image_mean=MEAN, image_std=STD)
    tok = Tokenizer.from_file(str(TOKENIZER))
    image = Image.open(IMAGE).convert("RGB")
    tensors, subcases = {}, {}
    for mode in ("pad", "crop"):
        img = expand2square(image) if mode == "pad" else image
        pixel_values = proc(img, return_tensors="pt").pixel_values.float()
        tensors[f"{mode}.pixel_values"] = pixel_values
        for template, fmt in TEMPLATES.items():
            sub, text = f"{mode}_{template}", fmt.format(p=PROMPT)
            ids = tok.encode(text).ids
            assert ids.count(32000) == 1, ids
            i = ids.index(32000)
            input_ids = torch.tensor([ids[:i] + [32000] * n_patches(E2E) + ids[i + 1:]])
            ref, info = references(model, input_ids, pixel_values)
            tensors[f"{mode}.image_features"] = ref["image_features"]
            tensors.update({f"{sub}.input_ids": input_ids, f"{sub}.greedy": ref["greedy"],
                            f"{sub}.logits_tail": ref["logits"][:, -E2E_TAIL:]})
            load_note = verify(out, tensors[f"{sub}.logits_tail"], input_ids, pixel_values, model)
            subcases[sub] = {"mode": mode, "template": template, "text": text, "token_ids_before_expansion": ids,
                             "seq_len": input_ids.shape[1], "pixel_values_key": f"{mode}.pixel_values", **info}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"))
    meta = {"case": "e2e", "dtype_stored": "float16", "layout": "hub (vision_tower.vision_model.*, "
            "language_model.model.*, language_model.lm_head.weight), single model.safetensors, sparse 4.x config",
            "seed": E2E_SEED, "transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "image_token_index": 32000, "image_seq_length": n_patches(E2E), "logits_tail_positions": E2E_TAIL,
            "eos_in_greedy": any(s["eos_in_greedy"] for s in subcases.values()),
            "tokenizer": "shared/testdata/llama-tokenizer/tokenizer.json" + (" (copied)" if COPY_TOKENIZER else ""),
            "image": "assets/example.jpg", "prompt": PROMPT, "subcases": subcases,
            "notes": "pixel_values: transformers CLIPImageProcessorPil (shortest_edge 336, crop 336); 'pad' first "
                     "pastes the image centred on a (122,116,104) square. input_ids: tokenizers encode(text).ids, the "
                     "single 32000 expanded to 576. pixel_values and image_features are per mode (shared by both "
                     "templates). logits_tail = logits of the last positions, fp32 from fp16-stored weights. "
                     + load_note + "."}
    (out / "expected.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_hub_sharded(model, out):
    write_weights({hub_name(k): v.half() for k, v in model.state_dict().items()}, out, n_shards=3)
    (out / "config.json").write_text(json.dumps(sparse_hub_config(LAYOUT), indent=2, sort_keys=True) + "\n")


def save_v5_hybrid(model, out):
    model.save_pretrained(out)


def save_v5_inmemory(model, out):
    write_weights({k: v.bfloat16() for k, v in model.state_dict().items()}, out)
    v5_config(model, out, torch.bfloat16)


def save_dup(model, out):
    write_weights({hub_name(k, inner="model.model."): v for k, v in model.state_dict().items()}, out, n_shards=2)
    v5_config(model, out, torch.float32)


def main():
    if not TOKENIZER.is_file():        # checked before anything is deleted or written
        raise SystemExit(f"make_golden: {TOKENIZER} not found (the e2e case needs ../shared's LLaMA tokenizer)")
    write_case("hub_sharded_fp16", "hub: vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*, "
               "language_model.lm_head.weight; 3 shards + index", "float16", 12, save_hub_sharded,
               "Sparse transformers-4.x style config.json as on llava-hf (defaults omitted). Expected values use the "
               "fp16-rounded weights upcast to fp32.")
    write_case("v5_hybrid_single", "transformers 5.x save_pretrained: vision_tower.* (no vision_model.), "
               "multi_modal_projector.*, language_model.model.*, language_model.lm_head.weight; single file",
               "float32", 2, save_v5_hybrid, "Written by save_pretrained itself (config.json with rope_parameters "
               "and dtype, generation_config.json).")
    write_case("v5_inmemory_bf16", "transformers 5.x in-memory state_dict: model.vision_tower.*, "
               "model.multi_modal_projector.*, model.language_model.* (no inner .model), lm_head.weight; single file",
               "bfloat16", 3, save_v5_inmemory, "Expected values use the bf16-rounded weights upcast to fp32.")
    write_case("dup_model_model", "language_model.model.model.* (duplicated .model.model), language_model.lm_head"
               ".weight, vision_tower.vision_model.*, multi_modal_projector.*; 2 shards + index", "float32", 4,
               save_dup, "5.x config.")
    write_e2e()
    for p in sorted(GOLDEN.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>10}  {p.relative_to(GOLDEN)}")


if __name__ == "__main__":
    main()
