"""``python -m chora``: the `chora` command (how `chora up` starts each service)."""

import sys

from chora.cli import main

sys.exit(main())
