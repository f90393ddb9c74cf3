"""The README's examples work as written: every ```python block of the README and of docs/api.md runs on the offline
demo (from the repo root), every `minivar ...` command in a ```bash block (of the README and docs/) is one the
command line accepts, every synopsis in the docs is the parser's usage, and every relative link leads to a file."""
import re
import shlex
from pathlib import Path

import pytest

from minivar import cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = [README] + [p.read_text() for p in sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = [README, (REPO / "docs" / "api.md").read_text()]     # pages whose python blocks run on the demo


def blocks(language: str, texts=(README,)) -> list[str]:
    return [b for text in texts for b in re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]


def test_the_readme_has_examples():
    assert blocks("python") and blocks("bash")


@pytest.mark.parametrize("index", range(len(blocks("python", RUNNABLE))))
def test_python_blocks_run_on_the_demo(index, demo_env, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = blocks("python", RUNNABLE)[index]
    exec(compile(code, f"python block {index + 1}", "exec"), {"__name__": "__readme__"})
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
    # an answer needs --image and --prompt; the live explorer (--serve) takes both from its page
    assert (args.image and args.prompt) if not args.serve else not (args.image or args.prompt)
    if args.model == "demo" and args.image:                  # the demo commands name files of this repo
        assert (REPO / args.image).is_file(), args.image


def test_the_docs_synopses_are_the_parsers():
    """Each `<!-- synopsis: PROGRAM -->` block is PROGRAM's usage as its parser prints it (line breaks aside):
    a flag added, renamed or given new choices makes this fail until `python tools/synopsis.py` rewrites the docs."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("synopsis_tool", REPO / "tools" / "synopsis.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    usage = tool.usages()
    found = [(program, block) for text in DOCS for program, block in tool.synopses(text)]
    assert {"minivar", "minivar-eval run", "minivar-eval reproduce"} <= {program for program, _ in found}
    for program, block in found:
        assert block.split() == usage[program].split(), f"{program}: the docs' synopsis is stale; run " \
                                                        f"python tools/synopsis.py"
    stale = tool.rewrite("<!-- synopsis: minivar -->\n```\nusage: minivar --old\n```\n", usage)
    assert tool.synopses(stale) == [("minivar", usage["minivar"] + "\n")]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)             # no headings inside code blocks
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_relative_links_lead_to_files_and_headings():
    pages = [REPO / "README.md", REPO / "CHANGELOG.md"] + sorted((REPO / "docs").glob("*.md"))
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = page.parent / target if target else page
            assert path.exists(), f"{page.relative_to(REPO)} links to {target}"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path.read_text()), f"{page.relative_to(REPO)} links to {target}#{anchor}"


def test_anchors_follow_githubs_rule():
    assert anchors("## VCD (released code = minivar's default)\n## `--json` with `--var`\n") == \
        {"vcd-released-code--minivars-default", "--json-with---var"}


def test_ci_runs_the_readmes_two_commands():
    """The README's "Two commands" block is what .ci/run runs (pip as `python -m pip`, quietly): the same
    installs, then the same test command."""
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    install, test = blocks("bash", (section,))[0].strip().splitlines()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]

    def plain(line):
        return " ".join(w for w in line.replace("python -m pip", "pip").split() if w != "--quiet")

    assert plain(install) in map(plain, ci)
    assert test == "python -m pytest -q" and ci[-1] == test          # the whole suite, last
