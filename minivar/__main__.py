"""`python -m minivar ...`: the command line (minivar/cli.py), as the installed `minivar` command runs it."""
import sys

from minivar.cli import main

if __name__ == "__main__":
    sys.exit(main())
