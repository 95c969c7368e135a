"""The paper-protocol study's measurements: a model's loss and its random-subnet distributions on
the study's shared windows, the post-training pruning references, and B*'s selection rule.

Every arm is scored on the same validation windows (spread evenly over python_docs' whole
validation split) and, per ratio, on the same subnet indices (drawn from EVAL_SEED's key).
Losses are nats per byte; PPL = exp(loss).
"""

import math

import jax
import numpy as np

from twist_jax import baselines, evaluate, subnet_spec
from twist_jax.baselines import __main__ as baselines_cli
from twist_jax.studies.paper_arms import (EVAL_SEED, KAPPA, KAPPAS, MODE, SPARSITIES,
                                          STRUCTURED, UNSTRUCTURED)

# One-sided prediction bound for a single new observation from B0's seed distribution:
# P(null lever passes) = ALPHA exactly under normal noise. 2.5%, not 5%: a rule that admits a
# null lever one time in forty stays under the one-in-twenty the study promises with margin.
ALPHA = 0.025
T_QUANTILES = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}  # t_{1-ALPHA, n-1} by n


def subnet_distributions(params, model, windows, kappas, samples: int, correction: str,
                         core: float = 0.0, full_loss: float | None = None) -> dict:
  """{kappa: distribution} of `samples` random attn_mlp subnets per ratio (core units kept in
  every subnet when `core` > 0), deployed with `correction`."""
  out = {}
  for k in kappas:
    spec = subnet_spec.deploy_spec(model, MODE, k, (), correction, core=core)
    losses = evaluate.ratio_losses(params, model, spec, k, samples, windows, seed=EVAL_SEED,
                                   full_loss=full_loss)
    out[f"{k:g}"] = evaluate.distribution(losses)
  return out


def evaluate_model(params, model, windows, *, samples: int, correction: str, core: float,
                   subnets_too: bool, kappas=KAPPAS) -> dict:
  """Full-model loss, and (unless a subnet-sized model) the random-subnet distributions: fully
  random ("random") and, for a core arm, core + random ("core", what such a run deploys)."""
  full = evaluate.mean_nll(params, model, windows)
  out = {"full": full, "full_ppl": evaluate.perplexity(full), "params": model.num_params()}
  if subnets_too:
    out["random"] = subnet_distributions(params, model, windows, kappas, samples, correction,
                                         full_loss=full)
    if core:
      out["core"] = subnet_distributions(params, model, windows, kappas, samples, correction,
                                         core, full)
  return out


def target_loss(ev: dict, kind: str = "random") -> float:
  """Mean loss of the kappa = 0.5 subnets of one evaluation."""
  return ev[kind][f"{KAPPA:g}"]["mean"]


# ---- pruning references --------------------------------------------------------------------------


def prune(params, model, method: str, sparsity: float, calib, key=None):
  """(params, ModelConfig) of `method` at `sparsity`: unstructured ones zero weights in place;
  structured ones keep the top kappa = 1 - sparsity attn_mlp units and extract a smaller dense
  model (nothing rescaled)."""
  if method in UNSTRUCTURED:
    return baselines.prune_unstructured(params, model, method, sparsity, calib), model
  spec = baselines_cli.structured_spec(model, 1 - sparsity, MODE, ())
  key = jax.random.key(EVAL_SEED) if key is None else key
  return baselines_cli.prune_structured(params, model, method[len("struct-"):], spec, calib, key)


def references(params, model, calib, windows) -> list[dict]:
  """Every pruning method at every sparsity, scored on the shared windows."""
  rows = []
  for method in UNSTRUCTURED + STRUCTURED:
    for sp in SPARSITIES:
      small, small_model = prune(params, model, method, sp, calib)
      loss = evaluate.mean_nll(small, small_model, windows)
      rows.append({"method": method, "sparsity": sp, "structured": method in STRUCTURED,
                   "loss": loss, "ppl": evaluate.perplexity(loss),
                   "params": small_model.num_params()})
  return rows


# ---- B*'s selection rule ------------------------------------------------------------------------


def t_quantile(n: int) -> float:
  if n not in T_QUANTILES:
    raise ValueError(f"the selection rule needs 2..6 B0 seeds, got {n}")
  return T_QUANTILES[n]


def pass_bound(b0_losses) -> float | None:
  """The loss a lever must beat: mean(B0) - t_{1-ALPHA, n-1} sd(B0) sqrt(1 + 1/n) (a one-sided
  prediction bound for one new B0 seed); None with fewer than two B0 seeds (no rule)."""
  x = np.asarray(b0_losses, np.float64)
  n = len(x)
  if n < 2:
    return None
  return float(x.mean() - t_quantile(n) * x.std(ddof=1) * math.sqrt(1 + 1 / n))


def select(b0_losses, lever_losses: dict) -> dict:
  """{"bound", "winners", "rule"}: the levers whose kappa = 0.5 random-subnet loss is below the
  bound. With one B0 seed (--quick) nothing passes: a rule needs a spread."""
  bound = pass_bound(b0_losses)
  winners = [] if bound is None else sorted(k for k, v in lever_losses.items() if v < bound)
  return {"bound": bound, "winners": winners, "alpha": ALPHA, "n": len(b0_losses),
          "rule": (f"a lever passes if mean(B0) - lever > t_(1-{ALPHA:g}, n-1) * sd(B0) * "
                   f"sqrt(1 + 1/n), n = {len(b0_losses)} B0 seeds (a one-sided "
                   f"{1 - ALPHA:.1%} prediction bound: a null lever passes {ALPHA:.1%} of the "
                   "time); the score is the mean loss of the fixed kappa=0.5 random subnets")}
