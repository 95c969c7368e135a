"""Runs an experiment: `python launch.py --config experiments/NAME.py[:ARG] --workdir DIR`.

Any config field can be overridden: `--config.twist.workers=8`. Ratio lists are comma-separated:
`--config.subnet.kappa=0.5,0.25,0.5,0.5` (one per layer; a single value applies to all layers)
and `--config.eval.golden_kappas=0.25,0.5`. (ml_collections types an override by the field's
default, a float for subnet.kappa, so these two are taken out of the command line before it is
parsed and set on the loaded config afterwards.)

When training finishes (not when interrupted), the final model and eval.golden_samples random
subnets per ratio in eval.golden_kappas are evaluated on the val_loss windows: a short table is
printed and WORKDIR/golden_tickets.{md,json,png} written (a rerun prints the saved table).

`--config.deterministic=True` puts XLA's deterministic-GPU-ops flag into XLA_FLAGS before JAX
starts its backend (docs/method.md §10).

Bad input (a missing or broken --config file, a bad field value, an unknown field) exits with
status 2 and a one-line message naming the flag or field, before anything is written.
"""

import difflib
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (NAME.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Several hosts: host:port of process 0 (or JAX_COORDINATOR_ADDRESS; "
    "under SLURM JAX finds it itself).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Several hosts: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Several hosts: this process's index.")

# Config fields given on the command line as comma-separated numbers (see the docstring).
RATIO_FIELDS = ("subnet.kappa", "eval.golden_kappas")
_RATIOS: dict = {}  # {field: tuple of floats} taken from the command line by _parse


def _fail(message: str) -> None:
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def _numbers(flag: str, text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(","))
  except ValueError:
    values = ()
  if not values:
    _fail(f"{flag}: got {text!r}; give a ratio in (0, 1] or several, comma-separated "
          "(e.g. 0.5,0.25,0.5,0.5)")
  return values


def take_ratio_overrides(argv: list[str]) -> tuple[list[str], dict]:
  """(argv without the RATIO_FIELDS overrides, {field: numbers}); `--f=v` and `--f v` forms."""
  rest, found, i = [], {}, 0
  while i < len(argv):
    name, eq, value = argv[i].partition("=")
    field = name[len("--config."):] if name.startswith("--config.") else None
    if field in RATIO_FIELDS:
      if not eq:
        if i + 1 == len(argv):
          _fail(f"{name}: needs a value, e.g. {name}=0.5")
        i, value = i + 1, argv[i + 1]
      found[field] = _numbers(name, value)
    else:
      rest.append(argv[i])
    i += 1
  return rest, found


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config (NAME.py[:ARG]) in argv, if given."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
  return None


def _check_config_file(spec: str | None) -> None:
  if spec is None:
    return
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    _fail(f"--config {spec}: no such file {path!r} (give an experiment file, e.g. "
          "experiments/pydocs_attn.py or experiments/pydocs_attn.py:smoke)")


def _parse(argv):
  """absl's flag parsing, with every failure turned into one line and exit status 2."""
  argv, ratios = take_ratio_overrides(list(argv))
  _RATIOS.clear()
  _RATIOS.update(ratios)
  spec = _config_spec(argv)
  _check_config_file(spec)
  saved, sys.argv = sys.argv, argv  # ml_collections reads the overrides from sys.argv
  # In-process reuse: no value, and no --config.* override flag, left over from an earlier call.
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  sys.modules.pop("config_config", None)  # ml_collections would load into the old module
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raised: keep the flag and the final exception line, not the traceback.
    head, _, rest = str(e).partition("Traceback (most recent call last):")
    _fail(head + rest.strip().splitlines()[-1] if rest else head)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
    if "get_config" in str(e):
      _fail(f"--config {spec}: the file defines no get_config(arg=None)")
    fields = [a.split("=")[0][len("--config."):] for a in argv if a.startswith("--config.")]
    first_line = str(e.args[0] if e.args else e).splitlines()[0]
    _fail(_unknown_field(spec, fields) or f"unknown config field {first_line} in "
          f"{' '.join('--config.' + f for f in fields)}")
  except Exception as e:  # pylint: disable=broad-except  (the config file's own code failed)
    _fail(f"--config {spec}: loading it failed: {type(e).__name__}: {e}")
  finally:
    sys.argv = saved


def _unknown_field(spec: str, fields: list[str]) -> str | None:
  """'unknown config field a.b (did you mean a.c?)' for the first of the dotted `fields` that the
  config file's get_config does not have (ml_collections' own message spans lines)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("twist_launch_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for field in fields:
    node, parts = config, field.split(".")
    for i, part in enumerate(parts):
      prefix = ".".join(parts[:i])
      if not hasattr(node, "keys"):
        return f"unknown config field {field} ({prefix} is a value, not a section)"
      if part not in node:
        near = difflib.get_close_matches(part, list(node.keys()), n=1)
        where = f"{prefix}." if prefix else ""
        hint = (f"did you mean {where}{near[0]}?" if near else
                f"{prefix or 'the top level'} has {', '.join(sorted(node.keys()))}")
        return f"unknown config field {field} ({hint})"
      node = node[part]
  return None


def loaded_configdict():
  """The parsed --config with the ratio overrides applied (exit 2 if it could not be loaded)."""
  import ml_collections

  try:
    c = _CONFIG.value
    d = c.to_dict()
  except OSError as e:  # ml_collections defers a failed load to the first access
    _fail(f"--config: {str(e).splitlines()[-1].strip()}")
  except AttributeError:
    _fail(f"--config: get_config() returned {type(_CONFIG.value).__name__}, not a ConfigDict")
  for field, values in _RATIOS.items():
    section, key = field.split(".")
    single = field == "subnet.kappa" and len(values) == 1  # one ratio for every layer
    d[section][key] = values[0] if single else values
  return ml_collections.ConfigDict(d)


def _golden_tickets(cfg, workdir: str, summary: dict) -> None:
  """The job's last step: the golden-ticket table of a finished run (see the docstring)."""
  import jax

  from twist_jax import evaluate

  if "interrupted" in summary or cfg.eval.golden_samples == 0:
    return
  if jax.process_count() > 1:  # every host would read the checkpoint: leave it to the CLI
    print(f"golden tickets: run `python -m twist_jax.evaluate --workdir {workdir}` on one host",
          flush=True)
    return
  if jax.process_index() == 0:
    print(evaluate.after_training(workdir, cfg, progress=cfg.log.progress), flush=True)


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
  if _CONFIG.value is None and flags.FLAGS["config"].present:
    _fail("--config: its get_config() returned None, not a ConfigDict")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config experiments/pydocs_attn.py")
  if not _WORKDIR.value:
    _fail("--workdir is required: the folder for config.json, metrics.jsonl and checkpoints")
  c = loaded_configdict()
  from twist_jax import config as config_lib, parallel
  from twist_jax.errors import DivergenceError, UserError

  try:  # XLA reads XLA_FLAGS when JAX starts a backend: set it before anything can
    config_lib.apply_determinism(c.get("deterministic") is True)
  except UserError as e:
    _fail(str(e))

  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from twist_jax import evaluate, train

  try:
    cfg = config_lib.from_configdict(c)
    evaluate.check_golden(cfg)
    summary = train.train(cfg, _WORKDIR.value)
    print("done: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in summary.items()), flush=True)
    _golden_tickets(cfg, _WORKDIR.value, summary)
  except UserError as e:
    _fail(str(e))
  except DivergenceError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(DivergenceError.exit_code)
  return 0


def main(argv=None) -> None:
  """`python launch.py ARGS`; in-process, `main([ARGS...])` (no program name). Exits via
  SystemExit: 0 done, 2 bad input, 3 divergence."""
  argv = sys.argv if argv is None else [sys.argv[0], *argv]
  app.run(_main, argv=argv, flags_parser=_parse)


if __name__ == "__main__":
  main()
