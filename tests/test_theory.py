"""Monte Carlo checks of twist_jax.theory, and its predictions on a freshly initialised GPT-2.

Every stochastic check uses a fixed seed and asserts two things: the sample's standard error is
small next to the predicted value (the check is tight), and the estimate lies within 5 standard
errors of the prediction (a false alarm has probability ~6e-7 per check). `pytest -s` prints the
theory value, the estimate and the relative error of each check.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twist_jax import theory
from twist_jax.model import GPT2, MLP, Attention, ModelConfig, init_params

N_SIGMA = 5.0


def check_mc(name, samples, expected, max_rel_se=0.01, max_abs_se=None):
  """Assert mean(samples) == expected within N_SIGMA standard errors; return (mean, se)."""
  x = np.asarray(samples, np.float64).ravel()
  mean, se = x.mean(), x.std(ddof=1) / math.sqrt(x.size)
  rel = abs(mean - expected) / abs(expected) if expected else float("nan")
  print(f"{name}: theory={expected:.6g} mc={mean:.6g} rel_err={rel:.2e} se={se:.2e} n={x.size}")
  if max_abs_se is None:
    assert se <= max_rel_se * abs(expected), f"{name}: too few samples for a tight check"
  else:
    assert se <= max_abs_se, f"{name}: too few samples for a tight check"
  assert abs(mean - expected) <= N_SIGMA * se + 1e-12, f"{name}: {mean} vs {expected} (se {se})"
  return mean, se


def random_subset_masks(rng, shape, n_keep):
  """0/1 masks over the last axis keeping a uniform random n_keep of its entries."""
  ranks = np.argsort(np.argsort(rng.random(shape), axis=-1), axis=-1)
  return (ranks < n_keep).astype(np.float64)


# --- Lemma 1.1 and its subnet extensions ------------------------------------------------------

def test_lemma_1_1_linear():
  rng = np.random.default_rng(0)
  n, d_out, d_in, s = 50_000, 4, 16, 0.3
  w = s * rng.standard_normal((n, d_out, d_in))
  x = 1.0 + 0.5 * rng.standard_normal((n, d_in))  # i.i.d. components with a non-zero mean
  y = np.einsum("noi,ni->no", w, x)
  expected = theory.expected_sq_norm_linear(d_out, s, d_in * (1.0 + 0.25))
  check_mc("lemma 1.1 E||Wx||^2", (y**2).sum(-1), expected)


def test_subnet_sq_norm_random_subset():
  # Units with unequal second moments: the kappa law then needs the subset to be random.
  rng = np.random.default_rng(1)
  n, d_out, n_units, n_keep, s = 50_000, 4, 16, 6, 0.2
  scale_U = np.linspace(0.2, 2.0, n_units)
  x = scale_U * (0.5 + rng.standard_normal((n, n_units)))
  keep = random_subset_masks(rng, (n, n_units), n_keep)
  w = s * rng.standard_normal((n, d_out, n_units))
  y_sub = np.einsum("nou,nu->no", w, x * keep)
  x_sq_norm = (scale_U**2).sum() * (0.25 + 1.0)
  expected = theory.expected_sq_norm_subnet(d_out, s, x_sq_norm, n_units, n_keep)
  check_mc("subnet E||W_S x_S||^2", (y_sub**2).sum(-1), expected)
  assert theory.subnet_sq_norm_ratio(n_units, n_keep) == n_keep / n_units


@pytest.mark.parametrize("n_heads_keep", [4, 2])
def test_attention_heads(n_heads_keep):
  # Head outputs: a shared non-zero-mean factor along a fixed direction plus noise, so the K
  # components of a head are correlated and not centred (as softmax averages are).
  rng = np.random.default_rng(2)
  n, d_out, n_head, k, s = 50_000, 8, 4, 4, 0.25
  u_K = np.full(k, 0.5)  # unit norm
  g = 0.3 + rng.standard_normal((n, n_head, 1))
  o = g * u_K + 0.5 * rng.standard_normal((n, n_head, k))
  keep = random_subset_masks(rng, (n, n_head), n_heads_keep)[..., None]
  w = s * rng.standard_normal((n, d_out, n_head * k))
  y = np.einsum("nod,nd->no", w, (o * keep).reshape(n, n_head * k))
  head_sq_norm = (0.09 + 1.0) + k * 0.25
  expected = theory.expected_sq_norm_heads(d_out, s, head_sq_norm, n_heads_keep)
  check_mc(f"attention E||y||^2, Hs={n_heads_keep}", (y**2).sum(-1), expected)


# --- GELU -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mu,sigma,approximate", [
    (0.0, 1.0, True), (0.5, 1.0, True), (-1.0, 2.0, True), (0.0, 0.16, True),
    (0.5, 1.0, False)])
def test_gelu_moments_mc(mu, sigma, approximate):
  z = mu + sigma * np.random.default_rng(3).standard_normal(1_000_000).astype(np.float32)
  g = np.asarray(jax.nn.gelu(z, approximate=approximate), np.float64)  # the model's GELU
  g1, g2 = theory.gelu_moments(mu, sigma, approximate)
  tag = f"mu={mu} sigma={sigma} tanh={approximate}"
  check_mc(f"E gelu(z) {tag}", g, g1, 0.015)
  check_mc(f"E gelu(z)^2 {tag}", g**2, g2)


def _trapezoid_gelu_moments(mu, sigma, approximate):
  """Reference: trapezoid rule on a fine grid, spectrally accurate for this analytic integrand."""
  z = np.arange(mu - 15 * sigma, mu + 15 * sigma, min(sigma, 1.0) / 50)
  w = np.exp(-0.5 * ((z - mu) / sigma) ** 2) * (z[1] - z[0]) / (sigma * math.sqrt(2 * math.pi))
  g = theory.gelu(z, approximate)
  return w @ g, w @ g**2


def test_gelu_moments_quadrature_exact():
  # Exact GELU: E[z Phi(z)] = mu Phi(mu / r) + sigma^2 phi(mu / r) / r, r = sqrt(1 + sigma^2)
  # (Stein's lemma); both GELUs against a trapezoid reference, within the documented accuracy.
  for mu, sigma in [(0.0, 1.0), (0.5, 1.0), (-1.0, 2.0), (0.0, 0.16)]:
    r = math.sqrt(1.0 + sigma**2)
    closed = (mu * 0.5 * (1.0 + math.erf(mu / r / math.sqrt(2.0)))
              + sigma**2 * math.exp(-0.5 * (mu / r) ** 2) / math.sqrt(2.0 * math.pi) / r)
    assert theory.gelu_moments(mu, sigma, approximate=False)[0] == pytest.approx(closed, 1e-10)
  for mu, sigma, rtol in [(0.0, 1.0, 1e-10), (-1.0, 2.0, 1e-10), (2.0, 3.0, 1e-7)]:
    for approximate in (True, False):
      np.testing.assert_allclose(theory.gelu_moments(mu, sigma, approximate),
                                 _trapezoid_gelu_moments(mu, sigma, approximate), rtol=rtol)


def test_gelu_mlp_moments():
  # Two independent inputs through the same W: E<y1, y2> = E_W||E_z y||^2, the mean's energy.
  rng = np.random.default_rng(4)
  n, d_out, n_units, n_keep, s, mu, sigma = 40_000, 8, 16, 6, 0.2, 0.5, 1.0
  w = s * rng.standard_normal((n, d_out, n_units))
  a1, a2 = (theory.gelu(mu + sigma * rng.standard_normal((n, n_units))) for _ in range(2))
  keep_U = np.arange(n_units) < n_keep  # units are i.i.d., so a fixed subset will do
  proj = lambda a: np.einsum("nou,nu->no", w, a)
  y1, y2, y1s, y2s = proj(a1), proj(a2), proj(a1 * keep_U), proj(a2 * keep_U)
  th = theory.gelu_mlp_moments(d_out, s, n_units, n_keep, mu, sigma)
  check_mc("mlp sq_norm_full", (y1**2).sum(-1), th["sq_norm_full"])
  check_mc("mlp sq_norm_sub", (y1s**2).sum(-1), th["sq_norm_sub"])
  check_mc("mlp sq_norm_shift", ((y1 - y1s)**2).sum(-1), th["sq_norm_shift"])
  check_mc("mlp mean_sq_norm_full", (y1 * y2).sum(-1), th["mean_sq_norm_full"], 0.02)
  check_mc("mlp mean_sq_norm_sub", (y1s * y2s).sum(-1), th["mean_sq_norm_sub"], 0.02)
  check_mc("mlp mean_shift_sq_norm", ((y1 - y1s) * (y2 - y2s)).sum(-1),
           th["mean_shift_sq_norm"], 0.02)


# --- Fixed weights, random subsets ------------------------------------------------------------

def _enumerated_subsets(contrib_UxD, n_keep):
  """y_S for every m-subset S: (C(U, m), D)."""
  idx = itertools.combinations(range(contrib_UxD.shape[0]), n_keep)
  return np.stack([contrib_UxD[list(s)].sum(0) for s in idx])


@pytest.mark.parametrize("coherent", [False, True])
def test_subset_moments_exact_enumeration(coherent):
  rng = np.random.default_rng(5)
  n_units, n_keep = 8, 3
  v = 0.7 + rng.standard_normal((n_units, 5))
  if coherent:
    v = np.broadcast_to(v[0], v.shape)  # identical contributions: rho = U
  y_all = _enumerated_subsets(v, n_keep)
  mean_D, var_D = theory.subset_mean_and_variance(v, n_keep)
  np.testing.assert_allclose(y_all.mean(0), mean_D, rtol=1e-12)
  np.testing.assert_allclose(y_all.var(0), var_D, rtol=1e-10, atol=1e-12)
  rho = theory.coherence(v)
  ratio = (y_all**2).sum(-1).mean() / (v.sum(0)**2).sum()
  assert ratio == pytest.approx(theory.subset_sq_norm_ratio(n_units, n_keep, rho), rel=1e-12)
  if coherent:
    assert rho == pytest.approx(n_units) and ratio == pytest.approx((n_keep / n_units)**2)


def test_subset_moments_mc():
  rng = np.random.default_rng(6)
  n, n_units, n_keep, d = 40_000, 64, 16, 4
  v = 0.3 + rng.standard_normal((n_units, d))
  y = random_subset_masks(rng, (n, n_units), n_keep) @ v
  mean_D, var_D = theory.subset_mean_and_variance(v, n_keep)
  for j in range(d):
    check_mc(f"E_S y_S[{j}]", y[:, j], mean_D[j], 0.02)
    check_mc(f"Var_S y_S[{j}]", (y[:, j] - mean_D[j])**2, var_D[j], 0.02)
  expected = theory.subset_sq_norm_ratio(n_units, n_keep, theory.coherence(v))
  check_mc("E_S||y_S||^2 / ||y||^2", (y**2).sum(-1) / (v.sum(0)**2).sum(), expected)


# --- Activation-shift correction --------------------------------------------------------------

def test_correction_factor_table():
  u, m = 12, 3  # kappa = 1/4
  assert [theory.correction_factor(u, m, p) for p in ("none", "mean", "norm")] == [1.0, 4.0, 2.0]
  assert theory.correction_factor(u, u, "mean") == 1.0
  want = {"none": (0.25, 0.25), "mean": (1.0, 4.0), "norm": (0.5, 1.0)}
  for mode, ratios in want.items():
    np.testing.assert_allclose(theory.correction_residuals(u, m, mode), ratios, rtol=1e-12)
  # Coherent output (rho = U): the mean correction restores the second moment too.
  np.testing.assert_allclose(theory.correction_residuals(u, m, "mean", rho=u), (1.0, 1.0))
  with pytest.raises(ValueError, match="correction mode"):
    theory.correction_factor(u, m, "dropout")


@pytest.mark.parametrize("mode", ["none", "mean", "norm"])
def test_correction_residuals_mc(mode):
  rng = np.random.default_rng(7)
  n, d_out, n_units, n_keep, s = 40_000, 8, 32, 8, 0.3
  c = theory.correction_factor(n_units, n_keep, mode)
  mean_ratio, sq_ratio = theory.correction_residuals(n_units, n_keep, mode)
  # Random zero-mean W, non-centred inputs, random subset: second moment ratio (rho = 1 law).
  w = s * rng.standard_normal((n, d_out, n_units))
  x = 0.8 + rng.standard_normal((n, n_units))
  keep = random_subset_masks(rng, (n, n_units), n_keep)
  y_sub = c * np.einsum("nou,nu->no", w, x * keep)
  full = theory.expected_sq_norm_linear(d_out, s, n_units * (0.64 + 1.0))
  check_mc(f"{mode}: E||c y_S||^2 (random W)", (y_sub**2).sum(-1), sq_ratio * full)
  # Fixed W and input, random subsets: the expected output is mean_ratio * y, exactly.
  v = 0.5 + rng.standard_normal((n_units, 3))
  y_fixed = c * (keep @ v)
  y_D = v.sum(0)
  for j in range(3):
    check_mc(f"{mode}: E_S[c y_S][{j}] (fixed W)", y_fixed[:, j], mean_ratio * y_D[j], 0.02)


# --- Sampler statistics -----------------------------------------------------------------------

def simulate_uniform(n_units, n_keep, n_subnets, n_trials, rng):
  """Membership (trials, S, U): each subnet draws its m units independently."""
  return random_subset_masks(rng, (n_trials, n_subnets, n_units), n_keep).astype(bool)


def simulate_cover(n_units, n_keep, n_subnets, n_trials, rng):
  """Membership (trials, S, U) of the `cover` sampler, written as plain loops (DESIGN §3).

  Deal a random permutation round-robin (subnet s gets positions s, s + S, ... up to its quota),
  then fill each subnet's remaining quota uniformly from the units it lacks.
  """
  member = np.zeros((n_trials, n_subnets, n_units), bool)
  for t in range(n_trials):
    perm = rng.permutation(n_units)
    for s in range(n_subnets):
      dealt = perm[s::n_subnets][:n_keep]
      member[t, s, dealt] = True
      lacking = np.flatnonzero(~member[t, s])
      member[t, s, rng.choice(lacking, n_keep - len(dealt), replace=False)] = True
  return member


SAMPLER_CASES = [  # (U, m, S)
    (12, 6, 4),  # S m = 2U, even dealing
    (10, 3, 4),  # uneven dealing: 3, 3, 2, 2
    (12, 2, 4),  # S m < U: dealing stops at the quota, coverage < 1
    (4, 2, 8),  # S > U: half the subnets are dealt nothing
    (5, 5, 3),  # full-width subnets
]


@pytest.mark.parametrize("sampler", ["uniform", "cover"])
@pytest.mark.parametrize("n_units,n_keep,n_subnets", SAMPLER_CASES)
def test_holder_pmf(sampler, n_units, n_keep, n_subnets):
  rng = np.random.default_rng(8)
  simulate = {"uniform": simulate_uniform, "cover": simulate_cover}[sampler]
  pmf_fn = {"uniform": theory.holder_pmf_uniform, "cover": theory.holder_pmf_cover}[sampler]
  member = simulate(n_units, n_keep, n_subnets, 3000, rng)
  assert (member.sum(-1) == n_keep).all()  # the simulation itself: exact quotas, no repeats
  counts = member.sum(1)  # (trials, U)
  pmf = pmf_fn(n_units, n_keep, n_subnets)
  assert pmf.shape == (n_subnets + 1,) and pmf.sum() == pytest.approx(1.0, abs=1e-12)
  tag = f"{sampler} U={n_units} m={n_keep} S={n_subnets}"
  for c, p in enumerate(pmf):
    frac = (counts == c).mean(-1)  # per-trial fraction: independent across trials
    if p < 1e-12 or p > 1 - 1e-12:
      assert (frac == round(p)).all(), f"{tag}: P(c={c}) should be {p}"
    else:
      check_mc(f"{tag} P(c={c})", frac, p, max_abs_se=0.006)
  holders = theory.expected_holders(n_units, n_keep, n_subnets)
  assert np.arange(n_subnets + 1) @ pmf == pytest.approx(holders, rel=1e-12)
  np.testing.assert_allclose(counts.mean(-1), holders)  # S m / U in every trial, exactly
  coverage = {"uniform": theory.coverage_uniform, "cover": theory.coverage_cover}[sampler]
  assert coverage(n_units, n_keep, n_subnets) == pytest.approx(1.0 - pmf[0], abs=1e-12)
  if sampler == "cover" and n_subnets * n_keep >= n_units:
    assert pmf[0] == 0.0 and (counts > 0).all()


# --- Masked-mean aggregation ------------------------------------------------------------------

@pytest.mark.parametrize("sampler,case", [("uniform", (48, 8, 4)), ("cover", (40, 12, 4)),
                                          ("cover", (48, 8, 4))])
def test_masked_mean_stats(sampler, case):
  # Unconditional forms, so that no per-trial ratio biases the estimate:
  # E[agg^2 1(c > 0)] = E[v / c | c > 0] P(c > 0) and E[1(c = 0)] = P(c = 0).
  rng = np.random.default_rng(9)
  v, n_trials, n_draws = 2.0, 2000, 4
  simulate = {"uniform": simulate_uniform, "cover": simulate_cover}[sampler]
  pmf = {"uniform": theory.holder_pmf_uniform, "cover": theory.holder_pmf_cover}[sampler](*case)
  member = simulate(*case, n_trials, rng)[:, None]  # (trials, 1, S, U)
  updates = math.sqrt(v) * rng.standard_normal((n_trials, n_draws) + member.shape[2:])
  cnt = member.sum(2)  # (trials, 1, U)
  agg = np.where(cnt > 0, (updates * member).sum(2) / np.maximum(cnt, 1), 0.0)  # central = 0
  expected_var, p_central = theory.masked_mean_stats(v, pmf)
  tag = f"{sampler} U,m,S={case}"
  check_mc(f"{tag} E[v/c | c>0] P(c>0)", (agg**2 * (cnt > 0)).mean((1, 2)),
           expected_var * (1.0 - p_central))
  if p_central > 0:
    check_mc(f"{tag} P(c=0)", (cnt == 0).mean((1, 2)), p_central, max_abs_se=0.005)
  else:
    assert (cnt > 0).all()
  assert theory.masked_mean_variance(v, 4) == v / 4


# --- The model at initialisation --------------------------------------------------------------
# At init every c_proj kernel is i.i.d. N(0, proj_std^2) and independent of its own input, and
# c_proj biases are zero, so Lemma 1.1 applies branch by branch: a kappa-subnet's branch output
# has kappa times the full branch's expected squared norm, times c^2 with a correction c. The
# expectation is over W (several init keys) and subsets; one W leaves an O(1/sqrt(D)) cross term.

N_LAYER, N_HEAD, N_EMBD = 3, 4, 64
CFG = ModelConfig.uniform(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, vocab_size=256,
                          n_positions=64)
N_INNER = CFG.n_inner[0]
N_MASKS = 32  # masks per forward call: one batch shape, so one compile per config
HEAD_SUBSETS = np.array([[h in s for h in range(N_HEAD)]
                         for s in itertools.combinations(range(N_HEAD), N_HEAD // 2)], np.float32)


def allow_rank_promotion():
  # The probe below subtracts (D,) biases from (B, L, D) outputs, which conftest's
  # rank_promotion="raise" would reject.
  return jax.numpy_rank_promotion("allow")


_init_params = jax.jit(init_params, static_argnums=0)  # compiled: ~2x faster than eager here


@functools.lru_cache(maxsize=None)
def init_case(seed):
  """GPT-2 initial parameters and a batch of random tokens (2, 32) for one seed."""
  kp, kt = jax.random.split(jax.random.key(seed))
  params = _init_params(CFG, kp)
  return params, jax.random.randint(kt, (2, 32), 0, CFG.vocab_size)


@functools.lru_cache(maxsize=None)
def model_probe(cfg):
  """jit(vmap over N_MASKS masks) of the model, returning float64 NumPy arrays:
  'attn', 'mlp': per-layer squared norms (M, N) of each branch's kernel term (output minus the
  c_proj bias: the correction scales only the kernel term); 'y0': the layer-0 MLP kernel term
  (M, B, L, D); 'h0': its GELU hidden activations (M, B, L, F).
  """
  def is_probe(mdl, name):
    return name == "__call__" and (isinstance(mdl, (Attention, MLP))
                                   or mdl.scope.path == ("h_0", "mlp", "c_fc"))

  def one(params, tokens, masks):
    inter = GPT2(cfg).apply({"params": params}, tokens, masks, capture_intermediates=is_probe,
                            mutable=["intermediates"])[1]["intermediates"]
    kernel_term = lambda i, br: (inter[f"h_{i}"][br]["__call__"][0]
                                 - params[f"h_{i}"][br]["c_proj"]["bias"])
    sq = lambda br: jnp.stack([(kernel_term(i, br)**2).sum() for i in range(cfg.n_layer)])
    h0 = jax.nn.gelu(inter["h_0"]["mlp"]["c_fc"]["__call__"][0], approximate=True)
    return {"attn": sq("attn"), "mlp": sq("mlp"), "y0": kernel_term(0, "mlp"), "h0": h0}

  fn = jax.jit(jax.vmap(one, in_axes=(None, None, 0)))
  def call(params, tokens, masks):
    assert masks["head"].shape[0] == N_MASKS
    with allow_rank_promotion():
      return {k: np.asarray(v, np.float64) for k, v in fn(params, tokens, masks).items()}
  return call


def full_masks():
  return {"head": np.ones((N_MASKS, N_LAYER, N_HEAD), np.float32),
          "unit": np.ones((N_MASKS, N_LAYER, N_INNER), np.float32)}


def test_model_branch_law_per_layer():
  """kappa = 1/2 in one layer at a time, so that layer's branch input equals the full model's.

  Heads: all 6 two-of-four subsets (the subset average is exact). MLP units: 4 random halves.
  Estimate: mean over 6 keys x 3 layers of E_S||y_S||^2 / ||y||^2; prediction kappa = 0.5.
  Stated tolerance: 5 standard errors over the 18 (key, layer) replicates, and within 5% (attn)
  and 2% (mlp) of kappa; the spread comes from the single-W cross terms of Lemma 1.1.
  """
  rng = np.random.default_rng(10)
  n_sets, n_unit_sets, full_row = len(HEAD_SUBSETS), 4, N_MASKS - 1
  head_rows = lambda layer: layer * n_sets + np.arange(n_sets)
  unit_rows = lambda layer: N_LAYER * n_sets + layer * n_unit_sets + np.arange(n_unit_sets)
  assert unit_rows(N_LAYER - 1)[-1] < full_row
  ratios = {"attn": [], "mlp": []}
  for seed in range(6):
    masks = full_masks()
    for layer in range(N_LAYER):
      masks["head"][head_rows(layer), layer] = HEAD_SUBSETS
      masks["unit"][unit_rows(layer), layer] = random_subset_masks(
          rng, (n_unit_sets, N_INNER), N_INNER // 2)
    out = model_probe(CFG)(*init_case(seed), masks)
    for layer in range(N_LAYER):
      ratios["attn"].append(out["attn"][head_rows(layer), layer].mean()
                            / out["attn"][full_row, layer])
      ratios["mlp"].append(out["mlp"][unit_rows(layer), layer].mean()
                           / out["mlp"][full_row, layer])
  expected = theory.subnet_sq_norm_ratio(N_HEAD, N_HEAD // 2)
  check_mc("model attn branch ratio (one layer masked)", ratios["attn"], expected, 0.02)
  check_mc("model mlp branch ratio (one layer masked)", ratios["mlp"], expected, 0.01)
  assert np.mean(ratios["attn"]) == pytest.approx(expected, rel=0.05)
  assert np.mean(ratios["mlp"]) == pytest.approx(expected, rel=0.02)


def corrected_cfg(mode, attn=True, mlp=True):
  """CFG with the kappa = 1/2 correction of `mode` folded into attn_scale / mlp_scale."""
  c_attn = theory.correction_factor(N_HEAD, N_HEAD // 2, mode) if attn else 1.0
  c_mlp = theory.correction_factor(N_INNER, N_INNER // 2, mode) if mlp else 1.0
  return CFG.replace(attn_scale=(c_attn,) * N_LAYER, mlp_scale=(c_mlp,) * N_LAYER)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "mean", "norm"])
def test_model_subnet_corrected_ratio(mode):
  """A whole kappa = 1/2 subnet (heads and units in every layer), corrected through the config.

  Prediction: branch ratio c^2 kappa (none 0.5, mean 2, norm 1). It holds for the MLP branch in
  every layer (LayerNorm and the random c_fc make E||gelu||^2 insensitive to the residual
  stream) and for layer-0 attention (same input). Deeper attention inputs change with the
  subnet: a softmax average's norm depends on how similar positions are, which the earlier
  branches' share of the residual stream sets. Only `norm` keeps every branch's energy, so only
  there is deeper attention predicted (and checked) too; the drift of the others is printed.
  Tolerance: 5 standard errors over (key, layer) replicates, and 3% (mlp) / 8% (attn).
  """
  rng = np.random.default_rng(11)
  expected = theory.correction_residuals(N_HEAD, N_HEAD // 2, mode)[1]
  assert expected == pytest.approx(theory.correction_residuals(N_INNER, N_INNER // 2, mode)[1])
  n_rounds = 5  # 5 x 6 subnets; every layer sees each head subset once per round
  rows = np.arange(n_rounds * len(HEAD_SUBSETS))
  attn_r, mlp_r = [], []
  for seed in range(4):
    params, tokens = init_case(seed)
    full = model_probe(CFG)(params, tokens, full_masks())
    masks = full_masks()
    for layer in range(N_LAYER):
      masks["head"][rows, layer] = np.concatenate(
          [np.roll(HEAD_SUBSETS, layer + r, axis=0) for r in range(n_rounds)])
    masks["unit"][rows] = random_subset_masks(rng, (len(rows), N_LAYER, N_INNER), N_INNER // 2)
    sub = model_probe(corrected_cfg(mode))(params, tokens, masks)
    attn_r.append(sub["attn"][rows].mean(0) / full["attn"][0])
    mlp_r.append(sub["mlp"][rows].mean(0) / full["mlp"][0])
  attn_r, mlp_r = np.array(attn_r), np.array(mlp_r)  # (keys, layers)
  print(f"{mode}: attn ratio per layer {attn_r.mean(0).round(3)}, "
        f"mlp {mlp_r.mean(0).round(3)}, predicted {expected:.3f}")
  check_mc(f"{mode}: model mlp ratio (all layers)", mlp_r, expected, 0.01)
  check_mc(f"{mode}: model attn ratio (layer 0)", attn_r[:, 0], expected, 0.03)
  assert mlp_r.mean() == pytest.approx(expected, rel=0.03)
  assert attn_r[:, 0].mean() == pytest.approx(expected, rel=0.08)
  if mode == "norm":
    check_mc("norm: model attn ratio (all layers)", attn_r, expected, 0.03)
    assert attn_r.mean() == pytest.approx(expected, rel=0.08)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mean", "norm"])
def test_model_expected_output_over_subsets(mode):
  """Fixed W and tokens, random unit halves: E_S[c y_S] = c kappa y (mean: y, norm: y / sqrt 2).

  Layer-0 MLP with units masked (heads full), so its input is the full model's. The total
  variance over subsets is predicted from the unit contributions v_u = gelu(z_u) W_proj[u].
  """
  rng = np.random.default_rng(12)
  params, tokens = init_case(0)
  full = model_probe(CFG)(params, tokens, full_masks())
  y_full, h_full = full["y0"][0], full["h0"][0]
  y_sub = []
  for _ in range(8):  # 8 x 32 subsets
    masks = full_masks()
    masks["unit"][:] = random_subset_masks(rng, masks["unit"].shape, N_INNER // 2)
    y_sub.append(model_probe(corrected_cfg(mode, attn=False))(params, tokens, masks)["y0"])
  y_sub = np.concatenate(y_sub)  # (subsets, B, L, D)
  c = theory.correction_factor(N_INNER, N_INNER // 2, mode)
  mean_ratio = theory.correction_residuals(N_INNER, N_INNER // 2, mode)[0]
  # Projection on y: E_S <c y_S, y> / ||y||^2 = mean ratio.
  proj = (y_sub * y_full).sum((1, 2, 3)) / (y_full**2).sum()
  check_mc(f"{mode}: model E_S<c y_S, y>/||y||^2", proj, mean_ratio)
  # Total variance over subsets: c^2 sum over tokens and d of Var_S(y_S), from contributions.
  w_FxD = np.asarray(params["h_0"]["mlp"]["c_proj"]["kernel"], np.float64)
  contrib = h_full.reshape(-1, N_INNER)[:, :, None] * w_FxD  # (tokens, F, D)
  var = sum(theory.subset_mean_and_variance(v, N_INNER // 2)[1].sum() for v in contrib)
  dev = ((y_sub - mean_ratio * y_full)**2).sum((1, 2, 3))
  check_mc(f"{mode}: model E_S||c y_S - E c y_S||^2", dev, c**2 * var)
