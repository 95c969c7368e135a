"""Per-device memory of experiment configs' training rounds and of the evaluation step, compiled
from shapes alone (no weights, no data): XLA's `memory_analysis()` of the compiled programs.

  python bench/memory.py --configs experiments/gpt2_*.py --devices 1,8 \\
      --before experiments/gpt2_attn.py --out results/bench/memory_gpt2.json

Each config (and each `--args` variant of it, e.g. `:hf`) is resolved as the launcher resolves
it and its training round is built as the trainer builds it (`train.round_context`, the
sampling round of its variant), then lowered from ShapeDtypeStructs on a mesh of N visible
devices (N from --devices; N > 1 are fake CPU devices, set before JAX starts) and compiled.
`--before CONFIG` also compiles CONFIG with no remat and no gradient accumulation (the setting
before those existed). The evaluation step (`evaluate.mean_nll`'s compiled batch and the
golden-ticket sweep's) is compiled at the configs' model and eval batch, next to the same
computation with full float32 logits (what evaluation did before it reused the chunked loss).
On the CPU backend these are compile-time estimates of XLA's buffer assignment, not allocator
peaks; `:hf` configs are compiled with Hugging Face gpt2's shape (the same ModelConfig as the
random-init config), without its weights.
"""

import argparse
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GB = 1e9


def load_config(path: str, arg: str | None):
  """The validated Config of `path:arg`, as the launcher resolves it."""
  from twist_jax import config as config_lib

  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.from_configdict(module.get_config(arg))


def memory_figures(compiled) -> dict:
  """argument, output, temp, alias, generated code and their per-device total, in bytes."""
  import hlo_stats

  m = hlo_stats.memory_bytes(compiled)
  code = int(compiled.memory_analysis().generated_code_size_in_bytes)
  return {**m, "generated_code": code, "total": m["total"] + code,
          "total_gb": round((m["total"] + code) / GB, 3)}


def _shaped(tree, sharding):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def round_memory(cfg, vocab: int, available: int) -> dict:
  """Compiles cfg's training round on `available` devices from shapes; its memory figures."""
  import jax
  import jax.numpy as jnp

  from twist_jax import parallel, subnet_spec, train, variants
  from twist_jax.errors import UserError
  from twist_jax.model import init_params

  tw = cfg.twist
  if tw.variant == "hybrid" or cfg.init.teacher_run or tw.dense_steps:
    raise UserError("bench/memory.py compiles one round function: not hybrid, a fixed teacher "
                    "or dense warm-up steps")
  model = cfg.model.model_config(vocab)
  spec = None if tw.variant == "ddp" else subnet_spec.make_spec(model, cfg.subnet, tw.workers)
  n = parallel.device_count_for(tw.workers, tw.devices, available=available)
  mesh = parallel.make_mesh(n)
  ctx = train.round_context(cfg, model, spec, mesh)
  rep, split = parallel.replicated(mesh), parallel.worker_sharded(mesh)
  state = jax.eval_shape(lambda: variants.init_state(ctx, init_params(model, jax.random.key(0))))
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)  # raw key data, as the trainer
  shape = (tw.workers, tw.local_steps, cfg.data.batch_size, cfg.model.context + 1)
  args = (_shaped(state, rep), key, jax.ShapeDtypeStruct(shape, jnp.int32, sharding=split),
          jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
  t0 = time.perf_counter()
  compiled = variants.make_sampling_round(tw.variant, ctx).lower(*args).compile()
  return {"mesh_devices": n, "workers_per_device": tw.workers // n,
          "compile_s": round(time.perf_counter() - t0, 1), **memory_figures(compiled)}


def _full_logits_nll_sum(params, cfg, windows_BxLp1):
  """Evaluation before chunking: the whole batch's float32 (B, L, V) logits, then the NLL."""
  from twist_jax.model import GPT2, next_token_nll

  logits = GPT2(cfg).apply({"params": params}, windows_BxLp1[:, :-1])
  return next_token_nll(logits, windows_BxLp1[:, 1:]).sum()


def eval_memory(cfg, vocab: int) -> dict:
  """Compiled memory of one evaluation batch and one golden-ticket sweep call, chunked (as
  evaluation runs now) and with full logits (before), on one device."""
  import jax
  import jax.numpy as jnp

  from twist_jax import evaluate, subnet_spec, subnets
  from twist_jax.model import init_params

  model = cfg.model.model_config(vocab)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  b, l = cfg.eval.batch_size, cfg.model.context
  windows = jax.ShapeDtypeStruct((b, l + 1), jnp.int32)
  figures = lambda fn, *a: memory_figures(jax.jit(fn, static_argnums=1).lower(*a).compile())
  out = {"batch": b, "context": l, "dtype": model.dtype,
         "mean_nll_batch": figures(evaluate.metrics._window_nll_sum, params, model, windows),
         "mean_nll_batch_full_logits_before": figures(_full_logits_nll_sum, params, model,
                                                      windows)}
  # The golden-ticket sweep: subnet_losses' call of 8 subnets on batch // 8 windows each.
  spec = subnet_spec.deploy_spec(model, cfg.subnet.mode, 0.5, cfg.subnet.shared_layers)
  sb = 8
  subs = jax.eval_shape(lambda: evaluate.random_subnets(jax.random.key(0), spec, sb))
  win = jax.ShapeDtypeStruct((max(1, b // sb), l + 1), jnp.int32)
  weight = jax.ShapeDtypeStruct((max(1, b // sb),), jnp.float32)
  small_cfg = subnets.subnet_model_config(model, spec)

  def full_logits_sweep(params, model, subs, win, weight):
    one = lambda s: _full_logits_nll_sum(subnets.extract_subnet(params, s, spec), small_cfg, win)
    return jax.vmap(one)(subs)  # (weights omitted: the memory is the logits')

  sweep = jax.jit(evaluate.metrics._subnets_nll_sums, static_argnums=(1, 2))
  out["golden_sweep_call"] = {
      "subnets": sb, "windows": win.shape[0], "mode": spec.mode,
      **memory_figures(sweep.lower(params, model, spec, subs, win, weight).compile())}
  out["golden_sweep_call_full_logits_before"] = figures(full_logits_sweep, params, model, subs,
                                                        win, weight)
  return out


def _uptime() -> str:
  return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def one_case(path: str, arg: str, setting: str, n: int, vocab: int) -> dict:
  """One config's round on n visible devices; setting 'before' drops remat and accumulation and
  runs a device's workers all at once (twist.worker_loop = vmap)."""
  import dataclasses

  cfg = load_config(path, None if arg == "none" else arg)
  if setting == "before":
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat="none"),
                              data=dataclasses.replace(cfg.data, microbatch=0),
                              twist=dataclasses.replace(cfg.twist, worker_loop="vmap"))
  name = os.path.basename(path) + ("" if arg == "none" else f":{arg}")
  return {"config": name, "setting": setting, "visible_devices": n,
          "variant": cfg.twist.variant, "workers": cfg.twist.workers,
          "batch": cfg.data.batch_size, "microbatch": cfg.data.microbatch,
          "remat": cfg.model.remat, "worker_loop": cfg.twist.worker_loop,
          "dtype": cfg.model.dtype, **round_memory(cfg, vocab, n)}


def _child(argv: list[str]) -> dict:
  """Runs one case in its own process (its own device count, its own compile memory)."""
  proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
  if proc.returncode:
    return {"case": argv, "error": proc.stderr.strip()[-2000:]}
  return json.loads(proc.stdout)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", nargs="+", help="experiment config files")
  p.add_argument("--args", default="none,hf", help="config arguments ('none' = no argument)")
  p.add_argument("--devices", default="1,8", help="visible device counts to compile for")
  p.add_argument("--before", nargs="*", default=[],
                 help="configs also compiled with model.remat=none, data.microbatch=0, "
                 "twist.worker_loop=vmap")
  p.add_argument("--vocab", type=int, default=50257, help="the tokenizer's vocabulary size")
  p.add_argument("--no-eval", dest="eval", action="store_false")
  p.add_argument("--jobs", type=int, default=4, help="cases compiled at once (processes)")
  p.add_argument("--out", help="also write the JSON here")
  p.add_argument("--case", nargs=4, help=argparse.SUPPRESS)  # internal: PATH ARG SETTING N
  p.add_argument("--eval-case", dest="eval_case", help=argparse.SUPPRESS)  # internal: PATH
  args = p.parse_args()
  n = int(args.case[3]) if args.case else 1
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={n}").strip()
  import common

  if args.case:
    common.emit(one_case(*args.case[:3], n, args.vocab))
    return
  if args.eval_case:
    common.emit(eval_memory(load_config(args.eval_case, None), args.vocab))
    return
  if not args.configs:
    p.error("--configs is required")
  t_start = time.perf_counter()
  out = {"command": "python " + " ".join(sys.argv), "device": common.device_info(),
         "estimate": "compile-time: XLA memory_analysis() of programs compiled from "
                     "ShapeDtypeStructs on the CPU backend (no arrays allocated); not an "
                     "allocator peak. total = argument + output + temp - alias + generated code",
         "machine": (f"loaded shared CPU machine, up to {args.jobs} cases compiled at once "
                     "(compile times are not benchmarks)"),
         "uptime_before": _uptime(), "complete": False, "cases": []}
  # Every config first (before, eval, then the other config arguments), so a cut-short run
  # still covers each config; the JSON is rewritten as cases finish.
  arg_list = args.args.split(",")
  jobs = [["--case", path, arg_list[0], "now", n] for path in args.configs
          for n in args.devices.split(",")]
  jobs += [["--case", path, "none", "before", n] for path in args.before
           for n in args.devices.split(",")]
  jobs += [["--eval-case", args.configs[0]]] if args.eval else []
  jobs += [["--case", path, arg, "now", n] for arg in arg_list[1:] for path in args.configs
           for n in args.devices.split(",")]
  jobs = [[str(x) for x in j] + ["--vocab", str(args.vocab)] for j in jobs]
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for job, result in zip(jobs, pool.map(_child, jobs)):
      if job[0] == "--eval-case":
        out["eval"] = result
      else:
        out["cases"].append(result)
        print(f"{result.get('config')} [{result.get('setting')}] "
              f"{result.get('visible_devices')} devices: "
              f"{result.get('total_gb', result.get('error'))} GB/device", file=sys.stderr)
      out["wall_s"] = round(time.perf_counter() - t_start, 1)
      _write(out, args.out)
  out["complete"], out["uptime_after"] = True, _uptime()
  _write(out, args.out)
  common.emit(out)


def _write(out: dict, path: str | None) -> None:
  """Replaces `path` whole (never half-written)."""
  if not path:
    return
  with open(path + ".tmp", "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()
