"""The README's examples work as written: every ```python block runs on the offline demo (from the repo root), and
every `minivar ...` command in a ```bash block (of the README and docs/) is one the command line accepts."""
import re
import shlex
from pathlib import Path

import pytest

from minivar import cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = [README] + [p.read_text() for p in sorted((REPO / "docs").glob("*.md"))]


def blocks(language: str, texts=(README,)) -> list[str]:
    return [b for text in texts for b in re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]


def test_the_readme_has_examples():
    assert blocks("python") and blocks("bash")


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_blocks_run_on_the_demo(index, demo_env, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = blocks("python")[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip() or "print(" not in code      # what it prints, it printed


def commands():
    """`minivar ...` lines of the bash blocks, continuation lines joined, without comments."""
    found = []
    for block in blocks("bash", DOCS):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "minivar":
                found.append(words[1:])
    return found


def test_the_commands_exist():
    assert len(commands()) >= 3


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv)[:60])
def test_bash_commands_parse(argv):
    args = cli.build_parser().parse_args(argv)              # an unknown or malformed flag exits 2
    assert args.image and args.prompt
    if args.model == "demo":                                 # the demo commands name files of this repo
        assert (REPO / args.image).is_file(), args.image
