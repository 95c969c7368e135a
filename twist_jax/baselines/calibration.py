"""Input statistics of every block Linear on calibration windows, and the sequential walk.

Activations are captured with `flax.linen.intercept_methods` (model.py is untouched) and reduced
inside jit to what the pruners need, so only (I,) or (I, I) sums ever leave the device:
  count  number of calibration tokens n (float)
  sq_sum (I,)   sum_t x_tj^2       (Wanda's ||X_j||_2^2)
  gram   (I, I) sum_t x_t x_t^T    (X^T X; SparseGPT's Hessian is 2 X^T X / n), only if asked.
Sums are accumulated over batches of windows in float64 NumPy.

Dimension alphabet: M calibration windows, B batch, L length, D model, I a Linear's inputs.
"""

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twist_jax.model import GPT2, Block, Linear, ModelConfig

# The four pruned kernels of a block, in forward order (the order the sequential walk prunes).
LINEAR_PATHS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))

Stats = dict[str, Any]
PruneKernel = Callable[[np.ndarray, Stats, tuple[str, ...]], np.ndarray]


def _reduce(x_BxLxI, gram: bool) -> dict[str, jax.Array]:
  """Per-batch sums of one Linear's input, in float32 whatever the compute dtype."""
  x_TxI = x_BxLxI.reshape(-1, x_BxLxI.shape[-1]).astype(jnp.float32)
  out = {"sq_sum": jnp.sum(x_TxI * x_TxI, axis=0)}
  if gram:
    out["gram"] = jnp.dot(x_TxI.T, x_TxI, precision=jax.lax.Precision.HIGHEST)
  return out


def _recording_interceptor(store: dict):
  """Records the input of every Linear.__call__ under the Linear's module path."""

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, Linear) and context.method_name == "__call__":
      store[tuple(context.module.path)] = args[0]
    return next_fun(*args, **kwargs)

  return interceptor


def _accumulate(total: Stats | None, batch: Mapping[str, jax.Array], n_tokens: int) -> Stats:
  batch = {k: np.asarray(v, np.float64) for k, v in batch.items()}
  if total is None:
    return {"count": float(n_tokens), **batch}
  return {"count": total["count"] + n_tokens, **{k: total[k] + v for k, v in batch.items()}}


def _batches(m: int, batch_size: int):
  return [slice(s, min(s + batch_size, m)) for s in range(0, m, batch_size)]


# ---------------------------------------------------------------------------------------------
# One pass over the whole model: every layer sees the params as given.


@functools.lru_cache(maxsize=None)
def _model_stats_fn(cfg: ModelConfig, gram: bool):
  """jit(params, tokens_BxL) -> {module path: per-batch sums} for every block Linear."""

  def fn(params, tokens_BxL):
    store = {}
    with nn.intercept_methods(_recording_interceptor(store)):
      GPT2(cfg).apply({"params": params}, tokens_BxL)  # logits unused: XLA drops the LM head
    return {path: _reduce(x, gram) for path, x in store.items() if path[-2:] in LINEAR_PATHS}

  return jax.jit(fn)


def collect_inputs(params, cfg: ModelConfig, calib_windows_MxLp1, *, gram: bool = False,
                   batch_size: int = 8) -> dict:
  """Input statistics of the four Linears of every block, all computed with `params` as given.

  Returns {'h_i': {'attn': {'c_attn': stats, 'c_proj': stats}, 'mlp': {'c_fc':.., 'c_proj':..}}}
  with stats as in the module docstring. Memory: the gram of GPT-2 124M's 48 Linears is about
  1 GB in float64; the pruners use `prune_sequential`, which holds one layer's at a time.
  """
  tokens_MxL = jnp.asarray(calib_windows_MxLp1)[:, :-1]
  fn = _model_stats_fn(cfg, gram)
  totals = {}
  for rows in _batches(tokens_MxL.shape[0], batch_size):
    chunk = tokens_MxL[rows]
    for path, sums in fn(params, chunk).items():
      totals[path] = _accumulate(totals.get(path), sums, chunk.size)
  nested = {}
  for (block, branch, layer), stats in totals.items():
    nested.setdefault(block, {}).setdefault(branch, {})[layer] = stats
  return nested


# ---------------------------------------------------------------------------------------------
# Sequential walk: block by block, Linear by Linear, on the already-pruned earlier layers.


def layer_config(cfg: ModelConfig, i: int) -> ModelConfig:
  """A one-block config with block i's widths, so equal-width blocks share compiled code."""
  return cfg.replace(n_head=(cfg.n_head[i],), n_inner=(cfg.n_inner[i],),
                     attn_scale=(cfg.attn_scale[i],), mlp_scale=(cfg.mlp_scale[i],))


@functools.lru_cache(maxsize=None)
def _block_stats_fn(cfg1: ModelConfig, path: tuple[str, str], gram: bool):
  """jit(block_params, x_BxLxD) -> sums of `path`'s input; XLA prunes the rest of the block."""

  def fn(block_params, x_BxLxD):
    store = {}
    with nn.intercept_methods(_recording_interceptor(store)):
      Block(cfg1, 0).apply({"params": block_params}, x_BxLxD)
    return _reduce(store[path], gram)

  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _block_forward_fn(cfg1: ModelConfig):
  return jax.jit(lambda block_params, x_BxLxD: Block(cfg1, 0).apply({"params": block_params},
                                                                       x_BxLxD))


def embed(params, cfg: ModelConfig, tokens_BxL) -> jax.Array:
  """The residual stream entering block 0, exactly as GPT2.__call__ builds it."""
  pos_L = jnp.arange(tokens_BxL.shape[1])
  x_BxLxD = params["wte"]["embedding"][tokens_BxL] + params["wpe"]["embedding"][pos_L][None]
  return x_BxLxD.astype(jnp.dtype(cfg.dtype))


def _block_input_stats(cfg1, block_params, x_MxLxD, path, gram, batch_size) -> Stats:
  fn, total = _block_stats_fn(cfg1, path, gram), None
  for rows in _batches(x_MxLxD.shape[0], batch_size):
    chunk = x_MxLxD[rows]
    total = _accumulate(total, fn(block_params, chunk), chunk.shape[0] * chunk.shape[1])
  return total


def _block_forward(cfg1, block_params, x_MxLxD, batch_size) -> jax.Array:
  fn = _block_forward_fn(cfg1)
  return jnp.concatenate([fn(block_params, x_MxLxD[rows])
                          for rows in _batches(x_MxLxD.shape[0], batch_size)])


def _with_kernel(block_params, path, kernel) -> dict:
  """A copy of a block's params with one kernel replaced (bias and the rest shared)."""
  branch, layer = path
  linear = {**block_params[branch][layer], "kernel": kernel}
  return {**block_params, branch: {**block_params[branch], layer: linear}}


def prune_sequential(params, cfg: ModelConfig, calib_windows_MxLp1, prune_kernel: PruneKernel,
                     *, gram: bool = False, batch_size: int = 8) -> dict:
  """Prunes every block kernel in forward order, each from inputs through the pruned model.

  `prune_kernel(kernel_IxO, stats, (block, branch, layer)) -> kernel_IxO` (NumPy). Finer than
  SparseGPT's per-block grouping (the "true sequential" order): attn c_proj sees the pruned
  c_attn, c_fc the pruned attention, and block i+1 the fully pruned block i.
  """
  tokens_MxL = jnp.asarray(calib_windows_MxLp1)[:, :-1]
  x_MxLxD = embed(params, cfg, tokens_MxL)
  pruned = dict(params)
  for i in range(cfg.n_layer):
    name, cfg1 = f"h_{i}", layer_config(cfg, i)
    block = params[name]
    for path in LINEAR_PATHS:
      stats = _block_input_stats(cfg1, block, x_MxLxD, path, gram, batch_size)
      kernel = block[path[0]][path[1]]["kernel"]
      new = prune_kernel(np.asarray(kernel), stats, (name, *path))
      block = _with_kernel(block, path, jnp.asarray(new, kernel.dtype))
    x_MxLxD = _block_forward(cfg1, block, x_MxLxD, batch_size)
    pruned[name] = block
  return pruned


def map_kernels(params, cfg: ModelConfig, fn: Callable[[np.ndarray, tuple[str, ...]], Any]):
  """Applies fn(kernel_IxO, (block, branch, layer)) to the four kernels of every block."""
  out = dict(params)
  for i in range(cfg.n_layer):
    name = f"h_{i}"
    for path in LINEAR_PATHS:
      kernel = out[name][path[0]][path[1]]["kernel"]
      new = fn(np.asarray(kernel), (name, *path))
      out[name] = _with_kernel(out[name], path, jnp.asarray(new, kernel.dtype))
  return out
