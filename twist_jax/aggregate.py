"""Aggregation: the masked mean that writes worker results back into the central model.

Pure functions of pytrees (docs/method.md §6); no mesh code. Workers hand in *changes*
(theta_w - central) summed over workers, and holder counts derived from subnet indices
(`unit_counts` / `leaf_counts`: arrays that broadcast to each leaf, never a full-size mask
per worker). The collective that sums over devices lives in parallel.py.
"""

import jax
import jax.numpy as jnp
import optax

from twist_jax import subnet_spec, subnets


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


# ---- sums and holder counts from subnet indices (no per-worker full-size trees) -------------


def unit_counts(subnets_W, spec: subnet_spec.SubnetSpec):
  """Holders per unit, from the indices alone: a bincount per layer and unit kind.

  `{'h_i': {'head': (H,), 'unit': (F,)}}` or `{'blocks': (N,)}` (every layer, shared ones held
  by all W), float32. Shared by params and both Adam moments; sums over devices with one psum.
  """
  if spec.mode == "blocks":
    w = subnets_W["blocks"].shape[0]
    kept_WxK = jax.vmap(lambda b: subnets.blocks_kept({"blocks": b}, spec))(subnets_W["blocks"])
    return {"blocks": _bincount(kept_WxK, spec.n_layer) if w else jnp.zeros(spec.n_layer)}
  sizes = {"head": spec.n_head, "unit": spec.n_inner}
  return {f"h_{i}": {kind: _bincount(subnets_W[f"h_{i}"][kind], sizes[kind][i])
                     for kind in spec.unit_kinds} for i in spec.partitioned}


def _bincount(idx, total: int):
  return jnp.zeros((total,), jnp.float32).at[idx.reshape(-1)].add(1.0)


def leaf_counts(counts, spec: subnet_spec.SubnetSpec, like, workers: int):
  """Params-shaped tree of holder counts, each broadcastable to its leaf (not full-sized).

  A unit-bearing leaf gets its unit counts laid along the leaf's unit dim; shared leaves get
  `workers` (all W hold them); in blocks mode each block's leaves get its layer's count.
  """
  total = jnp.float32(workers)
  if spec.mode == "blocks":
    out = jax.tree.map(lambda _: total, like)
    for i in range(spec.n_layer):
      out[f"h_{i}"] = jax.tree.map(lambda _, i=i: counts["blocks"][i], like[f"h_{i}"])
    return out
  out = jax.tree.map(lambda _: total, like)
  for i in spec.partitioned:
    for path, dim, pre, units, kind in subnets.leaf_rules(spec, i):
      leaf = subnets.get_path(like, (f"h_{i}",) + path)
      post = leaf.shape[dim] // (pre * units)
      along_dim = jnp.broadcast_to(counts[f"h_{i}"][kind][None, :, None], (pre, units, post))
      shape = [1] * leaf.ndim
      shape[dim] = leaf.shape[dim]
      out = subnets.set_path(out, (f"h_{i}",) + path, along_dim.reshape(shape))
  return out


def scatter_add(small_W, subnets_W, spec: subnet_spec.SubnetSpec, like):
  """sum_w scatter(small_w): W workers' subnet-shaped trees added into one full-shaped tree.

  One scatter-add per leaf over the workers' flattened indices; never W full-size trees.
  Shared leaves are summed over W. `like` gives the full shapes.
  """
  if spec.mode == "blocks":
    return _scatter_add_blocks(small_W, subnets_W, spec, like)
  out = jax.tree.map(lambda x: jnp.sum(x, axis=0), small_W)
  for i in spec.partitioned:
    for path, dim, pre, total, kind in subnets.leaf_rules(spec, i):
      full = subnets.get_path(like, (f"h_{i}",) + path)
      idx_WxM = subnets_W[f"h_{i}"][kind]
      w, m = idx_WxM.shape
      small = subnets.get_path(small_W, (f"h_{i}",) + path)
      s_view, axis = subnets.unit_view(small, dim + 1, pre, m)
      # (W, ..., pre, M, post, ...) -> (..., pre, W*M, post, ...): workers join the unit axis.
      s_view = jnp.moveaxis(s_view, 0, axis - 1)
      s_view = s_view.reshape(s_view.shape[:axis - 1] + (w * m,) + s_view.shape[axis + 1:])
      z_view, z_axis = subnets.unit_view(jnp.zeros(full.shape, s_view.dtype), dim, pre, total)
      where = (slice(None),) * z_axis + (idx_WxM.reshape(-1),)
      summed = z_view.at[where].add(s_view).reshape(full.shape)
      out = subnets.set_path(out, (f"h_{i}",) + path, summed)
  return out


def _scatter_add_blocks(small_W, subnets_W, spec: subnet_spec.SubnetSpec, like):
  w = subnets_W["blocks"].shape[0]
  kept_WxK = jax.vmap(lambda b: subnets.blocks_kept({"blocks": b}, spec))(subnets_W["blocks"])
  k = spec.kept_layers()
  small_stack = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1),
                             *[small_W[f"h_{j}"] for j in range(k)])  # (W, K, ...)
  full_stack = subnets.stack_blocks(like, spec.n_layer)
  summed = jax.tree.map(
      lambda z, s: jnp.zeros(z.shape, s.dtype).at[kept_WxK.reshape(-1)].add(
          s.reshape((w * k,) + s.shape[2:])), full_stack, small_stack)
  out = {key: jax.tree.map(lambda x: jnp.sum(x, axis=0), v) for key, v in small_W.items()
         if not key.startswith("h_")}
  for i in range(spec.n_layer):
    out[f"h_{i}"] = jax.tree.map(lambda x, i=i: x[i], summed)
  return out
