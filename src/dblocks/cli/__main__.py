"""``python -m dblocks.cli``: the ``dblocks`` command."""

import sys

from dblocks.cli import main

sys.exit(main())
