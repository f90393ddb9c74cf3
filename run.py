#!/usr/bin/env python
"""minivar command line, from a clone without installing: `python run.py --help` (= `minivar --help` once installed).

The code lives in minivar/cli.py, so the installed `minivar` command and `python -m minivar` are the same program.
"""
import sys

from minivar.cli import build_parser, main  # noqa: F401  (build_parser: for scripts that imported it from here)

if __name__ == "__main__":
    sys.exit(main())
