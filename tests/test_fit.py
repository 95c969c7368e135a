"""Fitting paper-scale rounds in memory: gradient accumulation over microbatches == one step on
the whole batch (every variant, with distillation too), remat policies == no remat, chunked
evaluation == full-logits evaluation, and the config checks of both knobs.

Tolerances: two float32 evaluations of the same math in another summation order differ by at
most about n * eps32 times the magnitude of what is summed, n the length of the longest sum
(here the tokens of a batch); a wrong accumulation (a sum instead of a mean, a dropped
microbatch) moves results by the size of the update itself.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from twist_jax import (config as config_lib, config_types, evaluate, parallel, subnet_spec, subnets,
                       variants, worker)
from twist_jax.errors import ConfigError
from twist_jax.model import GPT2, REMAT_POLICIES, ModelConfig, init_params, lm_loss, lm_nll_sums

from helpers import random_params

EPS = float(np.finfo(np.float32).eps)
W, R, B, L = 4, 2, 4, 8
MODEL = ModelConfig.uniform(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=L)
LR = 0.1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rounding_tol(ref, n: int) -> float:
  """n * eps32 times the largest magnitude in `ref` (see the module docstring)."""
  return n * EPS * max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref))


# ------------------------------------------------------------------------------ accumulation


def test_accumulated_gradient_equals_whole_batch_gradient():
  params = random_params(MODEL, std=0.1)
  batch = jax.random.randint(jax.random.key(0), (B, L + 1), 0, MODEL.vocab_size)
  loss_fn = lambda p, b, masks: lm_loss(p, MODEL, b, masks)
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch, None)
  # The magnitude of what the gradient sums: each window's own gradient, added up by size.
  per_window = jax.jit(jax.vmap(lambda b: jax.grad(loss_fn)(params, b[None], None)))(batch)
  scale = jax.tree.map(lambda g: jnp.sum(jnp.abs(g), 0) / B, per_window)
  for micro in (1, 2):
    loss_k, grads_k = jax.jit(worker.accumulated_value_and_grad(loss_fn, micro))(
        params, batch, None)
    assert abs(float(loss_k) - float(loss)) <= rounding_tol(loss, B * L)
    for g, gk, s in zip(*map(jax.tree.leaves, (grads, grads_k, scale))):
      np.testing.assert_allclose(gk, g, rtol=0, atol=B * L * EPS * float(jnp.max(s)) + 1e-30)
  # A microbatch that does not divide the batch is refused when the step is traced.
  with pytest.raises(ValueError, match="microbatch 3 does not divide the batch of 4"):
    worker.accumulated_value_and_grad(loss_fn, 3)(params, batch, None)


def test_accumulation_runs_microbatches_one_after_another():
  """The accumulated step is a scan over k microbatches of the forward and backward pass."""
  params = init_params(MODEL, jax.random.key(0))
  batch = jnp.zeros((B, L + 1), jnp.int32)
  loss_fn = lambda p, b, masks: lm_loss(p, MODEL, b, masks)
  scans = lambda fn: [e.params["length"] for e in jax.make_jaxpr(fn)(params, batch, None).eqns
                      if e.primitive.name == "scan"]
  # The whole batch's step has only the loss's scans over position chunks (one chunk here).
  assert set(scans(jax.value_and_grad(loss_fn))) == {1}
  assert scans(worker.accumulated_value_and_grad(loss_fn, 1)) == [B]


def make_ctx(variant, devices=1, microbatch=0, **levers):
  spec = None if variant == "ddp" else subnet_spec.make_spec(MODEL, config_lib.SubnetConfig(
      "attn_mlp", (0.5,) * MODEL.n_layer, (), "cover", "mean"), W)
  # SGD without clipping: the update is -lr * gradient, so the comparison is about the gradient.
  return variants.RoundContext(MODEL, spec, optax.identity(), lambda t: LR,
                               parallel.make_mesh(devices), "slice", None,
                               microbatch=microbatch, **levers)


def one_round(ctx, variant, params):
  k1, k2 = jax.random.split(jax.random.key(3))
  batches = jax.random.randint(k1, (W, R, B, L + 1), 0, MODEL.vocab_size)
  subs = subnets.sample_subnets(k2, ctx.spec, W) if ctx.spec else {}
  state = variants.init_state(ctx, jax.tree.map(jnp.copy, params))  # the round donates it
  state, metrics = variants.make_round(variant, ctx)(state, subs, batches, jnp.int32(0))
  return jax.device_get(state["params"]), np.asarray(metrics["loss"])


@pytest.mark.parametrize("variant,devices,levers", [
    ("ddp", 2, {}), ("true", 2, {}), ("masked", 2, {}), ("hybrid", 2, {}),
    ("true", 1, {"distill": 0.5, "distill_temperature": 2.0}),
    ("masked", 1, {"distill": 0.5, "full_workers": 1}),
    ("ddp", 1, {"distill": 0.5, "teacher": "wide"})])
def test_round_with_microbatches_equals_round_on_whole_batches(variant, devices, levers):
  if levers.get("teacher") == "wide":  # a fixed teacher of another width (prune-then-distill)
    wide = MODEL.replace(n_inner=(256, 256))
    levers = dict(levers, teacher=(random_params(wide, seed=5, std=0.1), wide))
  params = random_params(MODEL, std=0.1)
  whole, loss = one_round(make_ctx(variant, devices, 0, **levers), variant, params)
  for micro in (1, 2):  # k = 4 and k = 2 microbatches of each worker's batch of 4
    acc, loss_k = one_round(make_ctx(variant, devices, micro, **levers), variant, params)
    n = W * B * L  # the longest sum: DDP's gradient is a mean over all workers' tokens
    np.testing.assert_allclose(loss_k, loss, rtol=0, atol=rounding_tol(loss, n))
    for p, a, b in zip(*map(jax.tree.leaves, (params, acc, whole))):
      # One rounding of the parameter, plus n eps of the update (R steps of -lr * gradient).
      tol = 2 * EPS * float(np.max(np.abs(b))) + rounding_tol(b - p, n)
      np.testing.assert_allclose(a, b, rtol=0, atol=tol)
  moved = max(float(np.max(np.abs(b - p))) for p, b in zip(*map(jax.tree.leaves,
                                                                 (params, whole))))
  assert moved > 1e-3  # the round changed the model by far more than the tolerances


# ------------------------------------------------------------------------------ remat policies


@pytest.mark.parametrize("policy", ["block", "dots", True])
def test_remat_policy_gives_the_same_loss_and_gradients(policy):
  cfg = MODEL.replace(n_positions=16)
  params = random_params(cfg, std=0.1)
  wins = jax.random.randint(jax.random.key(1), (2, 17), 0, cfg.vocab_size)
  masks = {"head": jnp.array([[1.0, 0, 1, 1], [1, 1, 0, 1]])}
  fn = jax.jit(jax.value_and_grad(lm_loss), static_argnums=1)
  loss, grads = fn(params, cfg, wins, masks)
  loss_r, grads_r = fn(params, cfg.replace(remat=policy), wins, masks)
  n = wins[:, 1:].size
  assert abs(float(loss_r) - float(loss)) <= rounding_tol(loss, n)
  for g, gr in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(gr, g, rtol=0, atol=rounding_tol(grads, n))
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads)


def test_remat_policies_keep_less_for_the_backward_pass_in_order():
  """What the backward pass keeps (the residuals of jax.vjp): everything > the weight matmuls'
  outputs > each block's input."""
  cfg = MODEL.replace(n_positions=16)
  params = init_params(cfg, jax.random.key(0))
  wins = jnp.zeros((2, 17), jnp.int32)

  def residual_bytes(policy):
    vjp = jax.jit(lambda p: jax.vjp(lambda q: lm_loss(q, cfg.replace(remat=policy), wins), p)[1])
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp(params)))

  kept = {p: residual_bytes(p) for p in REMAT_POLICIES}
  assert kept["none"] > kept["dots"] > kept["block"], kept


def test_remat_names_and_the_boolean_form():
  assert MODEL.replace(remat=True).remat_policy == "block"
  assert MODEL.replace(remat=False).remat_policy == "none"
  assert MODEL.replace(remat="dots").remat_policy == "dots"
  with pytest.raises(ValueError, match="remat='all'"):
    MODEL.replace(remat="all").remat_policy  # pylint: disable=expression-not-assigned


# ------------------------------------------------------------------------------ chunked eval


def reference_nll_sums(params, cfg, windows):
  """(B,) NLL sums from the whole batch's float32 logits, log-softmax in float64 (NumPy)."""
  logits = np.asarray(GPT2(cfg).apply({"params": params}, jnp.asarray(windows)[:, :-1]),
                      np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  targets = np.asarray(windows)[:, 1:]
  return -np.take_along_axis(logp, targets[..., None], -1)[..., 0].sum(1)


@pytest.mark.parametrize("chunk", [3, 8, 128])  # ragged last chunk (3+3+2), exact, one chunk
def test_chunked_nll_sums_equal_full_logits(chunk):
  params = random_params(MODEL, std=0.3)
  wins = np.random.default_rng(0).integers(0, MODEL.vocab_size, (3, L + 1))
  got = np.asarray(lm_nll_sums(params, MODEL, jnp.asarray(wins), chunk=chunk), np.float64)
  ref = reference_nll_sums(params, MODEL, wins)
  np.testing.assert_allclose(got, ref, rtol=0, atol=L * MODEL.vocab_size * EPS * ref.max())


def test_evaluation_losses_equal_full_logits_losses():
  """mean_nll and the golden-ticket sweep at a context of 150 (a 128-position chunk and a
  ragged 22), a smaller last batch and a padded last subnet batch included."""
  cfg = MODEL.replace(n_positions=150)
  params = random_params(cfg, std=0.3)
  wins = np.random.default_rng(1).integers(0, cfg.vocab_size, (5, 151))
  n = wins.shape[0] * 150
  ref = reference_nll_sums(params, cfg, wins).sum() / n
  got = evaluate.mean_nll(params, cfg, wins, batch_size=2)
  assert abs(got - ref) <= 150 * cfg.vocab_size * EPS * ref

  spec = subnet_spec.deploy_spec(cfg, "attn_mlp", 0.5)
  subs = evaluate.random_subnets(jax.random.key(0), spec, 3)
  got_s = evaluate.subnet_losses(params, cfg, spec, subs, wins, batch_size=4, subnet_batch=2)
  small_cfg = subnets.subnet_model_config(cfg, spec)
  for s in range(3):
    small = subnets.extract_subnet(params, jax.tree.map(lambda x: x[s], subs), spec)
    ref_s = reference_nll_sums(small, small_cfg, wins).sum() / n
    assert abs(got_s[s] - ref_s) <= 150 * cfg.vocab_size * EPS * ref_s
  assert np.ptp(got_s) > 1e-3  # the subnets differ, so a mix-up would show


def test_evaluation_never_holds_a_batch_of_full_logits():
  cfg = ModelConfig.uniform(n_layer=1, n_head=2, n_embd=32, vocab_size=4096, n_positions=512)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  wins = jax.ShapeDtypeStruct((4, 513), jnp.int32)
  temp = evaluate.metrics._window_nll_sum.lower(params, cfg, wins).compile().memory_analysis()
  # Full logits need at least one float32 (B, L, V) buffer; chunks of 128 positions need 1/4.
  assert temp.temp_size_in_bytes < 4 * 512 * cfg.vocab_size * 4


# ------------------------------------------------------------------------------ config


def base_config(**fields):
  c = config_lib.default_config()
  for key, value in fields.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.mark.parametrize("fields,match", [
    ({"data__batch_size": 8, "data__microbatch": 3}, r"'data\.microbatch': got 3; must divide "
                                                     r"data\.batch_size=8"),
    ({"data__microbatch": -2}, r"'data\.microbatch': got -2; must be >= 0"),
    ({"model__remat": "all"}, r"'model\.remat': got 'all'; allowed: none, block, dots"),
])
def test_config_errors_name_the_field(fields, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.from_configdict(base_config(**fields))


@pytest.mark.parametrize("remat", ["none", "block", "dots"])
def test_remat_settings_reach_the_model(remat):
  cfg = config_lib.from_configdict(base_config(model__remat=remat, data__microbatch=4))
  assert cfg.model.model_config(256).remat_policy == remat and cfg.data.microbatch == 4
  # A run written when remat was a boolean still loads, with the policy it meant.
  old = config_types.to_dict(cfg)
  old["model"]["remat"] = remat == "block"
  assert config_types.from_dict(old).model.model_config(256).remat_policy == (
      "block" if remat == "block" else "none")


def _gpt2_config(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                   name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.from_configdict(module.get_config(arg))


@pytest.mark.parametrize("name", ["gpt2_attn", "gpt2_mlp", "gpt2_attn_mlp", "gpt2_blocks",
                                  "gpt2_ddp"])
@pytest.mark.parametrize("arg", [None, "hf"])
def test_paper_scale_configs_set_the_memory_defaults(name, arg):
  """The settings results/bench/memory_gpt2.json shows fit in 60 GB per device."""
  cfg = _gpt2_config(name, arg)
  assert cfg.model.remat == "none" and cfg.data.microbatch == 2 and cfg.data.batch_size == 16
  assert cfg.twist.worker_loop == "scan"  # one worker at a time on a device (true <= DDP there)
  smoke = _gpt2_config(name, "smoke")  # validated: the smoke batch of 4 is 2 microbatches
  assert (smoke.data.batch_size, smoke.data.microbatch) == (4, 2)
