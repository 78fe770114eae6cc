"""``python -m eplb``: the ``eplb`` command line (eplb/cli.py)."""

from eplb.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
