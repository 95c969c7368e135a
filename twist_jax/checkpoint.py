"""Orbax checkpoints of a run: train state (params, optimizer, outer optimizer) plus a JSON
`meta` item (step, round, data iterator position, model config), in WORKDIR/checkpoints.

The data position is the grain iterator's state (`data.TrainIterator.get_state`, versioned).
It lives in `meta`, not in grain's own orbax item, because every process holds the same
global position: one copy, with no per-process files.

Orbax writes each step into a temporary folder and renames it when complete, so a crash at any
point leaves the previous checkpoints usable.
"""

import os

import jax
import orbax.checkpoint as ocp

from twist_jax.errors import DataError

ITEMS = ("state", "meta")
# What a damaged or foreign checkpoint raises: missing or unreadable files (OSError), bad JSON,
# tensorstore data errors, and orbax's shape/tree mismatches (all ValueError). Anything else
# (TypeError, KeyError, ...) is a bug here and propagates with its traceback.
UNREADABLE = (OSError, ValueError)


def manager(workdir: str, keep: int | None = None) -> ocp.CheckpointManager:
  """Manager of WORKDIR/checkpoints; keep=None leaves deleting to the caller (the trainer keeps
  the last K plus the best by validation loss)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, like_state):
  """(state, meta) at `step`, restored into the shapes/shardings of `like_state`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
  _check_items(mngr, step)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     meta=ocp.args.JsonRestore()))
  except UNREADABLE as e:
    raise DataError(f"checkpoint {mngr.directory}/{step} is unreadable or does not match this "
                    f"config ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
  return out.state, out.meta


def _check_items(mngr: ocp.CheckpointManager, step: int) -> None:
  """DataError if the step's folder lacks an item (orbax would raise a bare KeyError, which
  cannot be told apart from a bug). Steps are plain `{step}` folders (default options)."""
  folder = mngr.directory / str(step)  # an epath: local or cloud storage alike
  missing = [item for item in ITEMS if not (folder / item).is_dir()]
  if missing:
    raise DataError(f"checkpoint {folder} is unreadable: it has no {' or '.join(missing)} folder")


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def latest_params(workdir: str):
  """Params of another run's latest checkpoint (for `init.from_run`), plus its meta."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise DataError(f"no checkpoints in {workdir!r}")
  mngr = ocp.CheckpointManager(os.path.abspath(path))
  step = mngr.latest_step()
  if step is None:
    raise DataError(f"no complete checkpoint in {path!r}")
  _check_items(mngr, step)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     meta=ocp.args.JsonRestore()))
  except UNREADABLE as e:
    raise DataError(f"checkpoint {path}/{step} is unreadable ({e})") from e
  return out.state["params"], out.meta


def load_run(workdir: str):
  """(Config, ModelConfig, params) of a finished or running run's latest checkpoint."""
  import json

  from twist_jax import config as config_lib
  from twist_jax.model import ModelConfig

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise DataError(f"{workdir!r} is not a twist_jax run (no config.json)")
  with open(path) as f:
    cfg = config_lib.from_dict(json.load(f))
  params, meta = latest_params(workdir)
  return cfg, ModelConfig.from_dict(meta["model"]), params


def params_at(workdir: str, step: int):
  """Params of a run's checkpoint at `step` (a study evaluating a run along its way)."""
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  mngr = ocp.CheckpointManager(path)
  if step not in mngr.all_steps():
    raise DataError(f"no checkpoint at step {step} in {path!r} (have {sorted(mngr.all_steps())})")
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return out.state["params"]
