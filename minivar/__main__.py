"""`python -m minivar ...`: the command line (minivar/cli.py), as the installed `minivar` command runs it."""
import sys

from minivar.cli import main

sys.exit(main())
