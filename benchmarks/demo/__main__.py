"""``python -m benchmarks.demo``."""

import sys

from . import main

sys.exit(main())
