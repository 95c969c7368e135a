"""launch.py in-process: bad input (config file or ratio lists) exits 2 with one line and writes
nothing; per-layer kappa from the command line; the job ends with the golden-ticket table, whose
numbers are evaluate's own, and a rerun shows the saved table without recomputing it."""

import json
import os
import re
import subprocess
import sys

import jax

import numpy as np
import pytest

from twist_jax import checkpoint, config as config_lib, data, evaluate, subnets

from helpers import exit_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import launch  # noqa: E402  (the repository root's entry point)

SMOKE = os.path.join(ROOT, "experiments", "pydocs_attn.py") + ":smoke"


def write(path, text):
  path.write_text(text)
  return str(path)


BAD = {
    "missing file": (lambda t: ["--config", str(t / "nope.py")], "no such file"),
    "folder": (lambda t: ["--config", str(t)], "no such file"),
    "syntax error": (lambda t: ["--config", write(t / "syn.py", "def get_config(:\n")],
                     "SyntaxError"),
    "get_config raises": (lambda t: ["--config", write(
        t / "boom.py", "def get_config(arg=None):\n  raise RuntimeError('boom')\n")],
                          "RuntimeError: boom"),
    "no get_config": (lambda t: ["--config", write(t / "none.py", "x = 1\n")], "get_config"),
    "bad config arg": (lambda t: ["--config", SMOKE.replace(":smoke", ":huge")],
                       "config argument must be smoke"),
    "kappa not numbers": (lambda t: ["--config", SMOKE, "--config.subnet.kappa=half"],
                          "--config.subnet.kappa"),
    "kappa empty": (lambda t: ["--config", SMOKE, "--config.subnet.kappa", ""],
                    "--config.subnet.kappa"),
    "kappa per layer count": (lambda t: ["--config", SMOKE, "--config.subnet.kappa=0.5,0.5,0.5"],
                              "subnet.kappa"),
    "kappa per layer range": (lambda t: ["--config", SMOKE, "--config.subnet.kappa=0.5,1.5"],
                              "subnet.kappa"),
    "golden kappa keeps no head": (lambda t: ["--config", SMOKE,
                                              "--config.eval.golden_kappas=0.5,0.1"],
                                   "eval.golden_kappas"),
    "golden samples": (lambda t: ["--config", SMOKE, "--config.eval.golden_samples=-1"],
                       "eval.golden_samples"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
  args, needle = BAD[case]
  workdir = tmp_path / "wd"
  code = exit_code(launch.main, [*args(tmp_path), "--workdir", workdir])
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
  assert not workdir.exists()


@pytest.mark.parametrize("override,line", [
    ("--config.subnet.kapa=0.5", "unknown config field subnet.kapa (did you mean subnet.kappa?)"),
    ("--config.stepz=10", "unknown config field stepz (did you mean steps?)"),
    ("--config.steps.every=10", "unknown config field steps.every (steps is a value, not a "
     "section)"),
    ("--config.zzz.lr=1", "unknown config field zzz.lr (the top level has "
     f"{', '.join(sorted(config_lib.default_config().keys()))})"),
])
def test_unknown_field_is_one_clean_line_with_a_suggestion(tmp_path, capsys, override, line):
  workdir = tmp_path / "wd"
  code = exit_code(launch.main, ["--config", SMOKE, "--workdir", workdir, "--config.opt.lr=0.1",
                                 override])
  err = capsys.readouterr().err
  assert code == 2 and err == f"error: {line}\n", err
  assert not workdir.exists()


@pytest.mark.parametrize("argv,found,rest", [
    (["--config.subnet.kappa=0.5,0.25"], {"subnet.kappa": (0.5, 0.25)}, []),
    (["--config.subnet.kappa", "0.25", "--workdir", "w"], {"subnet.kappa": (0.25,)},
     ["--workdir", "w"]),
    (["--x", "--config.eval.golden_kappas=0.5", "--config.twist.workers=2"],
     {"eval.golden_kappas": (0.5,)}, ["--x", "--config.twist.workers=2"]),
])
def test_ratio_overrides_are_taken_out_of_argv(argv, found, rest):
  assert launch.take_ratio_overrides(argv) == (rest, found)


def parse_rows(text):
  rows = [re.split(r"\s{2,}", ln.strip()) for ln in text.splitlines()]
  return {r[1]: r[2:] for r in rows if len(r) >= 7 and r[0] == "TwIST"}


@pytest.mark.slow
def test_job_ends_with_golden_tickets_equal_to_evaluate(tmp_path, capsys):
  workdir = tmp_path / "wd"
  args = ["--config", SMOKE, "--workdir", workdir, "--config.subnet.kappa=0.5,0.25",
          "--config.twist.devices=1", "--config.log.progress=False",
          "--config.eval.golden_samples=4"]
  assert exit_code(launch.main, args) == 0
  out = capsys.readouterr().out
  with open(workdir / "config.json") as f:
    cfg_json = json.load(f)
  assert cfg_json["subnet"]["kappa"] == [0.5, 0.25]  # per-layer kappa from the command line
  table = out[out.index("golden tickets:"):].strip().splitlines()
  assert len(table) == 7, out  # title, header, full + 3 ratios, plot path
  assert table[-1] == f"plot: {workdir / 'golden_tickets.png'}"
  for ext in ("json", "md", "png"):
    assert (workdir / f"golden_tickets.{ext}").exists()
  with open(workdir / "golden_tickets.json") as f:
    rep = json.load(f)
  assert rep["mode"] == "attn" and rep["samples"] == 4 and rep["windows"] == 32
  assert rep["kappas_deploy"] == [0.25, 0.5, 0.75]

  # Recomputed with evaluate's functions on the val_loss windows (eval.max_windows = 32).
  cfg, model, params = checkpoint.load_run(str(workdir))
  windows = data.load(cfg.data).validation_windows(context=cfg.model.context, max_windows=32)
  run = rep["runs"]["TwIST"]
  full = evaluate.mean_nll(params, model, windows)
  np.testing.assert_allclose(run["full"]["loss"], full, rtol=1e-6)
  val_loss = float(re.search(r"done: .* val_loss=([\d.]+)", out).group(1))
  assert abs(val_loss - full) < 1e-4  # the same windows as training's val_loss
  rows = parse_rows(out)
  assert rows["full"][1] == f"{full:.4f}"
  for k in (0.25, 0.5, 0.75):
    spec = evaluate.deploy_spec(model, "attn", k, (), "mean")
    losses = evaluate.subnet_losses(params, model, spec,
                                    evaluate.random_subnets(evaluate.kappa_key(0, k), spec, 4),
                                    windows)
    np.testing.assert_allclose(run["kappas"][f"{k:g}"]["losses"], losses, rtol=1e-5)
    params_k, mean_std, worst, *_ = rows[f"{k:g}"]
    assert params_k == f"{subnets.subnet_model_config(model, spec).num_params():,}"
    assert mean_std == f"{losses.mean():.4f} ± {losses.std():.4f}"
    assert worst == f"{losses.max():.4f}"

  # A rerun of the finished run shows the saved table and recomputes nothing.
  before = os.stat(workdir / "golden_tickets.json").st_mtime_ns
  assert exit_code(launch.main, args) == 0
  again = capsys.readouterr().out
  assert "nothing to do" in again and "not recomputed" in again
  assert parse_rows(again) == rows
  assert os.stat(workdir / "golden_tickets.json").st_mtime_ns == before


@pytest.mark.slow
def test_golden_samples_0_disables_it(tmp_path, capsys):
  workdir = tmp_path / "wd"
  assert exit_code(launch.main, ["--config", SMOKE, "--workdir", workdir,
                                 "--config.twist.devices=1", "--config.log.progress=False",
                                 "--config.eval.golden_samples=0"]) == 0
  assert "golden tickets" not in capsys.readouterr().out
  assert not (workdir / "golden_tickets.json").exists()


# ---- deterministic: XLA's flag is set before JAX starts a backend --------------------------------

# Runs launch.main in a fresh process with train.train replaced by a probe that reports what XLA
# will read when the backend starts (the probe runs before anything touches a device).
PROBE = """
import os, sys
sys.path.insert(0, {root!r})
import launch
from jax._src import xla_bridge
from twist_jax import train

def probe(cfg, workdir):
  print("started:", xla_bridge.backends_are_initialized())
  print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))
  return {{"step": 0, "interrupted": "probe"}}

train.train = probe
launch.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("setting,expect", [([], False), (["--config.deterministic=True"], True)])
def test_deterministic_reaches_xla_flags_before_the_backend_starts(tmp_path, setting, expect):
  proc = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT), "--config", SMOKE,
                         "--workdir", str(tmp_path / "wd"), *setting], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = dict(ln.split(": ", 1) for ln in proc.stdout.splitlines() if ": " in ln)
  assert out["started"] == "False", proc.stdout
  assert (config_lib.DETERMINISTIC_FLAG in out["XLA_FLAGS"].split()) == expect, proc.stdout
  assert "--xla_force_host_platform_device_count=8" in out["XLA_FLAGS"]  # the rest is kept


def test_deterministic_after_the_backend_started(monkeypatch):
  from jax._src import xla_bridge

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  jax.devices()  # the CPU backend starts
  assert xla_bridge.backends_are_initialized()
  config_lib.apply_determinism(True)  # CPU: deterministic anyway, nothing to refuse
  assert config_lib.DETERMINISTIC_FLAG not in os.environ["XLA_FLAGS"]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(config_lib.ConfigError, match="'deterministic': JAX's gpu backend started"):
    config_lib.apply_determinism(True)
  config_lib.apply_determinism(False)  # not asked for: nothing to refuse
  monkeypatch.setenv("XLA_FLAGS", config_lib.DETERMINISTIC_FLAG)
  config_lib.apply_determinism(True)  # set by the user before Python started
