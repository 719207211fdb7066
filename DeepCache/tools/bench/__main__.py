"""``python -m DeepCache.tools.bench ...``: the same as ``deepcache bench ...``."""

import sys

from . import main

if __name__ == "__main__":  # importing this module (pkgutil, doctest collection) runs nothing
    sys.exit(main())
