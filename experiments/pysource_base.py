"""Dense (DDP) pretraining of the shipped bases on the stdlib's Python source (python_source).

The study in twist_jax/studies/paper.py fine-tunes these bases on python_docs, the way the paper
fine-tunes a pretrained GPT-2 on WikiText-103. Four shapes, one argument each:
  full          the main job's model: 4 blocks, D = 128, 8 heads, MLP 512
  half          the dense model of full's kappa = 0.5 attn_mlp subnet: 4 heads of 16, MLP 256
  narrow_full   half the width (D = 64, 8 heads of 8, MLP 256): the width-trend point
  narrow_half   its kappa = 0.5 attn_mlp subnet's shape: 4 heads of 8, MLP 128
Each pair sees the same tokens in the same order (same seed, batch and steps).
  python launch.py --config experiments/pysource_base.py:full --workdir runs/base_full
  python launch.py --config experiments/pysource_base.py:smoke --workdir /tmp/smoke  # seconds
`python -m twist_jax.studies.bases --out results/bases` runs all four and ships them.
"""

from twist_jax.config import default_config
from twist_jax.experiments import smoke

SHAPES = {  # n_embd, n_head, head_dim, n_inner
    "full": (128, 8, 16, 512),
    "half": (128, 4, 16, 256),
    "narrow_full": (64, 8, 8, 256),
    "narrow_half": (64, 4, 8, 128),
}
# Equal tokens per parameter within each width: narrow_full has 224,640 params to full's 842,496.
STEPS = {"full": 7200, "half": 7200, "narrow_full": 1920, "narrow_half": 1920}


def get_config(arg=None):
  c = default_config()
  c.twist.variant = "ddp"
  c.twist.workers = 4
  c.twist.local_steps = 15
  c.data.update(name="python_source", tokenizer="bytes", batch_size=8)
  c.opt.update(lr=3e-3, warmup_steps=100)
  c.eval.update(every=600, max_windows=512, golden_samples=0)  # windows spread over the split
  c.ckpt.update(every=600, keep=2)
  c.log.every = 4
  shape = arg or "full"
  if shape == "smoke":
    smoke(c)
    c.data.name = "python_source"
    c.eval.golden_samples = 0
    return c
  if shape not in SHAPES:
    raise ValueError(f"config argument must be one of {', '.join(SHAPES)}, smoke (got {arg!r})")
  d, h, k, f = SHAPES[shape]
  c.model.update(n_embd=d, n_head=h, head_dim=k, n_inner=f)
  c.steps = STEPS[shape]
  return c
