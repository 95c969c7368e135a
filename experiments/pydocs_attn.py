"""TwIST on the built-in Python-docs corpus: S = 4 attention subnets at kappa = 0.5, R = 15.

The README's main job: 663 s of CPU time for training and the closing golden-ticket table, about
5.5 minutes on 2 idle cores (results/main_job/README.md has the measurement and the numbers).
  python launch.py --config experiments/pydocs_attn.py --workdir runs/pydocs_attn
  python launch.py --config experiments/pydocs_attn.py:smoke --workdir /tmp/smoke   # seconds
Variants: --config.twist.variant=true|masked|hybrid (all three compute the same thing).
"""

from twist_jax.config import default_config
from twist_jax.experiments import smoke


def get_config(arg=None):
  c = default_config()
  c.twist.variant = "true"  # physical subnets: each worker trains a half-width dense GPT-2
  c.twist.workers = 4  # S
  c.twist.local_steps = 15  # R
  c.subnet.mode = "attn"
  c.subnet.kappa = 0.5
  c.subnet.sampler = "cover"
  c.subnet.correction = "mean"
  c.steps = 480  # 32 rounds (results/main_job/: val loss 2.54, still near its early plateau)
  c.opt.lr = 5e-3  # short run: a higher peak than the default 3e-3, reached sooner
  c.opt.warmup_steps = 30
  if arg == "smoke":
    smoke(c)
  elif arg is not None:
    raise ValueError(f"config argument must be smoke or nothing (got {arg!r})")
  return c
