"""Aggregation: the masked mean that writes worker results back into the central model.

Pure functions of pytrees (docs/method.md §6); no mesh code. Worker trees carry a leading
W axis and are full-shaped (`subnets.scatter_subnet` output): values zero where not held.
"""

import jax
import jax.numpy as jnp
import optax


def masked_mean(central, values_W, masks_W):
  """new = where(cnt > 0, sum_w mask_w * value_w / cnt, central), cnt = sum_w mask_w.

  Entries no worker held keep the central value; shared leaves (mask 1 everywhere) get the
  plain mean. Dtypes of `central` are preserved.
  """
  def leaf(c, v, m):
    m = m.astype(jnp.float32)
    num = jnp.sum(v.astype(jnp.float32) * m, axis=0)
    cnt = jnp.sum(m, axis=0)
    return jnp.where(cnt > 0, num / jnp.maximum(cnt, 1.0), c.astype(jnp.float32)).astype(c.dtype)
  return jax.tree.map(leaf, central, values_W, masks_W)


def holder_counts(masks_W):
  """Per-entry number of workers holding it (a full-shaped tree of float32)."""
  return jax.tree.map(lambda m: jnp.sum(m.astype(jnp.float32), axis=0), masks_W)


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
