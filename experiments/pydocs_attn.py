"""TwIST on the built-in Python-docs corpus: S = 4 attention subnets at kappa = 0.5, R = 15.

The README's main job: about 5 minutes on 2 CPU cores.
  python launch.py --config experiments/pydocs_attn.py --workdir runs/pydocs_attn
  python launch.py --config experiments/pydocs_attn.py:smoke --workdir /tmp/smoke   # seconds
Variants: --config.twist.variant=true|masked|hybrid (all three compute the same thing).
"""

from twist_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.twist.variant = "true"  # physical subnets: each worker trains a half-width dense GPT-2
  c.twist.workers = 4  # S
  c.twist.local_steps = 15  # R
  c.subnet.mode = "attn"
  c.subnet.kappa = 0.5
  c.subnet.sampler = "cover"
  c.subnet.correction = "mean"
  c.steps = 900  # 60 rounds; the golden-ticket effect needs >= ~600 steps at this size
  if arg == "smoke":
    c.model.update(n_layer=2, n_head=4, n_embd=32, context=32)
    c.data.batch_size = 4
    c.steps, c.twist.local_steps = 30, 5
    c.opt.warmup_steps = 5
    c.eval.update(every=30, max_windows=32)
    c.ckpt.every = 15
  return c
