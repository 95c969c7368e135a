"""Closed forms behind TwIST: second moments of subnet branch outputs (Lemma 1.1 and its subnet,
attention and GELU-MLP extensions), the activation-shift correction, sampler coverage and
masked-mean aggregation variance. Pure NumPy; each result is checked by Monte Carlo in
tests/test_theory.py.

Notation: a branch output projection y = sum_u W_u a_u sums over U input units (MLP units, or
attention heads of K inputs each); a subnet keeps m of them (kappa = m / U); S subnets per round;
d_out is the output width and s the weight standard deviation.
"""

import math

import numpy as np

# Correction exponent p in c = (U / m)^p (docs/method.md §4).
CORRECTION_EXPONENTS = {"none": 0.0, "mean": 1.0, "norm": 0.5}


# --- Lemma 1.1 and its subnet extensions (W random, zero mean) -------------------------------

def expected_sq_norm_linear(d_out, sigma_w, x_sq_norm):
  """Lemma 1.1: E||W x||^2 = d_out * s^2 * E||x||^2.

  W is (d_out, d_in) with i.i.d. zero-mean entries of variance s^2 (Gaussian in the paper), x is
  independent of W. Then E[y_i^2] = sum_j s^2 E[x_j^2], because the cross terms E[W_ij W_ik] vanish
  for j != k. x need not have zero mean, nor i.i.d. components: only E||x||^2 enters.
  """
  return d_out * sigma_w**2 * x_sq_norm


def subnet_sq_norm_ratio(n_units, n_keep):
  """E||y_sub||^2 / E||y||^2 = m / U = kappa, for a subnet keeping m of the U input units.

  y_sub = sum_{u in S} W_u x_u. By Lemma 1.1 applied unit by unit, E||y_sub||^2 =
  d_out s^2 sum_{u in S} E||x_u||^2. This is a fraction m / U of E||y||^2 if either (a) the
  units are exchangeable (equal E||x_u||^2, e.g. i.i.d. components), or (b) the subset S is
  drawn uniformly and independently of x and W (then the expectation also runs over S).
  """
  return n_keep / n_units


def expected_sq_norm_subnet(d_out, sigma_w, x_sq_norm, n_units, n_keep):
  """E||W_S x_S||^2 = (m / U) * d_out * s^2 * E||x||^2 (assumptions of `subnet_sq_norm_ratio`)."""
  return subnet_sq_norm_ratio(n_units, n_keep) * expected_sq_norm_linear(d_out, sigma_w,
                                                                         x_sq_norm)


def expected_sq_norm_heads(d_out, sigma_w, head_sq_norm, n_heads_keep):
  """Attention output projection over Hs kept heads: E||sum_h W_h o_h||^2 = d_out s^2 Hs E||o_h||^2.

  The projection input is the concatenation of H head outputs o_h (K components each) and W_h is
  the (d_out, K) block of rows of head h. Inside a head the K components may be correlated and
  have any mean (softmax averages of values are); Lemma 1.1 needs only W zero-mean i.i.d. and
  independent of o. `head_sq_norm` = E||o_h||^2, equal across heads (exchangeable heads) or
  averaged over a uniformly random head subset. The subnet/full ratio is Hs / H.
  """
  return d_out * sigma_w**2 * n_heads_keep * head_sq_norm


# --- GELU moments and the GELU MLP ---------------------------------------------------------

def gelu(x, approximate=True):
  """GELU in NumPy: tanh form (GPT-2, the model's choice) or the exact x * Phi(x)."""
  x = np.asarray(x, np.float64)
  if approximate:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
  erf = np.vectorize(math.erf, otypes=[np.float64])
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_moments(mu, sigma, approximate=True, n_points=128):
  """(E[gelu(z)], E[gelu(z)^2]) for z ~ N(mu, sigma^2), by Gauss-Hermite quadrature.

  E f(z) = (2 pi)^(-1/2) int f(mu + sigma t) exp(-t^2 / 2) dt
         ~= (2 pi)^(-1/2) sum_i w_i f(mu + sigma t_i),
  with (t_i, w_i) the probabilists' Hermite nodes and weights (numpy hermegauss; sum w_i =
  sqrt(2 pi)). The rule is exact for polynomials of degree < 2 n_points. GELU is smooth but bends
  over a width ~1 in z, i.e. 1 / sigma in t, so accuracy falls as sigma grows: with 128 points
  the relative error is ~1e-11 for sigma <= 2 and ~1e-8 at sigma = 3 (tested against a fine
  trapezoid rule), ~4e-5 at sigma = 5; numpy's nodes fail above ~400 points. GELU activations
  have a non-zero mean (sigma^2 / sqrt(2 pi (1 + sigma^2)) at mu = 0 for the exact GELU), which
  is why an MLP output carries a mean component.
  """
  t, w = np.polynomial.hermite_e.hermegauss(n_points)
  g = gelu(mu + sigma * t, approximate)
  norm = math.sqrt(2.0 * math.pi)
  return float(w @ g / norm), float(w @ g**2 / norm)


def gelu_mlp_moments(d_out, sigma_w, n_units, n_keep, mu, sigma, approximate=True):
  """Second moments of a GELU MLP's output y = W a, a_u = gelu(z_u), full vs an m-unit subnet.

  Assumptions: z_u i.i.d. N(mu, sigma^2) (so a_u i.i.d. with mean g1 = E gelu, second moment
  g2 = E gelu^2 from `gelu_moments`), W (d_out, U) i.i.d. zero mean, variance s^2, independent of
  z; the subnet keeps units S, |S| = m. Expectations run over W and z; "mean" is the output's
  expectation over inputs for a fixed W, mu_y = g1 * W 1_U (mu_sub = g1 * W_S 1_m). Returns:
    sq_norm_full  E||y||^2          = d_out s^2 U g2
    sq_norm_sub   E||y_sub||^2      = d_out s^2 m g2           (ratio kappa, despite g1 != 0)
    sq_norm_shift E||y - y_sub||^2  = d_out s^2 (U - m) g2     (the dropped units' share)
    mean_sq_norm_full  E_W||mu_y||^2           = d_out s^2 U g1^2
    mean_sq_norm_sub   E_W||mu_sub||^2         = d_out s^2 m g1^2
    mean_shift_sq_norm E_W||mu_y - mu_sub||^2  = d_out s^2 (U - m) g1^2
  So with random W the mean carries the same fraction g1^2 / g2 of the energy in the full model
  and the subnet, and the kept mean is kappa of the full mean's energy (its norm sqrt(kappa)).
  For a *fixed* W the subnet mean over random subsets is kappa * mu_y instead
  (`subset_mean_and_variance`).
  """
  g1, g2 = gelu_moments(mu, sigma, approximate)
  unit = d_out * sigma_w**2  # E||W_u||^2 for one unit's column
  return {
      "sq_norm_full": unit * n_units * g2,
      "sq_norm_sub": unit * n_keep * g2,
      "sq_norm_shift": unit * (n_units - n_keep) * g2,
      "mean_sq_norm_full": unit * n_units * g1**2,
      "mean_sq_norm_sub": unit * n_keep * g1**2,
      "mean_shift_sq_norm": unit * (n_units - n_keep) * g1**2,
  }


# --- Fixed weights, random subsets ---------------------------------------------------------

def _finite_population_factor(n_units, n_keep):
  """kappa (1 - kappa) U / (U - 1): Cov of inclusion indicators of a uniform m-subset, scaled.

  For indicators d_u of S: Var d_u = kappa (1 - kappa), Cov(d_u, d_v) = -kappa (1 - kappa) /
  (U - 1) for u != v (sampling without replacement).
  """
  kappa = n_keep / n_units
  return 0.0 if n_units == 1 else kappa * (1.0 - kappa) * n_units / (n_units - 1)


def subset_mean_and_variance(contrib_UxD, n_keep):
  """Mean and per-coordinate variance of y_S = sum_{u in S} v_u over uniform m-subsets S.

  `contrib_UxD` holds each unit's fixed contribution v_u = a_u W_u to y = sum_u v_u (fixed W and
  input). Linearity gives E_S[y_S] = kappa y (so the mean shift is (1 - kappa) y, whatever the
  weights); with the indicator covariances of `_finite_population_factor`,
    Var_S(y_S[d]) = kappa (1 - kappa) U / (U - 1) * (sum_u v_ud^2 - (sum_u v_ud)^2 / U).
  Returns (mean_D, var_D).
  """
  v = np.asarray(contrib_UxD, np.float64)
  n_units = v.shape[0]
  y_D = v.sum(axis=0)
  var_D = _finite_population_factor(n_units, n_keep) * ((v**2).sum(axis=0) - y_D**2 / n_units)
  return (n_keep / n_units) * y_D, var_D


def coherence(contrib_UxD):
  """rho = ||sum_u v_u||^2 / sum_u ||v_u||^2, in [0, U].

  rho = 1 when the contributions are orthogonal on average (random zero-mean W: E_W of both
  sums agree); rho = U when all contributions are equal (a pure mean / DC component).
  """
  v = np.asarray(contrib_UxD, np.float64)
  return float((v.sum(axis=0)**2).sum() / (v**2).sum())


def subset_sq_norm_ratio(n_units, n_keep, rho=1.0):
  """E_S||y_S||^2 / ||y||^2 = kappa^2 + kappa (1 - kappa) U / (U - 1) (1 / rho - 1 / U).

  Sum of `subset_mean_and_variance` over coordinates: ||kappa y||^2 plus the total variance,
  divided by ||y||^2 = rho * sum_u ||v_u||^2. At rho = 1 it is exactly kappa (Lemma 1.1's
  law); at rho = U (coherent contributions) it is kappa^2, the law of a mean.
  """
  kappa = n_keep / n_units
  return kappa**2 + _finite_population_factor(n_units, n_keep) * (1.0 / rho - 1.0 / n_units)


# --- Activation-shift correction (docs/method.md §4) --------------------------------------------

def correction_factor(n_units, n_keep, mode):
  """c = (U / m)^p with p = 0 (none), 1 (mean), 1/2 (norm); c = 1 for the full model."""
  if mode not in CORRECTION_EXPONENTS:
    raise ValueError(f"correction mode {mode!r} is not one of {sorted(CORRECTION_EXPONENTS)}")
  if not 0 < n_keep <= n_units:
    raise ValueError(f"need 0 < m <= U, got m={n_keep}, U={n_units}")
  return (n_units / n_keep) ** CORRECTION_EXPONENTS[mode]


def correction_residuals(n_units, n_keep, mode, rho=1.0):
  """(mean ratio, second-moment ratio) of the corrected subnet output c * y_S to the full y.

  mean ratio = E_S[c y_S] / y = c kappa, exact for any fixed weights and input (linearity);
  second-moment ratio = c^2 * `subset_sq_norm_ratio(U, m, rho)`; at the default rho = 1 it is
  c^2 kappa, which is also E_W||c y_S||^2 / E_W||y||^2 for random zero-mean W (Lemma 1.1).
    none: (kappa, kappa)      mean: (1, 1 / kappa)      norm: (sqrt(kappa), 1)
  So `mean` restores the expected output but inflates the second moment by U / m, and `norm`
  restores the second moment of an incoherent (random-W) output but leaves the mean at
  sqrt(kappa). For a coherent output (rho = U) the second-moment ratio is c^2 kappa^2, and `mean`
  is the correction that restores both.
  """
  c = correction_factor(n_units, n_keep, mode)
  return c * n_keep / n_units, c**2 * subset_sq_norm_ratio(n_units, n_keep, rho)


# --- Sampler statistics (docs/method.md §3) -----------------------------------------------------

def coverage_uniform(n_units, n_keep, n_subnets):
  """P(a unit is in >= 1 of S subnets) = 1 - (1 - m / U)^S under `uniform` (independent draws)."""
  return 1.0 - (1.0 - n_keep / n_units) ** n_subnets


def holder_pmf_uniform(n_units, n_keep, n_subnets):
  """pmf of a unit's holder count c under `uniform`: Binomial(S, m / U), array of length S + 1.

  Each subnet holds a given unit with probability m / U, independently of the others.
  """
  q = n_keep / n_units
  return np.array([math.comb(n_subnets, c) * q**c * (1 - q) ** (n_subnets - c)
                   for c in range(n_subnets + 1)])


def poisson_binomial_pmf(probs):
  """pmf of a sum of independent Bernoulli(q_i), by repeated convolution (length len + 1)."""
  pmf = np.ones(1)
  for q in probs:
    pmf = np.convolve(pmf, [1.0 - q, q])
  return pmf


def cover_dealt_counts(n_units, n_keep, n_subnets):
  """n_s, the units dealt to subnet s by `cover`: min(m, #{p < U : p mod S = s}).

  Round-robin dealing of a permutation gives subnet s the positions s, s + S, s + 2S, ...; we
  read DESIGN §3 as stopping at the quota m, so when S m < U only the first S m positions are
  dealt (and no subnet needs filling). When S > U, subnets s >= U are dealt nothing.
  """
  if not 0 < n_keep <= n_units:
    raise ValueError(f"need 0 < m <= U, got m={n_keep}, U={n_units}")
  per_residue = [max(0, -(-(n_units - s) // n_subnets)) for s in range(n_subnets)]
  return np.minimum(n_keep, per_residue)


def holder_pmf_cover(n_units, n_keep, n_subnets):
  """pmf of a unit's holder count c under `cover`, exactly (array of length S + 1).

  Derivation. The permutation puts a given unit at a uniform position p in [0, U). Subnet s is
  dealt n_s units (`cover_dealt_counts`) and fills f_s = m - n_s more, uniformly without
  replacement from the U - n_s units it was not dealt; so a unit not dealt to s enters its fill
  with probability q_s = f_s / (U - n_s), independently across subnets (fills are independent
  draws and q_s depends on the deal only through n_s). Hence, with T = sum_s n_s,
    - with prob. n_s / U the unit was dealt to s: c = 1 + PoissonBinomial({q_r : r != s});
    - with prob. 1 - T / U it was not dealt:      c = PoissonBinomial({q_r : all r}).
  T = U whenever S m >= U, so then pmf[0] = 0 (full coverage). E[c] = S m / U (each subnet holds
  m units and units are exchangeable); with no dealing this reduces to `holder_pmf_uniform`.
  """
  n_s = cover_dealt_counts(n_units, n_keep, n_subnets)
  fill = n_keep - n_s
  q = np.where(fill > 0, fill / np.maximum(n_units - n_s, 1), 0.0)
  pmf = (1.0 - n_s.sum() / n_units) * poisson_binomial_pmf(q)
  for s in range(n_subnets):
    if n_s[s]:
      others = poisson_binomial_pmf(np.delete(q, s))
      pmf[1:] += (n_s[s] / n_units) * others  # dealt to s: one holder for sure
  return pmf


def coverage_cover(n_units, n_keep, n_subnets):
  """P(a unit is in >= 1 subnet) under `cover`: 1 - pmf[0]; exactly 1 when S m >= U."""
  return 1.0 - holder_pmf_cover(n_units, n_keep, n_subnets)[0]


def expected_holders(n_units, n_keep, n_subnets):
  """E[c] = S m / U under both samplers: S subnets hold m units each, units are exchangeable."""
  return n_subnets * n_keep / n_units


# --- Masked-mean aggregation (docs/method.md §6) ------------------------------------------------

def masked_mean_variance(v, n_holders):
  """Var of the mean of c i.i.d. worker updates of variance v: v / c (c >= 1)."""
  return v / n_holders


def masked_mean_stats(v, holder_pmf):
  """(E[v / c | c > 0], P(c = 0)) for a holder count c with the given pmf (index = c).

  The first is the variance of an aggregated entry given that some worker held it (law of total
  variance, the updates having mean zero given c); the second is the probability that the entry
  keeps its central value this round.
  """
  pmf = np.asarray(holder_pmf, np.float64)
  c = np.arange(1, len(pmf))
  p_central = float(pmf[0])
  return float(v * (pmf[1:] / c).sum() / (1.0 - p_central)), p_central
