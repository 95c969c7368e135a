"""Aggregation: the masked mean that writes worker results back into the central model.

Pure functions of pytrees (docs/method.md §6); no mesh code. Workers hand in *changes*
(theta_w - central) summed over workers, and holder counts derived from subnet indices
(`subnets.unit_counts` / `subnets.leaf_counts`: arrays that broadcast to each leaf, never a
full-size mask per worker). The collective that sums over devices lives in parallel.py.
"""

import jax
import jax.numpy as jnp
import optax


def mean_of_holders(central, delta_sum, counts):
  """new = central + sum_w (theta_w - central) / cnt where cnt > 0, else central.

  This is the masked mean over the workers that held an entry: a worker that did not hold an
  entry contributes a zero change there, so the sum only sees holders. `counts` leaves
  broadcast to their leaf (unit counts along the unit dim, W for shared leaves). Dtypes of
  `central` are preserved.
  """
  def leaf(c, d, n):
    step = d.astype(jnp.float32) / jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)
    return (c.astype(jnp.float32) + step).astype(c.dtype)
  return jax.tree.map(leaf, central, delta_sum, counts)


def changes(new, old):
  """theta_new - theta_old per leaf (what a worker sends back; exactly 0 where frozen)."""
  return jax.tree.map(lambda a, b: a - b, new, old)


def delta_norm(old, new) -> jax.Array:
  """Global L2 norm of the aggregation step (logged every round)."""
  return optax.tree.norm(jax.tree.map(lambda a, b: a.astype(jnp.float32) - b, new, old))


def outer_optimizer(lr: float, momentum: float) -> optax.GradientTransformation | None:
  """DiLoCo-style outer SGD on the pseudo-gradient central - mean; None = plain TwIST."""
  if lr == 1.0 and momentum == 0.0:
    return None
  return optax.sgd(lr, momentum=momentum or None, nesterov=momentum > 0)


def apply_outer(tx, outer_state, central, mean):
  """central <- central - outer_lr * outer_opt(central - mean); returns (new, new_state)."""
  pseudo_grad = jax.tree.map(lambda c, m: c - m, central, mean)
  updates, outer_state = tx.update(pseudo_grad, outer_state, central)
  return optax.apply_updates(central, updates), outer_state
