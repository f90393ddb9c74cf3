"""The one exception type minivar raises for bad input.

Everything a user can get wrong (a missing image, a broken checkpoint, a bad flag value) raises `MinivarError`
with a one-line message that names the thing at fault; the command line prints it to stderr as
`minivar: error: ...` and exits with code 2.
Anything else that escapes is a bug in minivar, and keeps its traceback. Library errors name the Python parameter
at fault in backticks (`max_new_tokens`, `VARConfig.p`); the command lines print them with their flags instead
(`for_command_line`).
"""
import re


class MinivarError(Exception):
    """A user-facing error: the message is one line naming the file, tensor, value or limit at fault."""


# The command lines' flags for the Python parameters library errors name in backticks (`max_new_tokens`, ...).
FLAGS = {
    "device": "--device", "dtype": "--dtype", "max_new_tokens": "--max-new-tokens", "top_p": "--top-p",
    "temperature": "--temperature", "prompt_tokenization": "--prompt-tokenization",
    "VARConfig.p": "--p", "VARConfig.rho": "--rho", "VARConfig.tau": "--tau",
    "VARConfig.min_image_attention": "--min-image-attention", "VARConfig.sink_dims": "--sink-dims",
    "VARConfig.layers": "--var-layers", "VARConfig.rule": "--var-rule", "VARConfig.heads": "--var-heads",
    "VARConfig.preset": "--var-preset", "KeyMask": "--mask-random-image-tokens",
}


def for_command_line(message: str) -> str:
    """A library error as the command line says it: each `parameter` it names becomes that parameter's flag."""
    return re.sub(r"`([\w.]+)`", lambda m: FLAGS.get(m.group(1), m.group(1)), message)
