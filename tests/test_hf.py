"""Hugging Face GPT-2 import/export: round trips through safetensors and clear errors for corrupt
folders (pure JAX, no torch), and the same logits as transformers itself both ways (needs the
`hf` extra: torch + transformers)."""

import functools
import json
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twist_jax import hf
from twist_jax.errors import DataError, UserError
from twist_jax.model import GPT2, ModelConfig, init_params

from helpers import have_transformers, random_params
random_params = functools.partial(random_params, std=0.1)

# The transformers cross-checks are marked, not silently skipped: `-ra` prints the reason, and
# CI installs the `hf` extra and sets TWIST_REQUIRE_TRANSFORMERS, so there they always run.
HAVE_TRANSFORMERS = have_transformers()
requires_transformers = pytest.mark.skipif(
    not HAVE_TRANSFORMERS,
    reason="cross-check against transformers needs torch + transformers: pip install -e '.[hf]'")
if HAVE_TRANSFORMERS:
  import torch
  import transformers

HF_KW = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
             bos_token_id=None, eos_token_id=None)
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 24))
# The twist_jax shape of HF_KW (n_inner defaults to 4 * n_embd = 256 on both sides).
SMALL = ModelConfig.uniform(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=64)


def hf_model(**overrides):
  """A tiny GPT2LMHeadModel in eval mode whose weights are all far from the 0.02 init, so the
  comparison exercises every parameter (LayerNorms included)."""
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**HF_KW, **overrides}))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def hf_logits(model, toks=TOKENS):
  with torch.no_grad():
    return model(torch.as_tensor(toks)).logits.numpy()


def jax_logits(params, cfg, toks=TOKENS):
  return np.asarray(GPT2(cfg).apply({"params": params}, jnp.asarray(toks)))


@pytest.fixture(scope="module")
def model():
  return hf_model()


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
  """The folder transformers' own save_pretrained writes."""
  path = tmp_path_factory.mktemp("gpt2_hf")
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
  """An HF GPT-2 folder of SMALL written by twist_jax itself (no torch needed)."""
  path = tmp_path_factory.mktemp("gpt2_st") / "export"
  hf.save_gpt2(random_params(SMALL), SMALL, str(path))
  return path


# ------------------------------------------------------------------------------------- import


@requires_transformers
def test_load_safetensors_matches_transformers(model, hf_dir):
  params, cfg = hf.load_gpt2(str(hf_dir))
  assert cfg == ModelConfig.uniform(n_layer=2, n_head=4, n_embd=64, vocab_size=256,
                                    n_positions=64)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  np.testing.assert_allclose(jax_logits(params, cfg), hf_logits(model), rtol=1e-4, atol=1e-4)


@requires_transformers
@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_load_pytorch_bin(model, tmp_path, prefix):
  """A .bin state dict, with or without the 'transformer.' prefix, holding the lm_head and the
  causal-mask buffers older transformers versions saved: all ignored."""
  # transformers 5 always writes safetensors, so the .bin is written with torch directly.
  state = {k: v for k, v in model.state_dict().items() if prefix or k != "lm_head.weight"}
  state = {prefix + k.removeprefix("transformer.") if k.startswith("transformer.") else k: v
           for k, v in state.items()}
  for i in range(HF_KW["n_layer"]):
    state[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
    state[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
  torch.save(state, tmp_path / hf.BIN_FILE)
  model.config.to_json_file(str(tmp_path / hf.CONFIG_FILE))
  params, cfg = hf.load_gpt2(str(tmp_path))
  np.testing.assert_allclose(jax_logits(params, cfg), hf_logits(model), rtol=1e-4, atol=1e-4)


@requires_transformers
def test_n_positions_truncation(model, hf_dir):
  params, cfg = hf.load_gpt2(str(hf_dir), n_positions=16)
  assert cfg.n_positions == 16 and params["wpe"]["embedding"].shape == (16, 64)
  toks = TOKENS[:, :16]
  np.testing.assert_allclose(jax_logits(params, cfg, toks), hf_logits(model, toks),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(UserError, match="n_positions=65"):
    hf.load_gpt2(str(hf_dir), n_positions=65)


@pytest.mark.parametrize("override", [
    dict(activation_function="relu"), dict(scale_attn_by_inverse_layer_idx=True),
    dict(reorder_and_upcast_attn=True), dict(scale_attn_weights=False),
    dict(tie_word_embeddings=False), dict(model_type="llama")])
def test_unsupported_config_is_rejected(st_dir, tmp_path, override):
  folder = copy_folder(st_dir, tmp_path)
  edit_config(folder, **override)
  with pytest.raises(UserError, match=next(iter(override))) as err:
    hf.load_gpt2(str(folder))
  assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ corrupt folders


def copy_folder(src, dst):
  for name in os.listdir(src):
    (dst / name).write_bytes((src / name).read_bytes())
  return dst


def edit_config(folder, **changes):
  path = folder / hf.CONFIG_FILE
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_tensor(path):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(path)
  del tensors["transformer.h.1.mlp.c_fc.bias"]
  save_file(tensors, path)


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: (d / hf.CONFIG_FILE).unlink(), "config.json: missing"),
    (lambda d: (d / hf.CONFIG_FILE).write_text("{not json"), "unreadable config"),
    (lambda d: (d / hf.SAFETENSORS_FILE).unlink(), "no model.safetensors or pytorch_model.bin"),
    (lambda d: truncate(d / hf.SAFETENSORS_FILE), "unreadable weights"),
    (lambda d: (d / hf.SAFETENSORS_FILE).write_bytes(b""), "unreadable weights"),
    (lambda d: edit_config(d, n_inner=128), r"'h.0.mlp.c_fc.\w+' has shape \((64, )?256,?\)"),
    (lambda d: edit_config(d, n_layer=3), r"'h.2.\S+' is missing"),
    (lambda d: edit_config(d, n_layer=1), r"unexpected weights \['h.1."),
    (lambda d: drop_tensor(d / hf.SAFETENSORS_FILE), "'h.1.mlp.c_fc.bias' is missing"),
])
def test_corrupt_folder_is_data_error(st_dir, tmp_path, corrupt, message):
  folder = copy_folder(st_dir, tmp_path)
  corrupt(folder)
  with pytest.raises(DataError, match=message) as err:
    hf.load_gpt2(str(folder))
  assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_missing_local_folder_is_data_error(tmp_path):
  with pytest.raises(DataError, match="no such folder"):
    hf.load_gpt2(str(tmp_path / "nope"))


def test_unreachable_hub_id_is_data_error(monkeypatch, tmp_path):
  """Offline, a hub id fails with a one-line DataError that says to pass a local folder."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
  monkeypatch.chdir(tmp_path)  # so the id is not a local folder by accident
  with pytest.raises(DataError, match="'no-such-org/gpt2-tiny'.*pass a local folder") as err:
    hf.load_gpt2("no-such-org/gpt2-tiny")
  assert "\n" not in str(err.value)


def test_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match="'org/gpt2-tiny'.*pip install huggingface_hub") as err:
    hf.load_gpt2("org/gpt2-tiny")
  assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_bin_without_torch_is_refused(monkeypatch, tmp_path):
  """A folder holding only pytorch_model.bin, where torch is not installed: one line naming the
  file and both ways out (install torch, or convert to safetensors)."""
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  (tmp_path / hf.CONFIG_FILE).write_text(json.dumps(hf._hf_config(SMALL)))
  (tmp_path / hf.BIN_FILE).write_bytes(b"a pickle torch would read")
  with pytest.raises(DataError, match="needs torch.*install torch.*model.safetensors") as err:
    hf.load_gpt2(str(tmp_path))
  assert str(tmp_path / hf.BIN_FILE) in str(err.value)
  assert "\n" not in str(err.value) and err.value.exit_code == 2


# ------------------------------------------------------------------------------------- export


TINY = ModelConfig.uniform(n_layer=2, n_head=4, n_embd=64, n_inner=96, vocab_size=256,
                           n_positions=32)


def test_export_file_has_hf_names_and_folded_scales(tmp_path):
  """The safetensors file read back with plain safetensors.numpy: the GPT2LMHeadModel names
  (spelled out by hand here), no lm_head, and each branch scale multiplied into its c_proj."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  cfg = TINY.replace(attn_scale=(1.5, 1.0), mlp_scale=(0.5, 2.0))
  params = random_params(cfg)
  hf.save_gpt2(params, cfg, str(tmp_path / "export"))
  tensors = load_file(tmp_path / "export" / hf.SAFETENSORS_FILE)
  block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
           "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
           "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
  names = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"] + [
      f"h.{i}.{b}" for i in range(2) for b in block]
  assert sorted(tensors) == sorted("transformer." + n for n in names)
  for i, (sa, sm) in enumerate(zip(cfg.attn_scale, cfg.mlp_scale)):
    for branch, scale in (("attn", sa), ("mlp", sm)):
      np.testing.assert_allclose(tensors[f"transformer.h.{i}.{branch}.c_proj.weight"],
                                 scale * np.asarray(params[f"h_{i}"][branch]["c_proj"]["kernel"]),
                                 rtol=1e-6)
      np.testing.assert_array_equal(tensors[f"transformer.h.{i}.{branch}.c_proj.bias"],
                                    params[f"h_{i}"][branch]["c_proj"]["bias"])
  np.testing.assert_array_equal(tensors["transformer.h.1.attn.c_attn.weight"],
                                params["h_1"]["attn"]["c_attn"]["kernel"])
  config = json.loads((tmp_path / "export" / hf.CONFIG_FILE).read_text())
  assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_inner"]) == (2, 4, 64, 96)


def test_export_import_round_trip_without_transformers(tmp_path):
  """Scaled model -> folder -> plain model: same logits (the fold is exact up to rounding),
  and every weight except the scaled c_proj kernels comes back bit for bit."""
  cfg = TINY.replace(attn_scale=(1.5, 1.0), mlp_scale=(0.5, 2.0))
  params = random_params(cfg)
  hf.save_gpt2(params, cfg, str(tmp_path / "export"))
  back, back_cfg = hf.load_gpt2(str(tmp_path / "export"))
  assert back_cfg == TINY
  toks = TOKENS[:, :32]
  np.testing.assert_allclose(jax_logits(back, back_cfg, toks), jax_logits(params, cfg, toks),
                             rtol=1e-5, atol=1e-5)
  flat, flat_back = (flax.traverse_util.flatten_dict(p) for p in (params, back))
  same = [k for k in flat if k[-2:] != ("c_proj", "kernel")]
  for k in same:
    np.testing.assert_array_equal(flat_back[k], flat[k])


def test_load_sharded_safetensors(st_dir, tmp_path):
  """A checkpoint split over model-0000x-of-0000y.safetensors files loads like one file."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  tensors = load_file(st_dir / hf.SAFETENSORS_FILE)
  names = sorted(tensors)
  for i, part in enumerate((names[::2], names[1::2])):
    save_file({k: tensors[k] for k in part}, tmp_path / f"model-0000{i + 1}-of-00002.safetensors")
  (tmp_path / hf.CONFIG_FILE).write_bytes((st_dir / hf.CONFIG_FILE).read_bytes())
  sharded, _ = hf.load_gpt2(str(tmp_path))
  whole, _ = hf.load_gpt2(str(st_dir))
  jax.tree.map(np.testing.assert_array_equal, sharded, whole)


@requires_transformers
@pytest.mark.parametrize("cfg", [TINY, TINY.replace(attn_scale=(1.5, 1.0), mlp_scale=(0.5, 2.0))])
def test_export_round_trip(tmp_path, cfg):
  params, out = random_params(cfg), tmp_path / "export"
  hf.save_gpt2(params, cfg, str(out))
  assert sorted(os.listdir(out)) == [hf.CONFIG_FILE, hf.SAFETENSORS_FILE]
  assert os.listdir(tmp_path) == ["export"]  # no temporary folder left behind
  exported = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  toks = TOKENS[:, :32]
  want = jax_logits(params, cfg, toks)
  np.testing.assert_allclose(hf_logits(exported, toks), want, rtol=1e-4, atol=1e-4)
  # The scales are folded into the kernels: the re-imported model is a plain GPT-2.
  back, back_cfg = hf.load_gpt2(str(out))
  assert back_cfg == TINY
  np.testing.assert_allclose(jax_logits(back, back_cfg, toks), want, rtol=1e-5, atol=1e-5)


def test_export_overwrites_previous_export_only(tmp_path):
  out = tmp_path / "export"
  hf.save_gpt2(random_params(TINY, seed=0), TINY, str(out))
  hf.save_gpt2(random_params(TINY, seed=1), TINY, str(out))
  back, _ = hf.load_gpt2(str(out))
  np.testing.assert_array_equal(back["wte"]["embedding"],
                                random_params(TINY, seed=1)["wte"]["embedding"])
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("mine")
  with pytest.raises(UserError, match="not a GPT-2 export"):
    hf.save_gpt2(random_params(TINY), TINY, str(tmp_path / "notes"))
  assert os.listdir(tmp_path / "notes") == ["todo.txt"]
  assert sorted(os.listdir(tmp_path)) == ["export", "notes"]


def test_export_crash_leaves_nothing(tmp_path, monkeypatch):
  def crash(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr("safetensors.numpy.save_file", crash)
  with pytest.raises(KeyboardInterrupt):
    hf.save_gpt2(random_params(TINY), TINY, str(tmp_path / "export"))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cfg, message", [
    (TINY.replace(n_inner=(96, 128)), "per-layer MLP widths"),
    (TINY.replace(n_head=(2, 2)), "head pruning"),  # head_dim 16 kept, so 2*16 != 64
    (TINY.replace(n_head=(4, 2)), r"n_head=\(4, 2\)"),
])
def test_unrepresentable_export_is_user_error(tmp_path, cfg, message):
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  with pytest.raises(UserError, match=message) as err:
    hf.save_gpt2(params, cfg, str(tmp_path / "export"))
  assert "\n" not in str(err.value)
  assert os.listdir(tmp_path) == []


def test_export_rejects_params_of_another_shape(tmp_path):
  params = random_params(TINY)
  params["h_1"]["mlp"]["c_fc"]["bias"] = params["h_1"]["mlp"]["c_fc"]["bias"][:10]
  with pytest.raises(UserError, match="shapes"):
    hf.save_gpt2(params, TINY, str(tmp_path / "export"))
