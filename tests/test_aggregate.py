"""Aggregation from indices (scatter-add sums, holder counts, mean of holders) against NumPy
references built from per-worker full-size scatters, and the outer optimizer; whole rounds over
several rounds (Adam moments merged like params, full + subnet workers) against a reference
that does its own index bookkeeping."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from twist_jax import aggregate, subnet_spec, subnets, variants
from twist_jax.model import ModelConfig, init_params, lm_loss
from twist_jax.subnet_spec import SubnetConfig

from helpers import random_params
import test_variants

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
  return subnet_spec.make_spec(CFG, SubnetConfig(mode, (kappa,) * CFG.n_layer, shared, "uniform",
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


# ---- several rounds against a hand-written reference: Adam moments, full + subnet workers -----
# The reference does its own index bookkeeping (which entries of which leaf a worker holds, from
# the Hugging Face layout) and its own sums and holder counts in float64; only each worker's
# local steps use the project's model and optax optimizer. Each round starts from the project's
# state, so a round's error is that round's own rounding, not a drift compounded over rounds.

def held_along(path, sub, spec):
  """(axis, entry ids) of leaf `path` that a worker with subnet `sub` (attn_mlp, no W axis;
  None for a full worker) holds; None where it holds the whole leaf."""
  if sub is None or not path[0].startswith("h_") or int(path[0][2:]) not in spec.partitioned:
    return None
  i, k = int(path[0][2:]), spec.head_dim
  heads, units = np.asarray(sub[path[0]]["head"]), np.asarray(sub[path[0]]["unit"])
  q_k_v = [part * spec.n_head[i] * k + h * k + j for part in range(3) for h in heads
           for j in range(k)]
  rows = [h * k + j for h in heads for j in range(k)]
  return {("attn", "c_attn", "kernel"): (1, q_k_v), ("attn", "c_attn", "bias"): (0, q_k_v),
          ("attn", "c_proj", "kernel"): (0, rows), ("mlp", "c_fc", "kernel"): (1, units),
          ("mlp", "c_fc", "bias"): (0, units), ("mlp", "c_proj", "kernel"): (0, units)}.get(
              path[1:])


def adam_part(opt_state):
  return next(s for s in opt_state if isinstance(s, optax.ScaleByAdamState))


def to_reference(state):
  """The project's state as flat float64 dicts {'params', 'mu', 'nu'} and Adam's step count."""
  flat = lambda t: {k: np.asarray(v, np.float64) for k, v in
                    traverse_util.flatten_dict(jax.device_get(t)).items()}
  adam = adam_part(state["opt_state"])
  return {"params": flat(state["params"]), "mu": flat(adam.mu), "nu": flat(adam.nu)}, int(
      adam.count)


_STEPS = {}


def local_step(ctx, cfg):
  """One jitted optimizer step of the project's loss and optax optimizer for model `cfg`."""
  if (cfg, ctx.tx) not in _STEPS:
    def step(p, s, batch, lr):
      loss, g = jax.value_and_grad(lm_loss)(p, cfg, batch)
      u, s = ctx.tx.update(g, s, p)
      return optax.apply_updates(p, jax.tree.map(lambda x: -lr * x, u)), s, loss
    _STEPS[cfg, ctx.tx] = jax.jit(step)
  return _STEPS[cfg, ctx.tx]


def train_worker(ctx, cfg, start, count, batches_RxBxLp1, step0):
  """R local steps from `start` (flat float64 dicts) with Adam's moments and count handed in."""
  tree = lambda d: traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32)
                                                 for k, v in d.items()})
  p = tree(start["params"])
  state = tuple(s._replace(count=jnp.int32(count), mu=tree(start["mu"]), nu=tree(start["nu"]))
                if isinstance(s, optax.ScaleByAdamState) else s for s in ctx.tx.init(p))
  losses = []
  for r in range(batches_RxBxLp1.shape[0]):
    p, state, loss = local_step(ctx, cfg)(p, state, batches_RxBxLp1[r], ctx.lr_fn(step0 + r))
    losses.append(float(loss))
  end, _ = to_reference({"params": p, "opt_state": state})
  return end, losses


def reference_round(ctx, start, count, subs, batches, step0, full=()):
  """One round by hand: workers in `full` train the whole model, the others their subnets;
  every entry (params, Adam mu and nu) becomes the mean over the workers that held it."""
  spec, small_cfg = ctx.spec, subnets.subnet_model_config(ctx.model, ctx.spec)
  sums = {t: {k: np.zeros_like(v) for k, v in tree.items()} for t, tree in start.items()}
  held = {k: np.zeros_like(v) for k, v in start["params"].items()}
  losses = []
  for w in range(spec.workers):
    sub = None if w in full else jax.tree.map(lambda x: x[w], subs)
    where = {k: held_along(k, sub, spec) for k in held}
    sel = {k: Ellipsis if a is None else (slice(None),) * a[0] + (np.asarray(a[1]),)
           for k, a in where.items()}
    mine = {t: {k: v[sel[k]] for k, v in tree.items()} for t, tree in start.items()}
    end, loss_w = train_worker(ctx, ctx.model if sub is None else small_cfg, mine, count,
                               batches[w], step0)
    losses.append(loss_w)
    for k in held:  # ids are distinct within one worker, so += adds each entry once
      held[k][sel[k]] += 1
      for t in sums:
        sums[t][k][sel[k]] += end[t][k] - mine[t][k]
  new = {t: {k: np.where(held[k] > 0, v + sums[t][k] / np.maximum(held[k], 1), v)
             for k, v in tree.items()} for t, tree in start.items()}
  return new, count + batches.shape[1], np.array(losses), held, sums


def assert_round_matches(got, want, start, sums, workers):
  """Entrywise |got - want| <= tol, tol = 4 eps32 (|start| + |sum of changes|) (the project's
  float32 sums and mean) + 1e-3 of the tree's largest change this round (the workers' float32
  steps, compiled differently here and there, differ by round-off that R Adam steps carry, far
  below 1e-3 of a step; an aggregation error -- a wrong count, a missed holder, a wrong index --
  is of the order of the step itself). Also checks that dividing by W instead of the holder
  count would be caught, so the tolerance can fail."""
  eps = float(np.finfo(np.float32).eps)
  caught = False
  for t in want:
    scale = max(float(np.abs(want[t][k] - start[t][k]).max()) for k in want[t])
    assert scale > 0
    for k in want[t]:
      tol = 4 * eps * (np.abs(start[t][k]) + np.abs(sums[t][k])) + 1e-3 * scale
      bad = np.abs(got[t][k] - want[t][k]) > tol
      assert not bad.any(), (t, k, float(np.abs(got[t][k] - want[t][k]).max()))
      caught |= bool((np.abs(start[t][k] + sums[t][k] / workers - want[t][k]) > tol).any())
  assert caught


def rounds_against_reference(ctx, variant, full=(), rounds=3):
  """`rounds` rounds of the project's round function, each checked against `reference_round`
  from the same starting state (params and Adam moments that earlier rounds made non-zero)."""
  fn = variants.make_round(variant, ctx)
  state = variants.init_state(ctx, init_params(ctx.model, jax.random.key(42)))
  r_steps = test_variants.R
  for r in range(rounds):
    batches, subs = test_variants.inputs(r, ctx.spec.workers, ctx.spec)
    start, count = to_reference(state)
    want, want_count, want_loss, held, sums = reference_round(ctx, start, count, subs, batches,
                                                              r * r_steps, full)
    state, metrics = fn(state, subs, batches, jnp.int32(r * r_steps))  # donates `state`
    got, got_count = to_reference(state)
    assert got_count == want_count == (r + 1) * r_steps
    # float32 losses of the same start on the same batch: summation order only.
    np.testing.assert_allclose(np.asarray(metrics["loss"]), want_loss, rtol=1e-5)
    assert_round_matches(got, want, start, sums, ctx.spec.workers)
    if r:
      assert any(np.abs(v).max() > 0 for v in start["mu"].values())  # moments carried in
  return held


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["true", "masked"])
def test_adam_moments_are_merged_like_params_over_rounds(variant):
  """opt_state=slice: Adam's mu and nu get the same masked mean as the params, count + R."""
  ctx = test_variants.make_ctx(opt_policy="slice")
  held = rounds_against_reference(ctx, variant)
  counts = np.concatenate([v.ravel() for v in held.values()])
  assert counts.min() >= 1 and counts.max() == ctx.spec.workers and (counts < 4).any()


@pytest.mark.slow
def test_full_and_subnet_workers_are_merged_like_the_reference_over_rounds():
  """Sandwich rule (twist.full_workers = 1): worker 0 trains the whole model and holds every
  entry; the others train their subnets; slice optimizer state."""
  ctx = dataclasses.replace(test_variants.make_ctx(opt_policy="slice"), full_workers=1)
  held = rounds_against_reference(ctx, "true", full=(0,))
  assert min(float(v.min()) for v in held.values()) >= 1  # the full worker holds everything
  assert any(float(v.min()) < float(v.max()) for v in held.values())
