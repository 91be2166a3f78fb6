"""``python -m eplb ...``: the ``eplb`` command (see :mod:`eplb.cli`), e.g. ``python -m eplb demo``."""

from __future__ import annotations

import sys

from eplb.cli import main

if __name__ == "__main__":
    sys.exit(main())
