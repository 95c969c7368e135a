"""GPT-2 module against independent references: a NumPy forward pass, hand-zeroed weights for
masks and scales, causality, and hand counts of parameters and FLOPs."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twist_jax.model import (GPT2, ModelConfig, distill_loss, flops_per_token, init_params,
                             lm_loss, next_token_nll)

from helpers import random_params

# Non-uniform per-layer widths: layer 0 has 4 heads and F = 48, layer 1 has 2 heads and F = 96.
CFG = ModelConfig(vocab_size=256, n_positions=32, n_embd=32, head_dim=8, n_head=(4, 2),
                  n_inner=(48, 96), attn_scale=(1.0, 1.0), mlp_scale=(1.0, 1.0))
UNIFORM = ModelConfig.uniform(n_layer=2, n_head=4, n_embd=32, vocab_size=256, n_positions=32)
B, L = 2, 12


def param_shapes(cfg):
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def tokens(seed=0, b=B, l=L):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, l)), jnp.int32)


# Jitted: op-by-op dispatch of the flax module is several times slower on CPU.
@functools.partial(jax.jit, static_argnums=1)
def logits(params, cfg, toks, masks=None):
  return GPT2(cfg).apply({"params": params}, toks, masks)


def edit(params, path, fn):
  """Copy of `params` with the leaf at 'a/b/c' replaced by fn(leaf)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  flat[path] = fn(flat[path])
  return flax.traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------------------ NumPy reference


def np_layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_attention(x, p, h, k, scale):
  l = x.shape[0]
  qkv = x @ p["c_attn"]["kernel"] + p["c_attn"]["bias"]
  q, kk, v = (qkv[:, i * h * k:(i + 1) * h * k].reshape(l, h, k) for i in range(3))
  out = np.zeros((l, h, k))
  causal = np.tril(np.ones((l, l), bool))
  for j in range(h):  # one head at a time, as the textbook writes it
    s = np.where(causal, q[:, j] @ kk[:, j].T / np.sqrt(k), -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    out[:, j] = (w / w.sum(-1, keepdims=True)) @ v[:, j]
  return scale * (out.reshape(l, h * k) @ p["c_proj"]["kernel"]) + p["c_proj"]["bias"]


def np_gpt2(params, cfg, toks):
  """Pure NumPy float64 GPT-2 forward of one sequence: (L,) -> (L, V)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p["wte"]["embedding"][toks] + p["wpe"]["embedding"][:len(toks)]
  for i in range(cfg.n_layer):
    b = p[f"h_{i}"]
    a = np_layer_norm(x, b["ln_1"], cfg.layer_norm_epsilon)
    x = x + np_attention(a, b["attn"], cfg.n_head[i], cfg.head_dim, cfg.attn_scale[i])
    m = np_layer_norm(x, b["ln_2"], cfg.layer_norm_epsilon)
    hid = np_gelu(m @ b["mlp"]["c_fc"]["kernel"] + b["mlp"]["c_fc"]["bias"])
    x = x + cfg.mlp_scale[i] * (hid @ b["mlp"]["c_proj"]["kernel"]) + b["mlp"]["c_proj"]["bias"]
  return np_layer_norm(x, p["ln_f"], cfg.layer_norm_epsilon) @ p["wte"]["embedding"].T


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(attn_scale=(2.0, 0.5), mlp_scale=(1.5, 0.7))])
def test_matches_numpy_reference(cfg):
  params, toks = random_params(cfg), tokens()
  got = np.asarray(logits(params, cfg, toks))
  want = np.stack([np_gpt2(params, cfg, np.asarray(t)) for t in toks])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ shapes, causality


def test_shapes_per_layer_widths():
  params = param_shapes(CFG)
  d, k = CFG.n_embd, CFG.head_dim
  for i, (h, f) in enumerate(zip(CFG.n_head, CFG.n_inner)):
    blk = params[f"h_{i}"]
    assert blk["attn"]["c_attn"]["kernel"].shape == (d, 3 * h * k)
    assert blk["attn"]["c_proj"]["kernel"].shape == (h * k, d)
    assert blk["mlp"]["c_fc"]["kernel"].shape == (d, f)
    assert blk["mlp"]["c_proj"]["kernel"].shape == (f, d)
  assert params["wte"]["embedding"].shape == (256, d)
  assert params["wpe"]["embedding"].shape == (32, d)
  out = logits(random_params(CFG), CFG, tokens())
  assert out.shape == (B, L, 256) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


def test_causal():
  params, toks = random_params(CFG), tokens()
  t = 5
  changed = toks.at[:, t].set((toks[:, t] + 1) % 256)
  a, b = np.asarray(logits(params, CFG, toks)), np.asarray(logits(params, CFG, changed))
  np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
  assert np.abs(a[:, t:] - b[:, t:]).min(axis=-1).max() > 1e-3  # later positions do see it


# ------------------------------------------------------------------------------ masks and scales


def full_masks(cfg):
  return {"head": [jnp.ones(h) for h in cfg.n_head],
          "unit": [jnp.ones(f) for f in cfg.n_inner],
          "block": jnp.ones(cfg.n_layer)}


def test_all_ones_masks_equal_no_mask():
  params, toks = random_params(CFG), tokens()
  np.testing.assert_allclose(logits(params, CFG, toks, full_masks(CFG)),
                             logits(params, CFG, toks), rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=1)
def loss_grads(params, cfg, masks):
  return jax.grad(lm_loss)(params, cfg, tokens(l=L + 1), masks)


def test_head_mask_equals_zeroed_c_proj_rows():
  params, toks, k = random_params(CFG), tokens(), CFG.head_dim
  layer, head = 0, 2
  masks = full_masks(CFG)
  masks["head"][layer] = masks["head"][layer].at[head].set(0)
  zeroed = edit(params, f"h_{layer}/attn/c_proj/kernel",
                lambda w: w.at[head * k:(head + 1) * k].set(0))
  np.testing.assert_allclose(logits(params, CFG, toks, masks), logits(zeroed, CFG, toks),
                             rtol=1e-5, atol=1e-5)
  # The gated head's q, k and v columns (one K-block in each third of c_attn) get no gradient.
  attn = loss_grads(params, CFG, masks)[f"h_{layer}"]["attn"]
  hk = CFG.n_head[layer] * k
  cols = np.concatenate([np.arange(s * hk + head * k, s * hk + (head + 1) * k) for s in range(3)])
  assert np.all(np.asarray(attn["c_attn"]["kernel"])[:, cols] == 0)
  assert np.all(np.asarray(attn["c_attn"]["bias"])[cols] == 0)
  assert np.all(np.asarray(attn["c_proj"]["kernel"])[head * k:(head + 1) * k] == 0)
  others = np.setdiff1d(np.arange(3 * hk), cols)
  assert np.all(np.abs(np.asarray(attn["c_attn"]["kernel"])[:, others]).max(axis=0) > 0)


def test_unit_mask_equals_zeroed_c_proj_rows():
  params, toks = random_params(CFG), tokens()
  layer, units = 1, np.array([0, 7, 95])
  masks = full_masks(CFG)
  masks["unit"][layer] = masks["unit"][layer].at[units].set(0)
  zeroed = edit(params, f"h_{layer}/mlp/c_proj/kernel", lambda w: w.at[units].set(0))
  np.testing.assert_allclose(logits(params, CFG, toks, masks), logits(zeroed, CFG, toks),
                             rtol=1e-5, atol=1e-5)
  mlp = loss_grads(params, CFG, masks)[f"h_{layer}"]["mlp"]
  assert np.all(np.asarray(mlp["c_fc"]["kernel"])[:, units] == 0)
  assert np.all(np.asarray(mlp["c_fc"]["bias"])[units] == 0)
  assert np.all(np.asarray(mlp["c_proj"]["kernel"])[units] == 0)
  assert np.all(np.abs(np.asarray(mlp["c_fc"]["bias"])[np.setdiff1d(np.arange(96), units)]) > 0)


def test_block_mask_zero_is_identity_residual():
  """Gating block 0 off equals the one-block model made of block 1 alone."""
  params, toks = random_params(CFG), tokens()
  masks = {"block": jnp.array([0.0, 1.0])}
  one = CFG.replace(n_head=CFG.n_head[1:], n_inner=CFG.n_inner[1:], attn_scale=(1.0,),
                    mlp_scale=(1.0,))
  short = {"wte": params["wte"], "wpe": params["wpe"], "ln_f": params["ln_f"],
           "h_0": params["h_1"]}
  np.testing.assert_allclose(logits(params, CFG, toks, masks), logits(short, one, toks),
                             rtol=1e-5, atol=1e-5)
  grads = loss_grads(params, CFG, masks)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["h_0"]))
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["h_1"]))


@pytest.mark.parametrize("branch", ["attn", "mlp"])
def test_scale_equals_scaled_kernel_not_bias(branch):
  params, toks = random_params(CFG), tokens()
  scaled = CFG.replace(**{f"{branch}_scale": (2.0, 1.0)})
  doubled = edit(params, f"h_0/{branch}/c_proj/kernel", lambda w: 2 * w)
  np.testing.assert_allclose(logits(params, scaled, toks), logits(doubled, CFG, toks),
                             rtol=1e-5, atol=1e-5)
  # Doubling the bias as well would be a different model: the scale must leave it alone.
  both = edit(doubled, f"h_0/{branch}/c_proj/bias", lambda b: 2 * b)
  assert not np.allclose(logits(params, scaled, toks), logits(both, CFG, toks), atol=1e-3)


# ------------------------------------------------------------------------------ dtype, counts


def test_bf16_compute_close_to_fp32():
  params, toks = random_params(UNIFORM, std=0.1), tokens()
  fp32 = np.asarray(logits(params, UNIFORM, toks))
  bf16_out = logits(params, UNIFORM.replace(dtype="bfloat16"), toks)
  assert bf16_out.dtype == jnp.float32  # logits are float32 whatever the compute dtype
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  err = np.abs(np.asarray(bf16_out) - fp32).max()
  assert 0 < err < 0.05 * np.abs(fp32).max(), err  # bf16 has ~3 significant digits


def test_num_params_hand_count():
  # wte 256*32 + wpe 32*32 + ln_f 2*32                                   = 9280
  # layer 0 (H*K = 32, F = 48): ln 4*32 + c_attn 32*96+96 + c_proj 32*32+32
  #                             + c_fc 32*48+48 + c_proj 48*32+32          = 7504
  # layer 1 (H*K = 16, F = 96): 128 + 32*48+48 + 16*32+32 + 32*96+96 + 96*32+32 = 8528
  assert CFG.num_params() == 9280 + 7504 + 8528
  for cfg in (CFG, UNIFORM):
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(param_shapes(cfg)))


def test_flops_per_token_hand_count():
  # Forward, context 16. Matmuls 2*(D*3HK + HK*D + 2*D*F); causal attention 2*context*HK
  # (QK^T and AV over half the context on average); LM head 2*D*V. Training = 3x forward.
  layer0 = 2 * (32 * 96 + 32 * 32 + 2 * 32 * 48) + 2 * 16 * 32  # 15360
  layer1 = 2 * (32 * 48 + 16 * 32 + 2 * 32 * 96) + 2 * 16 * 16  # 16896
  head = 2 * 32 * 256  # 16384
  assert layer0 + layer1 + head == 48640
  assert flops_per_token(CFG, 16) == 3 * 48640


# ------------------------------------------------------------------------------ chunked losses


def windows(seed=0, b=B, l=L):
  return tokens(seed, b, l + 1)


def reference_loss(params, cfg, wins, masks=None):
  """Unchunked: float32 (B, L, V) logits of the whole batch, then next_token_nll."""
  return next_token_nll(GPT2(cfg).apply({"params": params}, wins[:, :-1], masks),
                        wins[:, 1:]).mean()


def max_tree_diff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("chunk", [4, 5, 12, 128])  # divides L = 12, does not, equals, exceeds
def test_chunked_lm_loss_and_grad_equal_full_logits(chunk):
  params, wins = random_params(CFG), windows()
  masks = full_masks(CFG)
  masks["head"][0] = masks["head"][0].at[1].set(0)  # masks reach the chunked path too
  loss = jax.jit(functools.partial(lm_loss, cfg=CFG, chunk=chunk))
  want = reference_loss(params, CFG, wins, masks)
  np.testing.assert_allclose(loss(params, windows_BxLp1=wins, masks=masks), want, rtol=1e-6)
  grads = jax.grad(lambda p: lm_loss(p, CFG, wins, masks, chunk=chunk))(params)
  ref_grads = jax.grad(lambda p: reference_loss(p, CFG, wins, masks))(params)
  assert max_tree_diff(grads, ref_grads) < 1e-6


def test_chunked_lm_loss_bf16_matches_bf16_logits():
  """bf16 compute: the chunked head runs in bf16 like GPT2's, so both agree to float32 rounding
  of the log-softmax (a float32 head would differ by bf16's ~1e-2)."""
  cfg, params, wins = UNIFORM.replace(dtype="bfloat16"), random_params(UNIFORM, std=0.1), windows()
  np.testing.assert_allclose(lm_loss(params, cfg, wins, chunk=5),
                             reference_loss(params, cfg, wins), rtol=1e-5)


# A student narrower than the teacher (as an extracted subnet), with correction scales.
STUDENT = ModelConfig(vocab_size=256, n_positions=32, n_embd=32, head_dim=8, n_head=(2, 1),
                      n_inner=(24, 48), attn_scale=(2.0, 2.0), mlp_scale=(2.0, 2.0))


def np_distill(student_logits, teacher_logits, targets, alpha, t):
  """NumPy float64: (1 - alpha) * CE + alpha * T^2 * mean KL(p_teacher || p_student)."""
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  zs, zt = (np.asarray(z, np.float64) for z in (student_logits, teacher_logits))
  ce = -np.take_along_axis(log_softmax(zs), np.asarray(targets)[..., None], -1).mean()
  logp, logq = log_softmax(zt / t), log_softmax(zs / t)
  kl = (np.exp(logp) * (logp - logq)).sum(-1).mean()
  return (1 - alpha) * ce + alpha * t * t * kl


@functools.partial(jax.jit, static_argnums=(1, 3, 8))
def distill(sp, scfg, tp, tcfg, wins, alpha, temp, smasks=None, chunk=5):
  return distill_loss(sp, scfg, tp, tcfg, wins, alpha, temp, smasks, chunk=chunk)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_distill_loss_matches_numpy_kl(alpha, temp):
  sp, tp, wins = random_params(STUDENT, seed=1), random_params(CFG, seed=2), windows()
  want = np_distill(logits(sp, STUDENT, wins[:, :-1]), logits(tp, CFG, wins[:, :-1]),
                    wins[:, 1:], alpha, temp)
  np.testing.assert_allclose(distill(sp, STUDENT, tp, CFG, wins, alpha, temp), want, rtol=1e-5)
  # A masked full-width student (the Masked variant) against the same teacher.
  masks = full_masks(CFG)
  masks["unit"][1] = masks["unit"][1].at[:40].set(0)
  mp = random_params(CFG, seed=3)
  want = np_distill(logits(mp, CFG, wins[:, :-1], masks), logits(tp, CFG, wins[:, :-1]),
                    wins[:, 1:], alpha, temp)
  np.testing.assert_allclose(distill(mp, CFG, tp, CFG, wins, alpha, temp, masks), want,
                             rtol=1e-5)


def test_distill_alpha_0_is_lm_loss_and_teacher_gets_no_gradient():
  sp, tp, wins = random_params(STUDENT, seed=1), random_params(CFG, seed=2), windows()
  assert float(distill(sp, STUDENT, tp, CFG, wins, 0.0, 2.0)) == float(
      jax.jit(lm_loss, static_argnums=(1, 4))(sp, STUDENT, wins, None, 5))
  grad_s, grad_t = jax.grad(distill_loss, argnums=(0, 2))(sp, STUDENT, tp, CFG, wins, 0.5, 2.0,
                                                           chunk=5)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad_t))
  # The student's gradient equals autodiff of the unchunked formula on full logits.

  def reference(p):
    zs = GPT2(STUDENT).apply({"params": p}, wins[:, :-1]) / 2.0
    zt = GPT2(CFG).apply({"params": tp}, wins[:, :-1]) / 2.0
    logp, logq = jax.nn.log_softmax(zt), jax.nn.log_softmax(zs)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), -1).mean()
    return 0.5 * reference_loss(p, STUDENT, wins) + 0.5 * 4.0 * kl

  assert max_tree_diff(grad_s, jax.grad(reference)(sp)) < 1e-5
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_s)) > 1e-3


# ------------------------------------------------------------------------------ remat


def test_remat_same_loss_and_grads():
  params, wins, masks = random_params(CFG), windows(), full_masks(CFG)
  masks["block"] = jnp.array([1.0, 0.0])
  fn = jax.jit(jax.value_and_grad(lm_loss), static_argnums=1)
  loss, grads = fn(params, CFG, wins, masks)
  loss_r, grads_r = fn(params, CFG.replace(remat=True), wins, masks)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  assert max_tree_diff(grads_r, grads) < 1e-6
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
  jaxpr = lambda cfg: str(jax.make_jaxpr(lm_loss, static_argnums=1)(params, cfg, wins, masks))
  # One checkpoint per block on top of the loss's chunk checkpoint.
  remats = lambda cfg: jaxpr(cfg).count("remat")
  assert remats(CFG.replace(remat=True)) == remats(CFG) + CFG.n_layer


def test_model_config_dict_without_remat_still_loads():
  old = {k: v for k, v in CFG.to_dict().items() if k != "remat"}
  assert ModelConfig.from_dict(old) == CFG and not CFG.remat
  assert ModelConfig.from_dict(CFG.replace(remat=True).to_dict()).remat
