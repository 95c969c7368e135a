"""GPT-2 as a linen module with Hugging Face parameter names and per-layer widths.

The model knows nothing of workers: a TwIST subnet is the same module built with fewer heads,
a narrower MLP or fewer blocks, optionally with unit gates (`masks`) for the Masked variant.
It also owns the losses (next-token CE and in-place distillation, both chunked over the sequence
so the float32 (B, L, V) logits never exist at once); decoding.py runs the same parameters with a
KV cache.

Dimension alphabet: B batch, L length, D model width, H heads, K head dim, F MLP width,
V vocab, N layers, P positions, C loss chunk, T new positions.
"""

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn", "auto")
DTYPES = ("float32", "bfloat16")
# Activation checkpointing of each block (`ModelConfig.remat`): what the backward pass keeps
# from the forward pass; everything else in the block is recomputed. None = no checkpoint.
# False / True are the older boolean form ("none" / "block").
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,  # only each block's input
    # The outputs of the weight matmuls (c_attn, c_proj, c_fc): recomputes the attention core,
    # GELU and LayerNorms, which are cheap next to the matmuls (no second pass through them).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static shape of a (sub)model. Per-layer tuples have one entry per block."""

  vocab_size: int = 256
  n_positions: int = 128  # P: maximum context
  n_embd: int = 64  # D
  head_dim: int = 16  # K (D / H of the full model; kept when heads are dropped)
  n_head: tuple[int, ...] = (4, 4)  # H per layer
  n_inner: tuple[int, ...] = (256, 256)  # F per layer
  # Activation-shift correction: multiplies each branch's output-projection kernel term.
  attn_scale: tuple[float, ...] = (1.0, 1.0)
  mlp_scale: tuple[float, ...] = (1.0, 1.0)
  dtype: str = "float32"  # compute dtype; params stay float32
  attention: str = "xla"  # xla | cudnn | auto (jax.nn.dot_product_attention implementation)
  layer_norm_epsilon: float = 1e-5
  remat: bool | str = False  # a REMAT_POLICIES name (or False / True = none / block)

  @property
  def n_layer(self) -> int:
    return len(self.n_head)

  @property
  def remat_policy(self) -> str:
    """`remat` as a REMAT_POLICIES name."""
    return remat_name(self.remat)

  @classmethod
  def uniform(cls, *, n_layer: int, n_head: int, n_embd: int, n_inner: int | None = None,
              head_dim: int | None = None, **kw) -> "ModelConfig":
    """A plain GPT-2 shape: every layer has H heads of K = head_dim (default D/H) and
    F = n_inner (default 4D) units."""
    if not head_dim and n_embd % n_head:
      raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
    f = n_inner or 4 * n_embd
    return cls(n_embd=n_embd, head_dim=head_dim or n_embd // n_head, n_head=(n_head,) * n_layer,
               n_inner=(f,) * n_layer, attn_scale=(1.0,) * n_layer,
               mlp_scale=(1.0,) * n_layer, **kw)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    tuples = ("n_head", "n_inner", "attn_scale", "mlp_scale")
    return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})

  def num_params(self) -> int:
    """Parameter count (tied head counted once)."""
    d = self.n_embd
    total = (self.vocab_size + self.n_positions) * d + 2 * d  # wte, wpe, ln_f
    for h, f in zip(self.n_head, self.n_inner):
      hk = h * self.head_dim
      total += 4 * d  # ln_1, ln_2
      total += d * 3 * hk + 3 * hk + hk * d + d  # attention
      total += d * f + f + f * d + d  # mlp
    return total


def remat_name(value) -> str:
  """A remat setting (a REMAT_POLICIES name, or the boolean form) as its name."""
  if isinstance(value, bool):
    return "block" if value else "none"
  if value not in REMAT_POLICIES:
    raise ValueError(f"remat={value!r}; allowed: {', '.join(REMAT_POLICIES)}, False, True")
  return value


def _init(std):
  return nn.initializers.normal(stddev=std)


class Linear(nn.Module):
  """y = scale * (x @ kernel) + bias: the scale (correction) touches the kernel term only."""

  features: int
  dtype: Any = jnp.float32
  kernel_std: float = 0.02

  @nn.compact
  def __call__(self, x, scale: float = 1.0):
    kernel = self.param("kernel", _init(self.kernel_std), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if scale != 1.0:
      y = y * jnp.asarray(scale, self.dtype)
    return y + bias.astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))


class Attention(nn.Module):
  """Causal multi-head self-attention with H heads of width K; `head_mask` gates heads."""

  n_head: int
  head_dim: int
  n_embd: int
  proj_std: float
  scale: float = 1.0
  dtype: Any = jnp.float32
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x_BxLxD, head_mask_H=None):
    b, l, _ = x_BxLxD.shape
    h, k = self.n_head, self.head_dim
    qkv = Linear(3 * h * k, self.dtype, name="c_attn")(x_BxLxD)
    # HF layout: columns are [q | k | v], each H blocks of K.
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = jnp.split(qkv.reshape(b, l, 3, h, k), 3, axis=2)
    impl = None if self.implementation == "auto" else self.implementation
    out_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK[:, :, 0], k_BxLxHxK[:, :, 0], v_BxLxHxK[:, :, 0],
        is_causal=True, implementation=impl)
    if head_mask_H is not None:
      out_BxLxHxK = out_BxLxHxK * head_mask_H.astype(self.dtype)[None, None, :, None]
    out_BxLxD = Linear(self.n_embd, self.dtype, self.proj_std, name="c_proj")(
        out_BxLxHxK.reshape(b, l, h * k), self.scale)
    return out_BxLxD


class MLP(nn.Module):
  """GELU (tanh approximation, as GPT-2) MLP of width F; `unit_mask` gates hidden units."""

  n_inner: int
  n_embd: int
  proj_std: float
  scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD, unit_mask_F=None):
    h_BxLxF = jax.nn.gelu(Linear(self.n_inner, self.dtype, name="c_fc")(x_BxLxD), approximate=True)
    if unit_mask_F is not None:
      h_BxLxF = h_BxLxF * unit_mask_F.astype(self.dtype)[None, None, :]
    return Linear(self.n_embd, self.dtype, self.proj_std, name="c_proj")(h_BxLxF, self.scale)


class Block(nn.Module):
  """Pre-LN transformer block; `block_mask` (a 0/1 scalar) switches both branches off."""

  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x_BxLxD, head_mask=None, unit_mask=None, block_mask=None):
    cfg, i = self.cfg, self.layer
    dtype = jnp.dtype(cfg.dtype)
    proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5  # GPT-2: residual projections scaled by depth
    ln = lambda name: nn.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name=name)
    a = Attention(cfg.n_head[i], cfg.head_dim, cfg.n_embd, proj_std, cfg.attn_scale[i], dtype,
                  cfg.attention, name="attn")(ln("ln_1")(x_BxLxD), head_mask)
    if block_mask is not None:
      a = a * block_mask.astype(dtype)
    x_BxLxD = x_BxLxD + a
    m = MLP(cfg.n_inner[i], cfg.n_embd, proj_std, cfg.mlp_scale[i], dtype,
            name="mlp")(ln("ln_2")(x_BxLxD), unit_mask)
    if block_mask is not None:
      m = m * block_mask.astype(dtype)
    return x_BxLxD + m


class GPT2(nn.Module):
  """GPT-2 language model: tokens (B, L) -> logits (B, L, V) in float32.

  `masks` (Masked variant) is an optional mapping with any of 'head' (N, H), 'unit' (N, F),
  'block' (N,) holding 0/1 gates; a gated-off unit contributes exactly zero.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, masks: Mapping[str, Any] | None = None,
               return_hidden: bool = False):
    """Logits (B, L, V) float32, or with `return_hidden` the final LayerNorm's output (B, L, D)
    in the compute dtype (the LM head left to a chunked loss)."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    masks = masks or {}
    if tokens_BxL.shape[1] > cfg.n_positions:
      raise ValueError(f"sequence length {tokens_BxL.shape[1]} exceeds n_positions="
                       f"{cfg.n_positions}")
    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, embedding_init=_init(0.02),
                   name="wte")
    wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=dtype, embedding_init=_init(0.01),
                   name="wpe")
    pos_L = jnp.arange(tokens_BxL.shape[1])
    x_BxLxD = (wte(tokens_BxL) + wpe(pos_L)[None]).astype(dtype)
    policy = cfg.remat_policy
    # Same param names either way; the policy decides what the backward pass recomputes.
    block = (Block if policy == "none" else
             nn.remat(Block, policy=REMAT_POLICIES[policy]))
    for i in range(cfg.n_layer):
      pick = lambda key: masks[key][i] if key in masks else None
      x_BxLxD = block(cfg, i, name=f"h_{i}")(x_BxLxD, pick("head"), pick("unit"), pick("block"))
    x_BxLxD = nn.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name="ln_f")(x_BxLxD)
    if return_hidden:
      return x_BxLxD
    return wte.attend(x_BxLxD.astype(dtype)).astype(jnp.float32)  # tied LM head


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
  """GPT-2 initialisation of a model of shape `cfg` (float32 params)."""
  tokens = jnp.zeros((1, min(8, cfg.n_positions)), jnp.int32)
  return GPT2(cfg).init(key, tokens)["params"]


def fold_correction(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params, cfg) computing the same function with all branch scales 1.0: each block's
  attn_scale / mlp_scale is multiplied into that branch's c_proj kernel.

  The scale multiplies the branch output before the residual add, and only the kernel term is
  scaled: c (W x) + b == (c W) x + b. The one folding rule for deployment and Hugging Face export
  (docs/method.md §4); NumPy or JAX leaves, dtype kept.
  """
  out = dict(params)
  for i in range(cfg.n_layer):
    block = {**out[f"h_{i}"]}
    for branch, scale in (("attn", cfg.attn_scale[i]), ("mlp", cfg.mlp_scale[i])):
      proj = block[branch]["c_proj"]
      # A Python float is weakly typed: the kernel keeps its dtype (NumPy and JAX alike).
      kernel = proj["kernel"] * float(scale)
      block[branch] = {**block[branch], "c_proj": {**proj, "kernel": kernel}}
    out[f"h_{i}"] = block
  ones = (1.0,) * cfg.n_layer
  return out, cfg.replace(attn_scale=ones, mlp_scale=ones)


def next_token_nll(logits_BxLxV, targets_BxL):
  """Per-token negative log-likelihood (B, L), float32."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


def lm_head(params, cfg: ModelConfig, hidden_xD):
  """Tied LM head: float32 logits (..., V) of final hidden states, matmul in the compute dtype
  (as `GPT2.__call__`)."""
  dtype = jnp.dtype(cfg.dtype)
  emb_VxD = params["wte"]["embedding"].astype(dtype)
  return jnp.dot(hidden_xD.astype(dtype), emb_VxD.T).astype(jnp.float32)


# ---- chunked losses ------------------------------------------------------------------------------

LOSS_CHUNK = 128  # C: positions whose logits exist at once (B * C * V floats)


def _chunk(x_BxL, c: int):
  """(B, L, ...) -> (ceil(L / C), B, C, ...), zero-padded at the end of L."""
  b, l = x_BxL.shape[:2]
  n = -(-l // c)
  x = jnp.pad(x_BxL, [(0, 0), (0, n * c - l)] + [(0, 0)] * (x_BxL.ndim - 2))
  return jnp.moveaxis(x.reshape((b, n, c) + x_BxL.shape[2:]), 1, 0)


def _chunked_sums(fn, c: int, *xs_BxL):
  """Sum over chunks of fn(*chunks, valid_BxC) (a tuple of arrays). Each chunk is rematerialised
  in the backward pass, so only one chunk's logits are alive at a time there too."""
  valid_BxL = jnp.ones(xs_BxL[0].shape[:2], jnp.float32)  # 0 on the padding
  chunks = tuple(_chunk(x, c) for x in xs_BxL + (valid_BxL,))
  body = jax.checkpoint(lambda carry, xs: (
      jax.tree.map(jnp.add, carry, fn(*xs)), None))
  init = jax.eval_shape(fn, *(x[0] for x in chunks))
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init)
  return jax.lax.scan(body, init, chunks)[0]


def lm_nll_sums(params, cfg: ModelConfig, windows_BxLp1, masks=None, chunk: int = LOSS_CHUNK):
  """(B,) summed next-token NLL of each window of L+1 tokens (inputs are the first L), the
  logits computed `chunk` positions at a time (training loss and evaluation alike)."""
  hidden_BxLxD = GPT2(cfg).apply({"params": params}, windows_BxLp1[:, :-1], masks,
                                 return_hidden=True)

  def nll_sums(h_BxCxD, targets_BxC, valid_BxC):
    nll_BxC = next_token_nll(lm_head(params, cfg, h_BxCxD), targets_BxC)
    return (jnp.sum(nll_BxC * valid_BxC, axis=1),)

  return _chunked_sums(nll_sums, chunk, hidden_BxLxD, windows_BxLp1[:, 1:])[0]


def lm_loss(params, cfg: ModelConfig, windows_BxLp1, masks=None, chunk: int = LOSS_CHUNK):
  """Mean next-token NLL of windows of L+1 tokens, computed `chunk` positions at a time."""
  return jnp.sum(lm_nll_sums(params, cfg, windows_BxLp1, masks, chunk)) / windows_BxLp1[:, 1:].size


def distill_loss(student_params, student_cfg: ModelConfig, teacher_params,
                 teacher_cfg: ModelConfig, windows_BxLp1, alpha, temperature,
                 student_masks=None, chunk: int = LOSS_CHUNK):
  """In-place distillation: (1 - alpha) * CE(student) + alpha * T^2 * mean over tokens of
  KL(softmax(z_teacher / T) || softmax(z_student / T)). The teacher (any width) gets no
  gradient; T^2 keeps the soft term's gradient scale independent of T (Hinton et al.)."""
  inputs_BxL, targets_BxL = windows_BxLp1[:, :-1], windows_BxLp1[:, 1:]
  hs_BxLxD = GPT2(student_cfg).apply({"params": student_params}, inputs_BxL, student_masks,
                                     return_hidden=True)
  teacher_params = jax.lax.stop_gradient(teacher_params)
  ht_BxLxD = GPT2(teacher_cfg).apply({"params": teacher_params}, inputs_BxL, return_hidden=True)

  def sums(hs_BxCxD, ht_BxCxD, targets_BxC, valid_BxC):
    zs_BxCxV = lm_head(student_params, student_cfg, hs_BxCxD)
    zt_BxCxV = lm_head(teacher_params, teacher_cfg, ht_BxCxD)
    logq_BxCxV = jax.nn.log_softmax(zs_BxCxV / temperature, axis=-1)
    logp_BxCxV = jax.nn.log_softmax(zt_BxCxV / temperature, axis=-1)
    kl_BxC = jnp.sum(jnp.exp(logp_BxCxV) * (logp_BxCxV - logq_BxCxV), axis=-1)
    ce_BxC = next_token_nll(zs_BxCxV, targets_BxC)
    return jnp.sum(ce_BxC * valid_BxC), jnp.sum(kl_BxC * valid_BxC)

  ce, kl = _chunked_sums(sums, chunk, hs_BxLxD, ht_BxLxD, targets_BxL)
  n = targets_BxL.size
  return (1 - alpha) * ce / n + alpha * temperature ** 2 * kl / n


def flops_per_token(cfg: ModelConfig, context: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), with attention scores."""
  d, fwd = cfg.n_embd, 0.0
  for h, f in zip(cfg.n_head, cfg.n_inner):
    hk = h * cfg.head_dim
    fwd += 2 * (d * 3 * hk + hk * d + 2 * d * f)  # matmuls
    fwd += 2 * 2 * context * hk / 2  # causal QK^T and AV, half the scores on average
  fwd += 2 * d * cfg.vocab_size  # LM head
  return 3.0 * fwd
