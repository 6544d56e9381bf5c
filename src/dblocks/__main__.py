"""`python -m dblocks` is the `dblocks` command."""

import sys

from dblocks.cli import main

sys.exit(main())
