"""DDP baseline on the built-in Python-docs corpus, CPU-sized (a few minutes on 2 cores): the
main job's contrast, with its model, data, steps and optimizer.

  python launch.py --config experiments/pydocs_ddp.py --workdir runs/pydocs_ddp
  python launch.py --config experiments/pydocs_ddp.py:smoke --workdir /tmp/smoke   # seconds
  python -m twist_jax.evaluate --workdir runs/pydocs_attn --compare runs/pydocs_ddp  # vs TwIST
"""

from twist_jax.config import default_config
from twist_jax.experiments import pydocs_schedule, smoke


def get_config(arg=None):
  # The main job's workers (here data-parallel shards), batch, steps and optimizer; DDP averages
  # gradients every step, so local_steps is only the number of steps per compiled call.
  c = pydocs_schedule(default_config())
  c.twist.variant = "ddp"
  if arg == "smoke":
    smoke(c)
  elif arg is not None:
    raise ValueError(f"config argument must be smoke or nothing (got {arg!r})")
  return c
