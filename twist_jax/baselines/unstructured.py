"""Unstructured post-training pruning of the four block kernels: magnitude, Wanda, SparseGPT.

Pruning groups (each gets exactly round(sparsity * size) zeros, Python rounding):
  magnitude, wanda: one output neuron = one kernel column (I entries). Per-output groups for both,
    as in the Wanda paper's comparison, so the two differ only by the activation factor.
  sparsegpt: one block of `blocksize` kernel rows (input features) x all O outputs; SparseGPT's
    adaptive mask selection chooses the mask jointly within such a block.
Embeddings, LayerNorms and biases are never touched.

Dimension alphabet: I a Linear's inputs, O its outputs (kernels are (I, O)).
"""

import numpy as np

from twist_jax.baselines import validate
from twist_jax.baselines.calibration import collect_inputs, map_kernels, prune_sequential
from twist_jax.baselines.sparsegpt import sparsegpt_kernel
from twist_jax.errors import ConfigError
from twist_jax.model import ModelConfig

METHODS_UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")


def prune_lowest_per_column(kernel_IxO: np.ndarray, score_IxO: np.ndarray,
                            sparsity: float) -> np.ndarray:
  """Zeroes the round(sparsity * I) lowest-scoring entries of every column (ties: lower row)."""
  k = validate.n_pruned(sparsity, kernel_IxO.shape[0])
  rows_kxO = np.argsort(score_IxO, axis=0, kind="stable")[:k]
  out = np.array(kernel_IxO, copy=True)
  np.put_along_axis(out, rows_kxO, 0, axis=0)
  return out


def magnitude_kernel(kernel_IxO: np.ndarray, sparsity: float) -> np.ndarray:
  """Per output neuron, zero the smallest |w|."""
  return prune_lowest_per_column(kernel_IxO, np.abs(kernel_IxO), sparsity)


def wanda_kernel(kernel_IxO: np.ndarray, sq_sum_I: np.ndarray, sparsity: float) -> np.ndarray:
  """Per output neuron, zero the smallest |W_ij| * ||X_j||_2 (Sun et al. 2023)."""
  norm_I = np.sqrt(np.asarray(sq_sum_I, np.float64))
  return prune_lowest_per_column(kernel_IxO, np.abs(kernel_IxO) * norm_I[:, None], sparsity)


def _kernel_pruner(method, sparsity, blocksize, percdamp):
  """prune_kernel(kernel, stats, path) for the calibration walk, one per method."""
  if method == "wanda":
    return lambda kernel, stats, path: wanda_kernel(kernel, stats["sq_sum"], sparsity)
  return lambda kernel, stats, path: sparsegpt_kernel(
      kernel, stats["gram"], stats["count"], sparsity, blocksize=blocksize, percdamp=percdamp)


def prune_unstructured(params, cfg: ModelConfig, method: str, sparsity: float,
                       calib_windows=None, *, blocksize: int = 128, percdamp: float = 0.01,
                       sequential: bool = True, batch_size: int = 8) -> dict:
  """Params of the same shapes with the block kernels pruned by `method` at `sparsity`.

  calib_windows (M, L+1) int tokens are required by wanda and sparsegpt. With `sequential`
  (both papers' procedure) each kernel is pruned from inputs computed through the already
  pruned earlier kernels; otherwise all inputs come from the dense model in one pass.
  """
  validate.check_method(method, METHODS_UNSTRUCTURED)
  sparsity = validate.check_sparsity(sparsity)
  blocksize = validate.check_positive_int("blocksize", blocksize)
  percdamp = validate.check_nonnegative("percdamp", percdamp)
  batch_size = validate.check_positive_int("batch_size", batch_size)
  if method == "magnitude":
    return map_kernels(params, cfg, lambda kernel, path: magnitude_kernel(kernel, sparsity))
  if calib_windows is None:
    raise ConfigError("calib_windows", f"method {method!r} needs calibration windows (M, L+1)")
  prune_kernel = _kernel_pruner(method, sparsity, blocksize, percdamp)
  gram = method == "sparsegpt"
  if sequential:
    return prune_sequential(params, cfg, calib_windows, prune_kernel, gram=gram,
                            batch_size=batch_size)
  stats = collect_inputs(params, cfg, calib_windows, gram=gram, batch_size=batch_size)
  return map_kernels(params, cfg, lambda kernel, path: prune_kernel(
      kernel, stats[path[0]][path[1]][path[2]], path))
