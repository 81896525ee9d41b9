"""Pure tensor maths of the unified policy-gradient estimator.

Tensors and plain scalars in, tensors out: no models, no configs, no I/O, no `.item()` on a
hot path. Each module is one slot of the estimator with a registry of named variants.
"""

# Import every slot module so each registry is complete whichever one a caller imports first
# (hybrid registers its losses and advantages into the losses and advantages registries).
from unipo.core import advantages, entropy, hybrid, kl, logprobs, losses, preference, selection  # noqa: F401
