"""``python -m rewards.remote ...``: the same as ``braid serve-reward ...``."""

import sys

from rewards.remote.cli import main

sys.exit(main())
