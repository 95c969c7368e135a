"""Aggregation from indices (scatter-add sums, holder counts, mean of holders) against NumPy
references built from per-worker full-size scatters, and the outer optimizer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twist_jax import aggregate, subnets
from twist_jax.model import ModelConfig
from twist_jax.subnets import SubnetConfig

from helpers import random_params

CFG = ModelConfig.uniform(n_layer=3, n_head=4, n_embd=16, vocab_size=32, n_positions=8)
W = 3


def numpy_masked_mean(central, values, masks):
  """The definition, one entry at a time: mean over the workers holding the entry."""
  out = np.array(central, np.float64)
  for idx in np.ndindex(out.shape):
    held = [values[(w,) + idx] for w in range(values.shape[0]) if masks[(w,) + idx]]
    if held:
      out[idx] = np.mean(held)
  return out


def spec_for(mode, kappa=0.5, shared=()):
  return subnets.make_spec(CFG, SubnetConfig(mode, (kappa,) * CFG.n_layer, shared, "uniform",
                                             "mean"), W)


def per_worker_reference(small_W, subs, spec, like):
  """Full-size values and 0/1 masks per worker via `scatter_subnet` (one worker at a time)."""
  vals, masks = [], []
  for w in range(W):
    v, m = subnets.scatter_subnet(jax.tree.map(lambda x: x[w], small_W),
                                  jax.tree.map(lambda x: x[w], subs), spec, like)
    vals.append(jax.tree.map(np.asarray, v))
    masks.append(jax.tree.map(np.asarray, m))
  stack = lambda trees: jax.tree.map(lambda *xs: np.stack(xs), *trees)
  return stack(vals), stack(masks)


MODES = [("attn", 0.5, ()), ("mlp", 0.25, ()), ("attn_mlp", 0.5, ()), ("blocks", 0.5, (0,))]


@pytest.mark.parametrize("mode,kappa,shared", MODES)
def test_scatter_add_and_counts_equal_per_worker_scatters(mode, kappa, shared):
  spec, central = spec_for(mode, kappa, shared), random_params(CFG, 0)
  subs = subnets.sample_subnets(jax.random.key(1), spec)
  small_W = jax.tree.map(lambda *xs: jnp.stack(xs), *[
      subnets.extract_subnet(random_params(CFG, 10 + w), jax.tree.map(lambda x: x[w], subs),
                             spec) for w in range(W)])
  vals, masks = per_worker_reference(small_W, subs, spec, central)
  got_sum = aggregate.scatter_add(small_W, subs, spec, central)
  chex.assert_trees_all_close(got_sum, jax.tree.map(lambda v: v.sum(0), vals), rtol=1e-6,
                              atol=1e-6)
  counts = aggregate.leaf_counts(aggregate.unit_counts(subs, spec), spec, central, W)
  full = jax.tree.map(lambda c, x: np.broadcast_to(np.asarray(c), x.shape), counts, central)
  chex.assert_trees_all_equal(full, jax.tree.map(lambda m: m.sum(0), masks))
  # Holder counts must vary between entries (and reach 2+), or the test proves little.
  flat = np.concatenate([x.ravel() for x in jax.tree.leaves(full)])
  assert len(np.unique(flat)) >= 2 and flat.max() >= 2


@pytest.mark.parametrize("mode,kappa,shared", MODES)
def test_mean_of_holders_equals_numpy_loop(mode, kappa, shared):
  spec, central = spec_for(mode, kappa, shared), random_params(CFG, 0)
  subs = subnets.sample_subnets(jax.random.key(2), spec)
  thetas = [random_params(CFG, 20 + w) for w in range(W)]
  small_W = jax.tree.map(lambda *xs: jnp.stack(xs), *[
      subnets.extract_subnet(thetas[w], jax.tree.map(lambda x: x[w], subs), spec)
      for w in range(W)])
  central_small = jax.vmap(lambda s: subnets.extract_subnet(central, s, spec))(subs)
  changes = aggregate.scatter_add(aggregate.changes(small_W, central_small), subs, spec, central)
  counts = aggregate.leaf_counts(aggregate.unit_counts(subs, spec), spec, central, W)
  got = jax.jit(aggregate.mean_of_holders)(central, changes, counts)
  vals, masks = per_worker_reference(small_W, subs, spec, central)
  for g, c, v, m in zip(jax.tree.leaves(got), jax.tree.leaves(central), jax.tree.leaves(vals),
                        jax.tree.leaves(masks)):
    np.testing.assert_allclose(g, numpy_masked_mean(c, v, m), rtol=1e-5, atol=1e-6)


def test_unheld_entries_keep_central_idempotent_and_dtype():
  spec, central = spec_for("attn_mlp"), random_params(CFG, 0)
  subs = subnets.sample_subnets(jax.random.key(3), spec)
  counts = aggregate.leaf_counts(aggregate.unit_counts(subs, spec), spec, central, W)
  zero = jax.tree.map(jnp.zeros_like, central)
  chex.assert_trees_all_equal(aggregate.mean_of_holders(central, zero, counts), central)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), central)
  got = aggregate.mean_of_holders(half, zero, counts)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))


def test_outer_optimizer_plain_is_none_and_sgd_moves_toward_mean():
  assert aggregate.outer_optimizer(1.0, 0.0) is None
  tx = aggregate.outer_optimizer(0.5, 0.0)
  central, mean = jnp.ones(3), jnp.zeros(3)
  new, _ = aggregate.apply_outer(tx, tx.init(central), central, mean)
  np.testing.assert_allclose(new, 0.5)
