"""Train the embedded demo pipeline and classifier; same as ``deepcache train-demo-model``.

Example (the shipped weights; about an hour on 2 CPU cores)::

    $ python tools/train_demo_model.py --out DeepCache/assets
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepCache.tools.demo_model.train import main

if __name__ == "__main__":
    sys.exit(main())
