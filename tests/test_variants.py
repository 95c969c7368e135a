"""Round functions: masked == true == hybrid, shard_map == vmap == Python loop, TwIST(kappa=1,
R=1, SGD) == DDP, and resampling never recompiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from twist_jax import aggregate, config as config_lib, parallel, subnets, variants, worker
from twist_jax.model import ModelConfig, init_params, lm_loss

W, R, B, L = 4, 2, 2, 8
MODEL = ModelConfig.uniform(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=L)


def make_ctx(mode="attn_mlp", kappa=0.5, variant="true", devices=1, opt="adamw",
             opt_state="slice", correction="mean", workers=W, clip=1.0, shared=()):
  c = config_lib.default_config()
  c.opt.name, c.opt.grad_clip, c.opt.warmup_steps = opt, clip, 1
  c.opt.lr = 0.1 if opt == "sgd" else 1e-2
  # Key biases have an exactly-zero true gradient (softmax is shift invariant); with eps=1e-8
  # Adam would blow their float round-off (~1e-9) up to lr-sized steps that differ between
  # two equivalent summation orders. A larger eps keeps the comparison about the math.
  c.opt.eps = 1e-6
  cfg = config_lib.from_configdict(c)
  spec = subnets.make_spec(MODEL, config_lib.SubnetConfig(
      mode, (kappa,) * MODEL.n_layer, shared, "cover", correction), workers)
  lr_fn = lambda t: config_lib.lr_at(cfg.opt, 100, t)
  outer = None
  return variants.RoundContext(MODEL, spec, worker.make_optimizer(cfg.opt), lr_fn,
                               parallel.make_mesh(devices), opt_state, outer)


def inputs(seed=0, workers=W, spec=None):
  k1, k2 = jax.random.split(jax.random.key(seed))
  batches = jax.random.randint(k1, (workers, R, B, L + 1), 0, MODEL.vocab_size)
  return batches, subnets.sample_subnets(k2, spec, workers) if spec else {}


def run_rounds(ctx, variant, n=2, seed=0):
  params = init_params(MODEL, jax.random.key(42))
  state = variants.init_state(ctx, params)
  fn = variants.make_round(variant, ctx)
  losses = []
  for r in range(n):
    batches, subs = inputs(seed + r, ctx.spec.workers if ctx.spec else W, ctx.spec)
    state, metrics = fn(state, subs, batches, jnp.int32(r * R))
    losses.append(np.asarray(metrics["loss"]))
  return jax.device_get(state), np.stack(losses)


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol,
                               rtol=0)


@pytest.mark.parametrize("mode", ["attn", "mlp", "attn_mlp", "blocks"])
def test_masked_equals_true(mode):
  kappa, shared = 0.5, ()  # blocks: each worker keeps 1 of the 2 partitioned blocks
  true_state, true_loss = run_rounds(make_ctx(mode, kappa, shared=shared), "true")
  masked_state, masked_loss = run_rounds(make_ctx(mode, kappa, shared=shared), "masked")
  np.testing.assert_allclose(true_loss, masked_loss, atol=2e-5)
  assert_trees_close(true_state["params"], masked_state["params"], 2e-5)
  assert_trees_close(true_state["opt_state"], masked_state["opt_state"], 1e-6)


def test_masked_equals_true_with_reset_state_and_norm_correction():
  a, la = run_rounds(make_ctx(opt_state="reset", correction="norm"), "true")
  b, lb = run_rounds(make_ctx(opt_state="reset", correction="norm"), "masked")
  np.testing.assert_allclose(la, lb, atol=2e-5)
  assert_trees_close(a["params"], b["params"], 2e-5)


def test_hybrid_agrees_with_true_on_one_and_several_devices():
  ref, ref_loss = run_rounds(make_ctx(), "true")
  for devices in (1, 4):
    got, got_loss = run_rounds(make_ctx(devices=devices), "hybrid")
    np.testing.assert_allclose(ref_loss, got_loss, atol=2e-5)
    assert_trees_close(ref["params"], got["params"], 2e-5)


def python_loop_round(ctx, params, opt_state, subs, batches, step0):
  """Independent reference: each worker extracted, stepped in a Python loop, NumPy masked mean."""
  spec, small_cfg = ctx.spec, subnets.subnet_model_config(ctx.model, ctx.spec)
  num = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  cnt = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  losses = []
  for w in range(spec.workers):
    sub = jax.tree.map(lambda x: x[w], subs)
    p = subnets.extract_subnet(params, sub, spec)
    s = worker.map_param_trees(lambda t: subnets.extract_subnet(t, sub, spec), opt_state, params)
    for r in range(R):
      loss, g = jax.value_and_grad(lm_loss)(p, small_cfg, batches[w, r])
      u, s = ctx.tx.update(g, s, p)
      p = optax.apply_updates(p, jax.tree.map(lambda x: -ctx.lr_fn(step0 + r) * x, u))
      losses.append(float(loss))
    vals, mask = subnets.scatter_subnet(p, sub, spec, params)
    num = jax.tree.map(lambda n, v, m: n + np.asarray(v) * np.asarray(m), num, vals, mask)
    cnt = jax.tree.map(lambda c, m: c + np.asarray(m), cnt, mask)
  mean = jax.tree.map(lambda c, n, k: np.where(k > 0, n / np.maximum(k, 1), c), params, num, cnt)
  return mean, np.array(losses).reshape(spec.workers, R)


def test_shard_map_vmap_and_python_loop_agree():
  params = init_params(MODEL, jax.random.key(42))
  outs = {}
  for devices in (1, 2, 4):  # 4 workers: vmap of 4 on one device ... one worker per device
    ctx = make_ctx(devices=devices)
    batches, subs = inputs(0, W, ctx.spec)
    fresh = variants.init_state(ctx, jax.tree.map(jnp.copy, params))  # the round donates it
    state, metrics = variants.make_round("true", ctx)(fresh, subs, batches, jnp.int32(3))
    outs[devices] = (jax.device_get(state["params"]), np.asarray(metrics["loss"]))
  ref_params, ref_loss = python_loop_round(ctx, params, ctx.tx.init(params), subs, batches, 3)
  for devices, (p, loss) in outs.items():
    np.testing.assert_allclose(loss, ref_loss, atol=2e-5)
    assert_trees_close(p, ref_params, 2e-5)


def test_eight_devices_eight_workers_masked():
  ctx8 = make_ctx(devices=8, workers=8, kappa=0.25, mode="attn")
  ctx1 = make_ctx(devices=1, workers=8, kappa=0.25, mode="attn")
  a, la = run_rounds(ctx8, "masked", n=1)
  b, lb = run_rounds(ctx1, "masked", n=1)
  np.testing.assert_allclose(la, lb, atol=2e-5)
  assert_trees_close(a["params"], b["params"], 2e-5)


def test_twist_kappa_one_r_one_sgd_equals_ddp():
  global R
  old, R = R, 1
  try:
    ctx = make_ctx(mode="attn_mlp", kappa=1.0, opt="sgd", clip=0.0, devices=2)
    twist, _ = run_rounds(ctx, "true", n=3)
    ddp, _ = run_rounds(ctx, "ddp", n=3)
  finally:
    R = old
  assert_trees_close(twist["params"], ddp["params"], 2e-6)


@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("variant", ["ddp", "true", "masked", "hybrid"])
def test_resampling_does_not_recompile_or_touch_the_host(variant, devices):
  """Subnets are drawn inside the compiled round: new subnets every round, one compile, and
  no device-to-host transfer inside a round."""
  ctx = make_ctx(devices=devices)
  fn = variants.make_sampling_round(variant, ctx)
  rep = parallel.replicated(ctx.mesh)
  state = jax.device_put(variants.init_state(ctx, init_params(MODEL, jax.random.key(0))), rep)
  key = jax.device_put(jax.random.key(7), rep)
  seen = []
  for r in range(3):
    batches = jax.device_put(inputs(r, W)[0], parallel.worker_sharded(ctx.mesh))
    step0 = jax.device_put(jnp.int32(r * R), rep)
    with jax.transfer_guard_device_to_host("disallow"):
      state, metrics = fn(state, key, batches, step0)
    if variant != "ddp":
      seen.append(np.asarray(metrics["subnets"]["h_0"]["head"]))
      expect = subnets.sample_subnets(jax.random.fold_in(jax.random.key(7), r), ctx.spec)
      np.testing.assert_array_equal(seen[-1], expect["h_0"]["head"])
  if variant != "ddp":
    assert not np.array_equal(seen[0], seen[1])
  parts = getattr(fn, "jitted", (fn,))  # hybrid: several jitted calls, each compiled once
  assert [p._cache_size() for p in parts] == [1] * len(parts)


def test_round_donates_the_state_it_replaces():
  ctx = make_ctx()
  state = variants.init_state(ctx, init_params(MODEL, jax.random.key(0)))
  batches, subs = inputs(0, W, ctx.spec)
  variants.make_round("true", ctx)(state, subs, batches, jnp.int32(0))
  assert all(x.is_deleted() for x in jax.tree.leaves(state["params"]))


def test_outer_momentum_changes_the_update():
  ctx = make_ctx()
  ctx = variants.RoundContext(ctx.model, ctx.spec, ctx.tx, ctx.lr_fn, ctx.mesh, ctx.opt_state,
                              aggregate.outer_optimizer(0.7, 0.9))
  plain, _ = run_rounds(make_ctx(), "true", n=2)
  outer, _ = run_rounds(ctx, "true", n=2)
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(outer["params"])))
  assert diff > 1e-4
