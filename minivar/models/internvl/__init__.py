"""InternVL3 / InternVL3.5 in transformers' own format (`internvl`): InternViT (vision.py), pixel shuffle and the
projector with the Qwen2 / Qwen3 decoder (model.py), dynamic tiling (processing.py), the chat template and tokenizer
(template.py), the family entry (family.py)."""
