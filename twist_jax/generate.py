"""Text generation from a deployed subnet or a training run: temperature / top-k sampling with
one jitted, fixed-shape step.

  python -m twist_jax.generate --checkpoint PATH --prompt "def " [--max-new-tokens 100
      --temperature 0.8 --top-k 40 --seed 0]

There is no KV cache: every new token recomputes the model on a window padded to the context
length P (so the step compiles once). Once the sequence is longer than P the window slides: the
model sees the last P tokens at positions 0..P-1, as GPT-2 sampling scripts do.
Dimension alphabet: P positions (context), V vocab.
"""

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from twist_jax import checkpoint, config as config_lib, deploy
from twist_jax.errors import DataError, UserError
from twist_jax.model import GPT2, ModelConfig


def _pick(logits_V, key, temperature, top_k: int):
  """Greedy when temperature == 0, else a sample from softmax(logits / T) over the top k."""
  if top_k:
    kth = jax.lax.top_k(logits_V, top_k)[0][-1]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  greedy = jnp.argmax(logits_V)
  drawn = jax.random.categorical(key, logits_V / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1, 7))
def decode_step(params, cfg: ModelConfig, window_1xP, n, key, t, temperature, top_k: int):
  """Token t, following the first n (>= 1) tokens of the window; returns (token, window, n).

  One generated token costs one forward of the whole P-token window (no KV cache).
  """
  p = window_1xP.shape[1]
  logits_PxV = GPT2(cfg).apply({"params": params}, window_1xP)[0]
  # Causal attention: the padding after position n - 1 does not change its logits.
  token = _pick(logits_PxV[n - 1], jax.random.fold_in(key, t), temperature, top_k)
  window_1xP = jnp.where(n == p, jnp.roll(window_1xP, -1, axis=1), window_1xP)  # full: slide
  window_1xP = jax.lax.dynamic_update_slice(window_1xP, token[None, None],
                                            (0, jnp.minimum(n, p - 1)))
  return token, window_1xP, jnp.minimum(n + 1, p)


def _check(max_new_tokens: int, temperature: float, top_k: int, vocab_size: int | None = None):
  if max_new_tokens < 0:
    raise UserError(f"--max-new-tokens: got {max_new_tokens}; must be >= 0")
  if not temperature >= 0:
    raise UserError(f"--temperature: got {temperature}; must be >= 0 (0 = greedy)")
  if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
    raise UserError(f"--top-k: got {top_k}; must be in 0..{vocab_size or 'V'} (0 = no cut)")


def sample(params, cfg: ModelConfig, prompt_ids, key: jax.Array, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0) -> np.ndarray:
  """Prompt followed by `max_new_tokens` sampled ids (int32, 1-D); deterministic in `key`.

  Token t uses fold_in(key, t). temperature 0 is greedy; top_k 0 keeps the whole vocabulary.
  """
  prompt_ids = np.asarray(prompt_ids, np.int32).reshape(-1)
  if len(prompt_ids) == 0:
    raise UserError("the prompt is empty: give at least one token")
  _check(max_new_tokens, temperature, top_k, cfg.vocab_size)
  p = cfg.n_positions
  start = prompt_ids[-p:]
  window_1xP = jnp.asarray(np.pad(start, (0, p - len(start)))[None])
  n, temp = jnp.int32(len(start)), jnp.float32(temperature)
  new = []
  for t in range(max_new_tokens):  # tokens stay on device: no host sync per token
    token, window_1xP, n = decode_step(params, cfg, window_1xP, n, key, t, temp, int(top_k))
    new.append(token)
  tail = np.asarray(jnp.stack(new)) if new else np.zeros((0,), np.int32)
  return np.concatenate([prompt_ids, tail]).astype(np.int32)


# ---- CLI -----------------------------------------------------------------------------------------


def load_model(path: str):
  """(params, ModelConfig, data config) of a deployed folder or a training run's latest step."""
  if deploy.is_deployed(path):
    params, cfg = deploy.load_deployed(path)
    info = deploy.load_info(path)
    if "data" not in info:
      raise DataError(f"{path}/{deploy.SUBNET_FILE}: no 'data' entry to rebuild the tokenizer")
    return params, cfg, config_lib.DataConfig(**info["data"])
  if os.path.isfile(os.path.join(path, "config.json")):
    run_cfg, cfg, params = checkpoint.load_run(path)
    return params, cfg, run_cfg.data
  raise DataError(f"{path!r} is neither a deployed model (deploy --out) nor a training run")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m twist_jax.generate",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="deployed folder or training run workdir")
  p.add_argument("--prompt", default="", help="text to continue ('' starts a new document)")
  p.add_argument("--max-new-tokens", type=int, default=100)
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=40, help="0 = the whole vocabulary")
  p.add_argument("--seed", type=int, default=0)
  return p


def _until_eot(new_ids: np.ndarray, eot: int) -> list[int]:
  """The continuation up to (not including) the first end-of-document token."""
  stop = np.flatnonzero(new_ids == eot)
  return new_ids[:stop[0] if stop.size else new_ids.size].tolist()


def generate_text(args) -> str:
  """The prompt followed by the decoded continuation."""
  from twist_jax import data  # pylint: disable=import-outside-toplevel

  _check(args.max_new_tokens, args.temperature, args.top_k)  # before any loading
  params, cfg, data_cfg = load_model(args.checkpoint)
  tokenizer = data.load(data_cfg).tokenizer
  prompt_ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eot]
  ids = sample(params, cfg, prompt_ids, jax.random.key(args.seed), args.max_new_tokens,
               args.temperature, args.top_k)
  return args.prompt + tokenizer.decode(_until_eot(ids[len(prompt_ids):], tokenizer.eot))


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  try:
    print(generate_text(args), flush=True)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  main()
