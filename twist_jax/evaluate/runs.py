"""Trained runs as evaluation inputs: loading, the checks that let several runs share one set of
validation windows, one deploy spec per (run, kappa), and every run's distributions."""

import dataclasses
import os

import numpy as np
import tqdm

from twist_jax import config as config_lib, subnets
from twist_jax.errors import ConfigError, DataError, UserError
from twist_jax.evaluate.metrics import distribution, mean_nll, perplexity, ratio_losses
from twist_jax.model import ModelConfig
from twist_jax.subnet_spec import check_ratios, deploy_spec


@dataclasses.dataclass(frozen=True)
class Run:
  label: str
  workdir: str
  cfg: config_lib.Config
  model: ModelConfig
  params: dict


def check_run(workdir: str) -> None:
  """Cheap up-front check so a typo fails before any run is loaded."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise DataError(f"{workdir!r} is not a twist_jax run (no config.json)")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise DataError(f"no checkpoints in {workdir!r}")


def load_runs(runs: dict) -> list[Run]:
  """{label: workdir} -> the runs' latest checkpoints (all checked before any is read)."""
  from twist_jax import checkpoint  # orbax import only when runs are actually read

  if not runs:
    raise UserError("no runs to evaluate")
  for workdir in runs.values():
    check_run(workdir)
  out = []
  for label, workdir in runs.items():
    cfg, model, params = checkpoint.load_run(workdir)
    out.append(Run(label, workdir, cfg, model, params))
  return out


def shared_protocol(runs: list[Run]) -> str:
  """The shared protocol string; runs measured differently cannot share validation windows."""
  from twist_jax import data

  protocols = {r.label: data.protocol(r.cfg.data, r.cfg.model.context) for r in runs}
  first = runs[0]
  for r in runs[1:]:
    if protocols[r.label] != protocols[first.label] or r.cfg.data.name != first.cfg.data.name:
      raise UserError(f"runs {first.label!r} and {r.label!r} use different data/protocols; "
                      f"they cannot be compared on the same windows")
  return protocols[first.label]


def reference(runs: list[Run]) -> Run:
  """The run whose subnet mode is used for all: the first that trained subnets (a DDP run has
  none, so it is cut like the TwIST run it is compared with)."""
  return next((r for r in runs if r.cfg.twist.variant != "ddp"), runs[0])


def validation_windows(run: Run, max_windows: int) -> np.ndarray:
  """The run's validation windows, as training's val_loss sees them with eval.max_windows."""
  from twist_jax import data

  dataset = data.load(run.cfg.data)
  return dataset.validation_windows(context=run.cfg.model.context,
                                    max_windows=max_windows or None)


def check_args(kappas, samples: int, max_windows: int, mode, correction) -> tuple:
  """The ratios as floats; UserError naming the argument on anything out of range."""
  kappas = tuple(float(k) for k in kappas)
  if not kappas:
    raise UserError("kappas: give at least one ratio in (0, 1]")
  check_ratios(kappas, lambda k: UserError(f"kappas: got {k:g}; each ratio must be in (0, 1]"))
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
    raise UserError(f"samples: got {samples!r}; must be an integer >= 1")
  if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 0:
    raise UserError(f"max_windows: got {max_windows!r}; must be an integer >= 0 (0 = all)")
  if mode is not None and mode not in config_lib.MODES:
    raise UserError(f"mode: got {mode!r}; allowed: {', '.join(config_lib.MODES)}")
  if correction is not None and correction not in config_lib.CORRECTIONS:
    raise UserError(f"correction: got {correction!r}; allowed: "
                    f"{', '.join(config_lib.CORRECTIONS)}")
  return kappas


def specs(runs, kappas, mode, shared, correction) -> dict:
  """{(label, kappa): spec}, all built (and validated) before any evaluation."""
  out = {}
  for r in runs:
    for k in kappas:
      try:
        out[(r.label, k)] = deploy_spec(r.model, mode, k, shared,
                                        correction or r.cfg.subnet.correction)
      except ConfigError as e:  # name the CLI's argument, not the training config field
        raise UserError(f"kappa {k:g} ({mode} mode, run {r.label!r}): "
                        f"{str(e).split(': ', 1)[-1]}") from None
  return out


def kappa_train(run: Run) -> float:
  """The ratio a run trained its subnets at (DDP: 1, the whole model); per-layer ratios are
  averaged over the partitioned layers."""
  if run.cfg.twist.variant == "ddp":
    return 1.0
  s = run.cfg.subnet
  part = [k for i, k in enumerate(s.kappa) if i not in s.shared_layers] or list(s.kappa)
  return float(np.mean(part))


def evaluate_runs(runs, kappas, samples, specs_, windows, seed, batch_size, progress) -> dict:
  """{label: {"kappas": {"0.5": distribution + params}, "full": {...}}} for every run."""
  total = len(runs) * (len(kappas) * samples + 1)
  results = {}
  with tqdm.tqdm(total=total, unit="eval", desc="subnets", disable=not progress,
                 dynamic_ncols=True) as bar:
    for r in runs:
      full = mean_nll(r.params, r.model, windows, batch_size)
      bar.update(1)
      entry = {"workdir": os.path.abspath(r.workdir), "variant": r.cfg.twist.variant,
               "kappa_train": kappa_train(r), "kappas": {},
               "full": {"loss": full, "ppl": perplexity(full), "params": r.model.num_params()}}
      for k in kappas:
        spec = specs_[(r.label, k)]
        losses = ratio_losses(r.params, r.model, spec, k, samples, windows, seed=seed,
                              batch_size=batch_size, full_loss=full, bar=bar)
        entry["kappas"][f"{k:g}"] = {**distribution(losses), "correction": spec.correction,
                                     "params": subnets.subnet_model_config(
                                         r.model, spec).num_params()}
      results[r.label] = entry
  return results


def unique_labels(names: list[str], workdirs) -> dict:
  """{label: workdir}, a repeated name made unique with its position (no run is dropped)."""
  return {(n if names.count(n) == 1 else f"{n}#{i}"): w
          for i, (n, w) in enumerate(zip(names, workdirs))}


def folder_labels(workdirs) -> dict:
  """Heatmap row labels: the run's folder name."""
  return unique_labels([os.path.basename(os.path.normpath(w)) for w in workdirs], workdirs)


def variant_label(variant: str) -> str:
  return "DDP" if variant == "ddp" else "TwIST"
