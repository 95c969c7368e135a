"""Argument checks shared by the pruning entry points: one ConfigError per bad value."""

import numbers

from twist_jax.errors import ConfigError


def check_method(method, allowed: tuple[str, ...]) -> str:
  if method not in allowed:
    raise ConfigError("method", f"unknown method {method!r}; allowed: {', '.join(allowed)}")
  return method


def check_sparsity(sparsity) -> float:
  # bool is an int subclass; a flag passed by mistake must not read as 0 or 1.
  ok = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool)
  if not ok or not 0.0 <= float(sparsity) < 1.0:
    raise ConfigError("sparsity", f"must be a number in [0, 1), got {sparsity!r}")
  return float(sparsity)


def check_positive_int(field: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ConfigError(field, f"must be a positive integer, got {value!r}")
  return int(value)


def check_nonnegative(field: str, value) -> float:
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not ok or not float(value) >= 0.0:
    raise ConfigError(field, f"must be a number >= 0, got {value!r}")
  return float(value)


def n_pruned(sparsity: float, group_size: int) -> int:
  """How many entries of a group of `group_size` are zeroed: Python round(sparsity * n)."""
  return int(round(sparsity * group_size))
