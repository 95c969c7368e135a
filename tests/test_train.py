"""End to end: configs load, smoke training lowers the loss, resume is exact, bad input exits 2."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from twist_jax import config as config_lib, train

from helpers import ROOT, exit_code, have_transformers, load_experiment

sys.path.insert(0, ROOT)
import launch  # noqa: E402  (the repository root's entry point)
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_config_loads_and_validates(path):
  name = os.path.basename(path)[:-3]
  args = [None, "smoke"] + (["hf"] if name.startswith("gpt2") else [])
  for arg in args:
    cfg = config_lib.from_configdict(load_experiment(name, arg))
    assert cfg.steps % cfg.twist.local_steps == 0
    assert json.loads(json.dumps(config_lib.to_dict(cfg)))  # config.json is serialisable
  assert len(EXPERIMENTS) >= 7


def smoke_config(variant="true", **overrides):
  c = load_experiment("pydocs_attn", "smoke")
  c.twist.variant = variant
  c.log.progress = False
  for k, v in overrides.items():
    section, field = k.split("__")
    c[section][field] = v
  return config_lib.from_configdict(c)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "a")
  train.train(smoke_config(), workdir)
  return workdir


def test_smoke_run_lowers_the_loss_and_writes_outputs(finished_run):
  metrics = read_metrics(finished_run)
  train_lines = [m for m in metrics if "loss" in m]
  val_lines = [m for m in metrics if "val_loss" in m]
  assert [m["step"] for m in train_lines] == [5, 10, 15, 20, 25, 30]
  assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 0.5
  assert val_lines and val_lines[-1]["val_loss"] < 5.0  # log(256) = 5.55 is chance
  assert train_lines[0]["coverage_head_min"] >= 1
  assert len(train_lines[0]["worker_loss"]) == 4
  with open(os.path.join(finished_run, "config.json")) as f:
    assert json.load(f)["twist"]["variant"] == "true"
  assert sorted(os.listdir(os.path.join(finished_run, "checkpoints"))) == ["15", "30"]


def test_resume_reproduces_the_uninterrupted_run(finished_run, tmp_path):
  workdir = str(tmp_path / "b")
  train.train(smoke_config(), workdir)
  # Simulate a crash after the step-15 checkpoint: drop the later checkpoint, rerun.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "30"))
  train.train(smoke_config(), workdir)
  strip = lambda ms: [{k: v for k, v in m.items() if k not in ("round_time_s", "tokens_per_s")}
                      for m in ms if "event" not in m]
  assert strip(read_metrics(workdir)) == strip(read_metrics(finished_run))


def test_ddp_smoke_run(tmp_path):
  out = train.train(smoke_config("ddp"), str(tmp_path / "ddp"))
  assert out["step"] == 30 and out["val_loss"] < 5.0


def run_launch(tmp_path, *overrides, config="experiments/pydocs_attn.py:smoke"):
  workdir = tmp_path / "wd"
  proc = subprocess.run([sys.executable, "launch.py", "--config", config, "--workdir",
                         str(workdir), *overrides], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  return proc, workdir


BAD_VALUES = [
    (["--config.subnet.kappa=0.01"], "subnet.kappa"),
    (["--config.subnet.mode=heads"], "subnet.mode"),
    (["--config.subnet.sampler=best"], "subnet.sampler"),
    (["--config.twist.variant=fast"], "twist.variant"),
    (["--config.twist.devices=3"], "twist.devices"),
    (["--config.steps=31"], "steps"),
    (["--config.data.tokenizer=words"], "data.tokenizer"),
    (["--config.subnet.nope=1"], "nope"),
]


def test_a_bad_config_value_exits_2_from_a_fresh_process(tmp_path):
  proc, workdir = run_launch(tmp_path, "--config.subnet.kappa=1.5")
  assert proc.returncode == 2, proc.stderr
  lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
  assert len(lines) == 1 and "subnet.kappa" in lines[0], proc.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("overrides,needle", BAD_VALUES)
def test_bad_config_values_exit_2_and_write_nothing(tmp_path, capsys, overrides, needle):
  """launch.main in this process (the fresh-process path is the test above)."""
  workdir = tmp_path / "wd"
  code = exit_code(launch.main, ["--config", os.path.join(ROOT, "experiments", "pydocs_attn.py")
                                 + ":smoke", "--workdir", workdir, *overrides])
  err = capsys.readouterr().err
  lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
  assert code == 2, err
  assert len(lines) == 1 and needle in lines[0], err
  assert not workdir.exists()


def test_missing_and_empty_data_exit_2(tmp_path):
  proc, workdir = run_launch(tmp_path, "--config.data.name=text_files",
                             f"--config.data.files={tmp_path}/nothing/*.txt",
                             f"--config.data.data_dir={tmp_path}/cache")
  assert proc.returncode == 2 and "nothing/*.txt" in proc.stderr, proc.stderr
  assert not workdir.exists()
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("")
  proc, workdir = run_launch(tmp_path, "--config.data.name=text_files",
                             f"--config.data.files={tmp_path}/empty/*.txt",
                             f"--config.data.data_dir={tmp_path}/cache")
  assert proc.returncode == 2 and "error:" in proc.stderr, proc.stderr
  assert not workdir.exists()


def test_resume_with_a_different_config_is_refused(finished_run, tmp_path):
  c = load_experiment("pydocs_attn", "smoke")
  c.subnet.kappa = 0.25
  with pytest.raises(config_lib.ConfigError, match="subnet.kappa"):
    train.train(config_lib.from_configdict(c), finished_run)


def test_init_from_run_starts_from_its_latest_params(finished_run, tmp_path):
  from twist_jax import checkpoint
  import numpy as np
  import jax

  c = load_experiment("pydocs_attn", "smoke")
  c.init.from_run = finished_run
  run = train.build(config_lib.from_configdict(c), str(tmp_path / "ft"))
  _, _, params = checkpoint.load_run(finished_run)
  for a, b in zip(jax.tree.leaves(run.init_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c.model.context = 64  # longer than the source run's positions
  with pytest.raises(config_lib.ConfigError, match="model.context"):
    train.build(config_lib.from_configdict(c), str(tmp_path / "ft2"))


HAVE_TRANSFORMERS = have_transformers()  # CI (TWIST_REQUIRE_TRANSFORMERS): never skip


@pytest.mark.skipif(not HAVE_TRANSFORMERS,
                    reason="the HF folder is written by transformers: needs torch + transformers: "
                    "pip install -e '.[hf]'")
def test_init_from_a_hugging_face_folder(tmp_path):
  import numpy as np
  import jax
  import torch
  import transformers

  torch.manual_seed(0)
  hf_cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2,
                                   n_head=4)
  transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
  c = load_experiment("pydocs_attn", "smoke")
  c.init.hf = str(tmp_path / "hf")
  c.log.progress = False
  run = train.build(config_lib.from_configdict(c), str(tmp_path / "run"))
  np.testing.assert_allclose(
      np.asarray(run.init_params["h_1"]["mlp"]["c_fc"]["kernel"]),
      transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").transformer.h[1].mlp.c_fc
      .weight.detach().numpy(), rtol=1e-6)
  assert run.model.n_positions == 32 and run.init_params["wpe"]["embedding"].shape == (32, 32)
  proc, workdir = run_launch(tmp_path, f"--config.init.hf={tmp_path / 'hf'}",
                             "--config.model.context=128")
  assert proc.returncode == 2 and "n_positions" in proc.stderr, proc.stderr
  assert not workdir.exists()
