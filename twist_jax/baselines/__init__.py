"""Post-training pruning baselines (docs/method.md §7): unstructured magnitude / Wanda / SparseGPT
on the four block kernels, and structured head / MLP-unit scores (random, magnitude, Wanda)."""

from twist_jax.baselines.calibration import (LINEAR_PATHS, collect_inputs, map_kernels,
                                             prune_sequential)
from twist_jax.baselines.sparsegpt import sparsegpt_kernel
from twist_jax.baselines.structured import METHODS_STRUCTURED, unit_scores
from twist_jax.baselines.unstructured import (METHODS_UNSTRUCTURED, magnitude_kernel,
                                              prune_unstructured, wanda_kernel)

__all__ = [
    "LINEAR_PATHS", "METHODS_STRUCTURED", "METHODS_UNSTRUCTURED", "collect_inputs",
    "magnitude_kernel", "map_kernels", "prune_sequential", "prune_unstructured",
    "sparsegpt_kernel", "unit_scores", "wanda_kernel",
]
