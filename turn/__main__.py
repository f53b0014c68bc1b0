"""``python -m turn``: the same as ``rallypoint turn``."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
