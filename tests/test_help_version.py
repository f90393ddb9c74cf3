"""What a newcomer types first: `--version` and `--help` of both commands. The help names every family of the
registry (a family registered later appears by itself), its offline demo, and every method."""
import contextlib
import dataclasses
import io
import subprocess
import sys

import pytest

import minivar
from minivar.eval.__main__ import main as eval_main
from minivar.models import registry

from conftest import run_cli

FAMILY_NAMES = ("LLaVA-1.5", "LLaVA-NeXT", "Qwen2-VL", "Qwen2.5-VL", "InternVL")
DEMOS = ("--model demo", "--model demo-llava_next", "--model demo-qwen2_vl", "--model demo-qwen2_5_vl",
         "--model demo-internvl")
MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl")
METHODS = ("VAR (--var)", "DAMRO (--damro)", "VCD (--vcd)")


def run_eval(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = eval_main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("run", [run_cli, run_eval], ids=["minivar", "minivar-eval"])
def test_version_prints_the_package_version(run):
    rc, out, err = run(["--version"])
    assert (rc, out, err) == (0, f"minivar {minivar.__version__}\n", "")


def test_the_installed_commands_print_the_version():
    for module in ("minivar", "minivar.eval"):
        done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout == f"minivar {minivar.__version__}\n", done.stderr


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("run", [run_cli, run_eval], ids=["minivar", "minivar-eval"])
def test_help_names_every_family_its_demo_and_every_method(run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = run(["--help"])
    assert rc == 0 and err == ""
    text = one_line(out)
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    for name, model_type, demo in zip(FAMILY_NAMES, MODEL_TYPES, DEMOS):    # a line each, wide enough not to wrap
        assert lines[f"{name} ({model_type})"].endswith(f"; demo: {demo}")
    assert all(m in text for m in METHODS)
    assert "templates vicuna_v1, llava_hf, llava_v1; images pad, crop" in text            # LLaVA-1.5's own
    assert lines["DAMRO (--damro)"].endswith("a CLS token: LLaVA-1.5, LLaVA-NeXT, InternVL")   # where DAMRO runs


@pytest.mark.parametrize("run", [run_cli, run_eval], ids=["minivar", "minivar-eval"])
def test_a_family_registered_later_appears_in_the_help(run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    later = dataclasses.replace(registry.FAMILIES["llava"], model_type="baby_llava", name="Baby-LLaVA",
                                conv_modes=("baby",), has_cls=False)
    monkeypatch.setitem(registry.FAMILIES, "baby_llava", later)
    out = run(["--help"])[1]
    assert "  Baby-LLaVA (baby_llava): templates baby; images pad, crop; demo: --model demo-baby_llava\n" in out
    assert "a CLS token: LLaVA-1.5, LLaVA-NeXT, InternVL\n" in out       # has_cls=False: not listed for DAMRO


def test_subcommand_help_keeps_its_own_description():
    rc, out, err = run_eval(["run", "--help"])
    assert rc == 0 and "families (" not in out and "Answer a benchmark's questions" in one_line(out)
