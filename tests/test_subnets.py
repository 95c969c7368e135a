"""Subnet samplers, extract/scatter and masks against hand-checked and NumPy references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twist_jax import aggregate, subnet_spec, subnets
from twist_jax.config import SubnetConfig
from twist_jax.errors import ConfigError
from twist_jax.model import ModelConfig, init_params

CFG = ModelConfig.uniform(n_layer=3, n_head=4, n_embd=32, vocab_size=64, n_positions=16)
CFG4 = ModelConfig.uniform(n_layer=4, n_head=2, n_embd=16, vocab_size=32, n_positions=8)


def spec_for(mode, kappa=0.5, workers=4, sampler="cover", shared=(), correction="mean",
             cfg=CFG):
  kappas = kappa if isinstance(kappa, tuple) else (kappa,) * cfg.n_layer
  return subnet_spec.make_spec(cfg, SubnetConfig(mode, kappas, shared, sampler, correction),
                               workers)


def groups(sub, spec):
  """Every (W, m) index array of a subnet pytree with its unit count."""
  if spec.mode == "blocks":
    return [(sub["blocks"], len(spec.partitioned))]
  sizes = {"head": spec.n_head, "unit": spec.n_inner}
  return [(sub[f"h_{i}"][k], sizes[k][i]) for i in spec.partitioned for k in spec.unit_kinds]


@pytest.mark.parametrize("sampler", ["cover", "uniform", "partition", "balanced"])
@pytest.mark.parametrize("mode", ["attn", "mlp", "attn_mlp", "blocks"])
def test_sampler_sizes_no_duplicates_and_sorted(mode, sampler):
  kappa, workers = (0.5, 2) if sampler == "partition" else (0.5, 4)
  cfg = CFG4 if mode == "blocks" else CFG  # blocks: 4 blocks split evenly over 2 workers
  spec = spec_for(mode, kappa, workers, sampler, cfg=cfg)
  sub = subnets.sample_subnets(jax.random.key(0), spec)
  for idx, total in groups(sub, spec):
    idx = np.asarray(idx)
    assert idx.dtype == np.int32 and idx.shape[0] == workers
    for row in idx:
      assert len(set(row.tolist())) == len(row), "a unit twice in one subnet"
      assert (np.diff(row) > 0).all() and row.min() >= 0 and row.max() < total


@pytest.mark.parametrize("kappa,workers", [(0.25, 4), (0.5, 2), (0.5, 4), (0.75, 3), (0.25, 2)])
def test_cover_covers_every_unit_when_possible(kappa, workers):
  spec = spec_for("attn_mlp", kappa, workers)
  for seed in range(5):
    sub = subnets.sample_subnets(jax.random.key(seed), spec)
    for idx, total in groups(sub, spec):
      counts = np.bincount(np.asarray(idx).ravel(), minlength=total)
      keep = idx.shape[1]
      if workers * keep >= total:
        assert counts.min() >= 1
      else:  # not enough slots: every slot is a distinct unit
        assert counts.max() == 1


def test_partition_is_disjoint_and_complete():
  spec = spec_for("attn_mlp", 0.25, 4, "partition")
  sub = subnets.sample_subnets(jax.random.key(3), spec)
  for idx, total in groups(sub, spec):
    assert sorted(np.asarray(idx).ravel().tolist()) == list(range(total))


def test_uniform_draws_are_uniform_monte_carlo():
  # Each unit should be in a subnet with probability m / U = 0.5 (4 heads, keep 2).
  spec = spec_for("attn", 0.5, 1, "uniform")
  keys = jax.random.split(jax.random.key(1), 2000)
  draws = jax.vmap(lambda k: subnets.sample_subnets(k, spec)["h_0"]["head"])(keys)
  freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 2000
  np.testing.assert_allclose(freq, 0.5, atol=4 * np.sqrt(0.25 / 2000))
  pairs = {tuple(r) for r in np.asarray(draws)[:, 0]}
  assert pairs == set(itertools.combinations(range(4), 2))


def test_sampling_is_deterministic_in_the_key():
  spec = spec_for("attn_mlp")
  a = subnets.sample_subnets(jax.random.key(5), spec)
  b = subnets.sample_subnets(jax.random.key(5), spec)
  c = subnets.sample_subnets(jax.random.key(6), spec)
  same = jax.tree.map(lambda x, y: bool((x == y).all()), a, b)
  assert all(jax.tree.leaves(same))
  assert not all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), a, c)))


def test_spec_errors_name_the_field():
  with pytest.raises(ConfigError, match="subnet.kappa.*zero units"):
    spec_for("attn", 0.1)
  with pytest.raises(ConfigError, match="subnet.sampler"):
    spec_for("attn", 0.5, 4, "partition")


def numpy_extract_layer(layer, heads, units, h, k):
  """Independent reference: index the HF-layout columns/rows by hand."""
  cols = [part * h * k + hh * k + kk for part in range(3) for hh in heads for kk in range(k)]
  rows = [hh * k + kk for hh in heads for kk in range(k)]
  a = {kk: np.asarray(v) for kk, v in layer["attn"]["c_attn"].items()}
  return {"c_attn_kernel": a["kernel"][:, cols], "c_attn_bias": a["bias"][cols],
          "c_proj_kernel": np.asarray(layer["attn"]["c_proj"]["kernel"])[rows],
          "c_fc_kernel": np.asarray(layer["mlp"]["c_fc"]["kernel"])[:, units],
          "c_fc_bias": np.asarray(layer["mlp"]["c_fc"]["bias"])[units],
          "mlp_proj_kernel": np.asarray(layer["mlp"]["c_proj"]["kernel"])[units]}


def test_extract_matches_numpy_indexing_and_scatter_round_trips():
  spec = spec_for("attn_mlp", (0.5, 0.75, 0.25), shared=(1,))
  params = init_params(CFG, jax.random.key(0))
  sub = jax.tree.map(lambda x: x[2], subnets.sample_subnets(jax.random.key(1), spec))
  small = subnets.extract_subnet(params, sub, spec)
  small_cfg = subnets.subnet_model_config(CFG, spec)
  assert small_cfg.n_head == (2, 4, 1) and small_cfg.n_inner == (64, 128, 32)
  assert jax.tree.map(jnp.shape, small) == jax.tree.map(
      jnp.shape, init_params(small_cfg, jax.random.key(0)))
  for i in spec.partitioned:
    ref = numpy_extract_layer(params[f"h_{i}"], np.asarray(sub[f"h_{i}"]["head"]),
                              np.asarray(sub[f"h_{i}"]["unit"]), 4, CFG.head_dim)
    got = small[f"h_{i}"]
    np.testing.assert_array_equal(got["attn"]["c_attn"]["kernel"], ref["c_attn_kernel"])
    np.testing.assert_array_equal(got["attn"]["c_attn"]["bias"], ref["c_attn_bias"])
    np.testing.assert_array_equal(got["attn"]["c_proj"]["kernel"], ref["c_proj_kernel"])
    np.testing.assert_array_equal(got["mlp"]["c_fc"]["kernel"], ref["c_fc_kernel"])
    np.testing.assert_array_equal(got["mlp"]["c_fc"]["bias"], ref["c_fc_bias"])
    np.testing.assert_array_equal(got["mlp"]["c_proj"]["kernel"], ref["mlp_proj_kernel"])
  np.testing.assert_array_equal(small["h_1"]["mlp"]["c_fc"]["kernel"],
                                params["h_1"]["mlp"]["c_fc"]["kernel"])  # shared layer
  values, mask = subnets.scatter_subnet(small, sub, spec, params)
  for v, m, p in zip(jax.tree.leaves(values), jax.tree.leaves(mask), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(v), np.where(np.asarray(m) > 0, p, 0))
  again = subnets.extract_subnet(values, sub, spec)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), again, small)))
  # The held fraction of a partitioned c_fc kernel is exactly kappa.
  assert float(mask["h_2"]["mlp"]["c_fc"]["kernel"].mean()) == 0.25


def test_blocks_mode_extract_scatter_and_masks():
  cfg = CFG4
  spec = spec_for("blocks", 0.5, 2, shared=(0,), cfg=cfg)
  params = init_params(cfg, jax.random.key(0))
  sub = jax.tree.map(lambda x: x[0], subnets.sample_subnets(jax.random.key(2), spec))
  kept = [0] + [spec.partitioned[j] for j in np.asarray(sub["blocks"])]
  assert len(kept) == spec.kept_layers() == 3
  small = subnets.extract_subnet(params, sub, spec)
  for j, i in enumerate(kept):
    np.testing.assert_array_equal(small[f"h_{j}"]["ln_1"]["scale"], params[f"h_{i}"]["ln_1"]["scale"])
    np.testing.assert_array_equal(small[f"h_{j}"]["mlp"]["c_fc"]["kernel"],
                                  params[f"h_{i}"]["mlp"]["c_fc"]["kernel"])
  block = np.asarray(subnets.unit_masks(sub, spec)["block"])
  np.testing.assert_array_equal(np.nonzero(block)[0], kept)
  _, mask = subnets.scatter_subnet(small, sub, spec, params)
  for i in range(4):
    assert float(mask[f"h_{i}"]["attn"]["c_attn"]["kernel"].mean()) == float(i in kept)


def test_unit_masks_agree_with_one_workers_holder_counts():
  spec = spec_for("attn_mlp", 0.5, shared=(0,))
  params = init_params(CFG, jax.random.key(0))
  sub = jax.tree.map(lambda x: x[1], subnets.sample_subnets(jax.random.key(4), spec))
  one = jax.tree.map(lambda x: x[None], sub)
  hold = aggregate.leaf_counts(aggregate.unit_counts(one, spec), spec, params, 1)
  hold = jax.tree.map(lambda h, p: np.broadcast_to(np.asarray(h), p.shape), hold, params)
  masks = subnets.unit_masks(sub, spec)
  for i in range(CFG.n_layer):
    proj = np.asarray(hold[f"h_{i}"]["attn"]["c_proj"]["kernel"])[:, 0].reshape(4, -1)[:, 0]
    np.testing.assert_array_equal(proj, masks["head"][i])
    np.testing.assert_array_equal(np.asarray(hold[f"h_{i}"]["mlp"]["c_fc"]["bias"]),
                                  masks["unit"][i])


def test_correction_scales_follow_design():
  assert subnets.correction_factor(8, 2, "mean") == 4.0
  assert subnets.correction_factor(8, 2, "norm") == 2.0
  assert subnets.correction_factor(8, 2, "none") == 1.0
  spec = spec_for("attn", 0.5, correction="norm", shared=(2,))
  cfg = subnets.subnet_model_config(CFG, spec)
  np.testing.assert_allclose(cfg.attn_scale, (2 ** 0.5, 2 ** 0.5, 1.0))
  assert cfg.mlp_scale == (1.0, 1.0, 1.0)


def test_from_scores_keeps_top_units():
  spec = spec_for("attn", 0.5, 1)
  scores = {f"h_{i}": {"head": np.array([0.1, 3.0, 2.0, -1.0]), "unit": np.zeros(128)}
            for i in range(3)}
  sub = subnets.from_scores(scores, spec)
  np.testing.assert_array_equal(np.asarray(sub["h_0"]["head"]), [[1, 2]])
  np.testing.assert_array_equal(np.asarray(subnets.first_subnet(spec)["h_2"]["head"]), [[0, 1]])


def test_coverage_stats():
  spec = spec_for("attn", 0.5, 4)
  sub = subnets.sample_subnets(jax.random.key(0), spec)
  stats = subnets.coverage(sub, spec)
  assert stats["coverage_head_min"] >= 1 and stats["coverage_head_mean"] == 2.0


def test_one_rounding_rule_half_up_everywhere():
  # floor(kappa * U + 1/2): halves round up (Python's round() would give 12, 2 and 0 here).
  assert [subnet_spec.keep_count(k, u) for k, u in [(0.5, 25), (0.5, 5), (0.25, 2), (0.3, 5)]] == [
      13, 3, 1, 2]
  xl = ModelConfig.uniform(n_layer=2, n_head=25, n_embd=100, vocab_size=32, n_positions=8)
  train = spec_for("attn", 0.5, workers=2, cfg=xl)
  deploy = subnet_spec.deploy_spec(xl, "attn", 0.5)
  assert train.keep_head == deploy.keep_head == (13, 13)
  # Two workers of 13 heads now cover all 25 heads every round.
  for seed in range(3):
    sub = subnets.sample_subnets(jax.random.key(seed), train)
    assert np.bincount(np.asarray(sub["h_0"]["head"]).ravel(), minlength=25).min() >= 1


def test_cover_refuses_a_config_that_cannot_cover():
  cfg = ModelConfig.uniform(n_layer=2, n_head=10, n_embd=40, vocab_size=32, n_positions=8)
  # S * kappa = 1.02 >= 1 but 3 workers x floor(3.4 + 0.5) = 9 heads < 10.
  with pytest.raises(ConfigError, match=r"subnet\.kappa.*layer 0.*3 workers x 3 of 10 heads"):
    spec_for("attn", 0.34, workers=3, cfg=cfg)
  spec_for("attn", 0.34, workers=3, cfg=cfg, sampler="uniform")  # no coverage promised
  spec_for("attn", 0.3, workers=3, cfg=cfg)  # S * kappa < 1: cannot cover, nothing promised
  spec_for("attn", 0.35, workers=3, cfg=cfg)  # 3 x 4 >= 10


# ---- the balanced sampler: distinct subnets, even holder counts ---------------------------------


def heads_spec(units, keep, workers, core=0.0, mode="attn"):
  """A one-layer spec whose head group has U = `units` and m = `keep` (kappa = m / U)."""
  cfg = ModelConfig.uniform(n_layer=1, n_head=units, n_embd=2 * units, vocab_size=32,
                            n_positions=8)
  return subnet_spec.make_spec(cfg, SubnetConfig(mode, (keep / units,), (), "balanced", "mean",
                                             core), workers)


def draws(spec, keys=256, kind="head"):
  """(keys, W, m) draws of layer 0's `kind` group, one per key, jitted and vmapped."""
  ks = jax.random.split(jax.random.key(11), keys)
  return np.asarray(jax.jit(jax.vmap(lambda k: subnets.sample_subnets(k, spec)["h_0"][kind]))(
      ks))


# (U, m, S): S m a multiple of U (the old cyclic layout repeated subnets there), S > U with
# C(U, m) >= S distinct subsets (S = C exactly in the second), and S > C(U, m) (balance only).
BALANCED_CASES = [(8, 4, 4), (4, 2, 6), (6, 3, 12), (8, 2, 8), (6, 2, 9), (5, 2, 5), (4, 2, 8),
                  (3, 1, 7)]


@pytest.mark.parametrize("units,keep,workers", BALANCED_CASES)
def test_balanced_subnets_are_distinct_with_even_holder_counts(units, keep, workers):
  spec = heads_spec(units, keep, workers)
  assert spec.keep_head == (keep,)
  distinct_possible = math.comb(units, keep) >= workers
  for idx_WxM in draws(spec):
    assert idx_WxM.shape == (workers, keep)
    assert all((np.diff(row) > 0).all() for row in idx_WxM)  # sorted, no unit twice
    counts = np.bincount(idx_WxM.ravel(), minlength=units)
    assert counts.max() - counts.min() <= 1 and counts.sum() == workers * keep
    rows = {tuple(row) for row in idx_WxM.tolist()}
    # Where S > C(U, m) some subset must repeat; then every subset appears (as evenly as
    # holder counts allow, which the count check above covers).
    assert len(rows) == (workers if distinct_possible else math.comb(units, keep))


def test_balanced_mlp_units_and_the_random_part_beside_a_core_are_distinct():
  # MLP units: U = 64, m = 32, S = 4 (the old layout gave worker 0 == worker 2).
  spec = heads_spec(8, 4, 4, mode="attn_mlp")
  for idx_WxM in draws(spec, 64, "unit"):
    assert len({tuple(r) for r in idx_WxM.tolist()}) == 4
    counts = np.bincount(idx_WxM.ravel(), minlength=64)
    assert counts.min() == counts.max() == 2
  # Core of 2 heads: the random part is m - c = 2 of U - c = 6 for 4 workers (old: 0 == 3).
  spec = heads_spec(8, 4, 4, core=0.25)
  for idx_WxM in draws(spec, 128):
    assert (idx_WxM[:, :2] == [0, 1]).all()
    assert len({tuple(r) for r in idx_WxM[:, 2:].tolist()}) == 4
    counts = np.bincount(idx_WxM[:, 2:].ravel(), minlength=8)[2:]
    assert counts.max() - counts.min() <= 1


def test_balanced_subnet_of_each_worker_is_a_uniform_subset_monte_carlo():
  # U = 4, m = 2, S = 6: every worker should see each of the 6 pairs with probability 1/6.
  n = 3000
  got = draws(heads_spec(4, 2, 6), n)
  for w in range(6):
    pairs = [tuple(r) for r in got[:, w].tolist()]
    freq = np.array([pairs.count(p) for p in itertools.combinations(range(4), 2)]) / n
    np.testing.assert_allclose(freq, 1 / 6, atol=4 * np.sqrt((1 / 6) * (5 / 6) / n))
