"""``python -m DeepCache ...``: the same as ``deepcache ...`` (the command line lives in :mod:`DeepCache.tools.cli`)."""

import sys

from .tools.cli import main

sys.exit(main())
