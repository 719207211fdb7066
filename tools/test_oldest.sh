#!/usr/bin/env bash
# Run the core tests against the oldest supported diffusers (0.30) in a throw-away virtual environment
# that reuses this interpreter's packages (torch, pytest, ...) and overrides diffusers/transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DEEPCACHE_OLDEST_VENV:-/tmp/deepcache-oldest-venv}"
python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "diffusers==0.30.3" "transformers==4.46.3" "huggingface_hub==0.25.2" "tokenizers<0.21"
"$venv/bin/python" -c "import diffusers, transformers; print('oldest supported: diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_schedule.py tests/test_layout.py tests/test_helper.py tests/test_exactness.py \
    tests/test_serving.py tests/test_adaptive.py
