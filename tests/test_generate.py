"""Sampling: greedy equals a hand-written argmax loop (sliding past the context), determinism
by seed, top-k, no recompiles; the CLI on a deployed folder and on a training run; and the CPU
inference benchmark's quick mode prints one valid JSON object."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twist_jax import config, deploy, generate
from twist_jax.errors import UserError
from twist_jax.model import GPT2, ModelConfig, init_params

from helpers import exit_code, random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig.uniform(n_layer=2, n_head=4, n_embd=32, vocab_size=256, n_positions=8)


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


@jax.jit  # one compile per length 1..P: P is small
def last_logits(params, tokens_1xL):
  return GPT2(CFG).apply({"params": params}, tokens_1xL)[0, -1]


def manual_logits(params, ids):
  """Logits for the token after `ids`, from the last P tokens at exact length (no padding)."""
  return np.asarray(last_logits(params, jnp.asarray(ids[-CFG.n_positions:])[None]))


def prompt(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, n)


@pytest.mark.parametrize("n_prompt", [1, 5, 20])  # 20 > P = 8: starts already sliding
def test_greedy_equals_manual_argmax_loop(params, n_prompt):
  ids = list(prompt(n_prompt))
  for _ in range(12):  # 5 + 12 > 8: the window slides mid-way
    ids.append(int(np.argmax(manual_logits(params, ids))))
  out = generate.sample(params, CFG, prompt(n_prompt), jax.random.key(0), 12, temperature=0)
  assert out.dtype == np.int32 and out.shape == (n_prompt + 12,)
  np.testing.assert_array_equal(out, ids)


def test_deterministic_by_seed(params):
  draw = lambda s: generate.sample(params, CFG, prompt(5), jax.random.key(s), 30, 1.0)
  np.testing.assert_array_equal(draw(0), draw(0))
  assert not np.array_equal(draw(0), draw(1))
  np.testing.assert_array_equal(draw(0)[:5], prompt(5))


def test_top_k_restricts_and_top_1_is_greedy(params):
  out = generate.sample(params, CFG, prompt(3), jax.random.key(0), 24, temperature=3.0, top_k=3)
  for t in range(3, len(out)):
    top3 = np.argsort(-manual_logits(params, list(out[:t])))[:3]
    assert out[t] in top3
  greedy = generate.sample(params, CFG, prompt(3), jax.random.key(0), 24, temperature=0)
  top1 = generate.sample(params, CFG, prompt(3), jax.random.key(5), 24, temperature=2.0, top_k=1)
  np.testing.assert_array_equal(top1, greedy)
  assert not np.array_equal(out, greedy)


def test_no_recompile_across_prompts_lengths_and_settings(params):
  generate.sample(params, CFG, prompt(3), jax.random.key(0), 2, temperature=0.5, top_k=5)
  size = generate.decode_step._cache_size()
  for n, new, temp in ((1, 3, 0.0), (6, 10, 1.3), (30, 4, 0.7)):
    generate.sample(params, CFG, prompt(n), jax.random.key(n), new, temperature=temp, top_k=5)
  assert generate.decode_step._cache_size() == size


def test_zero_new_tokens_and_errors(params):
  np.testing.assert_array_equal(generate.sample(params, CFG, prompt(4), jax.random.key(0), 0),
                                prompt(4))
  for kw, match in ((dict(prompt_ids=[]), "empty"), (dict(max_new_tokens=-1), "max-new-tokens"),
                    (dict(temperature=-1.0), "temperature"), (dict(top_k=257), "top-k")):
    args = {**dict(prompt_ids=prompt(3), max_new_tokens=2, temperature=1.0, top_k=0), **kw}
    with pytest.raises(UserError, match=match):
      generate.sample(params, CFG, key=jax.random.key(0), **args)


# ---- CLI -----------------------------------------------------------------------------------------


def data_config():
  """The default data config (python_docs, bytes tokenizer): shares the test data cache."""
  return config.from_configdict(config.default_config()).data


@pytest.fixture(scope="module")
def deployed(params, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("gen") / "deployed")
  deploy.save_deployed(out, params, CFG, {"data": dataclasses.asdict(data_config())})
  return out


def run_cli(capsys, *args):
  code = exit_code(generate.main, args)
  out, err = capsys.readouterr()
  return code, out, err


def test_cli_on_deployed_folder_is_greedy_and_deterministic(params, deployed, capsys):
  from twist_jax import data
  tokenizer = data.load(data_config()).tokenizer
  args = ("--checkpoint", deployed, "--prompt", "def f", "--max-new-tokens", 12)
  code, out, err = run_cli(capsys, *args, "--temperature", 0)
  assert code == 0, err
  ids = generate.sample(params, CFG, tokenizer.encode("def f"), jax.random.key(0), 12, 0)
  new = ids[5:]
  new = new[:np.flatnonzero(new == tokenizer.eot)[0]] if (new == tokenizer.eot).any() else new
  assert out == "def f" + tokenizer.decode(new.tolist()) + "\n"
  sampled = [run_cli(capsys, *args, "--seed", 3)[1] for _ in range(2)]
  assert sampled[0] == sampled[1] and sampled[0].startswith("def f")


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "MISSING"], "neither a deployed model"),
    (["--max-new-tokens", "-1"], "max-new-tokens"),
    (["--temperature", "-0.5"], "temperature"),
    (["--top-k", "1000"], "top-k"),
    (["--max-new-tokens", "ten"], "max-new-tokens"),
])
def test_cli_bad_arguments_exit_2(deployed, tmp_path, capsys, args, message):
  args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
  base = [] if "--checkpoint" in args else ["--checkpoint", deployed]
  code, out, err = run_cli(capsys, *base, "--prompt", "x", *args)
  assert code == 2 and message in err and "error:" in err and out == ""


def smoke_config():
  spec = importlib.util.spec_from_file_location(
      "pydocs_attn", os.path.join(ROOT, "experiments", "pydocs_attn.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.steps, c.log.progress = 5, False
  c.eval.update(every=5, max_windows=4)
  c.ckpt.every = 5
  return config.from_configdict(c)


@pytest.mark.slow
def test_cli_on_training_run(tmp_path, capsys):
  from twist_jax import train
  workdir = str(tmp_path / "run")
  train.train(smoke_config(), workdir)
  capsys.readouterr()  # the training log
  code, out, err = run_cli(capsys, "--checkpoint", workdir, "--prompt", "import ",
                           "--max-new-tokens", 8, "--seed", 1)
  assert code == 0, err
  assert out.startswith("import ")


# ---- benchmark -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_cpu_inference_quick_prints_json():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cpu_inference.py"),
                         "--quick"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
  assert len(lines) == 1
  rec = json.loads(lines[0])
  assert rec["platform"] == "cpu" and set(rec["sizes"]) == {"124m", "xl"}
  for size in rec["sizes"].values():
    models = size["models"]
    assert set(models) == {"full", "subnet", "full_sparse_phase", "sparse50"}
    assert models["subnet"]["param_bytes"] < models["full"]["param_bytes"]
    assert models["sparse50"]["param_bytes"] == models["full"]["param_bytes"]
    assert models["sparse50"]["block_kernel_zero_fraction"] == pytest.approx(0.5, abs=0.01)
    for m in models.values():
      assert m["prefill_tokens_per_s"] > 0 and m["generate_tokens_per_s"] > 0
    assert size["speedup"]["subnet_vs_full"]["fwd_flops"] > 1
