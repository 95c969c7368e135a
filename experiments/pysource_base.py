"""Dense (DDP) pretraining of the shipped bases on the stdlib's Python source (python_source).

The paper-protocol study (twist_jax/studies/paper.py) fine-tunes these bases on python_docs, as
the paper fine-tunes a pretrained GPT-2 on WikiText-103. The argument is
[FAMILY:]SHAPE (twist_jax/experiments.py BASE_FAMILIES; FAMILY defaults to d128):
  full          d128: the main job's model: 4 blocks, D = 128, 8 heads of 16, MLP 512; 7200 steps
  half          the dense model of full's kappa = 0.5 attn_mlp subnet: 4 heads of 16, MLP 256
  narrow_full   half the width (D = 64, 8 heads of 8, MLP 256); 1920 steps (same tokens/param)
  narrow_half   its kappa = 0.5 attn_mlp subnet's shape: 4 heads of 8, MLP 128
  d64:SHAPE     the same four at half those widths (d64:full is D = 64), full and half 7200 steps
  python launch.py --config experiments/pysource_base.py:full --workdir runs/base_full
  python launch.py --config experiments/pysource_base.py:d64:full --workdir runs/base_d64_full
  python launch.py --config experiments/pysource_base.py:smoke --workdir /tmp/smoke  # seconds
`python -m twist_jax.studies.bases --out results/bases [--family d64]` trains a family's four and
ships them.
"""

from twist_jax.config import default_config
from twist_jax.experiments import pysource_base, smoke


def get_config(arg=None):
  if arg == "smoke":
    c = smoke(pysource_base(default_config(), "full"))
    c.data.name = "python_source"
    c.eval.golden_samples = 0
    return c
  family, _, shape = (arg or "full").rpartition(":")
  return pysource_base(default_config(), shape, family or "d128")
