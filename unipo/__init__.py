"""unipo: Unified Policy Optimization for language-model post-training."""

__version__ = "0.1.0"
