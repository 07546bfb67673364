"""``python -m sae``: see :mod:`sae.cli`."""

import sys

from .cli import main

sys.exit(main())
