"""Writes the command lines' synopses into the docs: the ``` block after each `<!-- synopsis: PROGRAM -->` line of
README.md and docs/*.md becomes PROGRAM's usage as its argparse parser prints it (PROGRAM: `minivar`,
`minivar-eval`, `minivar-eval run`, ...). tests/test_readme.py holds the docs to the parsers; after changing a
flag, run `python tools/synopsis.py` from the repository root."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIDTH = 100                      # argparse wraps the usage to the terminal's width: the docs' is fixed
MARKER = re.compile(r"^<!-- synopsis: (.+?) -->\n```\n(.*?)^```\n", re.S | re.M)


def usages() -> dict[str, str]:
    """PROGRAM → its usage text, wrapped at WIDTH columns."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from minivar import cli
    from minivar.eval.__main__ import build_parser
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)             # read by argparse's formatter (shutil.get_terminal_size)
    try:
        found = {"minivar": cli.build_parser().format_usage()}
        evaluation = build_parser()
        found["minivar-eval"] = evaluation.format_usage()
        commands = next(a for a in evaluation._actions if isinstance(a, argparse._SubParsersAction))
        for name, parser in commands.choices.items():
            found[f"minivar-eval {name}"] = parser.format_usage()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return {program: text.strip() for program, text in found.items()}


def synopses(text: str) -> list[tuple[str, str]]:
    """(PROGRAM, the block's text) for every marked block of a document."""
    return [(m.group(1), m.group(2)) for m in MARKER.finditer(text)]


def rewrite(text: str, usage: dict[str, str]) -> str:
    return MARKER.sub(lambda m: f"<!-- synopsis: {m.group(1)} -->\n```\n{usage[m.group(1)]}\n```\n", text)


def main() -> int:
    usage = usages()
    for path in [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md")):
        text = path.read_text()
        unknown = {program for program, _ in synopses(text)} - set(usage)
        if unknown:
            print(f"{path.relative_to(REPO)}: no parser for {', '.join(sorted(unknown))}", file=sys.stderr)
            return 1
        new = rewrite(text, usage)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
