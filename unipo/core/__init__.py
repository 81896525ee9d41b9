"""Pure tensor maths of the unified policy-gradient estimator.

Tensors and plain scalars in, tensors out: no models, no configs, no I/O, no `.item()` on a
hot path. Each module is one slot of the estimator with a registry of named variants.
"""
