"""Losses of one model and of many random subnets on the same validation windows, and the
summary of a loss distribution (docs/method.md §7).

Perplexity = exp(mean token NLL) over non-overlapping windows of context + 1 tokens. Many subnets
of one ratio share one compiled function: index values are data (vmapped), only the sizes (the
spec) are static. Losses use the training's chunked cross-entropy (`model.lm_nll_sums`), so the
float32 logits of a whole batch over the vocabulary never exist at once.

Dimension alphabet: S subnets, B batch (windows), L length, M all windows.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from twist_jax import subnet_spec, subnets
from twist_jax.model import ModelConfig, lm_nll_sums

# ---- perplexity of one model ---------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1,))
def _window_nll_sum(params, cfg: ModelConfig, windows_BxLp1, masks=None):
  return jnp.sum(lm_nll_sums(params, cfg, windows_BxLp1, masks))


def mean_nll(params, cfg: ModelConfig, windows_MxLp1: np.ndarray, batch_size: int = 32,
             masks=None, sharding=None) -> float:
  """Mean next-token NLL (nats) over all windows (a smaller last batch is kept, not dropped).

  `sharding`: where to put each batch, e.g. replicated over the training mesh when the params
  live there (several processes); default: the default device.
  """
  windows_MxLp1 = np.asarray(windows_MxLp1, np.int32)
  put = (lambda x: jax.device_put(x, sharding)) if sharding is not None else jnp.asarray
  total, count = 0.0, 0
  for start in range(0, len(windows_MxLp1), batch_size):
    chunk = windows_MxLp1[start:start + batch_size]
    total += float(_window_nll_sum(params, cfg, put(chunk), masks))
    count += chunk.shape[0] * (chunk.shape[1] - 1)
  return total / count


def perplexity(nll: float) -> float:
  return float(math.exp(min(nll, 700.0)))


# ---- many subnets of one ratio -------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def random_subnets(key: jax.Array, spec: subnet_spec.SubnetSpec, samples: int):
  """`samples` independent uniform subnets, leading axis S; sample n depends on (key, n) only,
  so a larger `samples` extends the same draws."""
  keys_S = jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(samples))
  draws = jax.vmap(lambda k: subnets.sample_subnets(k, spec, 1))(keys_S)
  return jax.tree.map(lambda x: x[:, 0], draws)  # drop the W = 1 axis


def kappa_key(seed: int, kappa: float) -> jax.Array:
  """The key of one ratio's draws: keyed by the ratio's value, not its position, so adding
  kappas leaves the others' draws unchanged."""
  return jax.random.fold_in(jax.random.key(seed), int(round(kappa * 1_000_000)))


def keeps_everything(spec: subnet_spec.SubnetSpec) -> bool:
  """True when every subnet of `spec` is the whole model (then all draws are identical)."""
  if spec.mode == "blocks":
    return spec.keep_blocks == len(spec.partitioned)
  return spec.keep_head == spec.n_head and spec.keep_unit == spec.n_inner


@functools.partial(jax.jit, static_argnums=(1, 2))
def _subnets_nll_sums(params, cfg: ModelConfig, spec: subnet_spec.SubnetSpec, subnets_S,
                      windows_BxLp1, weight_B):
  """(S,) NLL sums of the extracted dense subnets on one batch (padding windows weigh 0)."""
  small_cfg = subnets.subnet_model_config(cfg, spec)

  def one(subnet):
    # The deployed model itself: sliced weights, correction folded into the scales.
    small = subnets.extract_subnet(params, subnet, spec)
    return jnp.dot(lm_nll_sums(small, small_cfg, windows_BxLp1), weight_B)

  return jax.vmap(one)(subnets_S)


def _pad(x, size: int):
  """x padded along axis 0 to `size` by repeating its last row (keeps shapes static)."""
  extra = size - x.shape[0]
  return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])


def subnet_losses(params, cfg: ModelConfig, spec: subnet_spec.SubnetSpec, subnets_S,
                  windows_MxLp1: np.ndarray, *, batch_size: int = 32, subnet_batch: int = 8,
                  bar=None) -> np.ndarray:
  """(S,) mean next-token NLL of every subnet on the same windows.

  One call evaluates `subnet_batch` subnets on batch_size // subnet_batch windows, so peak memory
  is that of a plain eval batch; the last chunks are padded, so one compile serves all subnets.
  """
  windows_MxLp1 = np.asarray(windows_MxLp1, np.int32)
  m, s = windows_MxLp1.shape[0], jax.tree.leaves(subnets_S)[0].shape[0]
  sb = min(subnet_batch, s)
  bw = min(max(1, batch_size // sb), m)
  out = []
  for lo in range(0, s, sb):
    chunk = jax.tree.map(lambda x: _pad(x[lo:lo + sb], sb), subnets_S)
    total_S = jnp.zeros((sb,), jnp.float32)
    for start in range(0, m, bw):
      real = min(bw, m - start)
      win = _pad(jnp.asarray(windows_MxLp1[start:start + bw]), bw)
      weight = jnp.asarray(np.arange(bw) < real, jnp.float32)
      total_S = total_S + _subnets_nll_sums(params, cfg, spec, chunk, win, weight)
    out.append(np.asarray(total_S, np.float64)[:min(sb, s - lo)])  # one host sync per chunk
    if bar is not None:
      bar.update(out[-1].shape[0])
  return np.concatenate(out) / (m * (windows_MxLp1.shape[1] - 1))


def ratio_losses(params, cfg: ModelConfig, spec: subnet_spec.SubnetSpec, kappa: float,
                 samples: int, windows_MxLp1, *, seed: int = 0, batch_size: int = 32,
                 full_loss: float | None = None, bar=None) -> np.ndarray:
  """(samples,) losses of the random subnets of one ratio, drawn from kappa_key(seed, kappa).

  A spec that keeps everything is the full model for every draw: `full_loss` (computed here if
  not given) repeated, without evaluating the same model `samples` times.
  """
  if keeps_everything(spec):
    if bar is not None:
      bar.update(samples)
    full = mean_nll(params, cfg, windows_MxLp1, batch_size) if full_loss is None else full_loss
    return np.full((samples,), full)
  subnets_S = random_subnets(kappa_key(seed, kappa), spec, samples)
  return subnet_losses(params, cfg, spec, subnets_S, windows_MxLp1, batch_size=batch_size,
                       bar=bar)


def distribution(losses) -> dict:
  """All values plus mean / std (population, ddof=0) / min / max and the PPL of the mean."""
  arr = np.asarray(losses, np.float64)
  return {"losses": [float(x) for x in arr], "mean": float(arr.mean()), "std": float(arr.std()),
          "min": float(arr.min()), "max": float(arr.max()), "ppl_mean": perplexity(arr.mean())}
