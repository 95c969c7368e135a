"""The main job with the training levers that won the equal-FLOPs study (results/levers/): an
outer Nesterov step on each round's change (lr 0.7, momentum 0.9), a nested core of a quarter
of each layer's heads in every subnet, and (as in the main job itself) DDP for the first third
of the steps.

  python launch.py --config experiments/pydocs_levers.py --workdir runs/pydocs_levers
  python launch.py --config experiments/pydocs_levers.py:smoke --workdir /tmp/smoke   # seconds

Such a run deploys core + random subnets; the closing golden-ticket table draws fully random
ones, which the study found worse than plain TwIST's (results/levers/levers.md, B* rows). The
study measured the levers on fine-tuning runs; this file applies them from scratch, untimed and
untuned.
"""

import importlib.util
import os


def _main_job():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pydocs_attn.py")
  spec = importlib.util.spec_from_file_location("pydocs_attn", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _main_job().get_config(arg)
  c.twist.outer_lr = 0.7
  c.twist.outer_momentum = 0.9
  c.subnet.core = 0.25
  return c
