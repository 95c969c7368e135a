"""Shared test helpers (plain functions; fixtures live in the test modules)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from twist_jax.model import init_params


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
