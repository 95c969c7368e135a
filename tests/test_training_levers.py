"""Training levers (sandwich workers, in-place distillation, outer step for DDP, nested core,
balanced coverage, dense warm-up) against Python-loop, hand-checked and run-level references."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from twist_jax import aggregate, config as config_lib, subnet_spec, subnets, train, variants
from twist_jax.errors import ConfigError
from twist_jax.model import ModelConfig, distill_loss, init_params, lm_loss
from twist_jax.subnet_spec import SubnetConfig

from test_variants import MODEL, R, W, assert_trees_close, inputs, make_ctx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_levers(ctx, **kw):
  return dataclasses.replace(ctx, **kw)


def one_round(ctx, variant, seed=0):
  params = init_params(MODEL, jax.random.key(42))
  batches, subs = inputs(seed, W, ctx.spec)
  state, metrics = variants.make_round(variant, ctx)(
      variants.init_state(ctx, jax.tree.map(jnp.copy, params)), subs, batches, jnp.int32(0))
  return params, batches, subs, jax.device_get(state), np.asarray(metrics["loss"])


def loop_worker(ctx, params, loss_fn, batches_RxBxLp1):
  """R optimizer steps in a Python loop (the reference for one worker)."""
  p, s, losses = params, ctx.tx.init(params), []
  for r in range(R):
    loss, g = jax.value_and_grad(loss_fn)(p, batches_RxBxLp1[r])
    u, s = ctx.tx.update(g, s, p)
    p = optax.apply_updates(p, jax.tree.map(lambda x: -ctx.lr_fn(r) * x, u))
    losses.append(float(loss))
  return p, losses


def test_all_full_workers_is_local_sgd():
  ctx = with_levers(make_ctx(opt_policy="reset"), full_workers=W)
  params, batches, _, state, losses = one_round(ctx, "true")
  outs = [loop_worker(ctx, params, lambda p, b: lm_loss(p, MODEL, b), batches[w])
          for w in range(W)]
  mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), 0), *[p for p, _ in outs])
  assert_trees_close(state["params"], mean, 2e-5)
  np.testing.assert_allclose(losses, [l for _, l in outs], atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("levers", [dict(full_workers=1), dict(distill=0.5),
                                    dict(full_workers=2, distill=0.3, distill_temperature=2.0)])
def test_masked_equals_true_with_levers(levers):
  a = one_round(with_levers(make_ctx(), **levers), "true")
  b = one_round(with_levers(make_ctx(), **levers), "masked")
  np.testing.assert_allclose(a[4], b[4], atol=2e-5)
  assert_trees_close(a[3]["params"], b[3]["params"], 2e-5)
  plain = one_round(make_ctx(), "true")
  assert np.abs(plain[4] - a[4]).max() > 1e-4  # the lever changed the run


def test_distillation_teacher_is_the_round_start_model():
  ctx = with_levers(make_ctx(opt_policy="reset"), distill=0.5, distill_temperature=2.0)
  params, batches, subs, state, losses = one_round(ctx, "true")
  small_cfg = subnets.subnet_model_config(MODEL, ctx.spec)
  for w in range(W):
    sub = jax.tree.map(lambda x: x[w], subs)
    small = subnets.extract_subnet(params, sub, ctx.spec)
    loss_fn = lambda p, b: distill_loss(p, small_cfg, params, MODEL, b, 0.5, 2.0)
    _, ref = loop_worker(ctx, small, loss_fn, batches[w])
    np.testing.assert_allclose(losses[w], ref, atol=2e-5)


def test_ddp_with_a_fixed_teacher_of_another_width_distills_from_it():
  """The prune-then-distill baseline: DDP whose every step minimises the mix of CE and the KL to a
  fixed, wider teacher (not the round-start model)."""
  wide = MODEL.replace(n_inner=(4 * MODEL.n_embd + 32,) * MODEL.n_layer)
  teacher = init_params(wide, jax.random.key(7))
  ctx = with_levers(make_ctx(), distill=0.5, distill_temperature=2.0, teacher=(teacher, wide))
  params, batches, _, state, losses = one_round(ctx, "ddp")
  loss_fn = lambda p, b_WxBxLp1: jnp.mean(jnp.stack(
      [distill_loss(p, MODEL, teacher, wide, b, 0.5, 2.0) for b in b_WxBxLp1]))
  p, ref = loop_worker(ctx, params, loss_fn, jnp.swapaxes(batches, 0, 1))
  np.testing.assert_allclose(losses.reshape(-1, R)[0], ref, atol=2e-5)
  assert_trees_close(state["params"], p, 2e-5)
  # With the round-start model as teacher the same step would differ (its KL starts at 0).
  _, plain = loop_worker(ctx, params, lambda q, b: jnp.mean(jnp.stack(
      [distill_loss(q, MODEL, params, MODEL, x, 0.5, 2.0) for x in b])),
      jnp.swapaxes(batches, 0, 1))
  assert abs(plain[0] - ref[0]) > 1e-3


@pytest.mark.parametrize("variant,distill", [("true", 0.5), ("ddp", 0.0)])
def test_a_fixed_teacher_needs_ddp_and_distillation(variant, distill):
  c = config_lib.default_config()
  c.twist.variant, c.twist.distill, c.init.teacher_run = variant, distill, "runs/big"
  with pytest.raises(ConfigError, match=r"init\.teacher_run.*ddp.*distill"):
    config_lib.from_configdict(c)


def test_ddp_outer_nesterov_is_a_look_ahead_on_the_round_change():
  plain_ctx = make_ctx(devices=2)
  outer_ctx = with_levers(plain_ctx, outer=aggregate.outer_optimizer(0.7, 0.9))
  start, _, _, plain, _ = one_round(plain_ctx, "ddp")
  _, _, _, outer, _ = one_round(outer_ctx, "ddp")
  # First outer step of Nesterov SGD: update = lr * (1 + momentum) * (start - after).
  expect = jax.tree.map(lambda s, a: np.asarray(s) - 0.7 * 1.9 * (np.asarray(s) - a), start,
                        plain["params"])
  assert_trees_close(outer["params"], expect, 1e-6)


CFG = ModelConfig.uniform(n_layer=2, n_head=8, n_embd=32, vocab_size=32, n_positions=8)


def spec_for(sampler="cover", kappa=0.5, workers=4, core=0.0, mode="attn_mlp"):
  return subnet_spec.make_spec(CFG, SubnetConfig(mode, (kappa,) * 2, (), sampler, "mean", core),
                           workers)


@pytest.mark.parametrize("sampler", ["cover", "uniform", "balanced"])
def test_core_units_are_in_every_subnet(sampler):
  # ceil(0.3 * 8) = 3 heads and ceil(0.3 * 128) = 39 units of 5 and 80 kept (4 workers cover)
  spec = spec_for(sampler, kappa=0.625, core=0.3)
  for seed in range(3):
    sub = subnets.sample_subnets(jax.random.key(seed), spec)
    for kind, core in (("head", 3), ("unit", 39)):
      idx = np.asarray(sub["h_0"][kind])
      assert (idx[:, :core] == np.arange(core)).all()
      assert all(len(set(row)) == len(row) for row in idx.tolist())
      assert (idx[:, core:] >= core).all()
  draws = np.stack([np.asarray(subnets.sample_subnets(jax.random.key(s), spec)["h_0"]["head"])
                    for s in range(40)])
  assert len(np.unique(draws[..., 3:].reshape(-1))) == 5  # the rest varies over all others


def test_core_larger_than_a_subnet_is_refused():
  with pytest.raises(ConfigError, match=r"subnet\.core.*layer 0"):
    spec_for(kappa=0.25, core=0.5)  # 4 core heads > 2 kept


def test_cover_with_a_core_that_leaves_units_unheld_is_refused():
  # W = 2, kappa = 0.5, core = 0.25 of 8 heads: 2 core heads, so 2 workers x 2 other heads
  # cannot hold the other 6 (S m = U, so the check without the core passed it).
  with pytest.raises(ConfigError, match=r"subnet\.core.*layer 0.*2 workers x 2 other heads.*"
                     r"leave 2 of the other 6.*subnet\.core <= 0\b"):
    spec_for("cover", kappa=0.5, workers=2, core=0.25)
  c = config_lib.default_config()  # the same through config validation: one line
  c.twist.update(variant="true", workers=2)
  c.subnet.update(kappa=0.5, core=0.25)
  with pytest.raises(ConfigError, match="subnet.core") as err:
    config_lib.from_configdict(c)
  assert "\n" not in str(err.value)
  spec_for("uniform", kappa=0.5, workers=2, core=0.25)  # no coverage promised
  spec_for("cover", kappa=0.5, workers=2)  # without the core it covers


def test_the_largest_core_the_refusal_suggests_covers():
  # 4 workers x 4 of 8 heads: core 0.3 (3 heads) leaves 4 slots for 5 heads; it suggests 0.25.
  with pytest.raises(ConfigError, match=r"subnet\.core <= 0\.25 ") as err:
    spec_for("cover", kappa=0.5, workers=4, core=0.3)
  assert "layer 0" in str(err.value)
  assert_every_unit_held(spec_for("cover", kappa=0.5, workers=4, core=0.25), 8, 128)


def assert_every_unit_held(spec, heads, units, keys=64):
  ks = jax.random.split(jax.random.key(3), keys)
  draws = jax.jit(jax.vmap(lambda k: subnets.sample_subnets(k, spec)))(ks)
  for i in spec.partitioned:
    for kind, total in (("head", heads), ("unit", units)):
      for idx_WxM in np.asarray(draws[f"h_{i}"][kind]):
        assert np.bincount(idx_WxM.ravel(), minlength=total).min() >= 1


def test_cover_with_a_core_that_still_covers_is_accepted_and_holds_every_unit():
  # W = 3: 2 core heads + 3 workers x 2 other heads = all 8 heads; units 32 + 3 x 32 = 128,
  # both exactly tight.
  spec = spec_for("cover", kappa=0.5, workers=3, core=0.25)
  assert spec.keep_head == (4, 4) and subnet_spec.core_count(0.25, 8) == 2
  assert_every_unit_held(spec, 8, 128)


@pytest.mark.parametrize("kappa,workers", [(0.5, 4), (0.25, 3), (0.375, 3), (0.75, 2)])
def test_balanced_holder_counts_are_exact(kappa, workers):
  spec = spec_for("balanced", kappa, workers)
  for seed in range(4):
    sub = subnets.sample_subnets(jax.random.key(seed), spec)
    for kind, total in (("head", 8), ("unit", 128)):
      idx = np.asarray(sub["h_1"][kind])
      m = idx.shape[1]
      counts = np.bincount(idx.ravel(), minlength=total)
      lo = workers * m // total
      assert counts.min() >= lo and counts.max() <= lo + 1 and counts.sum() == workers * m
      assert all(len(set(row)) == len(row) for row in idx.tolist())


@pytest.mark.parametrize("field,value,needle", [
    ("twist.full_workers", -1, "full_workers"), ("twist.full_workers", 5, "0..twist.workers"),
    ("twist.distill", 1.5, r"\[0, 1\]"), ("twist.distill_temperature", 0.0, "> 0"),
    ("twist.dense_steps", 7, "multiple"), ("subnet.core", 1.0, r"\[0, 1\)")])
def test_bad_lever_values_are_refused(field, value, needle):
  c = config_lib.default_config()
  c.twist.variant = "true"
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=needle):
    config_lib.from_configdict(c)


def _smoke(tmp, name, **twist):
  c = config_lib.default_config()
  c.model.update(n_layer=2, n_head=4, n_embd=32, context=16)
  c.data.update(batch_size=2, max_train_bytes=60_000, data_dir=str(tmp / "data"))
  c.twist.update(variant="true", workers=2, local_steps=3, **twist)
  c.subnet.update(mode="attn_mlp")
  c.steps, c.eval.every, c.ckpt.every, c.ckpt.keep = 9, 9, 3, 10
  c.eval.max_windows, c.log.progress = 4, False
  c.eval.golden_samples = 0
  return config_lib.from_configdict(c), str(tmp / name)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if '"loss"' in l]


@pytest.mark.slow
def test_dense_warm_up_is_ddp_then_twist_and_resumes_across_the_switch(tmp_path):
  cfg, wd = _smoke(tmp_path, "warm", dense_steps=3)
  train.train(cfg, wd)
  ddp_cfg, ddp_wd = _smoke(tmp_path, "ddp")
  ddp_cfg = config_lib.from_dict(dict(config_lib.to_dict(ddp_cfg),
                                      twist=dict(config_lib.to_dict(ddp_cfg)["twist"],
                                                 variant="ddp")))
  train.train(ddp_cfg, ddp_wd)
  warm, ddp = _metrics(wd), _metrics(ddp_wd)
  assert warm[0]["loss"] == pytest.approx(ddp[0]["loss"], abs=1e-6)  # round 1: the same DDP
  assert "coverage_head_min" not in warm[0] and "coverage_head_min" in warm[1]
  assert warm[1]["loss"] != pytest.approx(ddp[1]["loss"], abs=1e-4)  # then TwIST
  # Resume from the checkpoint at the switch (step 3): the rest of the run is reproduced.
  again = str(tmp_path / "again")
  shutil.copytree(wd, again)
  for step in ("6", "9"):
    shutil.rmtree(os.path.join(again, "checkpoints", step))
  train.train(cfg, again)
  np.testing.assert_allclose([r["loss"] for r in _metrics(again)],
                             [r["loss"] for r in warm], atol=1e-6)


def _fit(cfg, workdir, watch_twist_rounds=None):
  """Trains in-process; returns the Trainer. `watch_twist_rounds` gets the outer-optimizer
  state each TwIST (non-dense) round is handed, copied to the host before the round runs."""
  trainer = train.Trainer(train.build(cfg, workdir))
  if watch_twist_rounds is not None:
    twist_round = trainer.round_fn

    def watched(state, *args):
      watch_twist_rounds.append(jax.device_get(state["outer_state"]))
      return twist_round(state, *args)
    trainer.round_fn = watched
  trainer.fit()
  return trainer


def _with(cfg, **twist):
  d = config_lib.to_dict(cfg)
  return config_lib.from_dict(dict(d, twist=dict(d["twist"], **twist)))


@pytest.mark.slow
def test_dense_warm_up_is_plain_ddp_and_hands_twist_a_zero_outer_momentum(tmp_path):
  outer = dict(outer_lr=0.7, outer_momentum=0.9)
  cfg, _ = _smoke(tmp_path, "x", **outer)
  cfg = dataclasses.replace(cfg, steps=6)  # two rounds of R = 3
  ddp = _fit(_with(cfg, variant="ddp", outer_lr=1.0, outer_momentum=0.0), str(tmp_path / "ddp"))
  dense = _fit(_with(cfg, dense_steps=6), str(tmp_path / "dense"))
  diloco = _fit(_with(cfg, dense_steps=6, dense_outer=True), str(tmp_path / "diloco"))
  # A whole run of warm-up with outer Nesterov configured is exactly the plain DDP run ...
  for a, b in zip(jax.tree.leaves(jax.device_get(dense.state["params"])),
                  jax.tree.leaves(jax.device_get(ddp.state["params"]))):
    np.testing.assert_array_equal(a, b)
  # ... which the old behaviour (the outer step in the warm-up, now dense_outer=True) is not:
  # it moves the parameters by a sizeable part of what the whole run moved them.
  start = train._initial_params(cfg, ddp.run.model)
  biggest = lambda x, y: max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                             for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  ddp_params = jax.device_get(ddp.state["params"])
  assert biggest(jax.device_get(diloco.state["params"]), ddp_params) > 0.1 * biggest(
      ddp_params, start)
  # The first TwIST round after a plain warm-up gets a zero outer momentum buffer; after a
  # DiLoCo warm-up it gets the warm-up's momentum.
  seen, seen_diloco = [], []
  _fit(_with(cfg, dense_steps=3), str(tmp_path / "switch"), seen)
  _fit(_with(cfg, dense_steps=3, dense_outer=True), str(tmp_path / "switch_diloco"), seen_diloco)
  assert len(seen) == len(seen_diloco) == 1  # round 2 of 2 is the only TwIST round
  buffers = jax.tree.leaves(seen[0])
  assert buffers and all(not np.asarray(x).any() for x in buffers)
  assert any(np.abs(np.asarray(x)).max() > 1e-4 for x in jax.tree.leaves(seen_diloco[0]))


def test_dense_outer_must_be_a_bool():
  c = config_lib.default_config()
  del c.twist["dense_outer"]  # ConfigDict's type check would refuse it first; a dict might not
  c.twist.dense_outer = "yes"
  with pytest.raises(ConfigError, match=r"twist\.dense_outer.*True or False"):
    config_lib.from_configdict(c)
  assert config_lib.from_configdict(config_lib.default_config()).twist.dense_outer is False


def test_workdirs_made_before_the_levers_still_resume(tmp_path):
  cfg, _ = _smoke(tmp_path, "x")
  old = config_lib.to_dict(cfg)
  for section, name in (("twist", "full_workers"), ("twist", "distill"), ("subnet", "core"),
                        ("twist", "dense_steps"), ("twist", "distill_temperature"),
                        ("twist", "dense_outer")):
    del old[section][name]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(old, f)
  train._check_resume_config(str(tmp_path), config_lib.to_dict(cfg))  # defaults: the same run
  changed = config_lib.to_dict(config_lib.from_dict(dict(
      config_lib.to_dict(cfg), twist=dict(config_lib.to_dict(cfg)["twist"], distill=0.5))))
  with pytest.raises(ConfigError, match="twist.distill"):
    train._check_resume_config(str(tmp_path), changed)
