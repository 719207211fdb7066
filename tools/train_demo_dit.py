"""Train the embedded tiny Flux DiT; same as ``deepcache train-demo-dit``.

Example (the shipped weights; about 80 minutes on 2 CPU cores)::

    $ python tools/train_demo_dit.py --out DeepCache/assets --max-minutes 80
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepCache.tools.demo_model.train_dit import main

if __name__ == "__main__":
    sys.exit(main())
