"""Round factories: one function per variant (ddp, true, masked, hybrid), picked by a table.

A round maps (state, subnets_W, batches_WxRxBxLp1, step0) -> (state, metrics), where state is
{'params', 'opt_state', 'outer_state'} of the central model and metrics holds per-worker
losses (W, R), the aggregation delta norm and the round's subnets. `make_sampling_round` draws
the subnets inside the compiled round from fold_in(key, round), so nothing goes to the host
between rounds. Each round is one compiled call that donates the state it replaces (hybrid:
two concurrent calls on different devices, then the aggregation).

Aggregation (docs/method.md §6): each device adds its own workers' changes into one full-size
sum per tree (`subnets.scatter_add`: one scatter-add per leaf) and counts holders from the
subnet indices; one psum per tree combines devices; then the masked mean and the outer step.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from twist_jax import aggregate, parallel, subnet_spec, subnets
from twist_jax.errors import ConfigError
from twist_jax.model import ModelConfig, distill_loss, lm_loss
from twist_jax.worker import local_steps, map_param_trees


@dataclasses.dataclass(frozen=True)
class RoundContext:
  model: ModelConfig  # the full (central) model
  spec: subnet_spec.SubnetSpec | None  # None for ddp
  tx: optax.GradientTransformation
  lr_fn: Callable  # global step -> learning rate
  mesh: Mesh
  opt_policy: str  # twist.opt_state: slice | reset (state["opt_state"] is the optimizer state)
  outer: optax.GradientTransformation | None  # None = plain masked mean
  full_workers: int = 0  # sandwich rule: the first of each device's workers train the full model
  distill: float = 0.0  # in-place distillation weight alpha of subnet workers (0 = off)
  distill_temperature: float = 1.0
  # ddp only: (params, ModelConfig) of a fixed teacher every worker distills from (with distill)
  teacher: tuple | None = None
  microbatch: int = 0  # rows per sequential microbatch of a worker's step (0 = whole batch)
  worker_loop: str = "vmap"  # a device's workers all at once (vmap) or one at a time (scan)


def init_state(ctx: RoundContext, params):
  return {"params": params, "opt_state": ctx.tx.init(params),
          "outer_state": ctx.outer.init(params) if ctx.outer else ()}


# ---- workers: each returns its changes (own shapes) and its losses (R,) ---------------------


def _subnet_loss(ctx: RoundContext, cfg: ModelConfig, teacher):
  """A subnet worker's loss: cross-entropy, or with `distill` > 0 the mix with the KL to the
  round-start central model (`teacher`: the params the worker was handed this round)."""
  if not ctx.distill:
    return lambda p, batch, masks: lm_loss(p, cfg, batch, masks)
  return lambda p, batch, masks: distill_loss(p, cfg, teacher, ctx.model, batch, ctx.distill,
                                              ctx.distill_temperature, masks)


def _full_worker(ctx: RoundContext):
  """Sandwich rule: a worker that trains the whole central model (all units, scales 1)."""
  loss_fn = lambda p, batch, masks: lm_loss(p, ctx.model, batch)

  def worker(params, opt_state, batches_RxBxLp1, step0):
    state = opt_state if ctx.opt_policy == "slice" else ctx.tx.init(params)
    new, new_state, losses_R = local_steps(loss_fn, ctx.tx, ctx.lr_fn, params, state,
                                           batches_RxBxLp1, step0, microbatch=ctx.microbatch)
    opt_change = aggregate.changes(new_state, state) if ctx.opt_policy == "slice" else ()
    return aggregate.changes(new, params), opt_change, losses_R
  return worker


def _true_worker(ctx: RoundContext):
  """Physical subnet: sliced params (and sliced Adam moments) trained as a smaller dense GPT-2."""
  spec, small_cfg = ctx.spec, subnets.subnet_model_config(ctx.model, ctx.spec)

  def worker(params, opt_state, subnet, batches_RxBxLp1, step0):
    loss_fn = _subnet_loss(ctx, small_cfg, params)
    small = subnets.extract_subnet(params, subnet, spec)
    if ctx.opt_policy == "slice":
      state = map_param_trees(lambda t: subnets.extract_subnet(t, subnet, spec), opt_state, params)
    else:
      state = ctx.tx.init(small)
    new, new_state, losses_R = local_steps(loss_fn, ctx.tx, ctx.lr_fn, small, state,
                                           batches_RxBxLp1, step0, microbatch=ctx.microbatch)
    opt_change = aggregate.changes(new_state, state) if ctx.opt_policy == "slice" else ()
    return aggregate.changes(new, small), opt_change, losses_R
  return worker


def _masked_worker(ctx: RoundContext):
  """Full-size copy with unit gates; unheld entries (and their Adam moments) are frozen, so
  their change is exactly zero."""
  spec, masked_cfg = ctx.spec, subnets.masked_model_config(ctx.model, ctx.spec)

  def worker(params, opt_state, subnet, batches_RxBxLp1, step0):
    loss_fn = _subnet_loss(ctx, masked_cfg, params)
    masks = subnets.unit_masks(subnet, spec)
    one = jax.tree.map(lambda x: x[None], subnet)
    hold = aggregate.leaf_counts(aggregate.unit_counts(one, spec), spec, params, 1)
    state = opt_state if ctx.opt_policy == "slice" else ctx.tx.init(params)
    new, new_state, losses_R = local_steps(loss_fn, ctx.tx, ctx.lr_fn, params, state,
                                           batches_RxBxLp1, step0, masks, hold,
                                           microbatch=ctx.microbatch)
    opt_change = aggregate.changes(new_state, state) if ctx.opt_policy == "slice" else ()
    return aggregate.changes(new, params), opt_change, losses_R
  return worker


# ---- per-device sums and the final mean -------------------------------------------------------


def _sum_workers(loop: str, call, part, xs):
  """(sum over workers of part(changes), losses (w, R)) for the workers along xs' leading axis.

  `call(x)` runs one worker: (params changes, opt changes, losses R). `part(d_p, d_o, xs)` turns
  changes with a leading worker axis into summed trees. vmap runs every worker at once; scan
  runs them one after another, adding each worker's part into running sums, so one worker's
  activations and slices are in memory at a time (the sums are the same up to roundoff).
  """
  if loop == "vmap":
    d_p, d_o, losses = jax.vmap(call)(xs)
    return part(d_p, d_o, xs), losses
  lead = lambda t: jax.tree.map(lambda a: a[None], t)
  one_part = lambda x, d_p, d_o: part(lead(d_p), lead(d_o), lead(x))

  def body(acc, x):
    d_p, d_o, losses = call(x)
    return jax.tree.map(jnp.add, acc, one_part(x, d_p, d_o)), losses
  first = jax.tree.map(lambda a: a[0], xs)
  like = jax.eval_shape(lambda x: one_part(x, *call(x)[:2]), first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), like)
  return jax.lax.scan(body, zeros, xs)


def _local_sums(ctx: RoundContext, worker_fn, physical: bool, full_local: int = 0):
  """This device's workers (leading axis w): ({'params', 'opt', 'counts'} sums, losses (w, R)).

  The first `full_local` of them train the full model (sandwich rule); the rest train their
  subnets. Physical (True) changes are subnet-shaped and scatter-added into full-size sums;
  masked and full-model changes are full-size already (zero where unheld) and are summed.
  """
  spec, k = ctx.spec, full_local
  total = lambda t: jax.tree.map(lambda x: jnp.sum(x, axis=0), t)

  def add_up(changes_w, subnets_w, like):
    if physical:
      return aggregate.scatter_add(changes_w, subnets_w, spec, like)
    return total(changes_w)

  def fn(params, opt_state, subnets_w, batches_wxRxBxLp1, step0):
    w = batches_wxRxBxLp1.shape[0]
    rest = jax.tree.map(lambda x: x[k:], subnets_w)
    counts = aggregate.unit_counts(rest if w > k else subnets_w, spec)
    counts = jax.tree.map(lambda c: (c if w > k else 0 * c) + k, counts)  # full workers hold all
    parts, losses = [], []
    if k:
      full = _full_worker(ctx)
      part, loss_kxR = _sum_workers(
          ctx.worker_loop, lambda b: full(params, opt_state, b, step0),
          lambda d_p, d_o, _: {"params": total(d_p), "opt": total(d_o)},
          batches_wxRxBxLp1[:k])
      parts.append(part)
      losses.append(loss_kxR)
    if w > k:
      def subnet_part(d_p, d_o, xs):
        # Moments have the workers' own (maybe fewer-block) shapes: d_p tells them apart.
        return {"params": add_up(d_p, xs[0], params),
                "opt": map_param_trees(lambda t: add_up(t, xs[0], params), d_o, d_p,
                                       other_fn=total)
                if ctx.opt_policy == "slice" else ()}
      part, loss_sxR = _sum_workers(
          ctx.worker_loop, lambda x: worker_fn(params, opt_state, x[0], x[1], step0),
          subnet_part, (rest, batches_wxRxBxLp1[k:]))
      parts.append(part)
      losses.append(loss_sxR)
    sums = jax.tree.map(lambda *xs: sum(xs), *parts) if len(parts) > 1 else parts[0]
    return dict(sums, counts=counts), jnp.concatenate(losses)
  return fn


def _replicate(mesh: Mesh, x):
  """Per-worker metrics gathered onto every device, so every process can read them."""
  return jax.lax.with_sharding_constraint(x, parallel.replicated(mesh))


def _all_finite(*trees) -> jax.Array:
  """One boolean: no NaN or Inf anywhere (the trainer stops or rolls back on False)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def _finish(ctx: RoundContext, state, sums, losses_WxR, subnets_W):
  """Masked mean of params (and, with opt_policy slice, of Adam moments); optional outer step."""
  params, w = state["params"], ctx.spec.workers
  counts = aggregate.leaf_counts(sums["counts"], ctx.spec, params, w)
  mean = aggregate.mean_of_holders(params, sums["params"], counts)
  opt_state = state["opt_state"]
  if ctx.opt_policy == "slice":  # step counts moved by R on every worker: their mean is + R
    step_mean = lambda c, s: (c + s // w if jnp.issubdtype(c.dtype, jnp.integer)
                              else c + s / w).astype(c.dtype)
    opt_state = map_param_trees(lambda c, s: aggregate.mean_of_holders(c, s, counts),
                                opt_state, params, sums["opt"], other_fn=step_mean)
  outer_state, new = state["outer_state"], mean
  if ctx.outer is not None:
    new, outer_state = aggregate.apply_outer(ctx.outer, outer_state, params, mean)
  metrics = {"loss": losses_WxR, "delta_norm": aggregate.delta_norm(params, new),
             "finite": _all_finite(new, losses_WxR), "subnets": subnets_W}
  return {"params": new, "opt_state": opt_state, "outer_state": outer_state}, metrics


def full_workers_per_device(ctx: RoundContext) -> int:
  """Each device runs the same number of full workers (one SPMD program): k / devices."""
  n = ctx.mesh.devices.size
  k, rest = ctx.full_workers, ctx.spec.workers - ctx.full_workers
  if k % n or rest % n:
    raise ConfigError("twist.full_workers", f"got {k} of {ctx.spec.workers} workers on {n} "
                      f"devices; full and subnet workers must each be a multiple of {n} (set "
                      f"twist.full_workers to a multiple of {n}, or twist.devices)")
  return k // n


def _mesh_round(ctx: RoundContext, worker_fn, physical: bool):
  """The un-jitted round body of true / masked: every worker on the mesh, one psum per tree."""
  run = parallel.sum_over_workers(
      _local_sums(ctx, worker_fn, physical, full_workers_per_device(ctx)), ctx.mesh,
      in_axes=(None, None, 0, 0, None))

  def body(state, subnets_W, batches_WxRxBxLp1, step0):
    sums, losses_WxR = run(state["params"], state["opt_state"], subnets_W, batches_WxRxBxLp1,
                           step0)
    return _finish(ctx, state, sums, _replicate(ctx.mesh, losses_WxR),
                   _replicate(ctx.mesh, subnets_W))
  return body


def _ddp_body(ctx: RoundContext):
  """Data parallel: every step's gradient is averaged over all W shards (R steps per call)."""
  one = lambda p, b: lm_loss(p, ctx.model, b)
  if ctx.teacher is not None:  # a fixed teacher of its own width (a prune-then-distill student)
    t_params, t_cfg = ctx.teacher
    one = lambda p, b: distill_loss(p, ctx.model, t_params, t_cfg, b, ctx.distill,
                                    ctx.distill_temperature)

  def loss_fn(p, batch_wxBxLp1, masks):
    return jnp.mean(jax.vmap(lambda b: one(p, b))(batch_wxBxLp1))

  def device_fn(params, opt_state, batches_wxRxBxLp1, step0):
    grad_mean = lambda g: jax.lax.pmean(g, parallel.AXIS)
    params, opt_state, losses_R = local_steps(
        loss_fn, ctx.tx, ctx.lr_fn, params, opt_state, jnp.swapaxes(batches_wxRxBxLp1, 0, 1),
        step0, grad_reduce=grad_mean, microbatch=ctx.microbatch, batch_axis=1)  # (w, B, L+1)
    return params, opt_state, losses_R[None]

  run = jax.shard_map(device_fn, mesh=ctx.mesh, in_specs=(P(), P(), P(parallel.AXIS), P()),
                      out_specs=(P(), P(), P(parallel.AXIS)), check_vma=False)

  def body(state, subnets_W, batches_WxRxBxLp1, step0):
    params, opt_state, losses = run(state["params"], state["opt_state"], batches_WxRxBxLp1, step0)
    losses, outer_state = _replicate(ctx.mesh, losses), state["outer_state"]
    if ctx.outer is not None:  # a look-ahead step on the change over the R steps (DiLoCo)
      params, outer_state = aggregate.apply_outer(ctx.outer, outer_state, state["params"], params)
    metrics = {"loss": losses, "delta_norm": aggregate.delta_norm(state["params"], params),
               "finite": _all_finite(params, losses), "subnets": subnets_W}
    return {"params": params, "opt_state": opt_state, "outer_state": outer_state}, metrics
  return body


# ---- the round factories ---------------------------------------------------------------------


def _sample(ctx: RoundContext, key, step0, local_steps_r: int):
  """Round r = step0 // R draws its subnets from fold_in(key, r) (the trainer's contract).
  `key` is a typed PRNG key or its raw uint32 data (what several processes can all pass in)."""
  if ctx.spec is None:
    return {}
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  return subnets.sample_subnets(jax.random.fold_in(key, step0 // local_steps_r), ctx.spec)


def _jitted(ctx: RoundContext, body, sampling: bool):
  """jit of the round body, donating the state it replaces; with `sampling` the second
  argument is a PRNG key and the subnets are drawn inside the compiled call."""
  if not sampling:
    return jax.jit(body, donate_argnums=0)

  def sampled(state, key, batches_WxRxBxLp1, step0):
    subs = _sample(ctx, key, step0, batches_WxRxBxLp1.shape[1])
    return body(state, subs, batches_WxRxBxLp1, step0)
  return jax.jit(sampled, donate_argnums=0)


def ddp_round(ctx: RoundContext, sampling: bool = False):
  return _jitted(ctx, _ddp_body(ctx), sampling)


def true_round(ctx: RoundContext, sampling: bool = False):
  return _jitted(ctx, _mesh_round(ctx, _true_worker(ctx), physical=True), sampling)


def masked_round(ctx: RoundContext, sampling: bool = False):
  return _jitted(ctx, _mesh_round(ctx, _masked_worker(ctx), physical=False), sampling)


def hybrid_round(ctx: RoundContext, sampling: bool = False):
  """Worker 0 trains masked on the central device; workers 1..S-1 train physical subnets on the
  other devices (the same device when there is one), dispatched concurrently. The physical
  workers' sums are combined on their sub-mesh and make one transfer to the central device."""
  devices = list(ctx.mesh.devices.flat)
  central = devices[0]
  rest = devices[1:] or devices
  n_phys = ctx.spec.workers - 1
  sub_mesh = parallel.make_mesh(
      parallel.device_count_for(max(n_phys, 1), available=len(rest)), rest)
  one = lambda t: jax.tree.map(lambda x: x[None], t)
  masked_sums = _local_sums(ctx, _masked_worker(ctx), physical=False,
                            full_local=ctx.full_workers)  # 0, or 1: worker 0 is the full one
  run_masked = jax.jit(lambda p, o, s, b, t: masked_sums(p, o, one(s), one(b), t))
  run_true = jax.jit(parallel.sum_over_workers(_local_sums(ctx, _true_worker(ctx), True),
                                               sub_mesh, in_axes=(None, None, 0, 0, None)))
  add = lambda a, b: jax.tree.map(jnp.add, a, b)

  @functools.partial(jax.jit, donate_argnums=0)
  def merge(state, sums0, losses0, sums_rest, losses_rest, subnets_W):
    sums = add(sums0, sums_rest) if sums_rest is not None else sums0
    losses = losses0 if losses_rest is None else jnp.concatenate([losses0, losses_rest])
    return _finish(ctx, state, sums, losses, subnets_W)

  sample = jax.jit(lambda key, step0, r: _sample(ctx, key, step0, r), static_argnums=2)

  def round_fn(state, subnets_or_key, batches_WxRxBxLp1, step0):
    state, step0 = jax.device_put(state, central), jax.device_put(step0, central)
    subnets_W = (sample(jax.device_put(subnets_or_key, central), step0,
                        batches_WxRxBxLp1.shape[1]) if sampling
                 else jax.device_put(subnets_or_key, central))
    first = lambda t: jax.tree.map(lambda x: jax.device_put(x[0], central), t)
    sums0, losses0 = run_masked(state["params"], state["opt_state"], first(subnets_W),
                                first(batches_WxRxBxLp1), step0)
    if n_phys == 0:
      return merge(state, sums0, losses0, None, None, subnets_W)
    # Dispatcher: central params to the workers' devices; their summed changes come back once.
    rep, split = parallel.replicated(sub_mesh), parallel.worker_sharded(sub_mesh)
    rest_of = lambda t: jax.device_put(jax.tree.map(lambda x: x[1:], t), split)
    sums_rest, losses_rest = run_true(
        jax.device_put(state["params"], rep), jax.device_put(state["opt_state"], rep),
        rest_of(subnets_W), rest_of(batches_WxRxBxLp1), jax.device_put(step0, rep))
    return merge(state, sums0, losses0, jax.device_put(sums_rest, central),
                 jax.device_put(losses_rest, central), subnets_W)
  round_fn.jitted = (run_masked, merge) + ((run_true,) if n_phys else ()) + (
      (sample,) if sampling else ())
  round_fn.physical = (run_true, sub_mesh) if n_phys else None  # for benchmarks
  return round_fn


FACTORIES = {"ddp": ddp_round, "true": true_round, "masked": masked_round,
             "hybrid": hybrid_round}


def make_round(variant: str, ctx: RoundContext):
  """fn(state, subnets_W, batches, step0) -> (state, metrics) of `variant` (one of FACTORIES)."""
  return FACTORIES[variant](ctx)


def make_sampling_round(variant: str, ctx: RoundContext):
  """fn(state, key, batches, step0): as `make_round`, with round step0 // R's subnets drawn
  inside the compiled call from fold_in(key, step0 // R) and returned in metrics['subnets']."""
  return FACTORIES[variant](ctx, sampling=True)
