"""Runs an experiment: `python launch.py --config experiments/NAME.py[:ARG] --workdir DIR`.

Any config field can be overridden: `--config.twist.workers=8`. Bad input exits with status 2
and a one-line message naming the field, before anything is written.
"""

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


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raised: keep the flag and the final exception line, not the traceback.
    head, _, rest = str(e).partition("Traceback (most recent call last):")
    _fail(" ".join((head + rest.strip().splitlines()[-1] if rest else head).split()))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field that is not there
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    _fail(f"unknown config field {str(e).strip(chr(34))} in {' '.join(bad)}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
  from twist_jax import parallel

  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from twist_jax import config as config_lib, train
  from twist_jax.errors import DivergenceError, UserError

  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config experiments/pydocs_attn.py")
  if not _WORKDIR.value:
    _fail("--workdir is required: the folder for config.json, metrics.jsonl and checkpoints")
  try:
    cfg = config_lib.from_configdict(_CONFIG.value)
    summary = train.train(cfg, _WORKDIR.value)
  except UserError as e:
    _fail(" ".join(str(e).split()))
  except DivergenceError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(DivergenceError.exit_code)
  print("done: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in summary.items()), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
