"""Shared pieces of the benchmarks: model presets, timing, device facts. Benchmarks print JSON."""

import json
import statistics
import sys
import time

import jax

from twist_jax import config as config_lib
from twist_jax.model import remat_name

# (n_layer, n_head, n_embd, vocab)
PRESETS = {
    "tiny": (2, 4, 64, 256),
    "small": (4, 8, 128, 256),
    "124m": (12, 12, 768, 50257),
    "350m": (24, 16, 1024, 50257),
}
# Dense (not 2:4-sparse) bf16 peak FLOP/s from the vendor's spec sheet, by JAX device kind, for
# MFU (kinds not listed: MFU not reported). H100 SXM and H200 share the H100 SXM's tensor cores.
PEAK_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12,
              "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12}


def base_config(preset: str, *, context: int, batch: int, dtype: str, attention: str,
                variant: str, workers: int, local_steps: int, kappa: float = 0.5,
                mode: str = "attn_mlp", opt_state: str = "slice", remat: bool | str = "none"):
  n_layer, n_head, n_embd, vocab = PRESETS[preset]
  c = config_lib.default_config()
  c.model.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd, context=context, dtype=dtype,
                 attention=attention)
  c.model.remat = remat_name(remat)  # a policy name; booleans as the older flag meant them
  c.twist.update(variant=variant, workers=workers, local_steps=local_steps, opt_state=opt_state)
  c.subnet.update(mode=mode, kappa=kappa)
  c.data.batch_size = batch
  c.steps = local_steps * 1000
  return config_lib.from_configdict(c), vocab


def time_calls(fn, repeats: int) -> list[float]:
  """Wall times of `fn()` (which must block until its device work is done)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def median(xs):
  return statistics.median(xs)


def device_info() -> dict:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
          "jax": jax.__version__}


def peak_memory() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def emit(obj) -> None:
  json.dump(obj, sys.stdout, indent=1, sort_keys=True)
  sys.stdout.write("\n")
