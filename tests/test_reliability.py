"""Interruption, divergence, corrupt checkpoints, determinism across device counts, hygiene."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from twist_jax import config as config_lib, train
from twist_jax.errors import DataError, DivergenceError

from helpers import ROOT, assert_same_training, load_experiment

LONG = ["--config.steps=100", "--config.ckpt.every=20", "--config.eval.every=50",
        "--config.log.progress=False"]
VOLATILE = ("round_time_s", "tokens_per_s")


def config(variant="true", steps=100, **sections):
  # The same config file that `launch` runs (it sets its own lr and warm-up), so the in-process
  # reference and the launched runs train the same thing.
  c = load_experiment("pydocs_attn", "smoke")
  c.twist.variant = variant
  c.subnet.mode = "attn"
  c.update_from_flattened_dict({"steps": steps, "ckpt.every": 20, "eval.every": 50,
                                "log.progress": False, **sections})
  return config_lib.from_configdict(c)


def training_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in VOLATILE} for r in recs if "event" not in r]


def launch(workdir, variant, extra=()):
  cmd = [sys.executable, "launch.py", "--config", "experiments/pydocs_attn.py:smoke",
         "--workdir", str(workdir), f"--config.twist.variant={variant}",
         "--config.subnet.mode=attn", *LONG, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def wait_for_lines(workdir, n, proc, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      return
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) >= n:
          return
    time.sleep(0.05)


@pytest.fixture(scope="module", params=["true", "ddp"])
def reference(request, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp(f"ref_{request.param}"))
  train.train(config(request.param), workdir)
  return request.param, training_lines(workdir)


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes_exactly(reference, tmp_path):
  variant, ref = reference
  proc = launch(tmp_path, variant)
  wait_for_lines(tmp_path, 8, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM: checkpoint saved" in err + out
  stopped = training_lines(tmp_path)[-1]["step"]
  assert stopped < 100
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert steps[-1] == stopped  # nothing lost at all
  proc = launch(tmp_path, variant)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert f"resumed from checkpoint at step {stopped}" in out
  assert training_lines(tmp_path) == ref


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_a_random_point_loses_at_most_one_interval(reference, tmp_path, seed):
  variant, ref = reference
  rng = random.Random(seed)
  proc = launch(tmp_path, variant)
  wait_for_lines(tmp_path, rng.randint(2, 30), proc)
  time.sleep(rng.random() * 0.5)
  proc.kill()
  proc.communicate()
  done = [r["step"] for r in training_lines(tmp_path)] if (tmp_path / "metrics.jsonl").exists() else [0]
  proc = launch(tmp_path, variant)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  resumed = int(out.split("resumed from checkpoint at step ")[1].split()[0]) if "resumed" in out else 0
  assert max(done or [0]) - resumed <= 20 + 5  # at most one checkpoint interval (+ the round)
  assert training_lines(tmp_path) == ref  # no duplicate or missing steps, same numbers


def nan_injecting(trainer, bad_calls):
  """Wraps the round function so that the given calls report a non-finite round."""
  real, calls = trainer.round_fn, [0]

  def round_fn(*args):
    state, metrics = real(*args)
    calls[0] += 1
    if calls[0] in bad_calls:
      metrics = dict(metrics, finite=jnp.bool_(False))
    return state, metrics
  trainer.round_fn = round_fn


def make_trainer(cfg, workdir):
  os.makedirs(workdir, exist_ok=True)
  return train.Trainer(train.build(cfg, str(workdir)))


def test_divergence_stops_naming_step_and_checkpoint(tmp_path):
  trainer = make_trainer(config(steps=60), tmp_path)
  nan_injecting(trainer, {6})  # the round ending at step 30; last checkpoint at 20
  with pytest.raises(DivergenceError, match=r"step 30; last good checkpoint: step 20"):
    trainer.fit()
  assert 20 in [int(s) for s in os.listdir(tmp_path / "checkpoints")]


def test_divergence_with_real_nan_exits_3(tmp_path):
  proc = launch(tmp_path, "true", ["--config.opt.lr=1e30", "--config.opt.grad_clip=0.0",
                                   "--config.steps=40"])
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 3, err[-2000:]
  assert "non-finite" in err and "last good checkpoint" in err


def test_rollback_skips_the_offending_batches(tmp_path):
  trainer = make_trainer(config(steps=60, **{"ckpt.on_divergence": "rollback"}), tmp_path)
  nan_injecting(trainer, {6})
  out = trainer.fit()
  assert out["step"] == 60
  steps = [r["step"] for r in training_lines(tmp_path) if "loss" in r]
  assert steps == list(range(5, 65, 5))  # no duplicates, none missing
  with open(tmp_path / "metrics.jsonl") as f:
    events = [json.loads(x) for x in f if "rollback" in x]
  assert events and events[0]["step"] == 20 and events[0]["bad_step"] == 30


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  train.train(config(steps=20), str(tmp_path))
  state_dir = tmp_path / "checkpoints" / "20" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
  with pytest.raises(DataError, match="checkpoint"):
    train.train(config(steps=20), str(tmp_path))  # same schedule: the resume reads step 20


def test_workdir_of_the_old_data_pipeline_is_refused(tmp_path):
  """A checkpoint whose data position was written before the grain pipeline (state version 1,
  another window order) cannot continue: exit 2 with one line saying to start a new workdir."""
  train.train(config(steps=20), str(tmp_path))
  for step in os.listdir(tmp_path / "checkpoints"):
    path = tmp_path / "checkpoints" / step / "meta" / "metadata"
    meta = json.loads(path.read_text())
    settings = {k: v for k, v in meta["data"].items() if k not in ("version", "grain")}
    meta["data"] = {**settings, "version": 1, "epoch": 0, "step": int(step)}
    path.write_text(json.dumps(meta))
  # LONG's step count differs from the run's 20: allowed here, so the data check is reached.
  proc = launch(tmp_path, "true", ["--config.ckpt.allow_schedule_change=True"])
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-2000:]
  assert "older data pipeline" in err and "new --workdir" in err
  assert len([ln for ln in err.splitlines() if "older data pipeline" in ln]) == 1


def test_same_run_on_1_2_and_4_devices(tmp_path):
  runs = {}
  for devices in (1, 2, 4):
    wd = tmp_path / str(devices)
    # opt.eps: key biases have an exactly-zero true gradient; Adam with eps = 1e-8 turns their
    # float round-off (which depends on how the devices' sums are added) into lr-sized steps.
    train.train(config(steps=20, **{"twist.devices": devices, "opt.eps": 1e-6}), str(wd))
    runs[devices] = training_lines(wd)
  for devices in (2, 4):
    # Empirical float32 floor (no float64 training exists to derive it from; see
    # assert_same_training). Steps, rounds, lr and subnet coverage are compared exactly.
    assert_same_training(runs[devices], runs[1], rtol=2e-5, atol=2e-5)


def test_keeps_last_k_plus_best(tmp_path):
  trainer = make_trainer(config(steps=40, **{"ckpt.every": 5, "ckpt.keep": 1,
                                             "eval.every": 10}), tmp_path)
  calls = [0]
  real_validate = trainer.validate

  def validate():  # make step 10 the best validation, then worse
    calls[0] += 1
    out = real_validate()
    out["val_loss"] = 1.0 if calls[0] == 1 else 2.0 + calls[0]
    return out
  trainer.validate = validate
  trainer.fit()
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [10, 40]
