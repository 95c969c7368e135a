"""DDP baseline on the built-in Python-docs corpus, CPU-sized (a few minutes on 2 cores): the
main job's contrast, with its model, data, steps and optimizer.

  python launch.py --config experiments/pydocs_ddp.py --workdir runs/pydocs_ddp
  python launch.py --config experiments/pydocs_ddp.py:smoke --workdir /tmp/smoke   # seconds
  python -m twist_jax.evaluate --workdir runs/pydocs_attn --compare runs/pydocs_ddp  # vs TwIST
"""

from twist_jax.config import default_config
from twist_jax.experiments import smoke


def get_config(arg=None):
  c = default_config()
  c.twist.variant = "ddp"
  c.twist.workers = 4  # data-parallel shards (global batch = workers * data.batch_size)
  c.twist.local_steps = 15  # steps per compiled call; DDP averages gradients every step
  c.data.batch_size = 4  # the main job's batch, steps, learning rate and warm-up
  c.steps = 900  # (experiments/pydocs_attn.py)
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 30
  if arg == "smoke":
    smoke(c)
  elif arg is not None:
    raise ValueError(f"config argument must be smoke or nothing (got {arg!r})")
  return c
