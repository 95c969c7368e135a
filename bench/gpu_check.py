"""One GPU check of twist_jax on random tokens (no dataset): dense GPT-2 124M training tokens/s and
MFU, TwIST's true attn_mlp kappa = 0.5 tokens/s over DDP's, the real peak memory of one round of
each experiments/gpt2_*.py config, and KV-cached decode tokens/s of GPT-2 124M and its kappa = 0.5
subnet; writes ONE JSON file, gpu_check.json.

  bash bench/gpu_check.sh          # GPU box: installs .whl/, then this; JSON into $OUT, else
                                   # results/bench/gpu/
  bash bench/gpu_check.sh --dry    # the same code at tiny shapes on CPU
  python bench/gpu_check.py [--dry] [--out DIR] [--budget-s 420]

Every measurement runs in a fresh process (peaks do not mix; a config that runs out of memory
fails alone) under a timeout, all within --budget-s, and the file is rewritten after each one, so
a run cut short keeps what it finished. The driver never touches the accelerator itself. In
order of priority:
  dense:        DDP, one worker, batch 16 x 1024 tokens, bf16, cuDNN attention (XLA if cuDNN
                fails), R = 10 steps per compiled round: train_throughput.measure. MFU = tokens/s
                x model.flops_per_token / the chip's spec-sheet dense bf16 peak (common.PEAK_FLOPS,
                by device kind).
  gpt2_ddp, gpt2_attn_mlp, then gpt2_attn, gpt2_mlp, gpt2_blocks (configs): experiments/NAME.py as
                train.build makes it (its workers, per-worker batch, R, kappa, dtype, attention,
                remat), all workers on one device: peak_bytes_in_use after its timed rounds (every
                round has the same shapes, so this is one round's peak), XLA's memory analysis of
                the compiled round, and tokens/s.
  kappa_ratio:  tokens/s of gpt2_attn_mlp (true, kappa = 0.5) / gpt2_ddp; `same_settings` says
                whether their workers, per-worker batch, R, context, dtype, attention and remat
                agree.
  decode:       greedy KV-cached decode (cpu_inference.bench_decode: 512-token prompt, 128 new
                tokens, batch 1) of GPT-2 124M and its attn_mlp kappa = 0.5 subnet, bf16 weights.
--dry: the same cases at tiny shapes (2 layers, width 64, 32 tokens, R = 2) on one CPU device,
with a nominal peak so that MFU is computed the same way; its numbers mean nothing.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [BENCH, ROOT]

import host  # noqa: E402  (bench/host.py: no JAX in the driver)

CONFIGS = ("gpt2_ddp", "gpt2_attn_mlp", "gpt2_attn", "gpt2_mlp", "gpt2_blocks")
CASES = ("dense", "gpt2_ddp", "gpt2_attn_mlp", "decode", "gpt2_attn", "gpt2_mlp", "gpt2_blocks")
# Seconds each case may take at most (compile included); the budget may cut them shorter.
CASE_TIMEOUT_S = {"dense": 110, "decode": 90, **{c: 100 for c in CONFIGS}}
DENSE = dict(preset="124m", batch=16, context=1024, steps=10, repeats=3)
DRY_DENSE = dict(preset="tiny", batch=2, context=32, steps=2, repeats=2)
DRY_MODEL = dict(n_layer=2, n_head=4, n_embd=64, context=32)  # configs under --dry
DRY_PEAK_FLOPS = 1e12  # nominal: a CPU has no spec figure, and MFU's code path must still run
CONFIG_REPEATS = 2
# Same settings for the kappa ratio: the fields of a config case's `settings` that must agree.
RATIO_FIELDS = ("workers", "batch", "local_steps", "context", "dtype", "attention", "remat",
                "devices")


# ---- cases (each runs in its own process: --case NAME) ------------------------------------------


def _peak_flops(kind: str, dry: bool) -> tuple[float | None, str]:
  import common  # pylint: disable=import-outside-toplevel
  if dry:
    return DRY_PEAK_FLOPS, "nominal 1e12 (--dry: no spec figure for this device)"
  if kind in common.PEAK_FLOPS:
    return common.PEAK_FLOPS[kind], f"spec sheet, dense bf16, {kind}"
  return None, f"unknown device kind {kind!r}: no MFU"


def case_dense(dry: bool) -> dict:
  """Dense GPT-2 training throughput and MFU (train_throughput.measure), cuDNN attention first."""
  import common  # pylint: disable=import-outside-toplevel
  import train_throughput  # pylint: disable=import-outside-toplevel
  s = DRY_DENSE if dry else DENSE
  failed = {}
  for attention in (["xla"] if dry else ["cudnn", "xla"]):
    cfg, vocab = common.base_config(s["preset"], context=s["context"], batch=s["batch"],
                                    dtype="bfloat16", attention=attention, variant="ddp",
                                    workers=1, local_steps=s["steps"])
    try:
      out = train_throughput.measure(cfg, vocab, s["repeats"])
      break
    except Exception as e:  # pylint: disable=broad-except  # cuDNN may be unavailable: fall back
      failed[attention] = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
  else:
    raise RuntimeError(f"every attention failed: {failed}")
  del out["round_args"], out["round_fn"]
  info = common.device_info()
  peak, source = _peak_flops(info["device_kind"], dry)
  out.update(settings=dict(s, workers=1, dtype="bfloat16", attention=attention, vocab=vocab),
             attention_failed=failed, peak_flops=peak, peak_flops_source=source,
             mfu=(out["tokens_per_s"] * out["flops_per_token"] / (peak * out["devices"])
                  if peak else None),
             peak_bytes_in_use=common.peak_memory(), device=info)
  return out


def _vocab(data_cfg) -> int:
  from twist_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  sizes = {"gpt2": tokenizers.GPT2_VOCAB_SIZE, "bytes": tokenizers.BytesTokenizer.vocab_size}
  if data_cfg.tokenizer not in sizes:
    raise ValueError(f"data.tokenizer {data_cfg.tokenizer!r}: the check knows {sorted(sizes)}")
  return sizes[data_cfg.tokenizer]


def load_config(name: str, dry: bool):
  """(Config, vocab) of experiments/NAME.py's default; under --dry with tiny shapes and no
  shared layers (its workers, kappa, mode, dtype, remat and other settings kept)."""
  from twist_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(None)
  if dry:
    c.model.update(**DRY_MODEL)
    c.data.batch_size = 2
    c.twist.local_steps = 2
    c.steps = 2 * c.twist.local_steps
    c.opt.warmup_steps = 0
    c.subnet.shared_layers = ()  # as the smoke variants: two blocks leave none to share
    if c.model.attention == "cudnn":
      c.model.attention = "xla"  # a CPU has no cuDNN
  cfg = config_lib.from_configdict(c)
  return cfg, (256 if dry else _vocab(cfg.data))


def case_config(name: str, dry: bool) -> dict:
  """One config's rounds on random tokens: real peak memory, XLA's estimate, tokens/s."""
  import common  # pylint: disable=import-outside-toplevel
  import hlo_stats  # pylint: disable=import-outside-toplevel
  import train_throughput  # pylint: disable=import-outside-toplevel
  cfg, vocab = load_config(name, dry)
  if cfg.init.teacher_run:
    raise ValueError(f"{name}: init.teacher_run needs a saved run; the check has none")
  out = train_throughput.measure(cfg, vocab, CONFIG_REPEATS)
  peak = common.peak_memory()  # before the extra compile below can allocate anything
  round_fn, round_args = out.pop("round_fn"), out.pop("round_args")
  compiled = round_fn.lower(*round_args).compile()
  m = cfg.model
  out.update(settings={"variant": cfg.twist.variant, "mode": cfg.subnet.mode,
                       "kappa": cfg.subnet.kappa, "workers": cfg.twist.workers,
                       "batch": cfg.data.batch_size, "local_steps": cfg.twist.local_steps,
                       "context": m.context, "dtype": m.dtype, "attention": m.attention,
                       "remat": m.remat, "worker_loop": cfg.twist.worker_loop,
                       "n_layer": m.n_layer, "n_embd": m.n_embd,
                       "vocab": vocab, "devices": out["devices"]},
             peak_bytes_in_use=peak, xla_memory_bytes_per_device=hlo_stats.memory_bytes(compiled),
             device=common.device_info())
  return out


def case_decode(dry: bool) -> dict:
  """Cached greedy decode of GPT-2 124M and its kappa = 0.5 subnet in bf16 (cpu_inference)."""
  import common  # pylint: disable=import-outside-toplevel
  import cpu_inference  # pylint: disable=import-outside-toplevel
  shape = dict((cpu_inference.QUICK if dry else cpu_inference.SIZES)["124m"], transformers=False)
  models = cpu_inference.full_and_subnet(shape, "bfloat16")
  out = cpu_inference.bench_decode(models, shape)
  out.update(dtype="bfloat16", batch=1, shape={k: shape[k] for k in ("n_layer", "n_head",
                                                                      "n_embd", "vocab_size")},
             subnet={"n_head": models["subnet"][1].n_head[0],
                     "n_inner": models["subnet"][1].n_inner[0]},
             peak_bytes_in_use=common.peak_memory(), device=common.device_info())
  return out


def run_case(name: str, dry: bool) -> dict:
  if name == "dense":
    return case_dense(dry)
  if name == "decode":
    return case_decode(dry)
  return case_config(name, dry)


# ---- driver -------------------------------------------------------------------------------------


def _nvidia_smi() -> str | None:
  """GPU name, utilisation and memory in use before the check (is anything else running?)."""
  try:
    return subprocess.run(["nvidia-smi", "--query-gpu=name,utilization.gpu,memory.used,"
                           "memory.total", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=20).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _case_env(dry: bool) -> dict:
  # No preallocation: each case's process grows its pool as needed, so a config can use the
  # whole device, and peak_bytes_in_use is what it really held.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if dry:  # one CPU device, as one GPU: drop any fake-device count (tests set 8)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
  return env


def _tail(text: str, n: int = 1500) -> str:
  return (text or "")[-n:]


def measure_case(name: str, dry: bool, timeout: float) -> dict:
  """Runs one case in a fresh process; its record, or its status and the tail of its stderr."""
  load = host.load_info()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "case.json")
    argv = [sys.executable, os.path.abspath(__file__), "--case", name, "--case-out", path]
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(argv + (["--dry"] if dry else []), capture_output=True, text=True,
                            timeout=timeout, env=_case_env(dry), cwd=ROOT)
    except subprocess.TimeoutExpired as e:
      return {"status": "timeout", "timeout_s": timeout, "wall_s": time.perf_counter() - t0,
              "load_before": load, "stderr_tail": _tail(e.stderr.decode() if isinstance(
                  e.stderr, bytes) else e.stderr)}
    wall = time.perf_counter() - t0
    if proc.returncode or not os.path.exists(path):
      oom = any(s in proc.stderr for s in ("RESOURCE_EXHAUSTED", "Out of memory", "OOM"))
      return {"status": "oom" if oom else "error", "returncode": proc.returncode,
              "wall_s": wall, "load_before": load, "stderr_tail": _tail(proc.stderr)}
    with open(path) as f:
      rec = json.load(f)
  return {"status": "ok", **rec, "wall_s": wall, "load_before": load}


def kappa_ratio(configs: dict) -> dict:
  """true attn_mlp kappa = 0.5 tokens/s over DDP's, from the two config cases."""
  ddp, twist = configs.get("gpt2_ddp", {}), configs.get("gpt2_attn_mlp", {})
  if ddp.get("status") != "ok" or twist.get("status") != "ok":
    return {"status": "missing", "reason": f"gpt2_ddp: {ddp.get('status', 'not run')}, "
                                           f"gpt2_attn_mlp: {twist.get('status', 'not run')}"}
  differ = [k for k in RATIO_FIELDS if ddp["settings"][k] != twist["settings"][k]]
  return {"status": "ok", "attn_mlp_tokens_per_s": twist["tokens_per_s"],
          "ddp_tokens_per_s": ddp["tokens_per_s"],
          "ratio": twist["tokens_per_s"] / ddp["tokens_per_s"],
          "kappa": twist["settings"]["kappa"], "same_settings": not differ,
          "settings_that_differ": differ}


def _write(out_dir: str, record: dict) -> str:
  """Atomically (a temp file renamed over it), so a run cut short leaves a whole JSON file."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "gpu_check.json")
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".gpu_check.", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path


def drive(args) -> dict:
  t0, started = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
  record = {"bench": "gpu_check", "dry": args.dry, "budget_s": args.budget_s,
            "started_utc": started.isoformat(timespec="seconds"),
            "command": " ".join(["python", "bench/gpu_check.py"] + sys.argv[1:]),
            "python": platform.python_version(), "host": {"load_before": host.load_info(),
                                                          "nvidia_smi_before": _nvidia_smi()},
            "dense": {"status": "not run"}, "configs": {}, "decode": {"status": "not run"}}
  for name in CASES:
    left = args.budget_s - (time.perf_counter() - t0)
    if left < 20:  # too little to import JAX and compile anything
      rec = {"status": "skipped", "reason": f"time budget: {left:.0f} s left"}
    else:
      # --dry has no per-case cap: its shapes are tiny, and a busy CI machine is slow to start.
      rec = measure_case(name, args.dry, left if args.dry else min(CASE_TIMEOUT_S[name], left))
    if name in CONFIGS:
      record["configs"][name] = rec
    else:
      record[name] = rec
    record["kappa_ratio"] = kappa_ratio(record["configs"])
    record["total_wall_s"] = time.perf_counter() - t0
    _write(args.out, record)
    print(f"{name}: {rec['status']} ({rec.get('wall_s', 0):.0f} s)", file=sys.stderr, flush=True)
  record["device"] = next((r["device"] for r in (record["dense"], *record["configs"].values(),
                                                 record["decode"]) if "device" in r), None)
  record["host"]["load_after"] = host.load_info()
  record["complete"] = all(r["status"] == "ok" for r in (record["dense"], record["decode"],
                                                         *record["configs"].values()))
  record["total_wall_s"] = time.perf_counter() - t0
  _write(args.out, record)
  return record


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dry", action="store_true", help="tiny shapes on CPU: the JSON's structure")
  p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "results", "bench",
                                                                        "gpu"),
                 help="folder of gpu_check.json (default: $OUT if set, else results/bench/gpu)")
  p.add_argument("--budget-s", type=float, default=420.0,
                 help="seconds for all cases together (each also has its own timeout)")
  p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: one case
  p.add_argument("--case-out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.budget_s <= 0:
    p.error(f"--budget-s: got {args.budget_s}; must be > 0")
  if args.case:
    rec = run_case(args.case, args.dry)
    with open(args.case_out, "w") as f:
      json.dump(rec, f)
    return
  record = drive(args)
  print(json.dumps({"out": os.path.join(args.out, "gpu_check.json"),
                    "complete": record["complete"], "total_wall_s": record["total_wall_s"]}))


if __name__ == "__main__":
  main()
