"""Deployment: the extracted dense subnet equals the masked full model (correction folded in),
the four heuristics choose what they claim, save/load round-trips, and the CLI on a smoke run
(Hugging Face export for mlp mode, a clean refusal for attn mode, exit 2 on bad arguments)."""

import dataclasses
import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twist_jax import checkpoint, config, deploy, evaluate, subnet_spec, subnets
from twist_jax.errors import DataError, UserError
from twist_jax.model import GPT2, ModelConfig, fold_correction

from helpers import exit_code, have_transformers, load_experiment, random_params

CFG = ModelConfig.uniform(n_layer=4, n_head=4, n_embd=32, vocab_size=256, n_positions=16)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)


@functools.partial(jax.jit, static_argnums=(1,))
def logits(params, cfg, tokens, masks=None):
  return GPT2(cfg).apply({"params": params}, tokens, masks)


def masked_logits(params, cfg, spec, subnet, tokens=TOKENS):
  """The reference: the full model with the subnet's unit gates and correction scales."""
  masks = subnets.unit_masks(deploy.one_worker(subnet), spec)
  return logits(params, subnets.masked_model_config(cfg, spec), tokens, masks)


def as_subnet(indices):
  """subnet.json indices (nested lists) -> a W = 1 index pytree."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.int32)[None], indices,
                      is_leaf=lambda x: isinstance(x, list))


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


# ---- extract == masked full model ------------------------------------------------------------


CASES = {  # mode, kappa, shared layers, correction
    "attn": ("attn", 0.5, (), "mean"),
    "mlp": ("mlp", 0.25, (), "norm"),
    "attn_mlp": ("attn_mlp", 0.5, (), "mean"),
    "blocks": ("blocks", 0.5, (), "mean"),
    "per_layer_kappa": ("attn_mlp", (0.5, 0.25, 0.75, 1.0), (), "mean"),
    "shared_layers": ("attn_mlp", 0.5, (0, 3), "mean"),
    "blocks_shared": ("blocks", 0.5, (0,), "none"),
}


@pytest.mark.parametrize("case", CASES)
def test_extracted_equals_masked_full_model(params, case):
  mode, kappa, shared, correction = CASES[case]
  spec = subnet_spec.deploy_spec(CFG, mode, kappa, shared, correction)
  for seed in range(2):
    subnet = deploy.choose_subnet(params, CFG, spec, "random", jax.random.key(seed))
    small, cfg_small = deploy.extract(params, CFG, spec, subnet)
    np.testing.assert_allclose(logits(small, cfg_small, TOKENS),
                               masked_logits(params, CFG, spec, subnet), rtol=2e-5, atol=2e-5)
  assert cfg_small.attn_scale == cfg_small.mlp_scale == (1.0,) * cfg_small.n_layer
  assert (cfg_small.n_layer == spec.kept_layers() if mode == "blocks" else
          (cfg_small.n_head, cfg_small.n_inner) == (spec.keep_head, spec.keep_unit))


def test_correction_is_folded_into_c_proj_kernels_only(params):
  spec = subnet_spec.deploy_spec(CFG, "attn_mlp", 0.5, correction="mean")
  subnet = deploy.choose_subnet(params, CFG, spec, "random", jax.random.key(0))
  small, _ = deploy.extract(params, CFG, spec, subnet)
  sliced = subnets.extract_subnet(params, deploy.one_worker(subnet), spec)
  flat_small = flax.traverse_util.flatten_dict(small)
  for path, x in flax.traverse_util.flatten_dict(sliced).items():
    folded = path[-2:] == ("c_proj", "kernel")
    np.testing.assert_allclose(flat_small[path], 2.0 * x if folded else x, rtol=1e-6)
  # Without the fold the sliced model is not the subnet: the correction matters here.
  unscaled = subnets.subnet_model_config(CFG, spec).replace(attn_scale=(1.0,) * 4,
                                                            mlp_scale=(1.0,) * 4)
  assert not np.allclose(logits(sliced, unscaled, TOKENS),
                         masked_logits(params, CFG, spec, subnet), atol=1e-3)


def test_fold_correction_keeps_the_function(params):
  """Scaled forward before folding == plain forward (scales 1) after, for deploy and HF export."""
  from twist_jax import hf

  scaled = CFG.replace(attn_scale=(2.0, 0.5, 1.0, 1.5), mlp_scale=(1.0, 3.0, 0.25, 2.0))
  folded, plain = fold_correction(params, scaled)
  assert plain == CFG and plain.attn_scale == plain.mlp_scale == (1.0,) * 4
  np.testing.assert_allclose(logits(folded, plain, TOKENS), logits(params, scaled, TOKENS),
                             rtol=2e-5, atol=2e-5)
  # The scales matter: the unfolded params without them are another function.
  assert not np.allclose(logits(params, plain, TOKENS), logits(params, scaled, TOKENS), atol=1e-2)
  # Only the c_proj kernels change, by their own block's scale.
  flat, flat_folded = (flax.traverse_util.flatten_dict(p) for p in (params, folded))
  for path, x in flat.items():
    scale = ({"attn": scaled.attn_scale, "mlp": scaled.mlp_scale}[path[1]][int(path[0][2:])]
             if path[-2:] == ("c_proj", "kernel") else 1.0)
    np.testing.assert_allclose(flat_folded[path], scale * np.asarray(x), rtol=1e-6)
  # The Hugging Face export folds by the same rule: exporting the scaled model writes the
  # tensors of the already-folded one.
  exported, reference = hf._hf_tensors(params, scaled), hf._hf_tensors(folded, plain)
  assert exported.keys() == reference.keys()
  for name, x in exported.items():
    np.testing.assert_array_equal(x, reference[name])


def test_kappa_one_is_the_full_model(params):
  spec = subnet_spec.deploy_spec(CFG, "attn_mlp", 1.0)
  small, cfg_small = deploy.extract(params, CFG, spec, subnets.first_subnet(spec))
  assert cfg_small == CFG
  np.testing.assert_allclose(logits(small, cfg_small, TOKENS), logits(params, CFG, TOKENS),
                             rtol=1e-6, atol=1e-6)


def test_deploy_spec_validates():
  spec = subnet_spec.deploy_spec(CFG, "attn_mlp", (0.5, 0.25, 0.75, 1.0))
  assert spec.workers == 1 and spec.keep_head == (2, 1, 3, 4)
  assert spec.keep_unit == (64, 32, 96, 128)
  for bad in (0, 1.5, -0.5, True, (0.5, 0.5), (0.5, 0.5, 0.5, 2.0)):
    with pytest.raises(UserError, match="kappa"):
      subnet_spec.deploy_spec(CFG, "attn", bad)
  with pytest.raises(UserError, match="mode"):
    subnet_spec.deploy_spec(CFG, "heads", 0.5)
  with pytest.raises(UserError, match="correction"):
    subnet_spec.deploy_spec(CFG, "attn", 0.5, correction="sqrt")
  with pytest.raises(UserError, match="shared_layers"):
    subnet_spec.deploy_spec(CFG, "attn", 0.5, shared_layers=(4,))
  with pytest.raises(UserError, match="blocks mode"):
    subnet_spec.deploy_spec(CFG, "blocks", (0.5, 0.5, 0.25, 0.5))
  spec = subnet_spec.deploy_spec(CFG, "blocks", (1.0, 0.5, 0.5, 0.5), shared_layers=(0,))
  assert spec.keep_blocks == 2


# ---- heuristics --------------------------------------------------------------------------------


def test_first_keeps_the_prefix(params):
  spec = subnet_spec.deploy_spec(CFG, "attn_mlp", (0.5, 0.25, 0.75, 1.0))
  subnet = deploy.choose_subnet(params, CFG, spec, "first", jax.random.key(0))
  for i in spec.partitioned:
    np.testing.assert_array_equal(subnet[f"h_{i}"]["head"], [np.arange(spec.keep_head[i])])
    np.testing.assert_array_equal(subnet[f"h_{i}"]["unit"], [np.arange(spec.keep_unit[i])])
  blocks = subnet_spec.deploy_spec(CFG, "blocks", 0.5, shared_layers=(1,))
  np.testing.assert_array_equal(
      deploy.choose_subnet(params, CFG, blocks, "first", jax.random.key(0))["blocks"], [[0, 1]])


def boosted(params, heads: dict, units: dict, blocks=()):
  """Params (weights ~0.01) with chosen heads / units / blocks multiplied by 100."""
  flat = {k: np.array(v) * (0.01 if k[-1] == "kernel" else 1.0)
          for k, v in flax.traverse_util.flatten_dict(params).items()}
  h, k = CFG.n_head[0], CFG.head_dim
  for i, chosen in heads.items():
    qkv = flat[(f"h_{i}", "attn", "c_attn", "kernel")].reshape(-1, 3, h, k)
    qkv[:, :, chosen] *= 100
    flat[(f"h_{i}", "attn", "c_proj", "kernel")].reshape(h, k, -1)[chosen] *= 100
  for i, chosen in units.items():
    flat[(f"h_{i}", "mlp", "c_fc", "kernel")][:, chosen] *= 100
    flat[(f"h_{i}", "mlp", "c_proj", "kernel")][chosen] *= 100
  for i in blocks:
    for path in flat:
      if path[0] == f"h_{i}" and path[-1] == "kernel":
        flat[path] *= 100
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def test_magnitude_keeps_the_largest_units(params):
  rng = np.random.default_rng(1)
  heads = {i: sorted(rng.choice(4, 2, replace=False).tolist()) for i in range(4)}
  units = {i: sorted(rng.choice(128, 64, replace=False).tolist()) for i in range(4)}
  big = boosted(params, heads, units)
  spec = subnet_spec.deploy_spec(CFG, "attn_mlp", 0.5)
  subnet = deploy.choose_subnet(big, CFG, spec, "magnitude", jax.random.key(0))
  for i in range(4):
    np.testing.assert_array_equal(subnet[f"h_{i}"]["head"], [heads[i]])
    np.testing.assert_array_equal(subnet[f"h_{i}"]["unit"], [units[i]])


def test_magnitude_blocks_keeps_the_largest_blocks(params):
  big = boosted(params, {}, {}, blocks=(2, 3))
  spec = subnet_spec.deploy_spec(CFG, "blocks", 0.5, shared_layers=(0,))  # partitioned: 1, 2, 3
  subnet = deploy.choose_subnet(big, CFG, spec, "magnitude", jax.random.key(0))
  np.testing.assert_array_equal(subnet["blocks"], [[1, 2]])  # positions of layers 2, 3


def test_best_of_k_picks_the_lowest_loss_draw(params):
  spec = subnet_spec.deploy_spec(CFG, "attn_mlp", 0.5)
  windows = np.random.default_rng(2).integers(0, 256, (4, 17))
  key, k = jax.random.key(3), 6
  draws = deploy.candidates(key, spec, k)
  # Independent of the masked evaluation best_of_k uses: the extracted models' losses.
  losses = [evaluate.mean_nll(*deploy.extract(params, CFG, spec, d), windows) for d in draws]
  assert len(np.unique(np.round(losses, 4))) == k
  chosen = deploy.choose_subnet(params, CFG, spec, "best_of_k", key, windows=windows, k=k)
  jax.tree.map(np.testing.assert_array_equal, chosen, draws[int(np.argmin(losses))])
  np.testing.assert_allclose(deploy.subnet_loss(params, CFG, spec, chosen, windows),
                             min(losses), rtol=1e-5)


def test_random_is_deterministic_by_seed(params):
  spec = subnet_spec.deploy_spec(CFG, "attn_mlp", 0.5)
  draw = lambda s: deploy.choose_subnet(params, CFG, spec, "random", jax.random.key(s))
  jax.tree.map(np.testing.assert_array_equal, draw(0), draw(0))
  assert draw(0)["h_0"]["unit"].shape == (1, 64)
  flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(draw(s))])
  assert len({tuple(flat(s)) for s in range(4)}) == 4


def test_heuristic_errors(params):
  spec = subnet_spec.deploy_spec(CFG, "attn", 0.5)
  with pytest.raises(UserError, match="heuristic"):
    deploy.choose_subnet(params, CFG, spec, "largest", jax.random.key(0))
  with pytest.raises(UserError, match="windows"):
    deploy.choose_subnet(params, CFG, spec, "best_of_k", jax.random.key(0))


# ---- save / load -------------------------------------------------------------------------------


def test_save_load_round_trip(params, tmp_path):
  spec = subnet_spec.deploy_spec(CFG, "attn_mlp", 0.5)
  subnet = deploy.choose_subnet(params, CFG, spec, "random", jax.random.key(0))
  small, cfg_small = deploy.extract(params, CFG, spec, subnet)
  info = {"heuristic": "random", "indices": deploy.indices_json(subnet)}
  paths = deploy.save_deployed(str(tmp_path / "out"), small, cfg_small, info)
  assert paths["hf"] is None and os.path.isdir(paths["checkpoint"])
  loaded, cfg_loaded = deploy.load_deployed(str(tmp_path / "out"))
  assert cfg_loaded == cfg_small
  jax.tree.map(np.testing.assert_array_equal, loaded, small)
  assert deploy.load_info(str(tmp_path / "out")) == info
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left behind
  with pytest.raises(UserError, match="not an empty folder"):
    deploy.save_deployed(str(tmp_path / "out"), small, cfg_small, info)
  with pytest.raises(DataError, match="not a deployed"):
    deploy.load_deployed(str(tmp_path))


def test_save_into_empty_folder_and_hf_refusal(params, tmp_path):
  spec = subnet_spec.deploy_spec(CFG, "attn", 0.5)
  small, cfg_small = deploy.extract(params, CFG, spec, subnets.first_subnet(spec))
  with pytest.raises(UserError, match="cannot export"):
    deploy.save_deployed(str(tmp_path / "refused"), small, cfg_small, {}, hf=True)
  assert os.listdir(tmp_path) == []
  (tmp_path / "empty").mkdir()
  deploy.save_deployed(str(tmp_path / "empty"), small, cfg_small, {})
  assert deploy.load_deployed(str(tmp_path / "empty"))[1] == cfg_small


# ---- CLI on a smoke run --------------------------------------------------------------------------


def smoke_config(mode: str):
  c = load_experiment("pydocs_attn", "smoke")
  c.subnet.mode = mode
  c.steps, c.log.progress = 10, False
  c.eval.update(every=10, max_windows=8)
  c.ckpt.every = 10
  return config.from_configdict(c)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
  """A TwIST smoke run in mlp mode (kappa 0.5, correction mean), trained once (~10 s)."""
  from twist_jax import train

  workdir = str(tmp_path_factory.mktemp("runs") / "mlp")
  train.train(smoke_config("mlp"), workdir)
  return workdir


def run_cli(capsys, *args):
  """(exit status, parsed --json record or None, stderr) of an in-process
  `python -m twist_jax.deploy`."""
  code = exit_code(deploy.main, [*args, "--json"])
  out, err = capsys.readouterr()
  return code, (json.loads(out) if code == 0 else None), err


@pytest.mark.slow
def test_cli_short_summary_and_json_record_file(mlp_run, tmp_path, capsys):
  code = exit_code(deploy.main, ["--workdir", mlp_run, "--kappa", "0.5", "--out",
                                 tmp_path / "a"])
  out, err = capsys.readouterr()
  assert code == 0, err
  lines = out.strip().splitlines()
  assert len(lines) == 3, out
  with open(tmp_path / "a" / deploy.RECORD_FILE) as f:
    rec = json.load(f)
  assert (f"{rec['params_deployed']:,} of {rec['params_full']:,} params kept "
          f"({rec['params_deployed'] / rec['params_full']:.1%})") in lines[0]
  assert lines[1].startswith(f"val PPL {np.exp(rec['val_loss']):.2f} deployed vs "
                             f"{np.exp(rec['full_val_loss']):.2f} full")
  assert lines[2].startswith(f"saved: {tmp_path / 'a'} ")
  # --json prints that file's record (same run, same seed: same numbers).
  code, printed, err = run_cli(capsys, "--workdir", mlp_run, "--kappa", "0.5", "--out",
                               tmp_path / "b")
  assert code == 0, err
  with open(tmp_path / "b" / deploy.RECORD_FILE) as f:
    assert printed == json.load(f)
  assert {k: v for k, v in printed.items() if k not in ("out", "checkpoint")} == {
      k: v for k, v in rec.items() if k not in ("out", "checkpoint")}


@pytest.mark.slow
@pytest.mark.skipif(not have_transformers(),  # CI (TWIST_REQUIRE_TRANSFORMERS): never skipped
                    reason="loading the export in transformers needs torch + transformers: "
                    "pip install -e '.[hf]'")
def test_cli_hf_export_loads_in_transformers(mlp_run, tmp_path, capsys):
  import torch
  import transformers
  out = tmp_path / "deployed"
  code, rec, err = run_cli(capsys, "--workdir", mlp_run, "--kappa", 0.5, "--heuristic",
                           "random", "--seed", 1, "--out", out, "--hf")
  assert code == 0, err
  assert rec["mode"] == "mlp" and rec["hf"] == str(out / "hf")
  assert rec["params_deployed"] < rec["params_full"] and rec["val_windows"] == 64
  params, cfg_small = deploy.load_deployed(str(out))
  assert cfg_small.n_inner == (64, 64) and cfg_small.mlp_scale == (1.0, 1.0)
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(out / "hf")).eval()
  toks = np.array(TOKENS)  # a writable copy for torch
  with torch.no_grad():
    hf_logits = hf_model(torch.as_tensor(toks)).logits.numpy()
  np.testing.assert_allclose(hf_logits, logits(params, cfg_small, TOKENS), rtol=1e-4, atol=1e-4)
  # The recorded indices rebuild the same model as the masked full model.
  info = deploy.load_info(str(out))
  run_cfg, full_cfg, full = checkpoint.load_run(mlp_run)
  spec = subnet_spec.deploy_spec(full_cfg, info["mode"], info["kappa"], info["shared_layers"],
                            info["correction"])
  np.testing.assert_allclose(logits(params, cfg_small, TOKENS),
                             masked_logits(full, full_cfg, spec, as_subnet(info["indices"])),
                             rtol=2e-5, atol=2e-5)
  assert info["data"] == dataclasses.asdict(run_cfg.data) and info["seed"] == 1
  # The reported loss is the deployed model's on 64 validation windows spread over the split.
  from twist_jax import data
  windows = data.load(run_cfg.data).validation_windows(context=full_cfg.n_positions,
                                                       max_windows=64)
  np.testing.assert_allclose(rec["val_loss"], evaluate.mean_nll(params, cfg_small, windows),
                             rtol=1e-5)


@pytest.mark.slow
def test_cli_refuses_hf_for_attn_and_writes_nothing(mlp_run, tmp_path, capsys):
  parent = tmp_path / "parent"
  parent.mkdir()
  code, _, err = run_cli(capsys, "--workdir", mlp_run, "--kappa", 0.5, "--mode", "attn",
                         "--out", parent / "deployed", "--hf")
  assert code == 2
  assert err.strip().splitlines()[-1].startswith("error: cannot export")
  assert list(parent.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("heuristic", ["first", "magnitude", "best_of_k"])
def test_cli_heuristics(mlp_run, tmp_path, capsys, heuristic):
  code, rec, err = run_cli(capsys, "--workdir", mlp_run, "--kappa", 0.25, "--heuristic",
                           heuristic, "--k", 3, "--out", tmp_path / "d", "--mode", "attn_mlp")
  assert code == 0, err
  info = deploy.load_info(str(tmp_path / "d"))
  assert (info["heuristic"], info["mode"], info["kappa"]) == (heuristic, "attn_mlp", 0.25)
  assert info["k"] == (3 if heuristic == "best_of_k" else None)
  assert np.isfinite(rec["val_ppl"]) and len(info["indices"]["h_0"]["unit"]) == 32
  if heuristic == "first":
    assert info["indices"]["h_1"] == {"head": [0], "unit": list(range(32))}


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--kappa", "0"], "kappa"),
    (["--kappa", "1.5"], "kappa"),
    (["--kappa", "half"], "kappa"),
    (["--kappa", "0.5,0.5,0.5"], "kappa"),
    (["--kappa", "0.5", "--heuristic", "biggest"], "heuristic"),
    (["--kappa", "0.5", "--heuristic", "best_of_k", "--k", "0"], "--k"),
    (["--kappa", "0.5", "--mode", "heads"], "--mode"),
    (["--kappa", "0.5", "--workdir", "MISSING"], "not a twist_jax run"),
    (["--kappa", "0.5", "--out", "NONEMPTY"], "not an empty folder"),
    ([], "--kappa"),
])
def test_cli_bad_arguments_exit_2_and_write_nothing(mlp_run, tmp_path, capsys, args, message):
  (tmp_path / "nonempty").mkdir()
  (tmp_path / "nonempty" / "keep.txt").write_text("x")
  before = sorted(os.walk(tmp_path))
  subs = {"MISSING": str(tmp_path / "missing"), "NONEMPTY": str(tmp_path / "nonempty")}
  args = [subs.get(a, a) for a in args]
  base = {"--workdir": mlp_run, "--out": str(tmp_path / "out")}
  argv = [x for k, v in base.items() if k not in args for x in (k, v)] + args
  code, _, err = run_cli(capsys, *argv)
  assert code == 2
  assert message in err and "error:" in err
  assert sorted(os.walk(tmp_path)) == before
