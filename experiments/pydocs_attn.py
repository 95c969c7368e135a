"""TwIST on the built-in Python-docs corpus: S = 4 attention subnets at kappa = 0.5, R = 15.

The README's main job: 900 steps, the first third of them dense (DDP on the same four workers)
and the rest TwIST rounds, then the closing golden-ticket table; about 3.3 minutes on 2 idle
cores (results/main_job/README.md has the measurement and the numbers).
  python launch.py --config experiments/pydocs_attn.py --workdir runs/pydocs_attn
  python launch.py --config experiments/pydocs_attn.py:smoke --workdir /tmp/smoke   # seconds
Variants: --config.twist.variant=true|masked|hybrid (all three compute the same thing).
Shorter runs keep at most their steps dense: --config.steps=300 --config.twist.dense_steps=90
(a multiple of R, or 0 for TwIST from the first step).
"""

from twist_jax.config import default_config
from twist_jax.experiments import pydocs_schedule, smoke


def get_config(arg=None):
  c = pydocs_schedule(default_config())  # S = 4 workers, R = 15, 900 steps, lr 3e-3
  c.twist.variant = "true"  # physical subnets: each worker trains a half-width dense GPT-2
  c.subnet.mode = "attn"
  c.subnet.kappa = 0.5
  c.subnet.sampler = "cover"
  c.subnet.correction = "mean"
  # Dense warm-up: the first 300 steps (a third, 20 whole rounds) are DDP on the same workers.
  # Pure TwIST from scratch sits on a ~2.6 nats/byte plateau for most of a 5-minute budget;
  # starting from a dense third reaches 2.20 in the same steps (results/main_job/tuning/).
  c.twist.dense_steps = 300
  if arg == "smoke":
    smoke(c)
    c.twist.dense_steps = 0  # the smoke run checks the TwIST rounds from the first step
  elif arg is not None:
    raise ValueError(f"config argument must be smoke or nothing (got {arg!r})")
  return c
