"""Hugging Face GPT-2 import and export: HF folders (or hub ids) <-> twist_jax params + ModelConfig.

Names map one to one (`h_0/attn/c_attn/kernel` <-> `transformer.h.0.attn.c_attn.weight`) and HF
Conv1D weights are already (in, out), so conversion is renaming plus shape checks. Weights are
read and written with safetensors.numpy: neither torch nor transformers is needed (torch only
to read a legacy pytorch_model.bin).
"""

import json
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from twist_jax.errors import DataError, UserError
from twist_jax.model import ModelConfig, fold_correction, init_params

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation
# GPT2Config defaults, for fields an old config.json may leave out.
_HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                    n_inner=None, layer_norm_epsilon=1e-5, activation_function="gelu_new")
# Settings the twist_jax model does not implement, with the value it does implement.
_FIXED = dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
              reorder_and_upcast_attn=False, add_cross_attention=False, tie_word_embeddings=True)
_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def _one_line(err: Exception) -> str:
  return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _hf_name(path: tuple[str, ...]) -> str:
  """('h_0', 'attn', 'c_attn', 'kernel') -> 'h.0.attn.c_attn.weight' (no 'transformer.')."""
  head = [re.sub(r"^h_(\d+)$", r"h.\1", p) for p in path[:-1]]
  return ".".join(head + [_LEAF[path[-1]]])


def _param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of the twist_jax params of `cfg`, traced without allocating."""
  tree = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}


# ------------------------------------------------------------------------------------- import


def _resolve(source: str) -> str:
  """A local folder as-is; otherwise a hub id fetched with huggingface_hub."""
  if os.path.exists(source):
    if not os.path.isdir(source):
      raise DataError(f"{source}: not a folder (expected a Hugging Face GPT-2 folder)")
    return source
  if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):  # looks like a path, not a hub id
    raise DataError(f"{source}: no such folder")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError(f"'{source}' is not a local folder, and fetching it from the Hugging Face "
                    "hub needs huggingface_hub: pip install huggingface_hub") from e
  try:
    return snapshot_download(source, allow_patterns=[CONFIG_FILE, "*.safetensors", BIN_FILE])
  except Exception as e:  # offline, unknown repo, auth: all mean "cannot fetch"
    raise DataError(f"cannot fetch '{source}' from the Hugging Face hub ({_one_line(e)}); "
                    "pass a local folder with config.json and model.safetensors") from e


def _read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{path}: missing (not a Hugging Face model folder)")
  try:
    with open(path, encoding="utf-8") as f:
      return {**_HF_DEFAULTS, **json.load(f)}
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable config ({_one_line(e)})") from e


def _model_config(hf: dict, path: str, n_positions: int | None) -> ModelConfig:
  """ModelConfig of an HF GPT-2 config dict; UserError for what twist_jax cannot represent."""
  if hf.get("model_type", "gpt2") != "gpt2":
    raise UserError(f"{path}: model_type '{hf['model_type']}' is not GPT-2")
  if hf["activation_function"] not in _GELU_TANH:
    raise UserError(f"{path}: activation_function '{hf['activation_function']}' is not "
                    f"supported (twist_jax GPT-2 uses tanh GELU: {', '.join(_GELU_TANH)})")
  for key, value in _FIXED.items():
    if key in hf and bool(hf[key]) != value:
      raise UserError(f"{path}: {key}={hf[key]} is not supported by twist_jax GPT-2 "
                      f"(only {key}={value})")
  d, h, p = hf["n_embd"], hf["n_head"], hf["n_positions"]
  if d % h:
    raise DataError(f"{path}: n_embd={d} is not divisible by n_head={h}")
  if n_positions is not None and not 0 < n_positions <= p:
    raise UserError(f"n_positions={n_positions}: must be in [1, {p}] (the checkpoint's context)")
  return ModelConfig.uniform(
      n_layer=hf["n_layer"], n_head=h, n_embd=d, n_inner=hf["n_inner"],
      vocab_size=hf["vocab_size"], n_positions=p if n_positions is None else n_positions,
      layer_norm_epsilon=float(hf["layer_norm_epsilon"]))


def _read_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
  import torch  # pylint: disable=import-outside-toplevel  (checked by _require_torch)
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


def _require_torch(path: str) -> None:
  """Only a pickled pytorch_model.bin needs torch; refuse it in one line where torch is absent."""
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise DataError(f"{path}: reading {BIN_FILE} needs torch, which is not installed; install "
                    f"torch, or convert the folder to {SAFETENSORS_FILE}") from e


def _read_weights(folder: str) -> dict[str, np.ndarray]:
  """All tensors of the folder (model.safetensors, its shards, or pytorch_model.bin) as
  float32 numpy arrays keyed by HF name."""
  shards = sorted(f for f in os.listdir(folder) if re.fullmatch(r"model.*\.safetensors", f))
  paths = [os.path.join(folder, f) for f in shards or [BIN_FILE]]
  if not os.path.isfile(paths[0]):
    raise DataError(f"{folder}: no {SAFETENSORS_FILE} or {BIN_FILE}")
  if not shards:
    _require_torch(paths[0])
  tensors = {}
  for path in paths:
    try:
      tensors.update(_read_file(path))
    except Exception as e:  # truncated / corrupt files raise library-specific errors
      raise DataError(f"{path}: unreadable weights ({_one_line(e)})") from e
  return tensors


def _is_ignored(name: str) -> bool:
  # Tied head (it is wte) and the causal-mask buffers old checkpoints store.
  return name == "lm_head.weight" or bool(re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name))


def _convert(tensors: dict[str, np.ndarray], cfg: ModelConfig, folder: str) -> dict:
  """Rename and shape-check HF tensors into the nested twist_jax params (full wpe)."""
  tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  flat = {}
  for path, shape in _param_shapes(cfg).items():
    name = _hf_name(path)
    if name not in tensors:
      raise DataError(f"{folder}: weight '{name}' is missing")
    if tensors[name].shape != shape:
      raise DataError(f"{folder}: weight '{name}' has shape {tensors[name].shape}, "
                      f"config.json implies {shape}")
    flat[path] = tensors.pop(name)
  extra = sorted(k for k in tensors if not _is_ignored(k))
  if extra:
    raise DataError(f"{folder}: unexpected weights {extra[:4]} (not a plain GPT-2?)")
  return traverse_util.unflatten_dict(flat)


def load_gpt2(source: str, *, n_positions: int | None = None) -> tuple[dict, ModelConfig]:
  """Load an HF GPT-2 (local folder or hub id) as (float32 params, ModelConfig).

  `n_positions` truncates the context (wpe keeps its first rows); it cannot extend it.
  """
  folder = _resolve(source)
  hf = _read_hf_config(folder)
  cfg = _model_config(hf, os.path.join(folder, CONFIG_FILE), n_positions)
  # Check shapes against the checkpoint's own context, then truncate.
  params = _convert(_read_weights(folder), cfg.replace(n_positions=hf["n_positions"]), folder)
  params["wpe"]["embedding"] = params["wpe"]["embedding"][:cfg.n_positions]
  return jax.tree.map(jnp.asarray, params), cfg


# ------------------------------------------------------------------------------------- export


def _check_exportable(params, cfg: ModelConfig) -> None:
  """UserError unless `cfg` is a plain GPT-2 shape that transformers can rebuild."""
  why = ("transformers GPT-2 has one n_head and one n_inner for all layers, head_dim = "
         "n_embd / n_head, and no head pruning; only uniform mlp-mode or blocks-mode subnets "
         "export")
  if cfg.n_layer == 0:
    raise UserError("cannot export: a model with no blocks")
  if len(set(cfg.n_inner)) > 1:
    raise UserError(f"cannot export: per-layer MLP widths n_inner={cfg.n_inner} ({why})")
  if len(set(cfg.n_head)) > 1 or cfg.n_head[0] * cfg.head_dim != cfg.n_embd:
    raise UserError(f"cannot export: n_head={cfg.n_head} x head_dim={cfg.head_dim} != "
                    f"n_embd={cfg.n_embd} ({why})")
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
  if got != _param_shapes(cfg):
    raise UserError("cannot export: params do not have the shapes of the given ModelConfig")


def _hf_tensors(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Flat HF state dict with the correction scales folded into the c_proj kernels (transformers
  has no such scales), by the same rule as deployment."""
  params = jax.tree.map(lambda v: np.asarray(v, np.float32), params)
  folded, _ = fold_correction(params, cfg)
  flat = traverse_util.flatten_dict(folded)
  # lm_head.weight is omitted: transformers re-ties it to wte, as its own save_pretrained does.
  return {"transformer." + _hf_name(k): np.ascontiguousarray(v) for k, v in flat.items()}


def _hf_config(cfg: ModelConfig) -> dict:
  gpt2_bpe = cfg.vocab_size == 50257  # only the GPT-2 BPE vocabulary has <|endoftext|> = 50256
  return dict(
      architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
      n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
      n_head=cfg.n_head[0], n_inner=cfg.n_inner[0], activation_function="gelu_new",
      layer_norm_epsilon=cfg.layer_norm_epsilon, bos_token_id=50256 if gpt2_bpe else None,
      eos_token_id=50256 if gpt2_bpe else None, dtype="float32", **_FIXED)


def _swap_into_place(tmp: str, out_dir: str) -> None:
  """Rename `tmp` to `out_dir`, replacing a previous export but never other content."""
  if os.path.exists(out_dir):
    if not os.path.isdir(out_dir) or not set(os.listdir(out_dir)) <= {
        CONFIG_FILE, SAFETENSORS_FILE, "generation_config.json"}:
      raise UserError(f"{out_dir}: exists and is not a GPT-2 export; choose another folder")
    old = tmp + ".old"
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old)
  else:
    os.rename(tmp, out_dir)


def save_gpt2(params, cfg: ModelConfig, out_dir: str) -> None:
  """Write `params` as an HF GPT2LMHeadModel folder (config.json + model.safetensors).

  Written into a temporary sibling folder and renamed, so a crash leaves nothing half-written.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  _check_exportable(params, cfg)
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the export private once renamed
    save_file(_hf_tensors(params, cfg), os.path.join(tmp, SAFETENSORS_FILE),
              metadata={"format": "pt"})  # transformers expects a torch-format tag
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(_hf_config(cfg), f, indent=2, sort_keys=True)
    _swap_into_place(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
