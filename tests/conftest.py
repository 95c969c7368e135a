"""Test setup: CPU with 8 fake devices, set before JAX initialises."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (must follow the environment set-up)

jax.config.update("jax_numpy_rank_promotion", "raise")
