"""``python -m gaspar``: the same as the ``gaspar`` command."""

import sys

from .cli import main

sys.exit(main())
