"""Evaluation: vmapped subnet losses against independent one-by-one references (extracted dense
subnets and the masked full model), kappa = 1 against the full model, no recompile per subnet,
and the golden-ticket report, heatmap and CLI on two tiny trained runs (TwIST and DDP)."""

import json
import os

import jax
import numpy as np
import pytest

from twist_jax import config, evaluate, subnets
from twist_jax.model import ModelConfig

from helpers import load_experiment, random_params

CFG = ModelConfig.uniform(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=16)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


@pytest.fixture(scope="module")
def windows():
  # 7 windows: with the batch sizes below the last window batch is padded.
  return np.random.default_rng(1).integers(0, CFG.vocab_size, (7, 13)).astype(np.int32)


def one_subnet(subnets_S, n):
  return jax.tree.map(lambda x: x[n], subnets_S)


# ---- fast subnet evaluation ----------------------------------------------------------------------


@pytest.mark.parametrize("mode,shared,correction", [
    ("attn", (), "mean"), ("mlp", (1,), "norm"), ("attn_mlp", (), "mean"),
    ("blocks", (), "none")])
def test_vmapped_losses_equal_one_by_one_references(params, windows, mode, shared, correction):
  spec = evaluate.deploy_spec(CFG, mode, 0.5, shared, correction)
  subnets_S = evaluate.random_subnets(jax.random.key(3), spec, 5)
  # 5 subnets in chunks of 2 (last chunk padded), 3 windows a call (last batch padded).
  got_S = evaluate.subnet_losses(params, CFG, spec, subnets_S, windows, batch_size=6,
                                 subnet_batch=2)
  small_cfg = subnets.subnet_model_config(CFG, spec)
  masked_cfg = subnets.masked_model_config(CFG, spec)
  for n in range(5):
    subnet = one_subnet(subnets_S, n)
    small = subnets.extract_subnet(params, subnet, spec)
    dense = evaluate.mean_nll(small, small_cfg, windows, batch_size=len(windows))
    masked = evaluate.mean_nll(params, masked_cfg, windows, batch_size=len(windows),
                               masks=subnets.unit_masks(subnet, spec))
    np.testing.assert_allclose(got_S[n], dense, rtol=2e-5)
    np.testing.assert_allclose(got_S[n], masked, rtol=2e-5)
  assert np.ptp(got_S) > 1e-3  # the subnets really differ: the comparison is not vacuous


def test_kappa_one_equals_full_model(params, windows):
  full = evaluate.mean_nll(params, CFG, windows)
  for mode in ("attn_mlp", "blocks"):
    spec = evaluate.deploy_spec(CFG, mode, 1.0, (), "mean")
    assert evaluate.keeps_everything(spec)
    got_S = evaluate.subnet_losses(params, CFG, spec,
                                   evaluate.random_subnets(jax.random.key(0), spec, 3), windows)
    np.testing.assert_allclose(got_S, full, rtol=2e-5)


def test_no_recompile_per_subnet(params, windows):
  spec = evaluate.deploy_spec(CFG, "attn_mlp", 0.5, (), "mean")
  draw = lambda seed: evaluate.random_subnets(jax.random.key(seed), spec, 4)
  a = evaluate.subnet_losses(params, CFG, spec, draw(0), windows, subnet_batch=4)
  size = evaluate._subnets_nll_sums._cache_size()
  b = evaluate.subnet_losses(params, CFG, spec, draw(1), windows, subnet_batch=4)
  assert evaluate._subnets_nll_sums._cache_size() == size
  assert not np.allclose(a, b)


def test_random_subnets_are_independent_uniform_draws():
  spec = evaluate.deploy_spec(CFG, "attn_mlp", 0.5, (0,), "mean")
  key = jax.random.key(7)
  many, few = evaluate.random_subnets(key, spec, 8), evaluate.random_subnets(key, spec, 3)
  assert set(many) == {"h_1"}  # the shared layer 0 is never cut
  for kind, total, keep in (("head", 4, 2), ("unit", 128, 64)):
    idx_SxM = np.asarray(many["h_1"][kind])
    assert idx_SxM.shape == (8, keep)
    np.testing.assert_array_equal(idx_SxM[:3], few["h_1"][kind])  # more samples extend
    for row in idx_SxM:
      assert (np.diff(row) > 0).all() and row.min() >= 0 and row.max() < total
    assert len({tuple(r) for r in idx_SxM}) > 1


def test_distribution_stats():
  d = evaluate.distribution([3.0, 1.0, 2.0])
  assert d["losses"] == [3.0, 1.0, 2.0]
  assert (d["mean"], d["min"], d["max"]) == (2.0, 1.0, 3.0)
  np.testing.assert_allclose(d["std"], np.sqrt(2 / 3))
  np.testing.assert_allclose(d["ppl_mean"], np.exp(2.0))


# ---- tiny trained runs ---------------------------------------------------------------------------


def smoke_config(name: str):
  c = load_experiment(name, "smoke")
  # Test speed only (what is trained is unchanged): one device compiles faster than a 4-device
  # mesh, and one checkpoint at the end is all the evaluation reads.
  c.log.progress, c.twist.devices, c.ckpt.every = False, 1, c.steps
  return config.from_configdict(c)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A TwIST (attn, kappa 0.5, correction mean) and a DDP smoke run, trained once (~30 s)."""
  from twist_jax import train

  root = tmp_path_factory.mktemp("runs")
  out = {}
  for label, name in (("TwIST", "pydocs_attn"), ("DDP", "pydocs_ddp")):
    out[label] = str(root / name)
    train.train(smoke_config(name), out[label])
  return out


def listing(folder):
  return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("report"))
  rep = evaluate.golden_ticket_report({"DDP": runs["DDP"], "TwIST": runs["TwIST"]},
                                      [0.25, 0.5, 1], 4, max_windows=16, out_dir=out_dir,
                                      progress=False)
  return rep, out_dir


@pytest.mark.slow
def test_report_schema_and_consistent_stats(report, runs):
  rep, _ = report
  assert rep["mode"] == "attn"  # the DDP run (no subnet training) is cut like the TwIST run
  assert rep["protocol"].startswith("data=python_docs") and rep["windows"] == 16
  assert list(rep["runs"]) == ["DDP", "TwIST"]
  for label, run in rep["runs"].items():
    assert run["workdir"] == os.path.abspath(runs[label])
    assert list(run["kappas"]) == ["0.25", "0.5", "1"]
    full = run["full"]
    np.testing.assert_allclose(full["ppl"], np.exp(full["loss"]))
    for k, d in run["kappas"].items():
      losses = np.asarray(d["losses"])
      assert len(losses) == 4
      np.testing.assert_allclose([d["mean"], d["std"], d["min"], d["max"]],
                                 [losses.mean(), losses.std(), losses.min(), losses.max()])
      np.testing.assert_allclose(d["ppl_mean"], np.exp(d["mean"]))
      assert d["correction"] == "mean"  # both configs' subnet.correction (the default)
    np.testing.assert_allclose(run["kappas"]["1"]["losses"], full["loss"])
    assert run["kappas"]["0.25"]["params"] < run["kappas"]["0.5"]["params"] < full["params"]
    assert np.ptp(run["kappas"]["0.25"]["losses"]) > 0  # four different random subnets


@pytest.mark.slow
def test_report_files(report):
  rep, out_dir = report
  with open(os.path.join(out_dir, "golden_tickets.json")) as f:
    assert json.load(f) == json.loads(json.dumps(rep))
  with open(os.path.join(out_dir, "golden_tickets.png"), "rb") as f:
    assert f.read(8) == PNG_MAGIC
  with open(os.path.join(out_dir, "golden_tickets.md")) as f:
    md = f.read()
  assert rep["protocol"] in md
  assert md.count("| TwIST |") == md.count("| DDP |") == 4  # 3 ratios + the full model
  assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp")]


@pytest.mark.slow
def test_report_matches_direct_evaluation(report, runs):
  """The report's numbers are those of the same subnets evaluated one by one."""
  from twist_jax import checkpoint, data

  rep, _ = report
  cfg, model, params = checkpoint.load_run(runs["TwIST"])
  windows = data.load(cfg.data).validation_windows(context=cfg.model.context, max_windows=16)
  np.testing.assert_allclose(rep["runs"]["TwIST"]["full"]["loss"],
                             evaluate.mean_nll(params, model, windows), rtol=1e-6)
  spec = evaluate.deploy_spec(model, "attn", 0.5, (), "mean")
  subnets_S = evaluate.random_subnets(evaluate.kappa_key(0, 0.5), spec, 4)
  small_cfg = subnets.subnet_model_config(model, spec)
  for n, loss in enumerate(rep["runs"]["TwIST"]["kappas"]["0.5"]["losses"]):
    small = subnets.extract_subnet(params, one_subnet(subnets_S, n), spec)
    np.testing.assert_allclose(loss, evaluate.mean_nll(small, small_cfg, windows), rtol=2e-5)


@pytest.mark.slow
def test_heatmap_writes_png_and_json(runs, tmp_path):
  out_png = str(tmp_path / "sweep" / "heatmap.png")
  grid = evaluate.heatmap([runs["DDP"], runs["TwIST"]], [0.5, 1], 2, out_png, max_windows=8,
                          progress=False)
  assert grid["rows"] == ["pydocs_attn", "pydocs_ddp"]  # by training kappa, DDP (1) last
  assert grid["kappa_train"] == [0.5, 1.0]
  assert np.asarray(grid["ppl"]).shape == (2, 2) and np.isfinite(grid["ppl"]).all()
  with open(out_png, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  with open(str(tmp_path / "sweep" / "heatmap.json")) as f:
    assert json.load(f) == json.loads(json.dumps(grid))


# ---- command line --------------------------------------------------------------------------------


BAD_ARGS = [
    (["--kappas", "0,0.5"], "kappas"),
    (["--kappas", "0.5,1.5"], "kappas"),
    (["--kappas", "half"], "kappas"),
    (["--kappas", "0.01"], "kappa 0.01"),  # keeps zero of the 4 heads
    (["--samples", "0"], "samples"),
    (["--max-windows", "-1"], "max_windows"),
    (["--mode", "heads"], "--mode"),
    (["--compare", "/nonexistent/run"], "/nonexistent/run"),
    (["--heatmap", "RUN,/nonexistent/run"], "/nonexistent/run"),
    (["--out", "OUT/x.png"], "--out"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra,needle", BAD_ARGS)
def test_cli_bad_arguments_exit_2_and_write_nothing(runs, tmp_path, capsys, extra, needle):
  before = listing(runs["TwIST"]) + listing(runs["DDP"])
  extra = [a.replace("RUN", runs["DDP"]).replace("OUT", str(tmp_path)) for a in extra]
  code = evaluate.main(["--workdir", runs["TwIST"], "--samples", "2", "--no-progress", *extra])
  captured = capsys.readouterr()
  assert code == 2
  assert captured.out == ""
  assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
  assert needle in captured.err
  assert listing(runs["TwIST"]) + listing(runs["DDP"]) == before
  assert os.listdir(tmp_path) == []


def test_cli_missing_run_and_no_target(tmp_path, capsys):
  for argv in (["--workdir", str(tmp_path / "missing")], ["--samples", "3"]):
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cli_json_equals_the_files(runs, tmp_path, capsys):
  out_png = str(tmp_path / "hm.png")
  code = evaluate.main(["--workdir", runs["TwIST"], "--compare", runs["DDP"], "--kappas", "0.5",
                        "--samples", "2", "--max-windows", "8", "--heatmap",
                        f"{runs['TwIST']},{runs['DDP']}", "--out", out_png, "--no-progress",
                        "--json"])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  printed = json.loads(captured.out)
  with open(os.path.join(runs["TwIST"], "golden_tickets.json")) as f:
    assert printed["golden_tickets"] == json.load(f)
  with open(str(tmp_path / "hm.json")) as f:
    assert printed["heatmap"] == json.load(f)
  assert set(printed["golden_tickets"]["runs"]) == {"TwIST", "DDP"}
  assert np.asarray(printed["heatmap"]["ppl"]).shape == (2, 1)
  assert os.path.exists(out_png) and os.path.exists(os.path.join(runs["TwIST"],
                                                                 "golden_tickets.png"))
  # One target: the printed JSON is that file's object itself.
  assert evaluate.main(["--workdir", runs["TwIST"], "--kappas", "0.5", "--samples", "2",
                        "--max-windows", "8", "--no-progress", "--json"]) == 0
  with open(os.path.join(runs["TwIST"], "golden_tickets.json")) as f:
    assert json.loads(capsys.readouterr().out) == json.load(f)


def parse_table(text: str) -> dict:
  """{(run, kappa): [cells]} from the summary table's rows (cells split on 2+ spaces)."""
  import re

  rows = [re.split(r"\s{2,}", ln.strip()) for ln in text.splitlines()]
  return {(r[0], r[1]): r[2:] for r in rows if len(r) >= 7 and r[0] in ("TwIST", "DDP")}


@pytest.mark.slow
def test_cli_default_output_is_a_short_table_matching_the_json(runs, capsys):
  code = evaluate.main(["--workdir", runs["TwIST"], "--compare", runs["DDP"], "--kappas",
                        "0.25,0.5", "--samples", "3", "--max-windows", "8", "--no-progress"])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  lines = captured.out.strip().splitlines()
  assert len(lines) <= 10, captured.out  # title + header + 2 runs x (full + 2 kappas) + paths
  with open(os.path.join(runs["TwIST"], "golden_tickets.json")) as f:
    rep = json.load(f)
  table = parse_table(captured.out)
  assert len(table) == 6
  for label, run in rep["runs"].items():
    full = table[(label, "full")]
    assert full[1] == f"{run['full']['loss']:.4f}" and full[3] == f"{run['full']['ppl']:.2f}"
    for k, d in run["kappas"].items():
      params, mean_std, worst, ppl_mean, ppl_worst = table[(label, k)]
      assert params == f"{d['params']:,}"
      assert mean_std == f"{d['mean']:.4f} ± {d['std']:.4f}"
      assert worst == f"{max(d['losses']):.4f}"
      assert ppl_mean == f"{np.exp(d['mean']):.2f}" and ppl_worst == f"{np.exp(d['max']):.2f}"
  assert os.path.join(os.path.abspath(runs["TwIST"]), "golden_tickets.json") in lines[-1]
