"""Qwen3-VL's prompt: the checkpoint's own chat template (its `chat_template`), rendered with jinja2 as transformers
renders it, for one user turn holding the image(s) and then the question, with the generation prompt. For the
Instruct checkpoints that is

    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n

(no system turn: the Qwen3-VL template adds none, unlike Qwen2-VL's); the Thinking checkpoints' template adds
`<think>\\n` after it. Reading the template from the checkpoint, not writing it here, keeps a fine-tune's own
prompt. jinja2 is a runtime dependency for this family only (imported here); the sandbox, trim_blocks/lstrip_blocks
and loop controls are transformers' settings, so a template renders the same text.

The question is kept apart: the template is rendered with a marker in its place, the text around the marker is
tokenized with special tokens recognised, and the question with them as text — so a question that spells
`<|im_start|>` or `<|image_pad|>` stays text (transformers' processor would turn them into control tokens). The
text between the question and its neighbouring special tokens is tokenized together with it, so the ids equal
tokenizing the whole rendered string whenever the question holds no special token. Each `<|image_pad|>` is then
repeated as many times as its image has merged tokens (transformers' replace_image_token).

Where a checkpoint has no chat template, minivar renders QWEN3_VL_TEMPLATE below (the Instruct prompt above).
Stop ids: generation_config.json's eos_token_id when the checkpoint has one, else <|im_end|>, <|endoftext|> and
config.json's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ...errors import MinivarError
from ..qwen2_vl.template import QwenTokenizer

CONV_MODES = ("qwen3",)
MARKER = "\x00minivar-question\x00"
# The Instruct prompt for image-then-text user turns, for checkpoints that carry no template of their own.
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def read_chat_template(directory: Path) -> str | None:
    """The checkpoint's chat template, where transformers looks: chat_template.jinja, chat_template.json, then
    tokenizer_config.json's `chat_template` (a string, or a list of named ones: "default")."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise MinivarError(f"'{path}' is not a valid JSON object ({e})") from None
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
        if template is not None:
            if not isinstance(template, str):
                raise MinivarError(f"'{path}': chat_template is not a string")
            return template
    return None


def render(template: str, messages: list, where: str) -> str:
    """transformers' rendering: a sandboxed jinja2 environment, trim_blocks and lstrip_blocks, loop controls, its
    tojson, raise_exception and strftime_now."""
    import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, tools=None, documents=None,
                                                add_generation_prompt=True)
    except jinja2.exceptions.TemplateError as e:
        raise MinivarError(f"the chat template of '{where}' cannot be rendered: {' '.join(str(e).split())}") from None


class Qwen3Tokenizer(QwenTokenizer):
    """Qwen's byte-level BPE (QwenTokenizer: decoding, streaming, ids checked against config.json) with the
    checkpoint's chat template and stop ids."""

    def __init__(self, directory, cfg):
        super().__init__(directory, cfg)
        directory = self.path.parent
        self.template = read_chat_template(directory) or QWEN3_VL_TEMPLATE
        self.where = str(directory)
        added = sorted((t.content for t in self._tok.get_added_tokens_decoder().values()), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        stops = generation_stop_ids(directory)
        if stops:
            self.stop_ids = stops
            self.eos_id = stops[0]

    def rendered(self, user_text: str, n_images: int, conv_mode: str = "qwen3") -> tuple[str, str]:
        """The template rendered around the question: (the text before it, the text after it)."""
        if conv_mode not in CONV_MODES:
            raise MinivarError(f"unknown conv mode '{conv_mode}' for Qwen3-VL (choose from {', '.join(CONV_MODES)})")
        if not isinstance(user_text, str) or not user_text.strip():
            raise MinivarError("empty prompt")
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": MARKER}]
        text = render(self.template, [{"role": "user", "content": content}], self.where)
        if text.count(MARKER) != 1:
            raise MinivarError(f"the chat template of '{self.where}' changes the question's text (it is not there "
                               f"once, as given): minivar cannot keep the question apart from it")
        before, after = text.split(MARKER)
        if before.count("<|image_pad|>") + after.count("<|image_pad|>") != n_images:
            raise MinivarError(f"the chat template of '{self.where}' does not give one <|image_pad|> per image")
        return before, after

    def encode_prompt(self, user_text: str, conv_mode: str = "qwen3",
                      num_image_tokens: int | list[int] = 1) -> list[int]:
        """Template + user text → ids, each image's `<|image_pad|>` repeated num_image_tokens times (an int for
        one image, a list for several, in order)."""
        counts = [num_image_tokens] if isinstance(num_image_tokens, int) else list(num_image_tokens)
        if any(int(n) < 1 for n in counts):
            raise MinivarError(f"num_image_tokens must be at least 1 per image, got {num_image_tokens}")
        before, after = self.rendered(user_text, len(counts), conv_mode)
        head, lead = self._split_last(before)           # lead: plain text right before the question
        trail, tail = self._split_first(after)          # trail: plain text right after it
        ids = self._encode(head, special=True) + self._encode(lead + user_text + trail, special=False) + \
            self._encode(tail, special=True)
        out, images = [], iter(counts)
        for i in ids:
            out += [i] * int(next(images)) if i == self.image_token_id else [i]
        return out

    def prompt_tail(self, user_text: str, conv_mode: str = "qwen3") -> str:
        """The prompt's text after its last added token (Instruct: "assistant\\n"), what an answer is tokenized
        together with (lmms_plugin.ContinuationEncoder)."""
        return self._split_last(self.rendered(user_text, 1, conv_mode)[1])[1]

    def _split_last(self, text: str) -> tuple[str, str]:
        """text → (up to and with its last added token, the plain text after it)."""
        ends = [m.end() for m in self._added.finditer(text)] if self._added else []
        cut = ends[-1] if ends else 0
        return text[:cut], text[cut:]

    def _split_first(self, text: str) -> tuple[str, str]:
        """text → (the plain text before its first added token, the rest)."""
        m = self._added.search(text) if self._added else None
        cut = m.start() if m else len(text)
        return text[:cut], text[cut:]

    def _encode(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        self._tok.encode_special_tokens = not special
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = True


def generation_stop_ids(directory: Path) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an int or a list) as a tuple; () where the file or key is absent."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise MinivarError(f"'{path}' is not a valid JSON object ({e})") from None
    if eos is None:
        return ()
    eos = [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise MinivarError(f"'{path}': eos_token_id {eos!r} is not an id or a list of ids")
    return tuple(dict.fromkeys(eos))
