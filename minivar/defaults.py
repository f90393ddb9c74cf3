"""The defaults every entry point shares, in a module that imports nothing (so `--help` needs no torch)."""

# The checkpoint every command loads when --model is not given: LLaVA-1.5-7B, a 14.1 GB download.
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
# the prompt's ids: LLaVA's fast tokenizer, VAR's released code, DAMRO's released scripts (processing.py)
PROMPT_TOKENIZATIONS = ("llava", "official", "damro")
