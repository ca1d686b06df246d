"""``python -m benchlib`` (from scripts/): the same as ``scripts/bench``."""

import sys

from benchlib.cli import main

sys.exit(main())
