"""TwIST on GPT-2 124M / WikiText-103, attn_mlp subnets: S = 4, kappa = 0.5, R = 15 (paper scale).

  python launch.py --config experiments/gpt2_attn_mlp.py --workdir runs/gpt2_attn_mlp        # from scratch
  python launch.py --config experiments/gpt2_attn_mlp.py:hf --workdir runs/gpt2_attn_mlp_ft  # fine-tune HF gpt2
  python launch.py --config experiments/gpt2_attn_mlp.py:smoke --workdir /tmp/smoke      # CPU, seconds
WikiText-103 downloads once into data.data_dir (or set --config.data.manual_dir to a folder
holding wikitext-103-raw-v1.zip). GPU: pip install -e ".[cuda12]".
"""

from twist_jax.experiments import base, gpt2_124m


def get_config(arg=None):
  c = base("true", "attn_mlp")
  c.twist.workers = 4  # S
  c.twist.local_steps = 15  # R: the paper resamples every 15 batches
  c.subnet.kappa = 0.5
  return gpt2_124m(c, arg)
