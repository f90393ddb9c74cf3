"""Qwen2-VL's Instruct chat template (conv mode `qwen`) and its byte-level BPE tokenizer (tokenizer.json).

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|>…<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n

(one line, wrapped here), with `<|image_pad|>` repeated as many times as the image has merged tokens — what the
chat template of the Qwen2-VL / Qwen2.5-VL Instruct checkpoints and their processor give for an image followed by
the question. The special tokens are put in by id and only the text between them is tokenized, so text the user
types stays text even if it spells `<|im_end|>`; the ids equal those of tokenizing the whole string, because the
tokenizer, too, splits the text at special tokens and encodes each piece on its own.
"""
from __future__ import annotations

import os
from pathlib import Path

from ...errors import MinivarError

CONV_MODES = ("qwen",)
QWEN_SYSTEM = "You are a helpful assistant."
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>")


def build_prompt(question: str, n_images: int = 1, conv_mode: str = "qwen") -> str:
    """The prompt as a string, one `<|image_pad|>` per image (what the processor expands)."""
    return "".join(piece if isinstance(piece, str) else "<|image_pad|>"
                   for piece in _pieces(question, [1] * n_images, conv_mode))


def _pieces(question: str, image_tokens: list[int], conv_mode: str) -> list:
    """The prompt as text pieces and special tokens ("<|…|>" names) in order; each image is an int (its count)."""
    if conv_mode not in CONV_MODES:
        raise MinivarError(f"unknown conv mode '{conv_mode}' for Qwen2-VL (choose from {', '.join(CONV_MODES)})")
    if not isinstance(question, str) or not question.strip():
        raise MinivarError("empty prompt")
    pieces = [("<|im_start|>",), "system\n" + QWEN_SYSTEM, ("<|im_end|>",), "\n", ("<|im_start|>",), "user\n"]
    for n in image_tokens:
        pieces += [("<|vision_start|>",), int(n), ("<|vision_end|>",)]
    pieces += [question, ("<|im_end|>",), "\n", ("<|im_start|>",), "assistant\n"]
    return [p[0] if isinstance(p, tuple) else p for p in pieces]


class QwenTokenizer:
    """Qwen2's byte-level BPE (a tokenizer.json for the `tokenizers` library), the `qwen` template, stop ids."""

    def __init__(self, path_to_tokenizer_json: str | os.PathLike, cfg):
        from tokenizers import Tokenizer as _HFTokenizer  # imported here so image-only users need no tokenizers

        path = Path(path_to_tokenizer_json)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.path = path
        if not path.is_file():
            raise MinivarError(f"tokenizer file '{path}' not found (a Qwen2-VL checkpoint ships tokenizer.json)")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for malformed JSON or an unknown model
            raise MinivarError(f"tokenizer file '{path}' cannot be loaded: {' '.join(str(e).split())}") from None
        tok.encode_special_tokens = True      # special tokens the user types stay text (see the module docstring)
        self._tok = tok
        self._special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.ids = {}
        for name in SPECIAL_TOKENS:
            i = tok.token_to_id(name)
            if i is None:
                raise MinivarError(f"tokenizer file '{path}' has no '{name}' token")
            self.ids[name] = i
        # The ids the model was trained with come from config.json; the tokenizer must agree with them.
        for name, key in (("<|image_pad|>", "image_token_id"), ("<|vision_start|>", "vision_start_token_id"),
                          ("<|vision_end|>", "vision_end_token_id")):
            if self.ids[name] != getattr(cfg, key):
                raise MinivarError(f"tokenizer file '{path}' maps '{name}' to id {self.ids[name]}, but config.json's "
                                   f"{key} is {getattr(cfg, key)}")
        self.image_token_id = cfg.image_token_id
        # Stop at the end of the assistant's turn (<|im_end|>) or of the text (<|endoftext|>), and at config.json's.
        self.stop_ids = tuple(dict.fromkeys([self.ids["<|im_end|>"], self.ids["<|endoftext|>"], *cfg.eos_token_ids]))
        self.eos_id = self.ids["<|im_end|>"]    # the first stop id: the end of the assistant's turn
        self.bos_id = None                       # Qwen2 prompts start with no BOS token

    def encode_prompt(self, user_text: str, conv_mode: str = "qwen",
                      num_image_tokens: int | list[int] = 1) -> list[int]:
        """Template + user text → ids, each image's `<|image_pad|>` repeated num_image_tokens times (an int for
        one image, a list for several, all before the question)."""
        counts = [num_image_tokens] if isinstance(num_image_tokens, int) else list(num_image_tokens)
        if any(int(n) < 1 for n in counts):
            raise MinivarError(f"num_image_tokens must be at least 1 per image, got {num_image_tokens}")
        out: list[int] = []
        for piece in _pieces(user_text, counts, conv_mode):
            if isinstance(piece, int):
                out += [self.image_token_id] * piece
            elif piece in self.ids:
                out.append(self.ids[piece])
            else:
                out += self._tok.encode(piece, add_special_tokens=False).ids
        return out

    def prompt_tail(self, user_text: str, conv_mode: str = "qwen") -> str:
        """The prompt's text after its last special token ("assistant\\n"): what an answer is tokenized together
        with (the lmms-eval plugin's continuations: lmms_plugin.ContinuationEncoder)."""
        return _pieces(user_text, [1], conv_mode)[-1]

    def decode(self, ids) -> str:
        """Ids → text, leaving out special tokens and ids the tokenizer does not have (the embedding has more rows
        than the tokenizer has entries: a model may emit one)."""
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)

    def decode_token_stream(self):
        """A fresh incremental decoder for one generated sequence (processing.StreamDecoder)."""
        from ...processing import StreamDecoder
        return StreamDecoder(self)

    def _closes_byte_run(self, token_id: int) -> bool:
        """True for an ordinary vocabulary token (StreamDecoder's question). In a byte-level BPE every ordinary
        token does; special tokens and ids beyond the tokenizer decode to nothing, so they close nothing."""
        token_id = int(token_id)
        return 0 <= token_id < self.vocab_size and token_id not in self._special_ids and \
            self._tok.id_to_token(token_id) is not None
