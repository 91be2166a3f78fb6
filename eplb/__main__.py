"""``python -m eplb demo``: run the demo (see :mod:`eplb.demo`)."""

from __future__ import annotations

import sys

USAGE = "usage: python -m eplb demo"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["demo"]:
        from eplb import demo

        demo.main()
        return 0
    print(USAGE, file=sys.stderr)
    return 0 if args in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
