"""Structured importance scores of attention heads and MLP units (higher = keep).

A head's weights: its K columns in each of q, k, v of c_attn and its K rows of attn c_proj.
A unit's weights: its c_fc column and its mlp c_proj row.
  random:    i.i.d. U[0, 1) from `key` (layer i uses fold_in(key, i)).
  magnitude: the L2 norm of all of the unit's weights above.
  wanda:     the RMS norm of the unit's contribution to the block output, ignoring cross terms:
             score = sqrt( sum_{j in unit} (||X_j||_2^2 / n) * ||W_proj[j, :]||_2^2 ),
             X_j the output-projection input feature j (GELU output of unit j, or head output
             feature j) on the dense model's calibration tokens, W_proj that projection's kernel.
             For an MLP unit this is Wanda's |W| * ||X|| with the row norm in place of |W_ij|.

Dimension alphabet: D model, H heads, K head dim, F MLP width.
"""

import jax
import jax.numpy as jnp
import numpy as np

from twist_jax.baselines import validate
from twist_jax.baselines.calibration import collect_inputs
from twist_jax.errors import ConfigError
from twist_jax.model import ModelConfig

METHODS_STRUCTURED = ("random", "magnitude", "wanda")


def _head_sq_norms(block, h: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(sum of squares of each head's q,k,v columns, of its c_proj rows), each (H,)."""
  qkv_Dx3xHxK = np.asarray(block["attn"]["c_attn"]["kernel"], np.float64).reshape(-1, 3, h, k)
  proj_HxKxD = np.asarray(block["attn"]["c_proj"]["kernel"], np.float64).reshape(h, k, -1)
  return (qkv_Dx3xHxK ** 2).sum(axis=(0, 1, 3)), (proj_HxKxD ** 2).sum(axis=(1, 2))


def _unit_sq_norms(block) -> tuple[np.ndarray, np.ndarray]:
  """(sum of squares of each unit's c_fc column, of its c_proj row), each (F,)."""
  fc_DxF = np.asarray(block["mlp"]["c_fc"]["kernel"], np.float64)
  proj_FxD = np.asarray(block["mlp"]["c_proj"]["kernel"], np.float64)
  return (fc_DxF ** 2).sum(axis=0), (proj_FxD ** 2).sum(axis=1)


def magnitude_scores(params, cfg: ModelConfig) -> dict:
  out = {}
  for i in range(cfg.n_layer):
    block = params[f"h_{i}"]
    head_in, head_out = _head_sq_norms(block, cfg.n_head[i], cfg.head_dim)
    unit_in, unit_out = _unit_sq_norms(block)
    out[f"h_{i}"] = {"head": np.sqrt(head_in + head_out), "unit": np.sqrt(unit_in + unit_out)}
  return out


def _contribution_rms(sq_sum_J, count, proj_JxD) -> np.ndarray:
  """Per projection input feature j: (||X_j||^2 / n) * ||W_proj[j, :]||^2, shape (J,)."""
  proj = np.asarray(proj_JxD, np.float64)
  return np.asarray(sq_sum_J) / count * (proj ** 2).sum(axis=1)


def wanda_scores(params, cfg: ModelConfig, calib_windows) -> dict:
  stats = collect_inputs(params, cfg, calib_windows)  # dense model: nothing is pruned yet
  out = {}
  for i in range(cfg.n_layer):
    name, block = f"h_{i}", params[f"h_{i}"]
    attn, mlp = stats[name]["attn"]["c_proj"], stats[name]["mlp"]["c_proj"]
    head_J = _contribution_rms(attn["sq_sum"], attn["count"], block["attn"]["c_proj"]["kernel"])
    unit_F = _contribution_rms(mlp["sq_sum"], mlp["count"], block["mlp"]["c_proj"]["kernel"])
    head_H = head_J.reshape(cfg.n_head[i], cfg.head_dim).sum(axis=1)
    out[name] = {"head": np.sqrt(head_H), "unit": np.sqrt(unit_F)}
  return out


def random_scores(cfg: ModelConfig, key: jax.Array) -> dict:
  out = {}
  for i in range(cfg.n_layer):
    key_head, key_unit = jax.random.split(jax.random.fold_in(key, i))
    out[f"h_{i}"] = {"head": jax.random.uniform(key_head, (cfg.n_head[i],)),
                     "unit": jax.random.uniform(key_unit, (cfg.n_inner[i],))}
  return out


def unit_scores(params, cfg: ModelConfig, method: str, calib_windows=None, key=None) -> dict:
  """{'h_i': {'head': (H,), 'unit': (F,)}} float32 scores; higher means more worth keeping."""
  validate.check_method(method, METHODS_STRUCTURED)
  if method == "random":
    if key is None:
      raise ConfigError("key", "method 'random' needs a PRNG key")
    scores = random_scores(cfg, key)
  elif method == "magnitude":
    scores = magnitude_scores(params, cfg)
  else:
    if calib_windows is None:
      raise ConfigError("calib_windows", "method 'wanda' needs calibration windows (M, L+1)")
    scores = wanda_scores(params, cfg, calib_windows)
  return jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), scores)
