"""CPU inference of a full GPT-2, its extracted attn_mlp kappa = 0.5 subnet (a smaller dense
GPT-2) and a 50% unstructured-sparse model stored dense; prints ONE JSON object.

  python bench/cpu_inference.py [--sizes 124m,xl] [--quick]     # ~4-5 min on 2 cores

Random weights (speed does not depend on training). Per model, batch 1, median of `repeats`
timed calls after a warm-up call (which also compiles); the models being compared take turns
within each repeat, so background load hits them alike:
  prefill:  one forward of the prompt (logits at every position, as GPT-2's forward computes).
  generate: one step of twist_jax.generate (greedy) with a full window of `gen_window` tokens.
            There is no KV cache: each new token recomputes the whole window.
  decode1:  a forward of ONE position: the weight-bound per-token cost a KV-cached decoder would
            pay (attention over the cache not included).
Forward FLOPs allow about 1.5x (124M) and 1.9x (XL) for the subnet: embeddings and the LM head
are shared. The sparse model has the full model's shapes and dense kernels: it shows what
unstructured sparsity buys on dense CPU kernels (expected: nothing) with half its block weights
zero.
"""

import argparse
import functools
import json
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"  # the point of the benchmark; set before JAX initialises
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from twist_jax import deploy, generate  # noqa: E402
from twist_jax.model import GPT2, ModelConfig, flops_per_token, init_params  # noqa: E402

# GPT-2 shapes; XL keeps a short prompt so the whole run stays within minutes on 2 cores.
SIZES = {
    "124m": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, prompt=512,
                 gen_window=128, repeats=5),
    "xl": dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, prompt=64,
               gen_window=32, repeats=3),
}
QUICK = {  # same code path, tiny shapes: a CPU test in seconds
    "124m": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=256, prompt=32, gen_window=16,
                 repeats=2),
    "xl": dict(n_layer=3, n_head=5, n_embd=80, vocab_size=256, prompt=24, gen_window=8,
               repeats=2),
}
N_POSITIONS = 1024
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


METRICS = ("prefill", "generate", "decode1")


@functools.partial(jax.jit, static_argnums=(1,))
def forward(params, cfg: ModelConfig, tokens_1xL):
  return GPT2(cfg).apply({"params": params}, tokens_1xL)


def calls(params, cfg: ModelConfig, prompt: int, gen_window: int) -> dict:
  """{metric: zero-argument call} of one model (see the module docstring)."""
  rng = np.random.default_rng(1)
  prompt_1xL = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt)), jnp.int32)
  # generate: the model with a gen_window context and its window full (the steady state).
  cfg_w = cfg.replace(n_positions=gen_window)
  params_w = dict(params, wpe={"embedding": params["wpe"]["embedding"][:gen_window]})
  window_1xW, n = prompt_1xL[:, :gen_window], jnp.int32(gen_window)
  key, greedy = jax.random.key(0), jnp.float32(0)
  return {"prefill": lambda: forward(params, cfg, prompt_1xL),
          "generate": lambda: generate.decode_step(params_w, cfg_w, window_1xW, n, key, 0,
                                                   greedy, 0),
          "decode1": lambda: forward(params, cfg, prompt_1xL[:, :1])}


def median_times(models: dict, shape: dict) -> dict:
  """{model: {metric: median seconds}} over shape['repeats'] timed calls after one warm-up
  (compiling) call. The models take turns within each repeat, so a change of background load
  hits all of them alike and their ratios stay fair."""
  fns = {name: calls(p, c, shape["prompt"], shape["gen_window"]) for name, (p, c) in
         models.items()}
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
          "generate_step_s": secs["generate"], "generate_tokens_per_s": 1 / secs["generate"],
          "decode1_s": secs["decode1"], "decode1_tokens_per_s": 1 / secs["decode1"]}


def ratios(model: dict, full: dict) -> dict:
  """Speed-ups (>1 = faster than full) and the parameter-memory ratio."""
  speed = {m: model[f"{m}_tokens_per_s"] / full[f"{m}_tokens_per_s"] for m in METRICS}
  return {**speed, "fwd_flops": full["fwd_flops_per_token"] / model["fwd_flops_per_token"],
          "param_bytes": model["param_bytes"] / full["param_bytes"]}


def bench_size(shape: dict) -> dict:
  """Two phases, so that at most two models are alive (XL: 6 GB each): full with its subnet,
  then full with the sparse model; each ratio compares timings of the same phase."""
  t0 = time.perf_counter()
  cfg = ModelConfig.uniform(n_layer=shape["n_layer"], n_head=shape["n_head"],
                            n_embd=shape["n_embd"], vocab_size=shape["vocab_size"],
                            n_positions=N_POSITIONS)
  full = random_params(cfg)
  spec = deploy.deploy_spec(cfg, MODE, KAPPA)
  subnet = deploy.choose_subnet(full, cfg, spec, "random", jax.random.key(0))
  small, cfg_small = deploy.extract(full, cfg, spec, subnet)
  secs = median_times({"full": (full, cfg), "subnet": (small, cfg_small)}, shape)
  models = {"full": summary(full, cfg, secs["full"], shape["prompt"]),
            "subnet": summary(small, cfg_small, secs["subnet"], shape["prompt"])}
  models["subnet"].update(n_head=cfg_small.n_head[0], n_inner=cfg_small.n_inner[0])
  del small
  sparse = random_params(cfg, sparsity=SPARSITY)  # the same draws as `full`, pruned
  secs = median_times({"full": (full, cfg), "sparse50": (sparse, cfg)}, shape)
  models["full_sparse_phase"] = summary(full, cfg, secs["full"], shape["prompt"])
  models["sparse50"] = summary(sparse, cfg, secs["sparse50"], shape["prompt"])
  models["sparse50"]["block_kernel_zero_fraction"] = block_zero_fraction(sparse, cfg)
  return {"shape": {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")},
          "n_inner": cfg.n_inner[0], "prompt_len": shape["prompt"],
          "gen_window": shape["gen_window"], "repeats": shape["repeats"], "models": models,
          "speedup": {"subnet_vs_full": ratios(models["subnet"], models["full"]),
                      "sparse_vs_full": ratios(models["sparse50"],
                                               models["full_sparse_phase"])},
          "seconds": time.perf_counter() - t0}


def _notes(sizes, table) -> str:
  lengths = "; ".join(f"{s}: prompt {table[s]['prompt']}, generation window "
                      f"{table[s]['gen_window']}" for s in sizes)
  short = " (xl: short, so the run fits in minutes on 2 cores)" if "xl" in sizes else ""
  return f"{lengths}{short}; forward FLOPs count the LM head at every position"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="124m,xl", help="comma-separated: 124m, xl")
  p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU test in seconds)")
  args = p.parse_args(argv)
  table = QUICK if args.quick else SIZES
  sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
  unknown = [s for s in sizes if s not in table]
  if unknown or not sizes:
    p.error(f"--sizes: unknown {unknown or sizes}; allowed: {', '.join(table)}")
  t0 = time.perf_counter()
  results = {s: bench_size(table[s]) for s in sizes}
  print(json.dumps({
      "bench": "cpu_inference", "quick": args.quick, "platform": jax.devices()[0].platform,
      "cpu_count": os.cpu_count(), "jax": jax.__version__, "dtype": "float32", "batch": 1,
      "subnet": f"{MODE} kappa={KAPPA} (random draw, correction folded), dense",
      "sparse": f"{SPARSITY:.0%} of each block kernel zeroed by magnitude, stored dense",
      "generate": "KV-less: each token recomputes a full gen_window-token window "
                  "(twist_jax.generate.decode_step); decode1 = one-position forward",
      "timing": "median of `repeats` calls after one warm-up (compile) call; models take "
                "turns within each repeat; sparse_vs_full uses the full model's timings of "
                "the same phase (models.full_sparse_phase)",
      "notes": _notes(sizes, table),
      "sizes": results, "total_seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
  main()
