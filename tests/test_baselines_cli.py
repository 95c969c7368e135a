"""`python -m twist_jax.baselines` on a tiny DDP run: a short summary, or with --json / --out the
full record, for unstructured and structured methods, consistent with evaluating the model
directly; bad arguments exit 2 with one line and write nothing."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from twist_jax import checkpoint, config, data, evaluate
from twist_jax.baselines import __main__ as cli

from helpers import ROOT, load_experiment

KEYS = {"method", "kind", "sparsity", "val_loss", "val_ppl", "protocol", "windows",
        "params_total", "params_kept", "params_kept_fraction", "calibration", "time_prune_s",
        "time_s", "workdir"}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
  """The DDP smoke run, trained once (~10 s)."""
  from twist_jax import train

  c = load_experiment("pydocs_ddp", "smoke")
  # Test speed only: one device compiles faster; one checkpoint at the end is all that is read.
  c.log.progress, c.twist.devices, c.ckpt.every = False, 1, c.steps
  workdir = str(tmp_path_factory.mktemp("runs") / "ddp")
  train.train(config.from_configdict(c), workdir)
  return workdir


@pytest.fixture(scope="module")
def dense(ddp_run):
  """(config, model, params, validation windows, full-model loss) of the run, evaluated directly."""
  cfg, model, params = checkpoint.load_run(ddp_run)
  windows = data.load(cfg.data).validation_windows(context=cfg.model.context, max_windows=16)
  return cfg, model, params, windows, evaluate.mean_nll(params, model, windows)


def direct_loss(ddp_run, dense, method):
  """The same pruning done by hand on the same 8 calibration and 16 validation windows."""
  from twist_jax import baselines

  cfg, model, params, windows, _ = dense
  calib = cli.calibration_windows(data.load(cfg.data), cfg, 8)
  if method.startswith(cli.STRUCT_PREFIX):
    spec = cli.structured_spec(model, 0.5, "attn_mlp", cfg.subnet.shared_layers)
    small, small_cfg = cli.prune_structured(params, model, method[len(cli.STRUCT_PREFIX):], spec,
                                            calib, None)
  else:
    small, small_cfg = baselines.prune_unstructured(params, model, method, 0.5, calib), model
  return evaluate.mean_nll(small, small_cfg, windows)


def run_cli(capsys, *argv):
  code = cli.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def listing(folder):
  return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "struct-wanda"])
def test_json_record(ddp_run, dense, capsys, method):
  cfg, model, _, _, full = dense
  code, out, err = run_cli(capsys, "--workdir", ddp_run, "--method", method, "--sparsity", "0.5",
                           "--calib-windows", "8", "--max-windows", "16", "--json")
  assert code == 0, err
  result = json.loads(out)
  assert KEYS <= set(result)
  assert result["method"] == method and result["sparsity"] == 0.5 and result["windows"] == 16
  assert result["protocol"] == data.protocol(cfg.data, cfg.model.context)
  assert math.isclose(result["val_ppl"], math.exp(result["val_loss"]), rel_tol=1e-9)
  assert result["val_loss"] != full  # half the weights went: the loss moved
  np.testing.assert_allclose(result["val_loss"], direct_loss(ddp_run, dense, method), rtol=1e-5)
  assert result["params_total"] == model.num_params()
  assert result["calibration"].startswith("8 shuffled training windows")
  # Half of every block's prunable weights go; embeddings, LayerNorms and biases stay.
  assert 0.5 < result["params_kept_fraction"] < 0.8
  if method.startswith("struct-"):
    assert (result["kind"], result["mode"], result["kappa"]) == ("structured", "attn_mlp", 0.5)
    assert result["correction"] == "none"
  else:
    assert result["kind"] == "unstructured"


@pytest.mark.slow
def test_structured_at_zero_sparsity_is_the_dense_model(ddp_run, dense, capsys):
  *_, full = dense
  code, out, err = run_cli(capsys, "--workdir", ddp_run, "--method", "struct-magnitude",
                           "--sparsity", "0", "--max-windows", "16", "--json")
  assert code == 0, err
  result = json.loads(out)
  np.testing.assert_allclose(result["val_loss"], full, rtol=1e-5)
  assert result["params_kept"] == result["params_total"]
  assert result["calibration"] == "none"


@pytest.mark.slow
def test_unstructured_keeps_the_unpruned_count(ddp_run, dense, capsys):
  """params_kept = total - zeros introduced: half of each of the four block kernels."""
  _, model, *_ = dense
  code, out, err = run_cli(capsys, "--workdir", ddp_run, "--method", "magnitude", "--sparsity",
                           "0.5", "--max-windows", "4", "--json")
  assert code == 0, err
  d, kernels = model.n_embd, 0
  for h, f in zip(model.n_head, model.n_inner):
    hk = h * model.head_dim
    kernels += d * 3 * hk + hk * d + 2 * d * f
  assert json.loads(out)["params_kept"] == model.num_params() - kernels // 2


@pytest.mark.slow
def test_json_equals_the_out_file_and_summary_matches(ddp_run, capsys, tmp_path):
  args = ["--workdir", ddp_run, "--method", "struct-magnitude", "--sparsity", "0.5",
          "--max-windows", "8"]
  code, out, err = run_cli(capsys, *args, "--out", str(tmp_path / "a.json"), "--json")
  assert code == 0, err
  with open(tmp_path / "a.json") as f:
    record = json.load(f)
  assert json.loads(out) == record
  code, out, err = run_cli(capsys, *args, "--out", str(tmp_path / "sub" / "b.json"))
  assert code == 0, err
  lines = out.strip().splitlines()
  assert len(lines) == 3, out  # what was pruned, the PPL, where the record is
  with open(tmp_path / "sub" / "b.json") as f:
    again = json.load(f)
  assert again["val_loss"] == record["val_loss"]  # same windows, same deterministic pruning
  assert f"sparsity 0.5, kept {again['params_kept']:,} of {again['params_total']:,}" in lines[0]
  assert (f"val loss {again['val_loss']:.4f}, PPL {again['val_ppl']:.2f} on 8 windows"
          in lines[1])
  assert lines[2] == f"record: {tmp_path / 'sub' / 'b.json'}"


@pytest.mark.slow
def test_module_entry_point(ddp_run):
  proc = subprocess.run(
      [sys.executable, "-m", "twist_jax.baselines", "--workdir", ddp_run, "--method",
       "struct-random", "--sparsity", "0.25", "--mode", "mlp", "--max-windows", "4", "--json"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  assert (result["method"], result["mode"], result["kappa"]) == ("struct-random", "mlp", 0.75)


BAD_ARGS = [
    (["--method", "lottery", "--sparsity", "0.5"], "--method"),
    (["--method", "magnitude", "--sparsity", "1"], "--sparsity"),
    (["--method", "magnitude", "--sparsity", "-0.1"], "--sparsity"),
    (["--method", "magnitude", "--sparsity", "half"], "--sparsity"),
    (["--method", "magnitude"], "--sparsity"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib-windows", "0"], "--calib-windows"),
    (["--method", "struct-wanda", "--sparsity", "0.5", "--mode", "blocks"], "--mode"),
    (["--method", "struct-magnitude", "--sparsity", "0.9"], "zero units"),  # 0.1 x 4 heads = 0
    (["--method", "magnitude", "--sparsity", "0.5", "--max-windows", "-2"], "--max-windows"),
    (["--method", "magnitude", "--sparsity", "0.5", "--out", "RUN"], "--out"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra,needle", BAD_ARGS)
def test_bad_arguments_exit_2_and_write_nothing(ddp_run, capsys, extra, needle):
  before = listing(ddp_run)
  extra = [a.replace("RUN", ddp_run) for a in extra]
  code, out, err = run_cli(capsys, "--workdir", ddp_run, *extra)
  assert code == 2 and out == ""
  assert err.startswith("error: ") and err.count("\n") == 1
  assert needle in err
  assert listing(ddp_run) == before


def test_missing_run_exits_2(tmp_path, capsys):
  code, out, err = run_cli(capsys, "--workdir", str(tmp_path / "none"), "--method", "magnitude",
                           "--sparsity", "0.5")
  assert code == 2 and out == ""
  assert err.startswith("error: ") and "no config.json" in err and err.count("\n") == 1
  assert os.listdir(tmp_path) == []
