"""Resuming with another learning-rate schedule is refused (exit 2, one line, nothing written)
unless ckpt.allow_schedule_change is set, which logs the change in metrics.jsonl; a checkpoint
that cannot be read is a DataError, while a bug while restoring one keeps its own exception."""

import importlib.util
import json
import math
import os
import shutil
import sys

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from twist_jax import checkpoint, config as config_lib, files, train
from twist_jax.errors import ConfigError, DataError

from helpers import exit_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import launch  # noqa: E402  (the repository root's entry point)

SMOKE = os.path.join(ROOT, "experiments", "pydocs_attn.py") + ":smoke"
FIRST = 15  # steps of the run that later runs resume


def smoke(**fields):
  """The smoke config (R = 5, a checkpoint every 15 steps) with `fields` ('opt.lr': 1e-3)."""
  spec = importlib.util.spec_from_file_location("pydocs_attn", SMOKE.split(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.update_from_flattened_dict({"steps": FIRST, "log.progress": False, **fields})
  return config_lib.from_configdict(c)


@pytest.fixture
def workdir(tmp_path):
  """What a refusal looks at: the config.json of a 15-step run (it is checked before the
  checkpoints, the data or the model are touched)."""
  (tmp_path / "run").mkdir()
  files.write_json(tmp_path / "run" / "config.json", config_lib.to_dict(smoke()), sort_keys=True)
  return tmp_path / "run"


@pytest.fixture
def saved(tmp_path):
  """A workdir holding one small checkpoint at step FIRST."""
  workdir = tmp_path / "ckpt"
  checkpoint.save(checkpoint.manager(str(workdir)), FIRST, {"params": {"w": jnp.arange(3.0)}},
                  {"step": FIRST})
  return workdir


def files_of(folder) -> dict:
  return {os.path.relpath(os.path.join(root, name), folder):
          open(os.path.join(root, name), "rb").read()
          for root, _, names in os.walk(folder) for name in names}


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ---- the refusal ---------------------------------------------------------------------------------


def test_resume_with_other_steps_exits_2_naming_steps_and_writes_nothing(workdir, capsys):
  before = files_of(workdir)
  code = exit_code(launch.main, ["--config", SMOKE, "--workdir", workdir, "--config.steps=30",
                                 "--config.log.progress=False"])
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith("error: config field 'steps': 15 in the run"), err
  assert "30 now" in lines[0] and "--config.ckpt.allow_schedule_change=True" in lines[0], err
  assert files_of(workdir) == before


@pytest.mark.parametrize("field,value", [("opt.lr", 1e-3), ("opt.warmup_steps", 10),
                                         ("opt.min_lr_ratio", 0.5)])
def test_every_schedule_field_is_refused(workdir, field, value):
  before = files_of(workdir)
  with pytest.raises(ConfigError, match=f"config field '{field}': .* schedule"):
    train.train(smoke(**{field: value}), str(workdir))
  assert files_of(workdir) == before


def test_the_override_does_not_admit_other_fields(workdir):
  with pytest.raises(ConfigError, match="config field 'subnet.kappa'.*use a new --workdir"):
    train.train(smoke(**{"steps": 30, "ckpt.allow_schedule_change": True,
                         "subnet.kappa": 0.25}), str(workdir))


# ---- the override --------------------------------------------------------------------------------


def cosine_lr(opt, total: int, t: int) -> float:
  """The schedule written out by hand (docs/method.md §1): linear warm-up, cosine to min."""
  if t < opt.warmup_steps:
    return opt.lr * (t + 1) / opt.warmup_steps
  frac = min((t - opt.warmup_steps) / (total - opt.warmup_steps), 1.0)
  return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@pytest.mark.slow
def test_override_resumes_on_the_new_schedule_and_records_the_change(tmp_path):
  first_run, workdir = tmp_path / "first", tmp_path / "run"
  train.train(smoke(), str(first_run))
  shutil.copytree(first_run, workdir)
  cfg = smoke(**{"steps": 30, "ckpt.allow_schedule_change": True})
  assert train.train(cfg, str(workdir))["step"] == 30
  lines = metrics(workdir)
  events = [r for r in lines if r.get("event") == "schedule_change"]
  assert events == [{"step": FIRST, "event": "schedule_change", "changed": {"steps": [15, 30]}}]
  trained = [r for r in lines if "lr" in r]
  assert trained[:3] == [r for r in metrics(first_run) if "lr" in r]  # steps 5..15 kept as run
  for r in trained[3:]:  # steps 20..30 follow the 30-step schedule, not the finished 15-step one
    assert r["lr"] == pytest.approx(cosine_lr(cfg.opt, 30, r["step"] - 1), rel=1e-6)
    assert r["lr"] != pytest.approx(cosine_lr(cfg.opt, 15, r["step"] - 1), rel=1e-3)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["steps"] == 30
  # Crash after the switch, before its next checkpoint: the rerun resumes at step 15 again, where
  # config.json already says 30, and the recorded change survives the metrics truncation.
  for step in os.listdir(os.path.join(workdir, "checkpoints")):
    if int(step) > FIRST:
      shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  train.train(cfg, str(workdir))
  assert [r for r in metrics(workdir) if r.get("event") == "schedule_change"] == events


# ---- unreadable checkpoints vs bugs --------------------------------------------------------------


@pytest.mark.parametrize("error", [TypeError("a bug"), KeyError("a bug")])
def test_a_bug_while_restoring_is_not_called_an_unreadable_checkpoint(saved, monkeypatch, error):
  def restore(*args, **kwargs):
    raise error
  checkpoint.latest_params(str(saved))  # readable
  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  with pytest.raises(type(error), match="a bug"):
    checkpoint.latest_params(str(saved))
  with pytest.raises(type(error), match="a bug"):
    checkpoint.restore(checkpoint.manager(str(saved)), FIRST, {})


@pytest.mark.parametrize("error", [OSError("disk"), ValueError("bad shape")])
def test_unreadable_files_are_a_data_error(saved, monkeypatch, error):
  def restore(*args, **kwargs):
    raise error
  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  with pytest.raises(DataError, match=f"unreadable.*{type(error).__name__}"):
    checkpoint.restore(checkpoint.manager(str(saved)), FIRST, {})
  with pytest.raises(DataError, match="unreadable"):
    checkpoint.latest_params(str(saved))


@pytest.mark.parametrize("item", checkpoint.ITEMS)
def test_a_checkpoint_missing_an_item_is_a_data_error(saved, item):
  shutil.rmtree(saved / "checkpoints" / str(FIRST) / item)
  like = {"params": {"w": jnp.zeros(3)}}
  with pytest.raises(DataError, match=f"checkpoint .*/{FIRST} is unreadable: it has no {item}"):
    checkpoint.restore(checkpoint.manager(str(saved)), FIRST, like)
  with pytest.raises(DataError, match=f"has no {item} folder"):
    checkpoint.latest_params(str(saved))


@pytest.mark.parametrize("old,new,differs", [(False, "none", False), (True, "block", False),
                                             (False, "block", True), (True, "dots", True),
                                             ("none", "dots", True)])
def test_an_older_spelling_of_remat_is_the_same_run(old, new, differs):
  """config.json files written when model.remat was a bool still match their runs: False is
  "none" and True is "block"; a real change of policy is still a difference."""
  base = config_lib.to_dict(config_lib.from_configdict(config_lib.default_config()))
  a = json.loads(json.dumps(base))
  b = json.loads(json.dumps(base))
  a["model"]["remat"], b["model"]["remat"] = old, new
  a["steps"], b["steps"] = 100, 100
  assert config_lib.differing_fields(a, b) == (["model.remat"] if differs else [])
  b["steps"] = 200  # other fields are still compared
  assert config_lib.differing_fields(a, b) == sorted(["steps"] + (["model.remat"] if differs
                                                                  else []))
