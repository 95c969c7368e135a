"""The masked mean against a NumPy reference loop, and the outer optimizer."""

import jax
import jax.numpy as jnp
import numpy as np

from twist_jax import aggregate


def numpy_masked_mean(central, values, masks):
  out = np.array(central, np.float64)
  for idx in np.ndindex(out.shape):
    num, cnt = 0.0, 0
    for w in range(values.shape[0]):
      if masks[(w,) + idx]:
        num += values[(w,) + idx]
        cnt += 1
    if cnt:
      out[idx] = num / cnt
  return out


def random_case(seed, w=3, shape=(4, 5)):
  rng = np.random.default_rng(seed)
  central = rng.normal(size=shape).astype(np.float32)
  values = rng.normal(size=(w,) + shape).astype(np.float32)
  masks = (rng.random((w,) + shape) < 0.4).astype(np.float32)
  return central, values, masks


def test_masked_mean_equals_numpy_loop():
  for seed in range(5):
    central, values, masks = random_case(seed)
    got = aggregate.masked_mean({"a": central}, {"a": values * masks}, {"a": masks})["a"]
    np.testing.assert_allclose(got, numpy_masked_mean(central, values, masks), rtol=1e-6)
    assert ((masks.sum(0) == 0) == (np.asarray(got) == central)).any()


def test_unheld_entries_keep_central_and_all_ones_is_plain_mean():
  central, values, _ = random_case(0)
  zeros = np.zeros_like(values)
  got = aggregate.masked_mean(central, zeros, zeros)
  np.testing.assert_array_equal(got, central)
  got = aggregate.masked_mean(central, values, np.ones_like(values))
  np.testing.assert_allclose(got, values.mean(0), rtol=1e-6)


def test_idempotent_when_workers_did_not_move():
  central, _, masks = random_case(1)
  values = np.broadcast_to(central, masks.shape) * masks
  got = jax.jit(aggregate.masked_mean)(central, values, masks)
  np.testing.assert_allclose(got, central, rtol=1e-7)


def test_dtype_preserved():
  central, values, masks = random_case(2)
  got = aggregate.masked_mean(jnp.asarray(central, jnp.bfloat16),
                              jnp.asarray(values, jnp.bfloat16), masks)
  assert got.dtype == jnp.bfloat16


def test_outer_optimizer_plain_is_none_and_sgd_moves_toward_mean():
  assert aggregate.outer_optimizer(1.0, 0.0) is None
  tx = aggregate.outer_optimizer(0.5, 0.0)
  central, mean = jnp.ones(3), jnp.zeros(3)
  new, _ = aggregate.apply_outer(tx, tx.init(central), central, mean)
  np.testing.assert_allclose(new, 0.5)
