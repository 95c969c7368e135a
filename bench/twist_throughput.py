"""TwIST vs DDP throughput: tokens/s, round time, peak device memory and bytes across devices.

  python bench/twist_throughput.py --preset 124m --batch 16 --context 1024 --dtype bfloat16 \
      --attention cudnn                       # GPU (GPT-2 124M, attn_mlp)
  python bench/twist_throughput.py --quick    # CPU: tiny model, a few seconds per case

Each (variant, kappa) case runs in its own process so peak memory is its own. Prints one JSON
object with every case and the ratios to DDP measured in the same run.

Bytes across devices count what a worker exchanges with the central model: DDP sends its
gradient and receives the mean every step (2 x params); TwIST receives its subnet (params and,
with opt_state=slice, both Adam moments) and sends it back once per round.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def one_case(args) -> dict:
  import jax

  import train_throughput
  from twist_jax import subnets

  cfg, vocab = common.base_config(args.preset, context=args.context, batch=args.batch,
                                  dtype=args.dtype, attention=args.attention,
                                  variant=args.variant, workers=args.workers,
                                  local_steps=args.steps, kappa=args.kappa, mode=args.mode)
  out = train_throughput.measure(cfg, vocab, args.repeats)
  model = cfg.model.model_config(vocab)
  full_bytes = 4 * model.num_params()
  w, r = cfg.twist.workers, cfg.twist.local_steps
  if args.variant == "ddp":
    per_round = 2 * full_bytes * w * r
  else:
    spec = subnets.make_spec(model, cfg.subnet, w)
    sub_bytes = 4 * subnets.subnet_model_config(model, spec).num_params()
    moments = 3 if cfg.twist.opt_state == "slice" else 1
    per_round = 2 * sub_bytes * moments * w
  peak = common.peak_memory()
  out.update(variant=args.variant, kappa=args.kappa, bytes_across_devices_per_round=per_round,
             bytes_per_token=per_round / out["tokens_per_round"], peak_bytes_in_use=peak,
             peak_bytes_per_worker=peak / w if peak else None,
             device_kind=jax.devices()[0].device_kind)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--context", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--attention", default="xla", choices=["xla", "cudnn", "auto"])
  p.add_argument("--mode", default="attn_mlp", choices=["attn", "mlp", "attn_mlp", "blocks"])
  p.add_argument("--workers", type=int, default=4)
  p.add_argument("--steps", type=int, default=15, help="R: local steps per round")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--variants", default="ddp,true,masked,hybrid")
  p.add_argument("--kappas", default="0.25,0.5,1.0")
  p.add_argument("--quick", action="store_true", help="tiny CPU-sized cases")
  p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one case
  p.add_argument("--kappa", type=float, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.quick:
    args.preset, args.batch, args.context, args.steps, args.repeats = "tiny", 4, 32, 3, 2
  if args.variant:
    common.emit(one_case(args))
    return
  cases = []
  for variant in args.variants.split(","):
    for kappa in ([1.0] if variant == "ddp" else [float(k) for k in args.kappas.split(",")]):
      argv = [sys.executable, __file__, "--variant", variant, "--kappa", str(kappa)]
      for k in ("preset", "batch", "context", "dtype", "attention", "mode", "workers", "steps",
                "repeats"):
        argv += [f"--{k}", str(getattr(args, k))]
      proc = subprocess.run(argv, capture_output=True, text=True)
      if proc.returncode:
        cases.append({"variant": variant, "kappa": kappa, "error": proc.stderr.strip()[-2000:]})
        continue
      cases.append(json.loads(proc.stdout))
      print(f"{variant} kappa={kappa}: {cases[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
  ddp = next((c for c in cases if c["variant"] == "ddp" and "error" not in c), None)
  for c in cases:
    if ddp and "error" not in c:
      c["speedup_vs_ddp"] = c["tokens_per_s"] / ddp["tokens_per_s"]
      c["bytes_per_token_vs_ddp"] = c["bytes_per_token"] / ddp["bytes_per_token"]
  common.emit({"settings": {k: v for k, v in vars(args).items() if k not in ("variant", "kappa")},
               "device": common.device_info(), "cases": cases})


if __name__ == "__main__":
  main()
