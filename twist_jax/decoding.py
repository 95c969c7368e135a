"""KV-cached decoding of a model.py GPT-2 (full or an extracted subnet, per-layer widths and
correction scales included): `prefill` a prompt once, then `decode` one position at a time.

Dimension alphabet as in model.py: B batch, D model width, H heads, K head dim, P positions,
T new positions, V vocab.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from twist_jax.model import MLP, Linear, ModelConfig

# The same parameters run through the same submodules (LayerNorm, Linear, MLP, Embed applied to
# their param subtrees), only attention differs: keys and values live in a fixed-size cache of P
# positions per layer, (B, H, P, K) each, so every decode step has one shape and compiles once.
# Masks (the Masked variant) are a training device and are not supported here.


def init_cache(cfg: ModelConfig, batch: int) -> tuple:
  """Empty cache: per layer a (keys, values) pair of zeros (B, H_l, P, K) in the compute dtype."""
  zeros = lambda h: jnp.zeros((batch, h, cfg.n_positions, cfg.head_dim), jnp.dtype(cfg.dtype))
  return tuple((zeros(h), zeros(h)) for h in cfg.n_head)


def cast_weights(params, cfg: ModelConfig, dtype) -> tuple[dict, ModelConfig]:
  """(params, cfg) that decode with floating weights stored in `dtype` and computing in it:
  bfloat16 halves the bytes every decode step reads. As in training's mixed precision, the
  attention scores, softmax and LayerNorm statistics stay float32, and the cache is in `dtype`."""
  dtype = jnp.dtype(dtype)
  # Leaves already in dtype are kept, not copied (XL's float32 weights are 6 GB).
  cast = lambda x: (x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype
                    else x)
  return jax.tree.map(cast, params), cfg.replace(dtype=dtype.name)


def _embed(params, cfg: ModelConfig, tokens_BxT, pos_T):
  dtype = jnp.dtype(cfg.dtype)
  embed = lambda name, n, ids: nn.Embed(n, cfg.n_embd, dtype=dtype).apply(
      {"params": params[name]}, ids)
  return (embed("wte", cfg.vocab_size, tokens_BxT) +
          embed("wpe", cfg.n_positions, pos_T)[None]).astype(dtype)


def _cached_block(p, cfg: ModelConfig, i: int, x_BxTxD, attend):
  """`Block` without masks, with attention core `attend(q, k, v) -> (out, new layer cache)`."""
  dtype = jnp.dtype(cfg.dtype)
  ln = lambda name, x: nn.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype).apply(
      {"params": p[name]}, x)
  b, t, _ = x_BxTxD.shape
  h, k = cfg.n_head[i], cfg.head_dim
  qkv = Linear(3 * h * k, dtype).apply({"params": p["attn"]["c_attn"]}, ln("ln_1", x_BxTxD))
  qkv_Bx3xTxHxK = jnp.moveaxis(qkv.reshape(b, t, 3, h, k), 2, 1)
  out_BxTxHxK, layer_cache = attend(qkv_Bx3xTxHxK[:, 0], qkv_Bx3xTxHxK[:, 1], qkv_Bx3xTxHxK[:, 2])
  x_BxTxD = x_BxTxD + Linear(cfg.n_embd, dtype).apply(
      {"params": p["attn"]["c_proj"]}, out_BxTxHxK.reshape(b, t, h * k), cfg.attn_scale[i])
  mlp = MLP(cfg.n_inner[i], cfg.n_embd, 0.02, cfg.mlp_scale[i], dtype)
  return x_BxTxD + mlp.apply({"params": p["mlp"]}, ln("ln_2", x_BxTxD)), layer_cache


def _final(params, cfg: ModelConfig, x_xD):
  return nn.LayerNorm(cfg.layer_norm_epsilon, dtype=jnp.dtype(cfg.dtype)).apply(
      {"params": params["ln_f"]}, x_xD)


def prefill(params, cfg: ModelConfig, tokens_BxT):
  """Hidden states (B, T, D) of positions 0..T-1 (feed them to `lm_head`) and a cache whose
  first T positions hold their keys and values (the rest zeros). T <= P."""
  b, t = tokens_BxT.shape
  if t > cfg.n_positions:
    raise ValueError(f"prefill length {t} exceeds n_positions={cfg.n_positions}")
  impl = None if cfg.attention == "auto" else cfg.attention
  to_cache = lambda x_BxTxHxK: jnp.pad(jnp.swapaxes(x_BxTxHxK, 1, 2),
                                       ((0, 0), (0, 0), (0, cfg.n_positions - t), (0, 0)))

  def attend(q, k, v):  # plain causal attention among the T new positions
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return out, (to_cache(k), to_cache(v))

  x_BxTxD, cache = _embed(params, cfg, tokens_BxT, jnp.arange(t)), []
  for i in range(cfg.n_layer):
    x_BxTxD, layer_cache = _cached_block(params[f"h_{i}"], cfg, i, x_BxTxD, attend)
    cache.append(layer_cache)
  return _final(params, cfg, x_BxTxD), tuple(cache)


def _after(x, dep):
  """x, made to data-depend on `dep` (exactly x: dep is finite, so 0 * dep is zero), so that
  XLA computes dep before any user of the result. decode writes the new key and value through
  it after `out`, which reads both caches: with the write first, XLA copies the whole cache
  every step to keep the old one readable. jax.lax.optimization_barrier does not order them (the
  CPU compiler expands it before copy insertion; test_decode_loop_updates_the_cache_in_place
  sees the copies), nor does writing first and reading the updated cache."""
  return x + (0 * dep).astype(x.dtype)


def _attend_cache(q_Bx1xHxK, k_Bx1xHxK, v_Bx1xHxK, layer_cache, pos):
  """Attention of one position over cached positions 0..pos-1 plus itself; returns the cache
  with its key/value written at `pos`. The scores read the cache as it was (entries at pos and
  after masked, stale or zero) and take the new key separately: a read of the freshly updated
  cache would make XLA copy the whole cache every step instead of updating it in place."""
  kc_BxHxPxK, vc_BxHxPxK = layer_cache
  q_BxHxK, kn_BxHxK, vn_BxHxK = (x[:, 0] for x in (q_Bx1xHxK, k_Bx1xHxK, v_Bx1xHxK))
  scale = jnp.sqrt(jnp.float32(q_BxHxK.shape[-1]))
  # As jax.nn.dot_product_attention: float32 scores and softmax, values in the compute dtype.
  old_BxHxP = jnp.einsum("bhk,bhpk->bhp", q_BxHxK, kc_BxHxPxK,
                         preferred_element_type=jnp.float32) / scale
  old_BxHxP = jnp.where(jnp.arange(kc_BxHxPxK.shape[2]) < pos, old_BxHxP,
                        jnp.finfo(jnp.float32).min)
  new_BxHx1 = jnp.einsum("bhk,bhk->bh", q_BxHxK, kn_BxHxK,
                         preferred_element_type=jnp.float32)[..., None] / scale
  w_BxHxPp1 = jax.nn.softmax(jnp.concatenate([old_BxHxP, new_BxHx1], -1), axis=-1)
  w_BxHxPp1 = w_BxHxPp1.astype(vc_BxHxPxK.dtype)
  out_BxHxK = (jnp.einsum("bhp,bhpk->bhk", w_BxHxPp1[..., :-1], vc_BxHxPxK) +
               w_BxHxPp1[..., -1:] * vn_BxHxK)
  kc_BxHxPxK, vc_BxHxPxK = (
      jax.lax.dynamic_update_slice(c, _after(x, out_BxHxK)[:, :, None].astype(c.dtype),
                                   (0, 0, pos, 0))
      for c, x in ((kc_BxHxPxK, kn_BxHxK), (vc_BxHxPxK, vn_BxHxK)))
  return out_BxHxK[:, None].astype(q_Bx1xHxK.dtype), (kc_BxHxPxK, vc_BxHxPxK)


def decode(params, cfg: ModelConfig, tokens_B, pos, cache):
  """One position: the hidden state (B, D) of `tokens_B` at position `pos` (< P, a traced
  scalar) given the cache of positions 0..pos-1, and the cache with `pos` written."""
  x_Bx1xD, new_cache = _embed(params, cfg, tokens_B[:, None], pos[None]), []
  for i in range(cfg.n_layer):
    attend = lambda q, k, v, c=cache[i]: _attend_cache(q, k, v, c, pos)
    x_Bx1xD, layer_cache = _cached_block(params[f"h_{i}"], cfg, i, x_Bx1xD, attend)
    new_cache.append(layer_cache)
  return _final(params, cfg, x_Bx1xD[:, 0]), tuple(new_cache)
