"""Qwen3-VL and Qwen3-VL-MoE: the vision tower with DeepStack (vision.py), the Qwen3 decoder with interleaved M-RoPE
(decoder.py, rope.py) and its mixture-of-experts layer (moe.py), the joined model (model.py), the chat template
rendered from the checkpoint (template.py), the registry entries (family.py)."""
