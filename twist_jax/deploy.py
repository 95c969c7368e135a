"""Zero-cost deployment (docs/method.md §3, §4, §7): choose one subnet of a trained model, cut
it out as a smaller dense GPT-2 with the activation-shift correction folded into its c_proj
kernels, and save it as a twist_jax checkpoint (and, where representable, a Hugging Face folder).

  python -m twist_jax.deploy --workdir RUN --kappa 0.5 --heuristic random --seed 0 --out OUT \
      [--hf] [--json]

Output folder: OUT/params (orbax), OUT/model.json (ModelConfig), OUT/subnet.json (how it was cut:
mode, kappa, heuristic, seed, indices, source run and its data config), OUT/deploy.json (sizes
and validation loss / PPL of the deployed and the full model), OUT/hf (with --hf). The CLI prints
a three-line summary, or with --json the record of OUT/deploy.json.
Dimension alphabet: W workers (1 here), N layers, H heads, F MLP width, M windows, L length.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import jax
import numpy as np

from twist_jax import (baselines, checkpoint, config as config_lib, evaluate, files, hf as hf_lib,
                       subnets)
from twist_jax.subnet_spec import SubnetSpec, check_kappa, deploy_spec
from twist_jax.errors import DataError, UserError
from twist_jax.model import ModelConfig, fold_correction, init_params

HEURISTICS = config_lib.HEURISTICS  # random | first | best_of_k | magnitude
PARAMS_DIR, MODEL_FILE, SUBNET_FILE, HF_DIR = "params", "model.json", "subnet.json", "hf"
RECORD_FILE = "deploy.json"  # the CLI's record: sizes, losses, paths
REPORT_WINDOWS = 64  # validation windows the CLI reports the deployed model's loss on
SELECT_WINDOWS = 16  # further validation windows best_of_k selects on (disjoint when possible)


# ---- which subnet --------------------------------------------------------------------------------


def candidates(key: jax.Array, spec: SubnetSpec, k: int) -> list:
  """The k random W = 1 subnets best_of_k chooses among; draw j uses fold_in(key, j), so a
  larger k extends the same draws."""
  return [subnets.sample_subnets(jax.random.fold_in(key, j), spec, 1) for j in range(k)]


def subnet_loss(params, model_cfg: ModelConfig, spec: SubnetSpec, subnet,
                windows_MxLp1) -> float:
  """Mean NLL of a W = 1 subnet, run as the masked full model (one compile for all draws)."""
  masks = subnets.unit_masks(one_worker(subnet), spec)
  return evaluate.mean_nll(params, subnets.masked_model_config(model_cfg, spec), windows_MxLp1,
                           masks=masks)


def _block_scores(params, spec: SubnetSpec) -> dict:
  """blocks mode: the L2 norm of all of a partitioned block's parameters."""
  norms = [np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(params[f"h_{i}"])))
           for i in spec.partitioned]
  return {"blocks": np.asarray(norms, np.float32)}


def magnitude_scores(params, model_cfg: ModelConfig, spec: SubnetSpec) -> dict:
  """Higher = keep: per head / MLP unit the L2 norm of its weights (the structured baselines'
  definition), per block in blocks mode the norm of the whole block."""
  if spec.mode == "blocks":
    return _block_scores(params, spec)
  return baselines.unit_scores(params, model_cfg, "magnitude")  # one definition for both


def choose_subnet(params, model_cfg: ModelConfig, spec: SubnetSpec, heuristic: str,
                  key: jax.Array, *, windows=None, k: int = 8):
  """A W = 1 subnet by a deployment heuristic (docs/method.md §3).

  random: one uniform draw from `key`; first: the fixed prefix; best_of_k: the `candidates`
  draw with the lowest loss on `windows` (M, L+1); magnitude: the largest-norm units.
  """
  if heuristic == "random":
    return subnets.sample_subnets(key, spec, 1)
  if heuristic == "first":
    return subnets.first_subnet(spec)
  if heuristic == "magnitude":
    return subnets.from_scores(magnitude_scores(params, model_cfg, spec), spec)
  if heuristic == "best_of_k":
    if windows is None or len(windows) == 0:
      raise UserError("heuristic 'best_of_k' needs held-out windows to compare the draws on")
    if k < 1:
      raise UserError(f"k: got {k}; best_of_k needs k >= 1")
    draws = candidates(key, spec, k)
    losses = [subnet_loss(params, model_cfg, spec, d, windows) for d in draws]
    return draws[int(np.argmin(losses))]
  raise UserError(f"heuristic: got {heuristic!r}; allowed: {', '.join(HEURISTICS)}")


# ---- extract -------------------------------------------------------------------------------------


def one_worker(subnet):
  """One worker's index arrays: strips the leading W = 1 axis if present."""
  return jax.tree.map(lambda x: x[0] if np.ndim(x) == 2 else x, subnet)


def extract(params, model_cfg: ModelConfig, spec: SubnetSpec, subnet):
  """(params_small, cfg_small): the subnet as a plain dense GPT-2 with the correction folded in,
  so cfg_small's scales are all 1.0. `subnet` is W = 1 (as choose_subnet returns) or unbatched."""
  small = subnets.extract_subnet(params, one_worker(subnet), spec)
  return fold_correction(small, subnets.subnet_model_config(model_cfg, spec))


# ---- save / load ---------------------------------------------------------------------------------


def _check_out(out_dir: str) -> None:
  """OUT may not exist yet or be an empty folder; anything else is refused."""
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise UserError(f"--out {out_dir}: exists and is not an empty folder; choose a new one")


@contextlib.contextmanager
def _staged(out_dir: str):
  """A fresh sibling folder that becomes `out_dir` on success and vanishes on any error, so a
  refused export or a crash leaves nothing at `out_dir`."""
  out_dir = os.path.abspath(out_dir)
  _check_out(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the result private once renamed
    yield tmp
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above); rename needs it gone
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def indices_json(subnet) -> dict:
  """Index pytree (W = 1 or not) as nested lists of ints for subnet.json."""
  return jax.tree.map(lambda x: np.asarray(x).tolist(), one_worker(subnet))


def planned_paths(out_dir: str, hf: bool) -> dict:
  """Where save_deployed puts things: out, checkpoint, hf (None without `hf`)."""
  out_dir = os.path.abspath(out_dir)
  return {"out": out_dir, "checkpoint": os.path.join(out_dir, PARAMS_DIR),
          "hf": os.path.join(out_dir, HF_DIR) if hf else None}


def save_deployed(out_dir: str, params_small, cfg_small: ModelConfig, info: dict, *,
                  hf: bool = False, record: dict | None = None) -> dict:
  """Writes OUT/{params, model.json, subnet.json}, with `hf` OUT/hf and with `record`
  OUT/deploy.json; returns the paths.

  The Hugging Face export goes first, so a subnet transformers cannot represent is refused
  (UserError from hf.save_gpt2) before any file exists at `out_dir`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  out_dir = os.path.abspath(out_dir)
  with _staged(out_dir) as tmp:
    if hf:
      hf_lib.save_gpt2(params_small, cfg_small, os.path.join(tmp, HF_DIR))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp, PARAMS_DIR), params_small)
    ckpt.wait_until_finished()
    files.write_json(os.path.join(tmp, MODEL_FILE), cfg_small.to_dict(), sort_keys=True)
    files.write_json(os.path.join(tmp, SUBNET_FILE), info, sort_keys=True)
    if record is not None:
      files.write_json(os.path.join(tmp, RECORD_FILE), record, sort_keys=True)
  return planned_paths(out_dir, hf)


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: missing or unreadable ({type(e).__name__})") from e


def is_deployed(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isdir(
      os.path.join(path, PARAMS_DIR))


def load_info(out_dir: str) -> dict:
  """OUT/subnet.json: how the deployed model was cut (and the source run's data config)."""
  return _read_json(os.path.join(out_dir, SUBNET_FILE))


def load_deployed(out_dir: str):
  """(params, ModelConfig) of a folder written by `save_deployed`."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  if not is_deployed(out_dir):
    raise DataError(f"{out_dir!r} is not a deployed twist_jax model (no {MODEL_FILE} and "
                    f"{PARAMS_DIR}/)")
  cfg = ModelConfig.from_dict(_read_json(os.path.join(out_dir, MODEL_FILE)))
  like = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  try:
    params = ocp.StandardCheckpointer().restore(
        os.path.abspath(os.path.join(out_dir, PARAMS_DIR)), like)
  except (ValueError, KeyError, OSError, TypeError) as e:
    raise DataError(f"{out_dir}/{PARAMS_DIR}: unreadable or does not match {MODEL_FILE} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
  return params, cfg


# ---- CLI -----------------------------------------------------------------------------------------


def _parse_kappa(text: str):
  try:
    values = tuple(float(v) for v in text.split(","))
  except ValueError:
    raise UserError(f"--kappa: got {text!r}; a ratio in (0, 1] or one per layer, "
                    "comma-separated") from None
  return check_kappa(values[0] if len(values) == 1 else values)


def _parser() -> argparse.ArgumentParser:
  p = evaluate.OneLineParser(prog="python -m twist_jax.deploy", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="training run folder (config.json, checkpoints)")
  p.add_argument("--kappa", required=True, help="keep ratio in (0, 1], or one per layer: 0.5,0.25")
  p.add_argument("--heuristic", default="random", help=f"one of {', '.join(HEURISTICS)}")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed of random / best_of_k draws")
  p.add_argument("--k", type=int, default=8, help="draws compared by best_of_k")
  p.add_argument("--out", required=True, help="new (or empty) output folder")
  p.add_argument("--hf", action="store_true", help="also export a Hugging Face GPT-2 to OUT/hf")
  p.add_argument("--mode", choices=config_lib.MODES, help="default: the run's subnet.mode")
  p.add_argument("--correction", choices=config_lib.CORRECTIONS,
                 help="default: the run's subnet.correction")
  evaluate.add_json_flag(p)
  return p


def _check_args(args):
  """Everything that needs no run or data, so bad input fails at once with nothing written;
  returns the parsed kappa."""
  if args.heuristic not in HEURISTICS:
    raise UserError(f"--heuristic: got {args.heuristic!r}; allowed: {', '.join(HEURISTICS)}")
  if args.k < 1:
    raise UserError(f"--k: got {args.k}; must be >= 1")
  _check_out(os.path.abspath(args.out))
  return _parse_kappa(args.kappa)


def _windows(dataset, context: int):
  """(report, select): REPORT_WINDOWS validation windows spread over the split (the windows
  every evaluation of that many uses) and up to SELECT_WINDOWS other spread windows that
  best_of_k selects on (on a tiny split, the report windows again)."""
  from twist_jax.data import windows as windows_lib  # pylint: disable=import-outside-toplevel

  report = dataset.validation_windows(context=context, max_windows=REPORT_WINDOWS)
  tokens = dataset.tokens("validation")
  count = windows_lib.num_windows(len(tokens), context)
  pool = windows_lib.spread_indices(count, REPORT_WINDOWS + SELECT_WINDOWS)
  select = pool[~np.isin(pool, windows_lib.spread_indices(count, REPORT_WINDOWS))][:SELECT_WINDOWS]
  return report, (windows_lib.gather_windows(tokens, select, context) if len(select) else report)


def _source_step(workdir: str) -> int | None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints"))).latest_step()


def deploy_run(args) -> dict:
  """The CLI's work: load the run, choose, extract, evaluate, save; returns the JSON record."""
  from twist_jax import data  # pylint: disable=import-outside-toplevel

  kappa = _check_args(args)
  cfg, model_cfg, params = checkpoint.load_run(args.workdir)
  mode = args.mode or cfg.subnet.mode
  correction = args.correction or cfg.subnet.correction
  spec = deploy_spec(model_cfg, mode, kappa, cfg.subnet.shared_layers, correction)
  dataset = data.load(cfg.data)
  report, select = _windows(dataset, model_cfg.n_positions)
  subnet = choose_subnet(params, model_cfg, spec, args.heuristic, jax.random.key(args.seed),
                         windows=select, k=args.k)
  small, cfg_small = extract(params, model_cfg, spec, subnet)
  nll = evaluate.mean_nll(small, cfg_small, report, cfg.eval.batch_size)
  full_nll = evaluate.mean_nll(params, model_cfg, report, cfg.eval.batch_size)
  info = {"mode": mode, "kappa": list(kappa) if isinstance(kappa, tuple) else kappa,
          "shared_layers": list(cfg.subnet.shared_layers),
          "correction": correction, "heuristic": args.heuristic, "seed": args.seed,
          "k": args.k if args.heuristic == "best_of_k" else None,
          "indices": indices_json(subnet), "source_workdir": os.path.abspath(args.workdir),
          "source_step": _source_step(args.workdir), "full_model": model_cfg.to_dict(),
          "data": dataclasses.asdict(cfg.data)}
  record = {"params_full": model_cfg.num_params(), "params_deployed": cfg_small.num_params(),
            "param_ratio": cfg_small.num_params() / model_cfg.num_params(),
            "kappa": info["kappa"], "mode": mode, "correction": correction,
            "heuristic": args.heuristic, "seed": args.seed, "val_loss": nll,
            "val_ppl": evaluate.perplexity(nll), "full_val_loss": full_nll,
            "full_val_ppl": evaluate.perplexity(full_nll), "val_windows": int(len(report)),
            "protocol": data.protocol(cfg.data, model_cfg.n_positions),
            **planned_paths(args.out, args.hf)}
  save_deployed(args.out, small, cfg_small, info, hf=args.hf, record=record)
  return record


def summary(r: dict) -> str:
  """Three lines for the terminal: what was kept, deployed vs full PPL, where it went."""
  kappa = r["kappa"] if isinstance(r["kappa"], float) else ",".join(f"{k:g}" for k in r["kappa"])
  return (f"deployed {r['mode']} kappa={kappa} ({r['heuristic']}, seed {r['seed']}): "
          f"{r['params_deployed']:,} of {r['params_full']:,} params kept "
          f"({r['param_ratio']:.1%})\n"
          f"val PPL {r['val_ppl']:.2f} deployed vs {r['full_val_ppl']:.2f} full (loss "
          f"{r['val_loss']:.4f} vs {r['full_val_loss']:.4f}) on {r['val_windows']} windows\n"
          f"saved: {r['out']} (record: {RECORD_FILE}{', Hugging Face: hf/' if r['hf'] else ''})")


def _main(argv) -> "evaluate.Output":
  args = _parser().parse_args(argv)
  record = deploy_run(args)
  return evaluate.Output(record, summary(record), args.json)


def main(argv=None) -> None:
  """`python -m twist_jax.deploy`; exits with status 2 and one line on bad input."""
  sys.exit(evaluate.run_cli(_main, argv))


if __name__ == "__main__":
  main()
