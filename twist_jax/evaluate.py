"""Evaluation: perplexity under a stated protocol (DESIGN.md section 7).

Perplexity = exp(mean token NLL) over non-overlapping windows of context + 1 tokens of the
validation split; `data.protocol` gives the one-line description printed with every number.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from twist_jax.model import GPT2, ModelConfig, next_token_nll


@functools.partial(jax.jit, static_argnums=(1,))
def _window_nll_sum(params, cfg: ModelConfig, windows_BxLp1, masks=None):
  logits = GPT2(cfg).apply({"params": params}, windows_BxLp1[:, :-1], masks)
  return next_token_nll(logits, windows_BxLp1[:, 1:]).sum()


def mean_nll(params, cfg: ModelConfig, windows_MxLp1: np.ndarray, batch_size: int = 32,
             masks=None) -> float:
  """Mean next-token NLL (nats) over all windows; the last batch is padded, not dropped."""
  windows_MxLp1 = np.asarray(windows_MxLp1, np.int32)
  total, count = 0.0, 0
  for start in range(0, len(windows_MxLp1), batch_size):
    chunk = windows_MxLp1[start:start + batch_size]
    total += float(_window_nll_sum(params, cfg, jnp.asarray(chunk), masks))
    count += chunk.shape[0] * (chunk.shape[1] - 1)
  return total / count


def perplexity(nll: float) -> float:
  return float(math.exp(min(nll, 700.0)))
