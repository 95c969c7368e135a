"""Two processes on localhost (4 CPU devices each, JAX's multi-controller runtime) train the
same TwIST smoke run as one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

from twist_jax import config as config_lib, train

from helpers import ROOT, assert_same_training, load_experiment

# opt.eps: key biases have an exactly-zero true gradient; with Adam's eps = 1e-8 their float
# round-off (which differs between one process's and two processes' reduction orders) becomes
# lr-sized steps. A larger eps keeps the comparison about the math.
OVERRIDES = {"twist.workers": 8, "steps": 20, "ckpt.every": 10, "eval.every": 10,
             "log.progress": False, "opt.eps": 1e-6, "eval.golden_samples": 0}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def training_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in ("round_time_s", "tokens_per_s")}
          for r in recs if "event" not in r]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["true", "ddp"])
def test_two_processes_equal_one_process_with_eight_devices(tmp_path, variant):
  # The same config file as the launched processes (not the defaults: it sets lr, warm-up).
  c = load_experiment("pydocs_attn", "smoke")
  c.twist.variant = variant
  c.update_from_flattened_dict(OVERRIDES)
  train.train(config_lib.from_configdict(c), str(tmp_path / "single"))

  port, workdir = free_port(), tmp_path / "multi"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + [f"--config.twist.variant={variant}"]
  procs = [subprocess.Popen(
      [sys.executable, "launch.py", "--config", "experiments/pydocs_attn.py:smoke",
       "--workdir", str(workdir), f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", *args],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "on 8 device(s), 2 process(es)" in outs[0][0]
  single, multi = training_lines(tmp_path / "single"), training_lines(workdir)
  assert [r["step"] for r in multi] == [r["step"] for r in single]
  # Empirical float32 floor (no float64 training exists to derive it from; see
  # assert_same_training).
  assert_same_training(multi, single, rtol=2e-5, atol=2e-5)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
