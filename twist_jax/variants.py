"""Round factories: one function per variant (ddp, true, masked, hybrid), picked by a table.

A round maps (state, subnets_W, batches_WxRxBxLp1, step0) -> (state, metrics), where state is
{'params', 'opt_state', 'outer_state'} of the central model and metrics holds per-worker
losses (W, R) and the aggregation delta norm. Each round is one compiled call (hybrid: two
concurrent calls on different devices, then the aggregation).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from twist_jax import aggregate, parallel, subnets
from twist_jax.model import ModelConfig, lm_loss
from twist_jax.worker import local_steps, map_param_trees


@dataclasses.dataclass(frozen=True)
class RoundContext:
  model: ModelConfig  # the full (central) model
  spec: subnets.SubnetSpec | None  # None for ddp
  tx: optax.GradientTransformation
  lr_fn: Callable  # global step -> learning rate
  mesh: Mesh
  opt_state: str  # slice | reset
  outer: optax.GradientTransformation | None  # None = plain masked mean


def init_state(ctx: RoundContext, params):
  return {"params": params, "opt_state": ctx.tx.init(params),
          "outer_state": ctx.outer.init(params) if ctx.outer else ()}


# ---- workers ---------------------------------------------------------------------------------


def _true_worker(ctx: RoundContext):
  """Physical subnet: sliced params (and sliced Adam moments) trained as a smaller dense GPT-2."""
  spec, small_cfg = ctx.spec, subnets.subnet_model_config(ctx.model, ctx.spec)
  loss_fn = lambda p, batch, masks: lm_loss(p, small_cfg, batch)

  def worker(params, opt_state, subnet, batches_RxBxLp1, step0):
    small = subnets.extract_subnet(params, subnet, spec)
    if ctx.opt_state == "slice":
      state = map_param_trees(lambda t: subnets.extract_subnet(t, subnet, spec), opt_state, params)
    else:
      state = ctx.tx.init(small)
    small, state, losses_R = local_steps(loss_fn, ctx.tx, ctx.lr_fn, small, state,
                                         batches_RxBxLp1, step0)
    values, hold = subnets.scatter_subnet(small, subnet, spec, params)
    state = map_param_trees(lambda t: subnets.scatter_subnet(t, subnet, spec, params)[0],
                            state, small)
    return values, hold, state, losses_R
  return worker


def _masked_worker(ctx: RoundContext):
  """Full-size copy with unit gates; unheld entries (and their Adam moments) are frozen."""
  spec, masked_cfg = ctx.spec, subnets.masked_model_config(ctx.model, ctx.spec)
  loss_fn = lambda p, batch, masks: lm_loss(p, masked_cfg, batch, masks)

  def worker(params, opt_state, subnet, batches_RxBxLp1, step0):
    masks, hold = subnets.unit_masks(subnet, spec), subnets.holder_mask(subnet, spec, params)
    state = opt_state if ctx.opt_state == "slice" else ctx.tx.init(params)
    params, state, losses_R = local_steps(loss_fn, ctx.tx, ctx.lr_fn, params, state,
                                          batches_RxBxLp1, step0, masks, hold)
    return params, hold, state, losses_R
  return worker


# ---- aggregation of worker outputs ------------------------------------------------------------


def _replicate(mesh: Mesh, x):
  """Per-worker metrics gathered onto every device, so every process can read them."""
  return jax.lax.with_sharding_constraint(x, parallel.replicated(mesh))


def _all_finite(*trees) -> jax.Array:
  """One boolean: no NaN or Inf anywhere (the trainer stops or rolls back on False)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def _merge(ctx: RoundContext, state, values_W, hold_W, opt_W, losses_WxR):
  """Masked mean of params (and, with opt_state=slice, of Adam moments); optional outer step."""
  params = state["params"]
  mean = aggregate.masked_mean(params, values_W, hold_W)
  if ctx.opt_state == "slice":
    treedef = jax.tree.structure(params)
    is_p = lambda x: isinstance(x, dict) and jax.tree.structure(x) == treedef
    merge = lambda c, w: (aggregate.masked_mean(c, w, hold_W) if is_p(c)
                          else jnp.mean(w, axis=0).astype(c.dtype))  # step counts: all equal
    opt_state = jax.tree.map(merge, state["opt_state"], opt_W, is_leaf=is_p)
  else:
    opt_state = state["opt_state"]
  outer_state = state["outer_state"]
  new = mean
  if ctx.outer is not None:
    new, outer_state = aggregate.apply_outer(ctx.outer, outer_state, params, mean)
  metrics = {"loss": losses_WxR, "delta_norm": aggregate.delta_norm(params, new),
             "finite": _all_finite(new, losses_WxR)}
  return {"params": new, "opt_state": opt_state, "outer_state": outer_state}, metrics


def _twist_round(ctx: RoundContext, worker_fn):
  run_workers = parallel.map_over_workers(worker_fn, ctx.mesh, in_axes=(None, None, 0, 0, None))

  @jax.jit
  def round_fn(state, subnets_W, batches_WxRxBxLp1, step0):
    values_W, hold_W, opt_W, losses_WxR = run_workers(
        state["params"], state["opt_state"], subnets_W, batches_WxRxBxLp1, step0)
    return _merge(ctx, state, values_W, hold_W, opt_W,
                  _replicate(ctx.mesh, losses_WxR))
  return round_fn


def true_round(ctx: RoundContext):
  return _twist_round(ctx, _true_worker(ctx))


def masked_round(ctx: RoundContext):
  return _twist_round(ctx, _masked_worker(ctx))


def hybrid_round(ctx: RoundContext):
  """Worker 0 trains masked on the central device; workers 1..S-1 train physical subnets on the
  other devices (the same device when there is one), dispatched concurrently."""
  devices = list(ctx.mesh.devices.flat)
  central = devices[0]
  rest = devices[1:] or devices
  n_phys = ctx.spec.workers - 1
  sub_mesh = parallel.make_mesh(
      parallel.device_count_for(max(n_phys, 1), available=len(rest)), rest)
  run_masked = jax.jit(_masked_worker(ctx))
  run_true = jax.jit(parallel.map_over_workers(_true_worker(ctx), sub_mesh,
                                               in_axes=(None, None, 0, 0, None)))
  cat = lambda a, b: jax.tree.map(lambda x, y: jnp.concatenate([x[None], y]), a, b)
  merge = jax.jit(lambda state, out0, outs: _merge(ctx, state, *cat(out0, outs)))

  def round_fn(state, subnets_W, batches_WxRxBxLp1, step0):
    state = jax.device_put(state, central)
    first = lambda t: jax.tree.map(lambda x: jax.device_put(x[0], central), t)
    out0 = run_masked(state["params"], state["opt_state"], first(subnets_W),
                      first(batches_WxRxBxLp1), jax.device_put(step0, central))
    if n_phys == 0:
      return merge(state, out0, jax.tree.map(lambda x: x[None][:0], out0))
    # Dispatcher: central params to the workers' devices; results back to the central device.
    rep, split = parallel.replicated(sub_mesh), parallel.worker_sharded(sub_mesh)
    rest_of = lambda t: jax.device_put(jax.tree.map(lambda x: x[1:], t), split)
    outs = run_true(jax.device_put(state["params"], rep), jax.device_put(state["opt_state"], rep),
                    rest_of(subnets_W), rest_of(batches_WxRxBxLp1), jax.device_put(step0, rep))
    return merge(state, out0, jax.device_put(outs, central))
  return round_fn


def ddp_round(ctx: RoundContext):
  """Data parallel: every step's gradient is averaged over all W shards (R steps per call)."""
  def loss_fn(p, batch_wxBxLp1, masks):
    return jnp.mean(jax.vmap(lambda b: lm_loss(p, ctx.model, b))(batch_wxBxLp1))

  def device_fn(params, opt_state, batches_wxRxBxLp1, step0):
    grad_mean = lambda g: jax.lax.pmean(g, parallel.AXIS)
    params, opt_state, losses_R = local_steps(
        loss_fn, ctx.tx, ctx.lr_fn, params, opt_state, jnp.swapaxes(batches_wxRxBxLp1, 0, 1),
        step0, grad_reduce=grad_mean)
    return params, opt_state, losses_R[None]

  run = jax.shard_map(device_fn, mesh=ctx.mesh, in_specs=(P(), P(), P(parallel.AXIS), P()),
                      out_specs=(P(), P(), P(parallel.AXIS)), check_vma=False)

  @jax.jit
  def round_fn(state, subnets_W, batches_WxRxBxLp1, step0):
    del subnets_W  # the dense model has no subnets
    params, opt_state, losses = run(state["params"], state["opt_state"], batches_WxRxBxLp1, step0)
    losses = _replicate(ctx.mesh, losses)
    metrics = {"loss": losses, "delta_norm": aggregate.delta_norm(state["params"], params),
               "finite": _all_finite(params, losses)}
    return {"params": params, "opt_state": opt_state, "outer_state": state["outer_state"]}, metrics
  return round_fn


FACTORIES = {"ddp": ddp_round, "true": true_round, "masked": masked_round,
             "hybrid": hybrid_round}


def make_round(variant: str, ctx: RoundContext):
  """The round function of `variant` (one of FACTORIES)."""
  return FACTORIES[variant](ctx)
