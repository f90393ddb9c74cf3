"""InternVL's prompt: the checkpoint's chat template (rendered with jinja2, as transformers renders it), its image
placeholder expanded as InternVLProcessor expands it, and the tokenizer (Qwen2's byte-level BPE, tokenizer.json).

The -hf / -HF checkpoints' template (transformers' conversion script writes it; no system turn):

    <|im_start|>user\\n<IMG_CONTEXT>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

and each `<IMG_CONTEXT>` the template writes for an image becomes `<img>` + `<IMG_CONTEXT>` × 256·tiles + `</img>`.
A checkpoint without a template file gets that one. The template's own special tokens are put in by id and only
the text between them is tokenized, the question with the template text around it — so what the user types stays
text even if it spells `<IMG_CONTEXT>` or `<|im_end|>`, and the ids otherwise equal transformers' (which splits the
text at added tokens too, and encodes each piece on its own).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ...errors import MinivarError
from ..qwen2_vl.template import QwenTokenizer

CONV_MODES = ("internvl",)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}")
# the names transformers' InternVL tokenizer gives its image tokens (tokenizer_config.json's extra_special_tokens)
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
QUESTION = "\x00question\x00"           # stands for the user's text while the template renders


def read_chat_template(directory: Path) -> str:
    """The processor's chat template beside the checkpoint: chat_template.jinja (transformers 5.x) or
    chat_template.json (4.x); else the conversion script's (CHAT_TEMPLATE)."""
    jinja, js = directory / "chat_template.jinja", directory / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text()
    if js.is_file():
        try:
            template = json.loads(js.read_text())["chat_template"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise MinivarError(f"'{js}' is not a chat template file ({e})") from None
        if not isinstance(template, str):
            raise MinivarError(f"'{js}': chat_template is not a string")
        return template
    return CHAT_TEMPLATE


def render(template: str, n_images: int, where: str) -> str:
    """The template for one user turn (n_images images, then QUESTION) and the assistant's opening, rendered as
    transformers renders it (qwen3_vl/template.py's render: the sandbox, its settings and globals)."""
    from ..qwen3_vl.template import render as render_messages
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTION}]
    return render_messages(template, [{"role": "user", "content": content}], where)


class InternVLTokenizer(QwenTokenizer):
    """Qwen2's byte-level BPE with InternVL's image tokens and the checkpoint's chat template; stop ids
    `<|im_end|>`, `<|endoftext|>` and config.json's. (decode, streaming: QwenTokenizer's.)"""

    def __init__(self, path_to_tokenizer_json: str | os.PathLike, cfg):
        from tokenizers import Tokenizer as _HFTokenizer
        path = Path(path_to_tokenizer_json)
        directory = path if path.is_dir() else path.parent
        path = directory / "tokenizer.json" if path.is_dir() else path
        self.path = path
        if not path.is_file():
            raise MinivarError(f"tokenizer file '{path}' not found (an InternVL checkpoint ships tokenizer.json)")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for malformed JSON or an unknown model
            raise MinivarError(f"tokenizer file '{path}' cannot be loaded: {' '.join(str(e).split())}") from None
        tok.encode_special_tokens = True      # text is tokenized as text; the template's tokens go in by id
        self._tok = tok
        added = tok.get_added_tokens_decoder()
        self._special_ids = {i for i, t in added.items() if t.special}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        names = dict(IMAGE_TOKENS)
        config = directory / "tokenizer_config.json"
        if config.is_file():
            try:
                extra = json.loads(config.read_text()).get("extra_special_tokens") or {}
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise MinivarError(f"'{config}' is not valid JSON ({e})") from None
            if isinstance(extra, dict):
                names.update({k: v for k, v in extra.items() if k in IMAGE_TOKENS and isinstance(v, str)})
        self.ids = {}
        for name in (*names.values(), "<|im_end|>", "<|endoftext|>"):
            i = tok.token_to_id(name)
            if i is None:
                raise MinivarError(f"tokenizer file '{path}' has no '{name}' token")
            self.ids[name] = i
        self.start, self.end, self.context = (names[k] for k in ("start_image_token", "end_image_token",
                                                                 "context_image_token"))
        if self.ids[self.context] != cfg.image_token_id:
            raise MinivarError(f"tokenizer file '{path}' maps '{self.context}' to id {self.ids[self.context]}, but "
                               f"config.json's image_token_id is {cfg.image_token_id}")
        self.image_token_id = cfg.image_token_id
        self.template = read_chat_template(directory)
        self.where = str(directory)
        # the template's text is split at every added token (as transformers' tokenizer splits it), longest first
        self._added = {t.content: i for i, t in added.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True))
                                 + ")") if self._added else None
        self.stop_ids = tuple(dict.fromkeys([self.ids["<|im_end|>"], self.ids["<|endoftext|>"], *cfg.eos_token_ids]))
        self.eos_id = self.ids["<|im_end|>"]
        self.bos_id = None

    def pieces(self, user_text: str, counts: list[int], conv_mode: str = "internvl") -> list:
        """The prompt as text pieces (str) and token ids (int, one per added token; each image's tokens in place)."""
        if conv_mode not in CONV_MODES:
            raise MinivarError(f"unknown conv mode '{conv_mode}' for InternVL (choose from {', '.join(CONV_MODES)})")
        if not isinstance(user_text, str) or not user_text.strip():
            raise MinivarError("empty prompt")
        rendered = render(self.template, len(counts), self.where)
        if rendered.count(QUESTION) != 1:
            raise MinivarError(f"the chat template of '{self.where}' does not write the question once")
        out: list = []
        images = iter(counts)
        for part in (self._split.split(rendered) if self._split else [rendered]):
            if part in self._added:
                if part == self.context:             # one image's placeholder → <img> context × n </img>
                    n = next(images, None)
                    if n is None:
                        raise MinivarError(f"the chat template of '{self.where}' writes more image placeholders "
                                           f"than there are images")
                    out += [self.ids[self.start]] + [self.image_token_id] * n + [self.ids[self.end]]
                else:
                    out.append(self._added[part])
            elif part:
                text = part.replace(QUESTION, user_text)
                if out and isinstance(out[-1], str):
                    out[-1] += text
                else:
                    out.append(text)
        if next(images, None) is not None:
            raise MinivarError(f"the chat template of '{self.where}' writes fewer image placeholders than images")
        return out

    def encode_prompt(self, user_text: str, conv_mode: str = "internvl",
                      num_image_tokens: int | list[int] = 256) -> list[int]:
        """Template + user text → ids, each image's `<IMG_CONTEXT>` run num_image_tokens long (256 per tile; an
        int for one image, a list for several, all before the question)."""
        counts = [num_image_tokens] if isinstance(num_image_tokens, int) else list(num_image_tokens)
        if any(int(n) < 1 for n in counts):
            raise MinivarError(f"num_image_tokens must be at least 1 per image, got {num_image_tokens}")
        ids: list[int] = []
        for piece in self.pieces(user_text, [int(n) for n in counts], conv_mode):
            ids += self._tok.encode(piece, add_special_tokens=False).ids if isinstance(piece, str) else [piece]
        return ids

    def prompt_tail(self, user_text: str, conv_mode: str = "internvl") -> str:
        """The prompt's text after its last added token ("assistant\\n"), what an answer is tokenized with."""
        last = self.pieces(user_text, [1], conv_mode)[-1]
        return last if isinstance(last, str) else ""
