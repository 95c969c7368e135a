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
