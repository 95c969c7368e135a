"""DDP baseline on the built-in Python-docs corpus, CPU-sized (a few minutes on 2 cores).

  python launch.py --config experiments/pydocs_ddp.py --workdir runs/pydocs_ddp
  python launch.py --config experiments/pydocs_ddp.py:smoke --workdir /tmp/smoke   # seconds
"""

from twist_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.twist.variant = "ddp"
  c.twist.workers = 4  # data-parallel shards (global batch = workers * data.batch_size)
  c.twist.local_steps = 15  # steps per compiled call; DDP averages gradients every step
  c.steps = 900
  if arg == "smoke":
    c.model.update(n_layer=2, n_head=4, n_embd=32, context=32)
    c.data.batch_size = 4
    c.steps, c.twist.local_steps = 30, 5
    c.opt.warmup_steps = 5
    c.eval.update(every=30, max_windows=32)
    c.ckpt.every = 15
  return c
