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


# The pretrained bases (twist_jax/studies/bases.py), in families of four shapes with the same names:
# family -> shape -> ((n_embd, n_head, head_dim, n_inner), pretraining steps). In each family
# `half` is `full`'s kappa = 0.5 attn_mlp subnet as a dense model, `narrow_*` the same pair at half
# the width (the study's width-trend point), and the narrow pair trains to full's tokens per
# parameter. Every step is 4 workers x 8 windows x 128 tokens.
BASE_FAMILIES = {
    # The main job's model (0.84M params at V = 256); 7200 steps = 35 tokens per parameter.
    "d128": {"full": ((128, 8, 16, 512), 7200), "half": ((128, 4, 16, 256), 7200),
             "narrow_full": ((64, 8, 8, 256), 1920), "narrow_half": ((64, 4, 8, 128), 1920)},
    # Half the width, the same 7200 steps (131 tokens per parameter): a capacity-limited pair.
    # The d128 half base trails its full one by only 0.052 nats after 7200 steps, and that gap
    # stopped growing from step 2400 on (results/bases/bases.png), while d128's narrow pair
    # already trailed by 0.056 at a quarter of the tokens with its gap still growing.
    "d64": {"full": ((64, 8, 8, 256), 7200), "half": ((64, 4, 8, 128), 7200),
            "narrow_full": ((32, 8, 4, 128), 2025), "narrow_half": ((32, 4, 4, 64), 2025)},
}
BASE_SHAPES = tuple(BASE_FAMILIES["d128"])  # the shape names, the same in every family


def pysource_base(c: ml_collections.ConfigDict, shape: str,
                  family: str = "d128") -> ml_collections.ConfigDict:
  """Dense (DDP) pretraining of base `shape` of `family` on python_source, the stdlib's code.

  Every shape sees the same windows in the same order (same seed, workers and batch); a pair
  (full, half) differs only in its model and so measures what width buys at this budget.
  """
  if family not in BASE_FAMILIES:
    raise ValueError(f"base family must be one of {', '.join(BASE_FAMILIES)} (got {family!r})")
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
  (d, h, k, f), c.steps = BASE_FAMILIES[family][shape]
  c.model.update(n_embd=d, n_head=h, head_dim=k, n_inner=f)
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
