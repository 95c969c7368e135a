"""KV-cached decoding: cached logits equal the full forward position by position (full models
and subnets with per-layer widths and correction scales), greedy equals a hand-written argmax
loop over the growing sequence (with the documented slide past the context), batches, seeds,
top-k, no recompiles; the CLI on a deployed folder and on a training run; and the CPU inference
benchmark's quick mode prints one valid JSON object."""

import dataclasses
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twist_jax import config, decoding, deploy, generate, model, subnet_spec, subnets
from twist_jax.errors import UserError
from twist_jax.model import GPT2, ModelConfig

from helpers import exit_code, have_transformers, random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig.uniform(n_layer=2, n_head=4, n_embd=32, vocab_size=256, n_positions=8)


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


# ---- cached logits == full forward -----------------------------------------------------------

BIG = ModelConfig.uniform(n_layer=4, n_head=4, n_embd=32, vocab_size=128, n_positions=16)
# Direct per-layer widths with correction scales != 1 (as a True-variant subnet trains).
WIDE = ModelConfig(vocab_size=128, n_positions=16, n_embd=32, head_dim=8, n_head=(4, 1, 3),
                   n_inner=(48, 128, 16), attn_scale=(1.0, 4.0, 1.3), mlp_scale=(0.7, 1.0, 8.0))
SUBNET_MODES = {"attn": (0.25, 0.5, 0.75, 1.0), "mlp": (0.5, 0.25, 0.75, 0.125),
                "attn_mlp": (0.5, 0.25, 1.0, 0.75), "blocks": 0.5}


def subnet_model(mode):
  """A True subnet of BIG: extracted, unfolded, so its scales are the 'mean' correction."""
  spec = subnet_spec.deploy_spec(BIG, mode, SUBNET_MODES[mode])
  subnet = deploy.choose_subnet(random_params(BIG), BIG, spec, "random", jax.random.key(1))
  small = subnets.extract_subnet(random_params(BIG), deploy.one_worker(subnet), spec)
  return small, subnets.subnet_model_config(BIG, spec)


@functools.partial(jax.jit, static_argnums=1)
def full_logits(params, cfg, tokens_BxL):
  return GPT2(cfg).apply({"params": params}, tokens_BxL)


@functools.partial(jax.jit, static_argnums=1)
def prefill(params, cfg, tokens_BxL):
  return decoding.prefill(params, cfg, tokens_BxL)


@functools.partial(jax.jit, static_argnums=1)
def decode_logits(params, cfg, tokens_B, pos, cache):
  hidden_BxD, cache = decoding.decode(params, cfg, tokens_B, pos, cache)
  return model.lm_head(params, cfg, hidden_BxD), cache


def cached_logits(params, cfg, tokens_BxL, n_prefill):
  """Prefill the first n_prefill tokens (from a window padded with junk tokens), then decode the
  rest one position at a time: logits (B, L, V) of every position."""
  b, l = tokens_BxL.shape
  junk_BxL = (tokens_BxL[:, ::-1] * 7 + 3) % cfg.vocab_size  # stale keys the mask must hide
  window = jnp.where(jnp.arange(l) < n_prefill, tokens_BxL, junk_BxL)
  hidden_BxLxD, cache = prefill(params, cfg, window)
  out = [np.asarray(model.lm_head(params, cfg, hidden_BxLxD[:, :n_prefill]))]
  for pos in range(n_prefill, l):
    logits_BxV, cache = decode_logits(params, cfg, tokens_BxL[:, pos], jnp.int32(pos), cache)
    out.append(np.asarray(logits_BxV)[:, None])
  return np.concatenate(out, axis=1)


@pytest.mark.parametrize("case", ["full", "wide", *SUBNET_MODES])
def test_cached_logits_equal_full_forward(case):
  if case in SUBNET_MODES:
    params, cfg = subnet_model(case)
    if case == "blocks":  # whole blocks dropped: no scale
      assert cfg.n_layer == 2
    else:  # unequal per-layer widths, correction scales != 1
      assert len(set(cfg.n_head)) > 1 or len(set(cfg.n_inner)) > 1
      assert set(cfg.attn_scale + cfg.mlp_scale) != {1.0}
  else:
    cfg = {"full": BIG, "wide": WIDE}[case]
    params = random_params(cfg)
  tokens_BxL = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 16)))
  want = np.asarray(full_logits(params, cfg, tokens_BxL))
  for n_prefill in (1, 5):
    got = cached_logits(params, cfg, tokens_BxL, n_prefill)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_decode_ignores_cache_entries_after_pos():
  """A cache holding junk at positions > pos (a longer earlier prefill) decodes like a clean
  one: the length mask, not zeros, hides them."""
  params = random_params(BIG)
  tokens_1xL = jnp.asarray(np.arange(16)[None] * 5 % 128)
  _, clean = prefill(params, BIG, tokens_1xL[:, :6])
  _, dirty = prefill(params, BIG, tokens_1xL[:, ::-1])
  dirty = jax.tree.map(lambda c, d: d.at[:, :, :6].set(c[:, :, :6]), clean, dirty)
  args = (tokens_1xL[:, 6], jnp.int32(6))
  np.testing.assert_array_equal(decode_logits(params, BIG, *args, dirty)[0],
                                decode_logits(params, BIG, *args, clean)[0])
  assert any(bool(jnp.any(c != d)) for c, d in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)))


# ---- generation == argmax loop over the growing sequence ---------------------------------------


@jax.jit  # one compile per length 1..P: P is small
def last_logits(params, tokens_1xL):
  return GPT2(CFG).apply({"params": params}, tokens_1xL)[0, -1]


def reference(params, ids, new, pick=np.argmax):
  """Uncached: each token from a full forward of the current window, which starts at the last P
  prompt tokens and, once it would exceed P, restarts at the last P/2 tokens."""
  ids, p = list(ids), CFG.n_positions
  start = max(0, len(ids) - p)
  for _ in range(new):
    if len(ids) - start > p:
      start = len(ids) - p // 2
    ids.append(int(pick(np.asarray(last_logits(params, jnp.asarray(ids[start:])[None])))))
  return ids


def prompt(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, n)


@pytest.mark.parametrize("n_prompt", [1, 5, 8, 20])  # 8 = P: full at once; 20 > P
def test_greedy_equals_uncached_argmax_loop(params, n_prompt):
  out = generate.sample(params, CFG, prompt(n_prompt), jax.random.key(0), 13, temperature=0)
  assert out.dtype == np.int32 and out.shape == (n_prompt + 13,)
  np.testing.assert_array_equal(out, reference(params, prompt(n_prompt), 13))  # slides twice+


def test_batch_rows_equal_single_prompts(params):
  prompts_BxL = np.stack([prompt(5, s) for s in range(3)])
  out = generate.sample(params, CFG, prompts_BxL, jax.random.key(0), 11, temperature=0)
  assert out.shape == (3, 16)
  for row, p in zip(out, prompts_BxL):
    np.testing.assert_array_equal(row, reference(params, p, 11))
  drawn = generate.sample(params, CFG, np.stack([prompt(5)] * 2), jax.random.key(0), 20, 1.0)
  assert not np.array_equal(drawn[0], drawn[1])  # one key per row


def test_deterministic_by_seed(params):
  draw = lambda s: generate.sample(params, CFG, prompt(5), jax.random.key(s), 30, 1.0)
  np.testing.assert_array_equal(draw(0), draw(0))
  assert not np.array_equal(draw(0), draw(1))
  np.testing.assert_array_equal(draw(0)[:5], prompt(5))


def test_top_k_restricts_and_top_1_is_greedy(params):
  out = generate.sample(params, CFG, prompt(3), jax.random.key(0), 24, temperature=3.0, top_k=3)
  ids, seen = list(prompt(3)), []

  def record_top3(logits_V):
    seen.append(np.argsort(-logits_V)[:3])
    return out[len(ids) + len(seen) - 1]  # follow the sampled sequence

  reference(params, ids, 24, record_top3)
  assert all(tok in top3 for tok, top3 in zip(out[3:], seen)) and len(seen) == 24
  greedy = generate.sample(params, CFG, prompt(3), jax.random.key(0), 24, temperature=0)
  top1 = generate.sample(params, CFG, prompt(3), jax.random.key(5), 24, temperature=2.0, top_k=1)
  np.testing.assert_array_equal(top1, greedy)
  assert not np.array_equal(out, greedy)


def test_one_decode_compile_across_prompts_lengths_and_settings(params):
  generate.sample(params, CFG, prompt(3), jax.random.key(0), 2, temperature=0.5, top_k=5)
  decode_size = generate.decode_loop._cache_size()
  for n, new, temp in ((4, 3, 0.0), (3, 10, 1.3), (30, 9, 0.7)):
    stats = {}
    generate.sample(params, CFG, prompt(n), jax.random.key(n), new, temp, 5, stats)
    assert stats["new_tokens"] == new and stats["decode"] + stats["prefill"] == new
  assert generate.decode_loop._cache_size() == decode_size
  # Prefill compiles once per bucket (powers of two up to P): 3 and 4 share the 4-bucket.
  assert [generate.bucket(n, 8) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 8]


def test_zero_new_tokens_and_errors(params):
  np.testing.assert_array_equal(generate.sample(params, CFG, prompt(4), jax.random.key(0), 0),
                                prompt(4))
  for kw, match in ((dict(prompt_ids=[]), "empty"),
                    (dict(prompt_ids=np.zeros((1, 2, 3))), "shape"),
                    (dict(max_new_tokens=-1), "max-new-tokens"),
                    (dict(temperature=-1.0), "temperature"), (dict(top_k=257), "top-k")):
    args = {**dict(prompt_ids=prompt(3), max_new_tokens=2, temperature=1.0, top_k=0), **kw}
    with pytest.raises(UserError, match=match):
      generate.sample(params, CFG, key=jax.random.key(0), **args)


# ---- in-place cache, bfloat16 weights ----------------------------------------------------------


def test_decode_loop_updates_the_cache_in_place():
  """The compiled decode loop writes each layer's cache with a dynamic-update-slice and never
  copies a whole cache (decoding._after's data dependency orders the reads first; an
  optimization barrier does not, on the CPU)."""
  cfg = CFG.replace(n_positions=128)
  args = (random_params(cfg), cfg, decoding.init_cache(cfg, 1), jnp.zeros((1,), jnp.int32),
          jnp.int32(3), jnp.int32(5), jax.random.key(0), 0, 0, jnp.float32(0))
  hlo = generate.decode_loop.lower(*args).compile().as_text()
  cache_shape = r"f32\[1,4,128,8\]"  # (B, H, P, K)
  assert re.search(cache_shape + r"\S* dynamic-update-slice\(", hlo)
  assert not re.search(cache_shape + r"\S* copy(-start)?\(", hlo)


def logits_and_bf16_error(params, cfg, tokens_BxL):
  """(float32 logits, bf16 params, bf16 cfg, error): error = max |logits| difference of the
  model's own uncached forward with the weights and compute in bfloat16: the rounding error
  bf16 puts on these logits, the scale other bf16 paths are held to."""
  want = np.asarray(full_logits(params, cfg, tokens_BxL))
  p16, c16 = decoding.cast_weights(params, cfg, jnp.bfloat16)
  error = float(np.abs(np.asarray(full_logits(p16, c16, tokens_BxL)) - want).max())
  assert error > 0  # bf16 really rounds here, so a bound of 2 x error can fail
  return want, p16, c16, error


@pytest.mark.parametrize("cfg", [BIG, WIDE], ids=["uniform", "wide"])
def test_bf16_cached_logits_within_twice_the_forwards_rounding_error(cfg):
  """bf16 cached decoding rounds in another order than the forward, so its error is of the same
  size but not the same: within twice the forward's bf16 error of the float32 logits. A bf16
  softmax or a float32 cache read as bf16 twice would exceed it."""
  params = random_params(cfg)
  tokens_BxL = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 16)))
  want, p16, c16, error = logits_and_bf16_error(params, cfg, tokens_BxL)
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
  assert c16.dtype == "bfloat16" and cfg.dtype == "float32"
  _, cache = prefill(p16, c16, tokens_BxL[:, :5])
  assert {x.dtype for x in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)}
  got = cached_logits(p16, c16, tokens_BxL, 5)
  assert np.abs(got - want).max() <= 2 * error


def test_bf16_greedy_equals_float32_on_a_confident_model():
  """Where every greedy step's float32 top-2 margin exceeds 4 x the bf16 error (each logit moves
  by at most 2 x it), sample(..., weights_dtype=bfloat16) picks the float32 tokens. Seed 5's
  model is that confident on this prompt (asserted, so the comparison is never vacuous)."""
  params = random_params(BIG, 5)
  prompt_ids = np.random.default_rng(5).integers(0, BIG.vocab_size, 4)
  out = generate.sample(params, BIG, prompt_ids, jax.random.key(0), 11, temperature=0)
  want, _, _, error = logits_and_bf16_error(params, BIG, jnp.asarray(out)[None])
  top2 = np.sort(want[0, 3:-1], axis=-1)[:, -2:]
  assert (top2[:, 1] - top2[:, 0]).min() > 4 * error
  out16 = generate.sample(params, BIG, prompt_ids, jax.random.key(0), 11, temperature=0,
                          weights_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(out16, out)


HAVE_TRANSFORMERS = have_transformers()  # CI (TWIST_REQUIRE_TRANSFORMERS): never skipped


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="needs torch + transformers (the hf extra)")
def test_bf16_cached_logits_match_transformers_bf16():
  """transformers' GPT2LMHeadModel with the same weights in bfloat16 and twist_jax's bf16 cached
  decoding are two bf16 computations of the float32 logits, each within about the forward's
  bf16 error of them: they differ by at most twice it."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from twist_jax import hf  # pylint: disable=import-outside-toplevel

  params = random_params(BIG)
  tokens_BxL = jnp.asarray(np.random.default_rng(2).integers(0, BIG.vocab_size, (2, 16)))
  _, p16, c16, error = logits_and_bf16_error(params, BIG, tokens_BxL)
  hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf._hf_config(BIG))).eval()
  hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in hf._hf_tensors(p16, BIG).items()},
                           strict=False)
  with torch.inference_mode():
    theirs = hf_model.to(torch.bfloat16)(torch.from_numpy(np.asarray(tokens_BxL, np.int64)))
  theirs = theirs.logits.float().numpy()
  assert np.abs(cached_logits(p16, c16, tokens_BxL, 5) - theirs).max() <= 2 * error


# ---- CLI -----------------------------------------------------------------------------------------


def data_config():
  """The default data config (python_docs, bytes tokenizer): shares the test data cache."""
  return config.from_configdict(config.default_config()).data


@pytest.fixture(scope="module")
def deployed(params, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("gen") / "deployed")
  deploy.save_deployed(out, params, CFG, {"data": dataclasses.asdict(data_config())})
  return out


def run_cli(capsys, *args):
  code = exit_code(generate.main, args)
  out, err = capsys.readouterr()
  return code, out, err


def test_cli_on_deployed_folder_is_greedy_and_deterministic(params, deployed, capsys):
  from twist_jax import data
  tokenizer = data.load(data_config()).tokenizer
  args = ("--checkpoint", deployed, "--prompt", "def f", "--max-new-tokens", 12)
  code, out, err = run_cli(capsys, *args, "--temperature", 0)
  assert code == 0, err
  assert "12 tokens in" in err and "tokens/s" in err
  ids = generate.sample(params, CFG, tokenizer.encode("def f"), jax.random.key(0), 12, 0)
  new = ids[5:]
  new = new[:np.flatnonzero(new == tokenizer.eot)[0]] if (new == tokenizer.eot).any() else new
  assert out == "def f" + tokenizer.decode(new.tolist()) + "\n"
  sampled = [run_cli(capsys, *args, "--seed", 3)[1] for _ in range(2)]
  assert sampled[0] == sampled[1] and sampled[0].startswith("def f")


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "MISSING"], "neither a deployed model"),
    (["--max-new-tokens", "-1"], "max-new-tokens"),
    (["--temperature", "-0.5"], "temperature"),
    (["--top-k", "1000"], "top-k"),
    (["--max-new-tokens", "ten"], "max-new-tokens"),
])
def test_cli_bad_arguments_exit_2(deployed, tmp_path, capsys, args, message):
  args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
  base = [] if "--checkpoint" in args else ["--checkpoint", deployed]
  code, out, err = run_cli(capsys, *base, "--prompt", "x", *args)
  assert code == 2 and message in err and "error:" in err and out == ""


def smoke_config():
  spec = importlib.util.spec_from_file_location(
      "pydocs_attn", os.path.join(ROOT, "experiments", "pydocs_attn.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.steps, c.log.progress = 5, False
  c.eval.update(every=5, max_windows=4)
  c.ckpt.every = 5
  return config.from_configdict(c)


@pytest.mark.slow
def test_cli_on_training_run(tmp_path, capsys):
  from twist_jax import train
  workdir = str(tmp_path / "run")
  train.train(smoke_config(), workdir)
  capsys.readouterr()  # the training log
  code, out, err = run_cli(capsys, "--checkpoint", workdir, "--prompt", "import ",
                           "--max-new-tokens", 8, "--seed", 1)
  assert code == 0, err
  assert out.startswith("import ")


# ---- benchmark -----------------------------------------------------------------------------------


def check_decode_record(decode, new_tokens):
  """cpu_inference's decode numbers agree with each other: tokens/s from the token count and
  the medians, the speed-ups from the tokens/s."""
  assert decode["new_tokens"] == new_tokens
  for r in decode["models"].values():
    assert r["decode_tokens_per_s"] == new_tokens / r["decode_s"]
    assert r["generate_tokens_per_s"] == new_tokens / (r["prefill_s"] + r["decode_s"])
  tps = {name: r["decode_tokens_per_s"] for name, r in decode["models"].items()}
  assert decode["speedup"]["subnet_vs_full"] == tps["subnet"] / tps["full"]
  if "transformers" in tps:
    assert decode["speedup"]["twist_jax_full_vs_transformers"] == tps["full"] / tps["transformers"]
    assert 0 <= decode["greedy_tokens_agree_before_first_difference"] <= new_tokens


@pytest.mark.slow
@pytest.mark.parametrize("dtype,sizes", [("float32", "124m,xl"), ("bfloat16", "124m")])
def test_bench_cpu_inference_quick_prints_json(dtype, sizes):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cpu_inference.py"),
                         "--quick", "--dtype", dtype, "--sizes", sizes],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
  assert len(lines) == 1
  check_cpu_inference_record(json.loads(lines[0]), dtype, sizes.split(","))


def check_cpu_inference_record(rec, dtype, sizes):
  """cpu_inference's JSON: exact sizes from the shapes, rates and ratios from its timings."""
  assert rec["platform"] == "cpu" and set(rec["sizes"]) == set(sizes)
  assert rec["dtype"] == dtype and rec["loaded"] == (rec["load_before"]["loadavg"][0] > 0.5)
  assert rec["load_before"]["uptime"] and rec["load_after"]["uptime"]
  itemsize = np.dtype(jnp.dtype(dtype)).itemsize
  for size in rec["sizes"].values():
    models = size["models"]
    assert set(models) == {"full", "subnet", "full_sparse_phase", "sparse50"}
    full = ModelConfig.uniform(**size["shape"], n_positions=1024)
    assert models["full"]["params"] == full.num_params()
    assert models["full"]["param_bytes"] == itemsize * full.num_params()
    sub = models["subnet"]  # attn_mlp kappa = 0.5: the deploy rule's heads and MLP units
    spec = subnet_spec.deploy_spec(full, "attn_mlp", 0.5)
    assert (sub["n_head"], sub["n_inner"]) == (spec.keep_head[0], spec.keep_unit[0])
    sub_cfg = full.replace(n_head=(sub["n_head"],) * full.n_layer,
                           n_inner=(sub["n_inner"],) * full.n_layer)
    assert sub["params"] == sub_cfg.num_params()
    assert sub["param_bytes"] == itemsize * sub_cfg.num_params()
    assert models["sparse50"]["param_bytes"] == models["full"]["param_bytes"]
    assert models["sparse50"]["block_kernel_zero_fraction"] == pytest.approx(0.5, abs=0.01)
    for m in models.values():
      assert m["prefill_tokens_per_s"] == size["prompt_len"] / m["prefill_s"]
      assert m["decode1_tokens_per_s"] == 1 / m["decode1_s"]
    speed = size["speedup"]["subnet_vs_full"]
    assert speed["fwd_flops"] == (models["full"]["fwd_flops_per_token"] /
                                  models["subnet"]["fwd_flops_per_token"])
    assert speed["prefill"] == (models["subnet"]["prefill_tokens_per_s"] /
                                models["full"]["prefill_tokens_per_s"])
    check_decode_record(size["decode"], 8)
  decode = rec["sizes"]["124m"]["decode"]
  if importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
    assert "twist_jax_full_vs_transformers" in decode["speedup"]
    if dtype == "float32":  # the same weights and greedy decoding: the same tokens
      assert decode["greedy_tokens_agree_before_first_difference"] == 8
  else:
    assert decode["transformers"].startswith("not installed")
