"""``python3 -m kemari``: see :mod:`kemari.cli`."""

import sys

from .cli import main

sys.exit(main())
