"""TwIST vs DDP: tokens/s, and what the compiled round moves and holds, measured from XLA.

  python bench/twist_throughput.py --preset 124m --batch 16 --context 1024 --dtype bfloat16 \\
      --attention cudnn                       # GPU (GPT-2 124M, attn_mlp)
  python bench/twist_throughput.py --quick    # 8 fake CPU devices, tiny model, seconds a case
  python bench/twist_throughput.py --memory-124m   # lower GPT-2 124M, W=8 on 8 fake devices:
                                              # per-device memory only (no arrays, no run)

Each (variant, kappa) case runs in its own process. Per case:
- collective_bytes_per_round: result bytes of the collectives in the compiled round's HLO, per
  device, those inside the R-step loop counted R times (bench/hlo_stats.py); and per token.
- memory_bytes_per_device: argument + output + temp - alias from `memory_analysis()` of the
  compiled round (on CPU an XLA proxy; on GPU also `peak_bytes_in_use` from the allocator).
- hybrid: its physical workers' collectives on their sub-mesh, plus the device-to-device
  transfers of a round (central state out to the sub-mesh, summed changes back), from the
  sizes of the arrays it moves.
- model_* fields are formulas, not measurements: the ideal protocol's bytes, and analytic
  training FLOPs per token of the model each worker trains.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import hlo_stats  # noqa: E402


def _tree_bytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _compiled_stats(round_fn, round_args, r: int) -> dict:
  compiled = round_fn.lower(*round_args).compile()
  coll = hlo_stats.collective_bytes(compiled.as_text(), default_trip=r)
  return {"collective_bytes_per_round": coll["total"], "collective_bytes_by_op": coll["by_op"],
          "memory_bytes_per_device": hlo_stats.memory_bytes(compiled)}


def _hybrid_stats(round_fn, state, cfg, model) -> dict:
  """Hybrid is several calls: its sub-mesh round's collectives and its transfers."""
  import jax
  import jax.numpy as jnp

  from twist_jax import parallel, subnet_spec, subnets

  if round_fn.physical is None:
    return {"collective_bytes_per_round": 0, "hybrid_transfer_bytes_per_round": 0}
  run_true, sub_mesh = round_fn.physical
  w, r, b, l = (cfg.twist.workers - 1, cfg.twist.local_steps, cfg.data.batch_size,
                cfg.model.context)
  spec = subnet_spec.make_spec(model, cfg.subnet, cfg.twist.workers)
  rep, split = parallel.replicated(sub_mesh), parallel.worker_sharded(sub_mesh)
  like = lambda t, sh: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                    t)
  subs = jax.eval_shape(lambda: subnets.sample_subnets(jax.random.key(0), spec, w))
  args = (like(state["params"], rep), like(state["opt_state"], rep), like(subs, split),
          jax.ShapeDtypeStruct((w, r, b, l + 1), jnp.int32, sharding=split),
          jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
  out = _compiled_stats(run_true, args, r)
  sums_bytes = _tree_bytes(jax.eval_shape(run_true, *args)[0])
  sent = (_tree_bytes(state["params"]) + _tree_bytes(state["opt_state"])) * sub_mesh.devices.size
  out["hybrid_transfer_bytes_per_round"] = sent + sums_bytes
  return out


def one_case(args) -> dict:
  import jax

  import train_throughput
  from twist_jax import subnet_spec, subnets
  from twist_jax.model import flops_per_token

  cfg, vocab = common.base_config(args.preset, context=args.context, batch=args.batch,
                                  dtype=args.dtype, attention=args.attention,
                                  variant=args.variant, workers=args.workers,
                                  local_steps=args.steps, kappa=args.kappa, mode=args.mode,
                                  opt_state=args.opt_state)
  out = train_throughput.measure(cfg, vocab, args.repeats)
  round_fn, round_args = out.pop("round_fn"), out.pop("round_args")
  model = cfg.model.model_config(vocab)
  w, r = cfg.twist.workers, cfg.twist.local_steps
  if args.variant == "hybrid":
    out.update(_hybrid_stats(round_fn, round_args[0], cfg, model))
  else:
    out.update(_compiled_stats(round_fn, round_args, r))
  out["collective_bytes_per_token"] = out["collective_bytes_per_round"] / out["tokens_per_round"]
  worker_model = model
  full_bytes = 4 * model.num_params()
  if args.variant == "ddp":
    ideal = 2 * full_bytes * w * r
  else:
    spec = subnet_spec.make_spec(model, cfg.subnet, w)
    worker_model = subnets.subnet_model_config(model, spec)
    moments = 3 if cfg.twist.opt_state == "slice" else 1
    ideal = 2 * 4 * worker_model.num_params() * moments * w
  peak = common.peak_memory()
  out.update(variant=args.variant, kappa=args.kappa, opt_state=args.opt_state,
             model_ideal_protocol_bytes_per_round=ideal,
             model_worker_train_flops_per_token=flops_per_token(worker_model, args.context),
             peak_bytes_in_use=peak, device_kind=jax.devices()[0].device_kind)
  return out


def memory_124m(args) -> dict:
  """GPT-2 124M, W = 8 workers on 8 devices, 16 x 1024 tokens per worker: lowered from
  ShapeDtypeStructs (no arrays), compiled, per-device memory for ddp / true / masked."""
  import jax
  import jax.numpy as jnp

  import train_throughput
  from twist_jax import parallel, variants
  from twist_jax.model import init_params

  cases = []
  for variant in ("ddp", "true", "masked"):
    cfg, vocab = common.base_config("124m", context=1024, batch=16, dtype=args.dtype,
                                    attention="xla", variant=variant, workers=8,
                                    local_steps=args.steps, kappa=0.5, mode="attn_mlp",
                                    remat=args.remat)
    ctx = train_throughput.build_context(cfg, vocab)
    model, mesh = ctx.model, ctx.mesh
    rep, split = parallel.replicated(mesh), parallel.worker_sharded(mesh)
    shapes = jax.eval_shape(lambda: variants.init_state(ctx, init_params(model,
                                                                         jax.random.key(0))))
    like = lambda t, sh: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t)
    key = jax.eval_shape(lambda: jax.random.key(0))
    round_args = (like(shapes, rep), like(key, rep),
                  jax.ShapeDtypeStruct((8, args.steps, 16, 1025), jnp.int32, sharding=split),
                  jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    stats = _compiled_stats(variants.make_sampling_round(variant, ctx), round_args, args.steps)
    cases.append({"variant": variant, "kappa": 0.5 if variant != "ddp" else 1.0, **stats})
    print(f"{variant}: {stats['memory_bytes_per_device']['total'] / 2**30:.2f} GiB/device",
          file=sys.stderr)
  ddp = cases[0]["memory_bytes_per_device"]["total"]
  for c in cases:
    c["memory_vs_ddp"] = c["memory_bytes_per_device"]["total"] / ddp
  return {"settings": {"preset": "124m", "workers": 8, "devices": 8, "batch": 16,
                       "context": 1024, "local_steps": args.steps, "dtype": args.dtype,
                       "remat": args.remat, "mode": "attn_mlp"},
          "device": common.device_info(), "cases": cases,
          "note": "memory_analysis() of the compiled round per device; on CPU an XLA proxy"}


def _run_cases(args) -> list:
  cases = []
  for variant in args.variants.split(","):
    for kappa in ([1.0] if variant == "ddp" else [float(k) for k in args.kappas.split(",")]):
      argv = [sys.executable, __file__, "--variant", variant, "--kappa", str(kappa)]
      for k in ("preset", "batch", "context", "dtype", "attention", "mode", "workers", "steps",
                "repeats", "opt_state"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
      proc = subprocess.run(argv, capture_output=True, text=True)
      if proc.returncode:
        cases.append({"variant": variant, "kappa": kappa, "error": proc.stderr.strip()[-2000:]})
        continue
      cases.append(json.loads(proc.stdout))
      print(f"{variant} kappa={kappa}: {cases[-1]['tokens_per_s']:.0f} tokens/s, "
            f"{cases[-1]['collective_bytes_per_token']:.1f} collective B/token", file=sys.stderr)
  ddp = next((c for c in cases if c["variant"] == "ddp" and "error" not in c), None)
  for c in cases:
    if ddp and "error" not in c:
      c["speedup_vs_ddp"] = c["tokens_per_s"] / ddp["tokens_per_s"]
      c["collective_bytes_per_token_vs_ddp"] = (c["collective_bytes_per_token"] /
                                                ddp["collective_bytes_per_token"])
      c["memory_vs_ddp"] = (c["memory_bytes_per_device"]["total"] /
                            ddp["memory_bytes_per_device"]["total"])
  return cases


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--context", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--attention", default="xla", choices=["xla", "cudnn", "auto"])
  p.add_argument("--mode", default="attn_mlp", choices=["attn", "mlp", "attn_mlp", "blocks"])
  p.add_argument("--workers", type=int, default=8)
  p.add_argument("--steps", type=int, default=15, help="R: local steps per round")
  p.add_argument("--opt-state", dest="opt_state", default="slice", choices=["slice", "reset"])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--variants", default="ddp,true,masked,hybrid")
  p.add_argument("--kappas", default="0.25,0.5,1.0")
  p.add_argument("--quick", action="store_true", help="tiny cases on 8 fake CPU devices")
  p.add_argument("--memory-124m", dest="memory_124m", action="store_true",
                 help="per-device memory of GPT-2 124M rounds, lowered without arrays")
  p.add_argument("--remat", action="store_true", help="with --memory-124m: model.remat")
  p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one case
  p.add_argument("--kappa", type=float, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.quick:
    args.preset, args.batch, args.context, args.repeats = "tiny", 2, 32, 1
    args.kappas = "0.5"
  if args.variant:
    common.emit(one_case(args))
    return
  if args.memory_124m:
    common.emit(memory_124m(args))
    return
  common.emit({"settings": {k: v for k, v in vars(args).items() if k not in ("variant", "kappa")},
               "device": common.device_info(), "cases": _run_cases(args)})


if __name__ == "__main__":
  if "--quick" in sys.argv or "--memory-124m" in sys.argv:
    # Several devices on a CPU-only machine: fake ones, set before JAX starts (inherited by
    # the per-case processes).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
  main()
