"""Shared pieces of the shipped experiment configs (experiments/*.py import these)."""

import ml_collections

from twist_jax.config import default_config


def gpt2_124m(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """GPT-2 124M on WikiText-103 with the GPT-2 tokenizer (paper scale, one GPU or more).

  `arg`: None (random init), 'hf' (fine-tune Hugging Face 'gpt2', as the paper does) or
  'smoke' (a seconds-long CPU run of the same code path on the built-in corpus).
  """
  c.model.update(n_layer=12, n_head=12, n_embd=768, context=1024, dtype="bfloat16",
                 attention="auto")
  c.data.update(name="wikitext103", tokenizer="gpt2", batch_size=16)
  # Each worker's 16 x 1024 tokens as 8 sequential microbatches of 2 (same update, no
  # recompute), so 4 workers fit in 60 GB on one device (results/bench/memory_gpt2.json).
  c.data.microbatch = 2
  # A device's workers one after another (running sums): on one GPU, one worker's activations
  # and slices at a time instead of four (twist.worker_loop; same round up to roundoff).
  c.twist.worker_loop = "scan"
  c.steps = 30_000
  c.opt.update(lr=6e-4, warmup_steps=1000, weight_decay=0.1)
  c.eval.update(every=1500, max_windows=0, batch_size=16)
  c.ckpt.update(every=1500, keep=3)
  if arg == "hf":
    c.init.hf = "gpt2"  # a hub id or a local folder with config.json + model.safetensors
    c.opt.update(lr=1e-4, warmup_steps=100)
    c.steps = 6_000
  elif arg == "smoke":
    smoke(c)
  elif arg is not None:
    raise ValueError(f"config argument must be one of: hf, smoke (got {arg!r})")
  return c


def pydocs_schedule(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The main job's schedule on the built-in corpus, which its DDP contrast shares.

  Four workers at batch 4 each, 15 steps per compiled call (TwIST's R), 900 steps, peak learning
  rate 3e-3 after a 30-step warm-up: the main job (experiments/pydocs_attn.py) and its DDP
  contrast (experiments/pydocs_ddp.py) take it from here, so they cannot drift apart.
  """
  c.twist.workers = 4
  c.twist.local_steps = 15
  c.data.batch_size = 4  # per worker: more, smaller steps in the same time
  c.steps = 900  # 60 rounds of 15 steps
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 30
  return c


# The pretrained bases (twist_jax/studies/bases.py): name -> (n_embd, n_head, head_dim, n_inner).
BASE_SHAPES = {
    "full": (128, 8, 16, 512),  # the main job's model (0.84M params at V = 256)
    "half": (128, 4, 16, 256),  # full's kappa = 0.5 attn_mlp subnet as a dense model
    "narrow_full": (64, 8, 8, 256),  # half the width: the width-trend point
    "narrow_half": (64, 4, 8, 128),  # its kappa = 0.5 attn_mlp subnet's shape
}
# Equal tokens per parameter within each width: narrow_full has 224,640 params to full's 842,496
# (~35 tokens per parameter: 7200 steps x 4 workers x 8 windows x 128 tokens over 0.84M).
BASE_STEPS = {"full": 7200, "half": 7200, "narrow_full": 1920, "narrow_half": 1920}


def pysource_base(c: ml_collections.ConfigDict, shape: str) -> ml_collections.ConfigDict:
  """Dense (DDP) pretraining of base `shape` on python_source, the stdlib's code.

  Every shape sees the same windows in the same order (same seed, workers and batch); a pair
  (full, half) differs only in its model and so measures what width buys at this budget.
  """
  if shape not in BASE_SHAPES:
    raise ValueError(f"base shape must be one of {', '.join(BASE_SHAPES)} (got {shape!r})")
  c.twist.variant = "ddp"
  c.twist.workers = 4
  c.twist.local_steps = 15
  c.data.update(name="python_source", tokenizer="bytes", batch_size=8)
  c.opt.update(lr=3e-3, warmup_steps=100)
  c.eval.update(every=600, max_windows=512, golden_samples=0)  # windows spread over the split
  c.ckpt.update(every=600, keep=2)
  c.log.every = 4
  d, h, k, f = BASE_SHAPES[shape]
  c.model.update(n_embd=d, n_head=h, head_dim=k, n_inner=f)
  c.steps = BASE_STEPS[shape]
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Seconds on a CPU: tiny model, built-in corpus, a few rounds, one checkpoint mid-way."""
  c.model.update(n_layer=2, n_head=4, n_embd=32, context=32, dtype="float32", attention="xla")
  c.data.update(name="python_docs", tokenizer="bytes", batch_size=4)
  c.init.hf = ""
  c.steps, c.twist.local_steps = 30, 5
  c.opt.warmup_steps = 5
  c.eval.update(every=30, max_windows=32, batch_size=32)
  c.ckpt.update(every=15, keep=2)
  c.subnet.shared_layers = ()  # the smoke model has only two blocks
  return c


def base(variant: str, mode: str = "attn") -> ml_collections.ConfigDict:
  c = default_config()
  c.twist.variant = variant
  c.subnet.mode = mode
  return c
