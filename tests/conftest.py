import os

import torch
from hypothesis import HealthCheck, settings

# Property tests run on a 2-core CI box: a modest example count, no per-example deadline
# (the first torch call in a process is slow and would trip it).
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests use tiny tensors: one intra-op thread avoids OpenMP spin-wait stalls, which on a
# busy 2-core box made a 1M-parameter forward pass 20x slower.
torch.set_num_threads(1)
