"""Qwen2-VL and Qwen2.5-VL: vision towers (vision.py, vision_2_5.py), their configs (config.py), the image processor
(processing.py); the Qwen2 decoder with M-RoPE and the joined model live beside them."""
