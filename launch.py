"""Runs an experiment: `python launch.py --config experiments/NAME.py[:ARG] --workdir DIR`.

Any config field can be overridden: `--config.twist.workers=8`. Bad input exits with status 2
and a one-line message naming the field, before anything is written.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (NAME.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(" ".join(str(e).split()))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
  from twist_jax import config as config_lib, train
  from twist_jax.errors import UserError

  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config experiments/pydocs_attn.py")
  if not _WORKDIR.value:
    _fail("--workdir is required: the folder for config.json, metrics.jsonl and checkpoints")
  try:
    cfg = config_lib.from_configdict(_CONFIG.value)
    summary = train.train(cfg, _WORKDIR.value)
  except UserError as e:
    _fail(" ".join(str(e).split()))
  print("done: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in summary.items()), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
