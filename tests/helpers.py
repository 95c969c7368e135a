"""Shared test helpers (plain functions; fixtures live in the test modules)."""

import contextlib
import importlib.util
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from twist_jax.model import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_experiment(name: str, arg=None):
  """`get_config(arg)` of experiments/<name>.py, loaded from its file as `launch --config`
  loads it (experiments/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def have_transformers() -> bool:
  """Whether torch and transformers import. CI installs the `hf` extra and sets
  TWIST_REQUIRE_TRANSFORMERS: there a missing package is an ImportError when the test module
  loads, so the transformers cross-checks fail instead of being skipped."""
  have = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
  if os.environ.get("TWIST_REQUIRE_TRANSFORMERS") and not have:
    raise ImportError("TWIST_REQUIRE_TRANSFORMERS is set (CI) but torch or transformers is "
                      "missing")
  return have


def random_params(cfg, seed=0, std=0.3):
  """N(0, std) params of shape `cfg`, LayerNorm scales around 1: larger than GPT-2's 0.02 init
  so every unit visibly changes the logits. NumPy draws: jitted threefry over every leaf shape
  takes seconds to compile on CPU."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
  return flax.traverse_util.unflatten_dict({
      k: jnp.asarray((k[-1] == "scale") + std * rng.standard_normal(x.shape, np.float32))
      for k, x in flat.items()})


def exit_code(main, args) -> int:
  """Exit status of an in-process CLI `main(args)` (0 when it returns without SystemExit)."""
  try:
    main([str(a) for a in args])
  except SystemExit as e:
    return e.code
  return 0


# ---- equivalence of differently ordered float sums ----------------------------------------------


@contextlib.contextmanager
def float64():
  """JAX with 64-bit types inside the block. Equivalence tests run both sides in float64 (params
  cast with `as_float64`, ModelConfig(dtype="float64")), so their round-off is ~1e-16 relative
  and a tolerance derived from it sits orders of magnitude below any real difference."""
  with jax.enable_x64(True):
    yield


def as_float64(tree):
  """Floating leaves cast to float64 (call inside `float64()`); other leaves unchanged."""
  return jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def reordered_sum_atol(dtype, n_terms: int, scale: float) -> float:
  """Largest difference between two evaluations of a sum of `n_terms` terms, each at most `scale`
  in magnitude, added in different orders in `dtype`: each order is within (n - 1) eps
  sum|terms| <= n eps scale of the exact sum (Higham, Accuracy and Stability of Numerical
  Algorithms, 2nd ed., section 4.2), so they are within twice that of each other."""
  return 2.0 * n_terms * float(np.finfo(dtype).eps) * scale


def assert_trees_close_reordered(a, b, n_terms: int, scale: float, rounded_to=None,
                                 roundings: int = 1):
  """Trees `a` and `b` hold the same computation with sums in different orders (devices,
  workers, sliced vs masked matmuls): floating leaves agree within
  `reordered_sum_atol(leaf dtype, n_terms, scale)`, integer leaves exactly. The caller derives
  `n_terms` and `scale` from its computation (in a comment next to the call).

  `rounded_to`: a dtype the results were rounded to, `roundings` times along the way (float64
  runs whose library code casts through float32). Two values within the bound can still
  straddle one of its rounding boundaries and land one of its ulps (<= eps relative) apart, and
  one side may be rounded where the other is not; `roundings` such ulps are allowed on top.
  """
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  rtol = roundings * float(np.finfo(rounded_to).eps) if rounded_to is not None else 0.0
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), lb):
    x, y, name = np.asarray(x), np.asarray(y), jax.tree_util.keystr(path)
    assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
    if not np.issubdtype(x.dtype, np.floating):
      np.testing.assert_array_equal(x, y, err_msg=name)
      continue
    np.testing.assert_allclose(x, y, rtol=rtol, err_msg=name,
                               atol=reordered_sum_atol(x.dtype, n_terms, scale))


def assert_same_training(got, want, rtol: float, atol: float):
  """Two runs' metrics.jsonl training lines (timings dropped) are the same run: the same steps,
  rounds, learning rates and subnet coverage exactly (no round-off reaches them), and the float
  values (losses, delta norms, validation) within `rtol` / `atol`.

  Those float32 values come from whole training runs whose library code is float32 only (params,
  aggregation and losses), so no float64 comparison is possible there; the round functions'
  equivalence across devices is proven in float64 by tests/test_variants.py. The caller's
  tolerance is an empirical float32 floor and says so.
  """
  assert [sorted(r) for r in got] == [sorted(r) for r in want]
  for g, w in zip(got, want):
    for k, v in w.items():
      if isinstance(v, int) or k == "lr" or k.startswith("coverage_"):
        assert g[k] == v, (w["step"], k, g[k], v)
      else:
        np.testing.assert_allclose(g[k], v, rtol=rtol, atol=atol, err_msg=f"step {w['step']} {k}")
