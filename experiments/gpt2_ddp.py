"""DDP baseline: GPT-2 124M on WikiText-103 (paper scale).

  python launch.py --config experiments/gpt2_ddp.py --workdir runs/gpt2_ddp
  python launch.py --config experiments/gpt2_ddp.py:hf --workdir runs/gpt2_ddp_ft   # fine-tune
  python launch.py --config experiments/gpt2_ddp.py:smoke --workdir /tmp/smoke       # CPU
"""

from twist_jax.experiments import base, gpt2_124m


def get_config(arg=None):
  c = base("ddp")
  c.twist.workers = 4  # data-parallel shards (global batch = 4 x 16 x 1024 tokens)
  c.twist.local_steps = 15  # steps per compiled call; gradients are averaged every step
  return gpt2_124m(c, arg)
