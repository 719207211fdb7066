import os

import torch

# Tiny models gain nothing from threads, and the CI machine has 2 cores: one thread per test process
# avoids oversubscription when other work runs beside the tests.
torch.set_num_threads(int(os.environ.get("DEEPCACHE_TEST_THREADS", "1")))
