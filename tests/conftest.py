import os

import torch

# Tiny models gain nothing from threads, and the CI machine has 2 cores: one thread per test process
# avoids oversubscription when other work runs beside the tests.
torch.set_num_threads(int(os.environ.get("DEEPCACHE_TEST_THREADS", "1")))

# Placeholders (what a skipped module returns on a retrieval step) are NaN in the whole suite: a placeholder
# that some computation consumes poisons the output and fails the exactness tests. Set it to 0 to run the
# suite as users run the library (uninitialised placeholders).
os.environ.setdefault("DEEPCACHE_NAN_PLACEHOLDERS", "1")
