"""CPU inference of a full GPT-2, its extracted attn_mlp kappa = 0.5 subnet (a smaller dense
GPT-2) and a 50% unstructured-sparse model stored dense, plus KV-cached decoding against
transformers' GPT2LMHeadModel on the same weights; prints ONE JSON object.

  python bench/cpu_inference.py [--sizes 124m,xl] [--quick]     # ~15-20 min on 2 cores
  python bench/cpu_inference.py --sizes 124m --dtype bfloat16     # bf16 weights, both sides

Random weights (speed does not depend on training). Per model, batch 1, median of `repeats`
timed calls after a warm-up call (which also compiles); the models being compared take turns
within each repeat, so background load hits them alike:
  prefill:  one forward of the prompt (logits at every position, as GPT-2's forward computes).
  decode1:  a forward of ONE position without a cache (weight-bound, no attention context).
  decode:   KV-cached generation as twist_jax.generate runs it: prefill a `decode_prompt`-token
            prompt once (prefill_step), then `decode_new` greedy tokens in one jitted loop over a
            fixed cache of P = 1024 positions (decode_loop); decode_tokens_per_s counts the loop
            only. At 124M the same weights also run in transformers' GPT2LMHeadModel (torch,
            use_cache with past_key_values, a greedy loop), when torch and transformers import.
Forward FLOPs allow about 1.5x (124M) and 1.9x (XL) for the subnet: embeddings and the LM head
are shared. The sparse model has the full model's shapes and dense kernels: it shows what
unstructured sparsity buys on dense CPU kernels (expected: nothing) with half its block weights
zero. --dtype bfloat16 stores every model's weights in bf16 and computes in it
(decoding.cast_weights; scores, softmax and LayerNorm statistics stay float32), and runs
transformers with the same bf16 weights (model.to(torch.bfloat16)). The JSON records `uptime`
before and after and `loaded`: the 1-minute load average before was above LOADED (timings of a
busy machine, not for results/).
"""

import argparse
import functools
import json
import os
import sys
import time

if __name__ == "__main__":  # the point of the benchmark; set before JAX initialises (importers,
  os.environ["JAX_PLATFORMS"] = "cpu"  # such as bench/gpu_check.py, keep their own platform)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import host  # noqa: E402  (bench/host.py: this file's folder is on sys.path)
from twist_jax import decoding, deploy, generate, hf, subnet_spec  # noqa: E402
from twist_jax.model import GPT2, ModelConfig, flops_per_token, init_params  # noqa: E402

# GPT-2 shapes; XL keeps a short prompt and decodes 64 (not 128) tokens after its 512-token
# prompt, so the whole run stays within minutes on 2 cores (all 48 layers are kept).
SIZES = {
    "124m": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, prompt=512, repeats=5,
                 decode_prompt=512, decode_new=128, decode_repeats=3, transformers=True),
    "xl": dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, prompt=64, repeats=3,
               decode_prompt=512, decode_new=64, decode_repeats=2, transformers=False),
}
QUICK = {  # same code path, tiny shapes: a CPU test in seconds
    "124m": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=256, prompt=32, repeats=2,
                 decode_prompt=24, decode_new=8, decode_repeats=2, transformers=True),
    "xl": dict(n_layer=3, n_head=5, n_embd=80, vocab_size=256, prompt=24, repeats=2,
               decode_prompt=16, decode_new=8, decode_repeats=2, transformers=False),
}
N_POSITIONS = 1024
LOADED = 0.5  # 1-minute load average above which the machine counts as busy
KAPPA, MODE, SPARSITY = 0.5, "attn_mlp", 0.5


def _prune_smallest(kernel: np.ndarray, sparsity: float) -> None:
  """Zeroes (in place) the smallest-|w| fraction of a kernel: one threshold per kernel, found by
  O(n) selection (a per-column sort of XL's 1.5B weights takes minutes)."""
  mag = np.abs(kernel).ravel()
  k = int(round(sparsity * mag.size))
  kernel[np.abs(kernel) < np.partition(mag, k)[k]] = 0


def random_params(cfg: ModelConfig, seed: int = 0, sparsity: float = 0.0) -> dict:
  """U(-0.035, 0.035) weights (std 0.02) drawn with NumPy (threefry takes minutes for XL on
  CPU). With `sparsity`, every block kernel is pruned by magnitude as it is drawn, so the sparse
  model is the full model of the same seed without ever holding both (XL: 6 GB each)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    x = rng.random(leaf.shape, dtype=np.float32)
    x -= 0.5
    x *= 0.0693  # uniform of std 0.02
    if path[-1].key == "scale":
      x += 1.0  # LayerNorm gains around 1
    if sparsity and path[0].key.startswith("h_") and x.ndim == 2:
      _prune_smallest(x, sparsity)
    return jnp.asarray(x)

  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def param_bytes(params) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(params)))


def block_zero_fraction(params, cfg: ModelConfig) -> float:
  zeros = total = 0
  for i in range(cfg.n_layer):
    for leaf in jax.tree.leaves(params[f"h_{i}"]):
      if leaf.ndim == 2:
        zeros += int(jnp.sum(leaf == 0))
        total += leaf.size
  return zeros / total


METRICS = ("prefill", "decode1")


@functools.partial(jax.jit, static_argnums=(1,))
def forward(params, cfg: ModelConfig, tokens_1xL):
  return GPT2(cfg).apply({"params": params}, tokens_1xL)


def prompt_ids(cfg: ModelConfig, length: int) -> np.ndarray:
  return np.random.default_rng(1).integers(0, cfg.vocab_size, (1, length)).astype(np.int32)


def calls(params, cfg: ModelConfig, prompt: int) -> dict:
  """{metric: zero-argument call} of one model (see the module docstring)."""
  prompt_1xL = jnp.asarray(prompt_ids(cfg, prompt))
  return {"prefill": lambda: forward(params, cfg, prompt_1xL),
          "decode1": lambda: forward(params, cfg, prompt_1xL[:, :1])}


def median_times(models: dict, shape: dict) -> dict:
  """{model: {metric: median seconds}} over shape['repeats'] timed calls after one warm-up
  (compiling) call. The models take turns within each repeat, so a change of background load
  hits all of them alike and their ratios stay fair."""
  fns = {name: calls(p, c, shape["prompt"]) for name, (p, c) in models.items()}
  for per_model in fns.values():
    for fn in per_model.values():
      jax.block_until_ready(fn())
  times = {name: {m: [] for m in METRICS} for name in models}
  for _ in range(shape["repeats"]):
    for metric in METRICS:
      for name in models:
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name][metric]())
        times[name][metric].append(time.perf_counter() - t0)
  return {name: {m: float(np.median(t)) for m, t in per.items()} for name, per in times.items()}


def summary(params, cfg: ModelConfig, secs: dict, prompt: int) -> dict:
  return {"params": cfg.num_params(), "param_bytes": param_bytes(params),
          "fwd_flops_per_token": flops_per_token(cfg, prompt) / 3,
          "prefill_s": secs["prefill"], "prefill_tokens_per_s": prompt / secs["prefill"],
          "decode1_s": secs["decode1"], "decode1_tokens_per_s": 1 / secs["decode1"]}


def ratios(model: dict, full: dict) -> dict:
  """Speed-ups (>1 = faster than full) and the parameter-memory ratio."""
  speed = {m: model[f"{m}_tokens_per_s"] / full[f"{m}_tokens_per_s"] for m in METRICS}
  return {**speed, "fwd_flops": full["fwd_flops_per_token"] / model["fwd_flops_per_token"],
          "param_bytes": model["param_bytes"] / full["param_bytes"]}


# ---- KV-cached decode ----------------------------------------------------------------------------


def jax_decoder(params, cfg: ModelConfig, prompt_1xL: np.ndarray):
  """(prefill, decode) of twist_jax.generate, greedy: prefill() -> state after the prompt;
  decode(state, steps) -> the next `steps` tokens (1, steps) from one jitted loop."""
  n = prompt_1xL.shape[1]
  window_1xT = jnp.asarray(np.pad(prompt_1xL, ((0, 0), (0, generate.bucket(n, N_POSITIONS) - n))))
  key, greedy = jax.random.key(0), jnp.float32(0)

  def prefill():
    return jax.block_until_ready(generate.prefill_step(params, cfg, window_1xT, jnp.int32(n),
                                                       key, 0, 0, greedy))

  def decode(state, steps: int):
    token_1, cache = state
    out_1xP, _ = generate.decode_loop(params, cfg, cache, token_1, jnp.int32(n),
                                      jnp.int32(steps), key, 0, 0, greedy)
    return np.asarray(out_1xP)[:, :steps]

  return prefill, decode


def hf_decoder(params, cfg: ModelConfig, prompt_1xL: np.ndarray):
  """The same (prefill, decode) pair on transformers' GPT2LMHeadModel holding the same weights
  (twist_jax.hf's export tensors, in cfg.dtype: bf16 weights widen to float32 and back
  exactly), with its own KV cache (past_key_values)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf._hf_config(cfg))).eval()
  tensors = {k: torch.from_numpy(v) for k, v in hf._hf_tensors(params, cfg).items()}
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  model = model.to(getattr(torch, cfg.dtype))
  assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
  ids_1xL = torch.from_numpy(prompt_1xL.astype(np.int64))

  @torch.inference_mode()
  def prefill():
    out = model(input_ids=ids_1xL, use_cache=True, logits_to_keep=1)  # last position only
    return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

  @torch.inference_mode()
  def decode(state, steps: int):
    token_1x1, past, new = *state, []
    for _ in range(steps):
      out = model(input_ids=token_1x1, past_key_values=past, use_cache=True)
      past, token_1x1 = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      new.append(token_1x1)
    return torch.cat(new, dim=1).numpy()

  return prefill, decode, f"transformers {transformers.__version__}, torch {torch.__version__}"


def decode_times(decoders: dict, new: int, repeats: int) -> tuple[dict, dict]:
  """{model: {'prefill': s, 'decode': s}} medians over `repeats` (models take turns), after a
  warm-up that compiles (the decode loop's length is traced: 1 step compiles it), and each
  model's greedy tokens of the last repeat."""
  for prefill, decode in decoders.values():
    decode(prefill(), 1)
  times = {name: {"prefill": [], "decode": []} for name in decoders}
  tokens = {}
  for _ in range(repeats):
    for name, (prefill, decode) in decoders.items():
      t0 = time.perf_counter()
      state = prefill()
      t1 = time.perf_counter()
      tokens[name] = decode(state, new)
      times[name]["prefill"].append(t1 - t0)
      times[name]["decode"].append(time.perf_counter() - t1)
  return {n: {k: float(np.median(v)) for k, v in t.items()} for n, t in times.items()}, tokens


def agreement(a: np.ndarray, b: np.ndarray) -> int:
  """Greedy tokens two implementations share before their first difference (random weights make
  near-ties, where float rounding may pick the other token)."""
  diff = np.flatnonzero(a.ravel() != b.ravel())
  return int(diff[0]) if diff.size else int(a.size)


def bench_decode(models: dict, shape: dict) -> dict:
  """KV-cached decode of the twist_jax `models` and, where asked and importable, of
  transformers on the full model's weights."""
  prompt_1xL, new = prompt_ids(models["full"][1], shape["decode_prompt"]), shape["decode_new"]
  decoders = {name: jax_decoder(p, c, prompt_1xL) for name, (p, c) in models.items()}
  hf_note = "not measured at this size"
  if shape["transformers"]:
    try:
      *decoders["transformers"], hf_note = hf_decoder(*models["full"], prompt_1xL)
    except ImportError as e:
      hf_note = f"not installed ({e}): pip install torch transformers"
  secs, tokens = decode_times(decoders, new, shape["decode_repeats"])
  rows = {name: {"prefill_s": t["prefill"], "decode_s": t["decode"],
                 "decode_tokens_per_s": new / t["decode"],
                 "generate_tokens_per_s": new / (t["prefill"] + t["decode"])}
          for name, t in secs.items()}
  tps = {name: r["decode_tokens_per_s"] for name, r in rows.items()}
  out = {"prompt_len": shape["decode_prompt"], "new_tokens": new, "n_positions": N_POSITIONS,
         "repeats": shape["decode_repeats"], "models": rows, "transformers": hf_note,
         "speedup": {"subnet_vs_full": tps["subnet"] / tps["full"]}}
  if "transformers" in rows:
    out["speedup"]["twist_jax_full_vs_transformers"] = tps["full"] / tps["transformers"]
    out["greedy_tokens_agree_before_first_difference"] = agreement(tokens["full"],
                                                                   tokens["transformers"])
  return out


def full_and_subnet(shape: dict, dtype: str = "float32") -> dict:
  """{'full': (params, cfg), 'subnet': (params, cfg)}: random weights of `shape` and its
  extracted attn_mlp kappa = 0.5 subnet (a random draw, correction folded), both in `dtype`."""
  cfg = ModelConfig.uniform(n_layer=shape["n_layer"], n_head=shape["n_head"],
                            n_embd=shape["n_embd"], vocab_size=shape["vocab_size"],
                            n_positions=N_POSITIONS)
  full = random_params(cfg)
  spec = subnet_spec.deploy_spec(cfg, MODE, KAPPA)
  subnet = deploy.choose_subnet(full, cfg, spec, "random", jax.random.key(0))
  models = {"full": (full, cfg), "subnet": deploy.extract(full, cfg, spec, subnet)}
  return {name: decoding.cast_weights(p, c, dtype) for name, (p, c) in models.items()}


def bench_size(shape: dict, dtype: str = "float32") -> dict:
  """Two phases, so that at most two models are alive (XL: 6 GB each): full with its subnet,
  then full with the sparse model; each ratio compares timings of the same phase."""
  t0 = time.perf_counter()
  models = full_and_subnet(shape, dtype)
  (full, cfg), (small, cfg_small) = models["full"], models["subnet"]
  del models
  secs = median_times({"full": (full, cfg), "subnet": (small, cfg_small)}, shape)
  models = {"full": summary(full, cfg, secs["full"], shape["prompt"]),
            "subnet": summary(small, cfg_small, secs["subnet"], shape["prompt"])}
  models["subnet"].update(n_head=cfg_small.n_head[0], n_inner=cfg_small.n_inner[0])
  decode = bench_decode({"full": (full, cfg), "subnet": (small, cfg_small)}, shape)
  del small
  # The same draws as `full`, pruned.
  sparse, _ = decoding.cast_weights(random_params(cfg, sparsity=SPARSITY), cfg, dtype)
  secs = median_times({"full": (full, cfg), "sparse50": (sparse, cfg)}, shape)
  models["full_sparse_phase"] = summary(full, cfg, secs["full"], shape["prompt"])
  models["sparse50"] = summary(sparse, cfg, secs["sparse50"], shape["prompt"])
  models["sparse50"]["block_kernel_zero_fraction"] = block_zero_fraction(sparse, cfg)
  return {"shape": {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")},
          "n_inner": cfg.n_inner[0], "prompt_len": shape["prompt"],
          "repeats": shape["repeats"], "models": models, "decode": decode,
          "speedup": {"subnet_vs_full": ratios(models["subnet"], models["full"]),
                      "sparse_vs_full": ratios(models["sparse50"],
                                               models["full_sparse_phase"])},
          "seconds": time.perf_counter() - t0}


def _notes(sizes, table) -> str:
  lengths = "; ".join(f"{s}: prompt {table[s]['prompt']}, decode {table[s]['decode_new']} "
                      f"tokens after {table[s]['decode_prompt']}" for s in sizes)
  short = (f" (xl: short prompt and {table['xl']['decode_new']} decoded tokens, so the run fits "
           f"in minutes on 2 cores; {table['xl']['n_layer']} layers)" if "xl" in sizes else "")
  return f"{lengths}{short}; forward FLOPs count the LM head at every position"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="124m,xl", help="comma-separated: 124m, xl")
  p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU test in seconds)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="weights and compute of every model, twist_jax and transformers alike")
  p.add_argument("--xl-layers", type=int, default=0,
                 help="blocks of the xl shape (0 = all 48); fewer when 48 do not fit in memory")
  args = p.parse_args(argv)
  table = QUICK if args.quick else SIZES
  load_before = host.load_info()
  if args.xl_layers < 0:
    p.error(f"--xl-layers: got {args.xl_layers}; must be >= 1 (0 = the full depth)")
  if args.xl_layers:
    table = dict(table, xl=dict(table["xl"], n_layer=args.xl_layers))
  sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
  unknown = [s for s in sizes if s not in table]
  if unknown or not sizes:
    p.error(f"--sizes: unknown {unknown or sizes}; allowed: {', '.join(table)}")
  t0 = time.perf_counter()
  results = {s: bench_size(table[s], args.dtype) for s in sizes}
  print(json.dumps({
      "bench": "cpu_inference", "quick": args.quick, "platform": jax.devices()[0].platform,
      "cpu_count": os.cpu_count(), "jax": jax.__version__, "dtype": args.dtype, "batch": 1,
      "load_before": load_before, "load_after": host.load_info(),
      "loaded": load_before["loadavg"][0] > LOADED,
      "subnet": f"{MODE} kappa={KAPPA} (random draw, correction folded), dense",
      "sparse": f"{SPARSITY:.0%} of each block kernel zeroed by magnitude, stored dense",
      "decode": "KV-cached greedy decoding (twist_jax.generate prefill_step + decode_loop; "
                "transformers: past_key_values loop); decode1 = one-position forward, no cache",
      "command": " ".join(["python", "bench/cpu_inference.py"] + list(argv or sys.argv[1:])),
      "timing": "median of `repeats` calls after one warm-up (compile) call; models take "
                "turns within each repeat; sparse_vs_full uses the full model's timings of "
                "the same phase (models.full_sparse_phase)",
      "notes": _notes(sizes, table),
      "sizes": results, "total_seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
  main()
