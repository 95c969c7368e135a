"""User-facing errors: one line naming the field (or path) and what is allowed.

Entry points (launch.py and the ``python -m twist_jax.*`` CLIs) catch `UserError`, print its
message on one line to stderr and exit with status 2 before anything is written.
"""


class UserError(ValueError):
  """Bad input from the user; the message is shown as-is, on one line."""

  exit_code = 2


class ConfigError(UserError):
  """An invalid config value: names the dotted field and what is allowed."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config field '{field}': {message}")
    self.field = field


class DataError(UserError):
  """Missing, unreadable or empty data: names the path or dataset."""


class DivergenceError(RuntimeError):
  """Training produced a NaN or Inf; the message names the step and the last good checkpoint."""

  exit_code = 3
