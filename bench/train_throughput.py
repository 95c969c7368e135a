"""DDP training throughput: tokens/s, step time and MFU of twist_jax's data-parallel round.

  python bench/train_throughput.py --preset 124m --batch 16 --context 1024 --dtype bfloat16 \
      --attention cudnn            # GPU
  python bench/train_throughput.py --preset tiny --batch 8 --context 64   # CPU smoke

Prints one JSON object. Random tokens; the round function is the one training uses.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
from twist_jax import (aggregate, config as config_lib, parallel, subnet_spec,  # noqa: E402
                       variants, worker)
from twist_jax.model import flops_per_token, init_params  # noqa: E402


def build_context(cfg, vocab: int) -> variants.RoundContext:
  """The round context of cfg's variant on all usable local devices, as train.build makes it
  (random init; no teacher: init.teacher_run needs a saved run)."""
  model = cfg.model.model_config(vocab)
  tw = cfg.twist
  spec = None if tw.variant == "ddp" else subnet_spec.make_spec(model, cfg.subnet, tw.workers)
  mesh = parallel.make_mesh(parallel.device_count_for(tw.workers, tw.devices))
  return variants.RoundContext(
      model, spec, worker.make_optimizer(cfg.opt),
      lambda t: config_lib.lr_at(cfg.opt, cfg.steps, t), mesh, tw.opt_state,
      aggregate.outer_optimizer(tw.outer_lr, tw.outer_momentum), tw.full_workers if spec else 0,
      tw.distill, tw.distill_temperature)


def build_round(cfg, vocab: int):
  """(round_fn, state, model, spec, mesh) for cfg's variant on all usable local devices."""
  ctx = build_context(cfg, vocab)
  state = jax.device_put(variants.init_state(ctx, init_params(ctx.model, jax.random.key(0))),
                         parallel.replicated(ctx.mesh))
  return (variants.make_sampling_round(cfg.twist.variant, ctx), state, ctx.model, ctx.spec,
          ctx.mesh)


def measure(cfg, vocab: int, repeats: int) -> dict:
  round_fn, state, model, spec, mesh = build_round(cfg, vocab)
  w, r, b, l = cfg.twist.workers, cfg.twist.local_steps, cfg.data.batch_size, cfg.model.context
  batches = jax.device_put(jax.random.randint(jax.random.key(1), (w, r, b, l + 1), 0, vocab),
                           parallel.worker_sharded(mesh))
  key = jax.device_put(jax.random.key(2), parallel.replicated(mesh))
  holder = {"state": state}

  def one(i=[0]):
    i[0] += 1  # a new round each call: new subnets, drawn inside the compiled round
    holder["state"], metrics = round_fn(holder["state"], key, batches, jnp.int32(i[0] * r))
    jax.block_until_ready(metrics["loss"])

  one()  # compile
  times = common.time_calls(one, repeats)
  t = common.median(times)
  tokens = w * r * b * l
  return {"round_time_s": t, "step_time_s": t / r, "tokens_per_s": tokens / t,
          "tokens_per_round": tokens, "round_times_s": times, "model_params": model.num_params(),
          "flops_per_token": flops_per_token(model, l), "devices": mesh.devices.size,
          "round_args": (holder["state"], key, batches, jnp.int32(0)), "round_fn": round_fn}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny", choices=sorted(common.PRESETS))
  p.add_argument("--batch", type=int, default=8, help="sequences per worker per step")
  p.add_argument("--context", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--attention", default="xla", choices=["xla", "cudnn", "auto"])
  p.add_argument("--workers", type=int, default=1, help="data-parallel shards")
  p.add_argument("--steps", type=int, default=10, help="steps per compiled round")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  cfg, vocab = common.base_config(args.preset, context=args.context, batch=args.batch,
                                  dtype=args.dtype, attention=args.attention, variant="ddp",
                                  workers=args.workers, local_steps=args.steps)
  out = measure(cfg, vocab, args.repeats)
  del out["round_args"], out["round_fn"]
  peak = common.PEAK_FLOPS.get(jax.devices()[0].device_kind)
  out["mfu"] = (out["flops_per_token"] * out["tokens_per_s"] / (peak * out["devices"])
                if peak else None)
  out.update(vars(args), **common.device_info(), peak_bytes_in_use=common.peak_memory())
  common.emit(out)


if __name__ == "__main__":
  main()
