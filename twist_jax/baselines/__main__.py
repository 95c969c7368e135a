"""Post-training pruning baselines on a trained run, evaluated like the TwIST subnets.

  python -m twist_jax.baselines --workdir RUN_DDP --method NAME --sparsity 0.5 \
      [--calib-windows 16] [--mode attn_mlp] [--max-windows 64] [--seed 0] [--out FILE] [--json]

NAME: unstructured magnitude | wanda | sparsegpt (same shapes, zeros in the four block kernels),
or structured struct-random | struct-magnitude | struct-wanda (unit scores -> the top
kappa = 1 - sparsity units per partitioned layer -> an extracted dense, smaller GPT-2).
Structured subnets are extracted with correction 'none': a pruning baseline rescales nothing.
Calibration windows come from the *training* split (the run's seed shuffles which); the
validation windows and protocol are those of `python -m twist_jax.evaluate`. Prints a short
summary (method, sparsity, kept parameters, PPL); the full JSON record goes to --out FILE
and/or, with --json, to stdout instead of the summary. Writes nothing else.
"""

import os
import sys
import time

import jax
import numpy as np

from twist_jax import baselines, evaluate, files, subnet_spec, subnets
from twist_jax.errors import ConfigError, UserError

STRUCT_PREFIX = "struct-"
METHODS = (tuple(baselines.METHODS_UNSTRUCTURED) +
           tuple(STRUCT_PREFIX + m for m in baselines.METHODS_STRUCTURED))
STRUCT_MODES = ("attn", "mlp", "attn_mlp")  # unit scores exist for heads and MLP units only
NEEDS_CALIBRATION = ("wanda", "sparsegpt", STRUCT_PREFIX + "wanda")


def _parser() -> evaluate.OneLineParser:
  p = evaluate.OneLineParser(prog="python -m twist_jax.baselines",
                             description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="trained run (usually the DDP baseline)")
  p.add_argument("--method", required=True, choices=METHODS)
  p.add_argument("--sparsity", type=float, required=True,
                 help="fraction removed, in [0, 1); structured methods keep kappa = 1 - sparsity")
  p.add_argument("--calib-windows", type=int, default=16, help="training windows for calibration")
  # attn_mlp removes ~sparsity of every block's weights, the ones unstructured methods prune.
  p.add_argument("--mode", choices=STRUCT_MODES, default="attn_mlp",
                 help="structured methods: which units are pruned")
  p.add_argument("--max-windows", type=int, default=64, help="validation windows (0 = all)")
  p.add_argument("--batch-size", type=int, default=32, help="validation batch")
  p.add_argument("--seed", type=int, default=0, help="struct-random's scores")
  p.add_argument("--out", help="JSON file for the full record (a new or replaced file)")
  evaluate.add_json_flag(p)
  return p


def _check(a) -> None:
  if not 0 <= a.sparsity < 1:
    raise UserError(f"--sparsity: got {a.sparsity:g}; must be in [0, 1)")
  for flag, value, low in (("--calib-windows", a.calib_windows, 1),
                           ("--max-windows", a.max_windows, 0),
                           ("--batch-size", a.batch_size, 1)):
    if value < low:
      raise UserError(f"{flag}: got {value}; must be >= {low}")
  if a.out and os.path.isdir(a.out):
    raise UserError(f"--out {a.out}: is a folder; give a JSON file path")
  evaluate.check_run(a.workdir)


def calibration_windows(dataset, cfg, count: int) -> np.ndarray:
  """(count, L+1) training windows: the first batch of a one-worker train iterator (shuffled by
  the run's seed, so the windows are spread over the whole training split)."""
  it = dataset.train_iterator(num_workers=1, batch_size=count, context=cfg.model.context,
                              seed=cfg.seed)
  return next(it)[0]


def structured_spec(model, kappa: float, mode: str, shared) -> subnet_spec.SubnetSpec:
  """The pruned model's shape; correction 'none': a pruning baseline rescales nothing."""
  try:
    return subnet_spec.deploy_spec(model, mode, kappa, shared, "none")
  except ConfigError as e:  # name the CLI's argument, not the training config field
    raise UserError(f"--sparsity: keeping kappa = {kappa:g} in {mode} mode: "
                    f"{str(e).split(': ', 1)[-1]}") from None


def prune_structured(params, model, method: str, spec: subnet_spec.SubnetSpec, calib, key):
  """(small params, small model config): the top-scoring units kept, extracted dense."""
  scores = baselines.unit_scores(params, model, method, calib_windows=calib, key=key)
  subnet = jax.tree.map(lambda x: x[0], subnets.from_scores(scores, spec))  # drop W = 1
  return subnets.extract_subnet(params, subnet, spec), subnets.subnet_model_config(model, spec)


def _zeros(params) -> int:
  return int(sum(np.count_nonzero(np.asarray(x) == 0) for x in jax.tree.leaves(params)))


def summary(r: dict) -> str:
  """Two lines for the terminal: what was pruned, and the resulting PPL."""
  how = f"{r['kind']}, {r['mode']} mode" if r["kind"] == "structured" else r["kind"]
  return (f"{r['method']} ({how}): sparsity {r['sparsity']:g}, kept {r['params_kept']:,} of "
          f"{r['params_total']:,} params ({r['params_kept_fraction']:.1%})\n"
          f"val loss {r['val_loss']:.4f}, PPL {r['val_ppl']:.2f} on {r['windows']} windows "
          f"({r['protocol']})")


def _main(argv) -> evaluate.Output:
  a = _parser().parse_args(argv)
  _check(a)
  record = prune_and_evaluate(a)
  text = summary(record)
  if a.out:
    files.write_json(a.out, record)
    text += f"\nrecord: {os.path.abspath(a.out)}"
  return evaluate.Output(record, text, a.json)


def prune_and_evaluate(a) -> dict:
  """The CLI's work on checked arguments: load, prune, evaluate; returns the JSON record."""
  from twist_jax import checkpoint, data

  cfg, model, params = checkpoint.load_run(a.workdir)
  structured = a.method.startswith(STRUCT_PREFIX)
  kappa = 1.0 - a.sparsity
  if structured:  # checked before any data is loaded
    spec = structured_spec(model, kappa, a.mode, cfg.subnet.shared_layers)
  dataset = data.load(cfg.data)
  calib = (calibration_windows(dataset, cfg, a.calib_windows)
           if a.method in NEEDS_CALIBRATION else None)
  val = dataset.validation_windows(context=cfg.model.context, max_windows=a.max_windows or None)
  t0 = time.perf_counter()
  if structured:
    small, small_cfg = prune_structured(params, model, a.method[len(STRUCT_PREFIX):], spec,
                                        calib, jax.random.key(a.seed))
    kept = small_cfg.num_params()
  else:
    small = baselines.prune_unstructured(params, model, a.method, a.sparsity, calib)
    small_cfg = model
    kept = model.num_params() - (_zeros(small) - _zeros(params))  # newly zeroed entries
  jax.block_until_ready(small)
  t_prune = time.perf_counter() - t0
  loss = evaluate.mean_nll(small, small_cfg, val, a.batch_size)
  out = {"method": a.method, "kind": "structured" if structured else "unstructured",
         "sparsity": a.sparsity, "val_loss": loss, "val_ppl": evaluate.perplexity(loss),
         "protocol": data.protocol(cfg.data, cfg.model.context), "windows": int(len(val)),
         "params_total": model.num_params(), "params_kept": int(kept),
         "params_kept_fraction": kept / model.num_params(),
         "calibration": (f"{len(calib)} shuffled training windows of {calib.shape[1]} tokens "
                         f"(seed {cfg.seed})") if calib is not None else "none",
         "time_prune_s": t_prune, "time_s": time.perf_counter() - t0,
         "workdir": os.path.abspath(a.workdir)}
  if structured:
    out.update(mode=a.mode, kappa=kappa, correction="none",
               shared_layers=list(cfg.subnet.shared_layers))
  return out


def main(argv=None) -> int:
  return evaluate.run_cli(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
