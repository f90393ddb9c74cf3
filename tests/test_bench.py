"""The benchmark runs end to end on a tiny checkpoint (no timing assertions: numbers are for bench/bench.py to print)."""
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_runs_end_to_end(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "bench.py"), "--make", "tiny", "--quick", "--dtype", "float32",
           "--checkpoint", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")]
    assert len(lines) == 1
    report = json.loads(lines[0][len("BENCH_JSON "):])
    mv = report["minivar"]
    for key in ("load_s", "peak_rss_gb", "vision_s", "prefill_s", "decode_tok_s", "var_prefill_s", "var_decode_tok_s"):
        assert mv[key] > 0, key
    assert mv["var_pairs_prefill"] > 0            # the VAR run really redistributed attention
    assert set(mv["batch"]) == {"1", "2"}
    assert report["roofline_tok_s"] > 0 and report["bandwidth_gb_s"] > 0
    assert len(mv["runs"]) == 1 and mv["runs"][0]["bandwidth_gb_s"] > 0 and mv["runs"][0]["gemv_gb_s"] > 0
    assert "decode (tok/s)" in proc.stdout         # the readable table
    # every printed rate and ratio is a possible one: positive and finite (issue 28: a quick run printed a negative
    # decode rate and speed-up, each from two separately timed runs)
    rates = re.findall(r"(-?[\d.]+|-?inf|nan) tok/s", proc.stdout) + re.findall(r"speed-up[^:]*: (-?[\d.]+|-?inf|nan)x",
                                                                                 proc.stdout)
    assert len(rates) >= 4, proc.stdout
    for text in rates:
        assert math.isfinite(float(text)) and float(text) > 0, (text, proc.stdout)
    for text in re.findall(r"(-?[\d.]+|-?inf|nan)%", proc.stdout):    # a cost or a share: finite, above -100 %
        assert math.isfinite(float(text)) and float(text) > -100, (text, proc.stdout)
    # VAR's cost from one off/on pair is noise (a quick run printed -96 %): not given
    assert "cost not measured" in proc.stdout and mv["var_prefill_cost_pct"] is None
    table = proc.stdout.split("decode (tok/s)")[1].splitlines()[0].split()
    assert all(float(v) > 0 for v in table), table
    if importlib.util.find_spec("transformers"):   # the comparison ran on the same ids and pixels (fp32: exact)
        assert report["transformers"] is not None, proc.stderr[-2000:]
        assert report["same_tokens_as_transformers"] is True


def test_next_benchmark_runs_end_to_end(tmp_path):
    """bench_next.py on a tiny NeXT checkpoint (a 672×672 image: the reference's 2,928 image tokens): every figure
    is there, both implementations ran each repeat, and (fp32) their greedy tokens are equal."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_next.py"), "--make", "tiny", "--quick", "--dtype", "float32",
           "--checkpoint", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_NEXT_JSON ")]
    assert len(lines) == 1
    report = json.loads(lines[0][len("BENCH_NEXT_JSON "):])
    assert (report["image_tokens"], report["prompt_tokens"]) == (2928, 2976)
    assert report["minivar"]["prefill_s"] > 0 and report["minivar"]["decode_tok_s"] > 0
    assert len(report["minivar_tokens"]) == 5 and report["minivar_peak_rss_gb"] > 0 and report["checkpoint_gb"] > 0
    assert len(report["runs"]["minivar"]["prefill_s"]) == 2
    assert (tmp_path / "ckpt" / ".bench-checkpoint").read_text().startswith("minivar bench, shape next-tiny")
    assert "prefill (s)" in proc.stdout
    if importlib.util.find_spec("transformers"):
        assert len(report["runs"]["transformers"]["decode_tok_s"]) == 2 and report["transformers"]["prefill_s"] > 0
        assert report["same_tokens_as_transformers"] is True


def test_many_questions_benchmark_runs_end_to_end(tmp_path, llama_tokenizer_path):
    """bench_many.py on a tiny checkpoint: every figure is there (the eval CLI's end-to-end run included)."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_many.py"), "--make", "tiny", "--quick", "--dtype", "float32",
           "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(llama_tokenizer_path), "--no-transformers"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_MANY_JSON ")]
    report = json.loads(lines[0][len("BENCH_MANY_JSON "):])
    mv = report["minivar"]
    assert set(mv["shared"]) == {"off-1", "off-6", "on-1", "on-6"} and min(mv["shared"].values()) > 0
    assert mv["one_by_one"]["off"] > 0 and mv["one_by_one"]["on"] > 0 and mv["var_pairs"] > 0
    assert report["eval_cli"]["6"]["questions_per_s"] > 0
    assert "shared prefix" in proc.stdout


def test_contrastive_benchmark_runs_end_to_end(tmp_path):
    """bench_contrastive.py on a tiny checkpoint: base, DAMRO, VCD (and DAMRO as released, with transformers) timed,
    every ratio there; in fp32 minivar's DAMRO picks the released structure's tokens."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_contrastive.py"), "--make", "tiny", "--quick", "--dtype",
           "float32", "--checkpoint", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_CD_JSON ")]
    assert len(lines) == 1
    report = json.loads(lines[0][len("BENCH_CD_JSON "):])
    has_hf = importlib.util.find_spec("transformers") is not None
    variants = {"base", "damro", "vcd"} | ({"damro_released"} if has_hf else set())
    assert set(report["median"]) == variants and set(report["runs"]) == variants
    for v in variants:
        assert len(report["runs"][v]) == report["repeats"] == 2
        assert report["median"][v]["prefill_s"] > 0 and report["median"][v]["decode_tok_s"] > 0
        assert len(report["tokens"][v]) == report["new_tokens"] + 1
    for key in ("damro_decode_ratio", "vcd_decode_ratio", "damro_prefill_ratio"):
        assert report["ratios"][key] > 0, key
    assert report["tokens"]["damro"] != report["tokens"]["base"]          # the contrast branch acted
    assert "DAMRO prefill / base" in proc.stdout                          # the readable table
    if has_hf:
        assert report["ratios"]["damro_end_to_end_speedup"] > 0
        assert report["same_tokens_as_released"] is True


def test_bandwidth_reads_exactly_the_weights_a_decode_step_reads():
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    import bench
    from minivar.models.llava import Llava
    cfg = bench.SHAPES["tiny"]
    model = Llava(cfg).to(torch.bfloat16)
    weights = bench.decode_weights(model)
    assert sum(t.numel() * t.element_size() for t in weights) == bench.decode_bytes_per_token(cfg, torch.bfloat16)
    assert not any(t is model.language_model.model.embed_tokens.weight for t in weights)   # one row per step
    assert bench.read_bandwidth(weights, "cpu") > 0 and bench.gemv_rate(model, "cpu") > 0


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux's; elsewhere ru_maxrss is all")
def test_peak_rss_is_the_worker_own_not_its_parents():
    """A worker started by a process that once held 1.5 GB reports its own peak (getrusage's would be the parent's)."""
    grandchild = f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import bench; print(bench.peak_rss_gb())"
    child = ("import subprocess, sys\n"
             "big = b'x' * (1536 * 2**20)\n"                          # 1.5 GB, every page written
             "del big\n"
             f"print(subprocess.run([sys.executable, '-c', {grandchild!r}], capture_output=True, text=True,"
             " check=True).stdout)")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=True).stdout
    assert 0 < float(out) < 1.2


def test_bench_checkpoints_made_by_an_older_rule_are_made_again(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import bench
    d = bench.make_checkpoint("tiny", "float32", tmp_path / "made")
    weights = next(d.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert bench.make_checkpoint("tiny", "float32", d) == d and weights.stat().st_mtime_ns == stamp   # reused
    (d / ".bench-checkpoint").write_text("minivar bench, shape tiny, init 1\n")
    bench.make_checkpoint("tiny", "float32", d)
    assert weights.stat().st_mtime_ns != stamp and "init 1" not in (d / ".bench-checkpoint").read_text()
    # a checkpoint of the user's own (no marker) is taken as it is, never rewritten
    (d / ".bench-checkpoint").unlink()
    stamp = weights.stat().st_mtime_ns
    bench.make_checkpoint("reference", "float32", d)
    assert weights.stat().st_mtime_ns == stamp


def test_help_gives_the_whole_first_paragraph():
    """--help's description is the docstring's whole first paragraph, not its first line cut mid-sentence."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "decode speed, VAR cost, batching, and the same figures for transformers' LlavaForConditionalGeneration" \
        in text
    assert "on the same checkpoint, pixels and prompt ids." in text and "--make tiny --quick" in text


def test_qwen_benchmark_runs_end_to_end(tmp_path):
    """bench_qwen.py --quick --make tiny: the checkpoint made with transformers (hub layout, tokenizer.json,
    preprocessor_config.json), both workers' figures from alternating repeats, the targets, one BENCH_JSON line."""
    pytest.importorskip("transformers")       # it makes the checkpoint
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, str(REPO / "bench" / "bench_qwen.py"), "--quick", "--make", "tiny", "--dtype", "float32",
           "--checkpoint", str(ckpt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors"):
        assert (ckpt / name).is_file(), name
    config = json.loads((ckpt / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"]["mrope_section"] == [2, 3, 3]   # the hub's flat file
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")]
    assert len(lines) == 1
    report = json.loads(lines[0][len("BENCH_JSON "):])
    assert report["image_tokens"] == 256 and report["prompt_tokens"] > 256 and report["shape"] == "tiny"
    for side in ("minivar", "transformers"):
        r = report[side]
        assert r is not None, (side, proc.stderr[-2000:])
        for key in ("load_s", "peak_rss_gb", "vision_s", "prefill_s", "decode_tok_s"):
            assert r[key] > 0, (side, key)
        assert len(r["runs"]) == 2 and len(r["tokens"]) == 9          # 2 repeats; the first token + 8 decoded
    mv, hf = report["minivar"], report["transformers"]
    assert report["prefill_ratio_vs_transformers"] == mv["prefill_s"] / hf["prefill_s"]
    assert report["decode_target_met"] == (report["decode_speedup_vs_transformers"] >= 1.3)
    assert report["same_tokens_as_transformers"] is True               # fp32: the same greedy tokens
    assert "prefill time:" in proc.stdout and "decode speed:" in proc.stdout   # the targets, printed


def test_qwen_reference_shape_is_qwen2_vl_7b_with_4_layers(tmp_path):
    """The reference checkpoint's config (built on the meta device: nothing of its 5 GB is made): the full Qwen2-VL
    ViT, 4 Qwen2-7B decoder layers, untied; minivar reads its flat hub config.json to the same model, tensor for
    tensor, and a 448² image gives 256 tokens."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "bench"))
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    import bench_qwen
    from test_qwen2_vl_model import flat_hub_config, write_tokenizer
    from minivar.models.qwen2_vl.model import Qwen2VL, Qwen2VLConfig
    cfg = bench_qwen.transformers_config("reference", write_tokenizer(tmp_path) / "tokenizer.json")
    ours_cfg = Qwen2VLConfig.from_hf(flat_hub_config(cfg.to_dict()))
    v, t = ours_cfg.vision, ours_cfg.text
    assert (v.depth, v.embed_dim, v.num_heads, v.hidden_size) == (32, 1280, 16, 3584)
    assert (t.hidden_size, t.num_attention_heads, t.n_kv_heads, t.intermediate_size, t.vocab_size,
            t.num_hidden_layers, t.tie_word_embeddings) == (3584, 28, 4, 18944, 152064, 4, False)
    with torch.device("meta"):
        hf = Qwen2VLForConditionalGeneration(cfg)
        ours = Qwen2VL(ours_cfg)
    hf_shapes = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): tuple(p.shape)
                 for k, p in hf.state_dict().items()}
    assert hf_shapes == {k: tuple(p.shape) for k, p in ours.state_dict().items()}
    assert 2.6e9 < sum(p.numel() for p in ours.parameters()) < 2.8e9
    from PIL import Image
    from minivar.models.qwen2_vl.processing import QwenImageConfig, preprocess_image
    image = preprocess_image(Image.new("RGB", (448, 448)), QwenImageConfig.from_hf(bench_qwen.PREPROCESSOR))
    assert image.num_tokens == 256 and tuple(image.meta["grid_thw"]) == (1, 32, 32)
