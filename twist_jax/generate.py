"""Text generation from a deployed subnet or a training run: KV-cached temperature / top-k
sampling, one compiled prefill per prompt bucket and one compiled decode loop.

  python -m twist_jax.generate --checkpoint PATH --prompt "def " [--max-new-tokens 100
      --temperature 0.8 --top-k 40 --seed 0]

Decoding: the prompt is prefilled once (padded to the next power of two, at most P, so prefill
compiles once per bucket), then one position per step runs inside one jitted `lax.fori_loop`
over a fixed cache of P positions per layer (no per-token Python dispatch; the cache is donated
and updated in place). Sliding policy: when the cache is full (P positions seen) and more tokens
are wanted, the last P/2 tokens are prefilled again at positions 0..P/2-1 and decoding goes on;
a prompt longer than P keeps its last P tokens. Token t of the continuation is drawn with
fold_in(key, t), one key per batch row.
Dimension alphabet: B batch, P positions (context), V vocab.
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from twist_jax import checkpoint, config as config_lib, decoding, deploy, model
from twist_jax.errors import DataError, UserError
from twist_jax.model import ModelConfig


def _pick(logits_V, key, temperature, top_k: int):
  """Greedy when temperature == 0, else a sample from softmax(logits / T) over the top k."""
  if top_k:
    kth = jax.lax.top_k(logits_V, top_k)[0][-1]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  # A cond, not a select: greedy decoding skips the Gumbel draw over V.
  return jax.lax.cond(
      temperature > 0,
      lambda: jax.random.categorical(key, logits_V / jnp.maximum(temperature, 1e-6)),
      lambda: jnp.argmax(logits_V)).astype(jnp.int32)


def _pick_rows(params, cfg: ModelConfig, hidden_BxD, key, t, temperature, top_k: int):
  """Token t for every row, from the final hidden states; row b draws with key b of
  split(fold_in(key, t), B)."""
  logits_BxV = model.lm_head(params, cfg, hidden_BxD)
  keys_B = jax.random.split(jax.random.fold_in(key, t), hidden_BxD.shape[0])
  return jax.vmap(lambda l, k: _pick(l, k, temperature, top_k))(logits_BxV, keys_B)


@functools.partial(jax.jit, static_argnums=(1, 6))
def prefill_step(params, cfg: ModelConfig, window_BxT, n, key, t, top_k: int, temperature):
  """Prefills the first n tokens of the window (the rest is padding, which causal attention and
  the cache mask never let count); returns token t (B,) and the cache."""
  hidden_BxTxD, cache = decoding.prefill(params, cfg, window_BxT)
  hidden_BxD = jax.lax.dynamic_index_in_dim(hidden_BxTxD, n - 1, axis=1, keepdims=False)
  return _pick_rows(params, cfg, hidden_BxD, key, t, temperature, top_k), cache


@functools.partial(jax.jit, static_argnums=(1, 8), donate_argnums=(2,))
def decode_loop(params, cfg: ModelConfig, cache, token_B, n, steps, key, t, top_k: int,
                temperature):
  """Feeds token_B at position n and its successors at n+1..n+steps-1 (n + steps <= P), one
  position per iteration; returns (tokens (B, P): column i holds token t+1+i for i < steps,
  the cache). `steps` is traced: one compile serves every length."""
  b, p = token_B.shape[0], cfg.n_positions

  def body(i, carry):
    cache, token_B, out_BxP = carry
    hidden_BxD, cache = decoding.decode(params, cfg, token_B, n + i, cache)
    token_B = _pick_rows(params, cfg, hidden_BxD, key, t + 1 + i, temperature, top_k)
    return cache, token_B, jax.lax.dynamic_update_slice(out_BxP, token_B[:, None], (0, i))

  init = (cache, token_B, jnp.zeros((b, p), jnp.int32))
  cache, _, out_BxP = jax.lax.fori_loop(0, steps, body, init)
  return out_BxP, cache


def _check(max_new_tokens: int, temperature: float, top_k: int, vocab_size: int | None = None):
  if max_new_tokens < 0:
    raise UserError(f"--max-new-tokens: got {max_new_tokens}; must be >= 0")
  if not temperature >= 0:
    raise UserError(f"--temperature: got {temperature}; must be >= 0 (0 = greedy)")
  if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
    raise UserError(f"--top-k: got {top_k}; must be in 0..{vocab_size or 'V'} (0 = no cut)")


def bucket(n: int, p: int) -> int:
  """Prefill length for n prompt tokens: the next power of two, at most P."""
  return min(p, 1 << max(0, n - 1).bit_length())


def _generate(params, cfg: ModelConfig, ids_BxL, key, max_new_tokens: int, temperature: float,
              top_k: int):
  """New tokens (B, max_new_tokens) as a device array, and {'prefill', 'decode'}: the number of
  prefill calls and of decoded positions."""
  p, temp = cfg.n_positions, jnp.float32(temperature)
  window_BxN, new, t, counts = ids_BxL[:, -p:], [], 0, {"prefill": 0, "decode": 0}
  while t < max_new_tokens:
    n = window_BxN.shape[1]
    padded = jnp.pad(window_BxN, ((0, 0), (0, bucket(n, p) - n)))
    token_B, cache = prefill_step(params, cfg, padded, jnp.int32(n), key, t, top_k, temp)
    new.append(token_B[:, None])
    steps = min(max_new_tokens - t - 1, p - n)  # positions n..P-1 are free
    if steps:
      out_BxP, cache = decode_loop(params, cfg, cache, token_B, jnp.int32(n), jnp.int32(steps),
                                   key, t, top_k, temp)
      new.append(out_BxP[:, :steps])
    counts["prefill"] += 1
    counts["decode"] += steps
    t += 1 + steps
    if t < max_new_tokens:  # cache full: slide to the last P/2 tokens
      window_BxN = jnp.concatenate([ids_BxL] + new, axis=1)[:, -max(1, p // 2):]
  b = ids_BxL.shape[0]
  return (jnp.concatenate(new, axis=1) if new else jnp.zeros((b, 0), jnp.int32)), counts


def sample(params, cfg: ModelConfig, prompt_ids, key: jax.Array, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, stats: dict | None = None,
           weights_dtype=None) -> np.ndarray:
  """Prompt followed by `max_new_tokens` sampled ids (int32); deterministic in `key`.

  `prompt_ids` is 1-D (returns 1-D) or (B, L) of B prompts of one length (returns (B, L+new)).
  temperature 0 is greedy; top_k 0 keeps the whole vocabulary. `stats`, if given, receives the
  wall seconds (compilation included), the new-token count and the prefill calls.
  `weights_dtype` (e.g. jnp.bfloat16): decode with the weights cast to it and computing in it
  (decoding.cast_weights); None keeps params and cfg.dtype as they are.
  """
  ids = np.asarray(prompt_ids, np.int32)
  ids_BxL = ids.reshape(1, -1) if ids.ndim == 1 else ids
  if ids_BxL.ndim != 2:
    raise UserError(f"prompt_ids: got shape {ids.shape}; must be (L,) or (B, L)")
  if ids_BxL.shape[1] == 0:
    raise UserError("the prompt is empty: give at least one token")
  _check(max_new_tokens, temperature, top_k, cfg.vocab_size)
  if weights_dtype is not None:
    params, cfg = decoding.cast_weights(params, cfg, weights_dtype)
  t0 = time.perf_counter()
  new_BxT, counts = _generate(params, cfg, jnp.asarray(ids_BxL), key, max_new_tokens,
                              temperature, int(top_k))
  out = np.concatenate([ids_BxL, np.asarray(new_BxT)], axis=1).astype(np.int32)
  if stats is not None:
    stats.update(seconds=time.perf_counter() - t0, new_tokens=new_BxT.size, **counts)
  return out[0] if ids.ndim == 1 else out


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
  p.add_argument("--max-new-tokens", type=int, default=100,
                 help="tokens to generate; past the context P the last P/2 tokens are "
                      "prefilled again and decoding goes on (a KV cache of P positions)")
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=40, help="0 = the whole vocabulary")
  p.add_argument("--seed", type=int, default=0)
  return p


def _until_eot(new_ids: np.ndarray, eot: int) -> list[int]:
  """The continuation up to (not including) the first end-of-document token."""
  stop = np.flatnonzero(new_ids == eot)
  return new_ids[:stop[0] if stop.size else new_ids.size].tolist()


def generate_text(args, stats: dict | None = None) -> str:
  """The prompt followed by the decoded continuation (`stats`: see `sample`)."""
  from twist_jax import data  # pylint: disable=import-outside-toplevel

  _check(args.max_new_tokens, args.temperature, args.top_k)  # before any loading
  params, cfg, data_cfg = load_model(args.checkpoint)
  tokenizer = data.load(data_cfg).tokenizer
  prompt_ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eot]
  ids = sample(params, cfg, prompt_ids, jax.random.key(args.seed), args.max_new_tokens,
               args.temperature, args.top_k, stats)
  return args.prompt + tokenizer.decode(_until_eot(ids[len(prompt_ids):], tokenizer.eot))


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  try:
    stats = {}
    print(generate_text(args, stats), flush=True)
    if stats["new_tokens"]:
      print(f"{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: "
            f"{stats['new_tokens'] / stats['seconds']:.1f} tokens/s (KV cache; compilation "
            f"included; {stats['prefill']} prefill call(s))", file=sys.stderr, flush=True)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  main()
