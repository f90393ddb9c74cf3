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
    "temperature": "--temperature", "seed": "--seed", "prompt_tokenization": "--prompt-tokenization",
    "VARConfig.p": "--p", "VARConfig.rho": "--rho", "VARConfig.tau": "--tau",
    "VARConfig.min_image_attention": "--min-image-attention", "VARConfig.sink_dims": "--sink-dims",
    "VARConfig.layers": "--var-layers", "VARConfig.rule": "--var-rule", "VARConfig.heads": "--var-heads",
    "VARConfig.preset": "--var-preset", "KeyMask": "--mask-random-image-tokens",
    "conv_mode": "--conv-mode", "image_aspect_ratio": "--image-aspect-ratio",
    "min_pixels": "--min-pixels", "max_pixels": "--max-pixels", "max_patches": "--max-patches",
    "DAMROConfig.alpha": "--damro-alpha", "DAMROConfig.beta": "--damro-beta", "DAMROConfig.topk": "--damro-topk",
    "DAMROConfig.preset": "--damro-preset", "VCDConfig.alpha": "--vcd-alpha", "VCDConfig.beta": "--vcd-beta",
    "VCDConfig.noise_step": "--vcd-noise-step",
    "PAIConfig.alpha": "--pai-alpha", "PAIConfig.layers": "--pai-layers", "PAIConfig.gamma": "--pai-gamma",
    "PAIConfig.first_token": "--pai-first-token",
}


def for_command_line(message: str) -> str:
    """A library error as the command line says it: each `parameter` it names becomes that parameter's flag."""
    return re.sub(r"`([\w.]+)`", lambda m: FLAGS.get(m.group(1), m.group(1)), message)


def run_command(work, args, interrupted: str = "minivar: interrupted") -> int:
    """Run a command line's work(args) the way both of minivar's command lines end: a MinivarError is one line on
    stderr, `minivar: error: ...` with the flags named, exit 2; Ctrl-C exits 130; a reader that went away
    (`... | head`) ends the program quietly (exit 141)."""
    import os
    import sys
    try:
        return work(args)
    except MinivarError as e:
        print(f"minivar: error: {for_command_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Point stdout at /dev/null so Python's own flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
