"""``python -m cspmirror``: the same as the ``cspmirror`` console script."""

import sys

from .cli import main

sys.exit(main())
