"""``python -m astage``: the command line (see :mod:`astage._cli`)."""

from ._cli import main

raise SystemExit(main())
