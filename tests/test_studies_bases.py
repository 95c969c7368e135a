"""The python_source corpus (the bases' pretraining data) and the pretrained-bases driver."""

import json
import os
import types

import jax
import numpy as np
import pytest

from twist_jax import checkpoint, data, deploy, hf
from twist_jax.data import documents
from twist_jax.model import GPT2
from twist_jax.studies import bases


def _docs(ds, split) -> list[str]:
  """A bytes-tokenised split back as its documents (NUL ends each one)."""
  return ds.tokenizer.decode(ds.tokens(split))[:-1].split('\0')


def _cfg(data_dir, name):
  return types.SimpleNamespace(data_dir=str(data_dir), name=name, tokenizer='bytes',
                               val_fraction=0.05)


@pytest.fixture(scope='module')
def stdlib_corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp('stdlib_corpora')
  return {name: data.load(_cfg(root, name)) for name in ('python_docs', 'python_source')}


def test_python_source_is_the_stdlib_code_without_tests(stdlib_corpora):
  src = stdlib_corpora['python_source']
  train, val = _docs(src, 'train'), _docs(src, 'validation')
  files = [p for p in documents.stdlib_files(documents.stdlib_root()) if p.suffix == '.py']
  kept = [p for p in files if p.read_text('utf-8', errors='replace').strip()]
  assert len(train) + len(val) == len(kept) - 1  # every non-empty module but pydoc's topics
  assert not any('/test/' in p.as_posix() or p.name.startswith('test_') for p in files)
  json_init = (documents.stdlib_root() / 'json' / '__init__.py').read_text('utf-8')
  assert json_init in train + val  # whole modules, code and all
  assert 0.02 < len(val) / (len(train) + len(val)) < 0.1


def test_no_python_docs_validation_text_in_python_source_train(stdlib_corpora):
  """The fine-tuning domain's held-out docs were never pretraining text: every paragraph of
  SHARED_PARAGRAPH characters or more of a python_docs validation document is absent from
  python_source's training split."""
  train = '\0'.join(_docs(stdlib_corpora['python_source'], 'train'))
  held_out = [p for doc in _docs(stdlib_corpora['python_docs'], 'validation')
              for p in doc.split('\n\n') if len(p) >= documents.SHARED_PARAGRAPH]
  assert len(held_out) > 50  # the check has something to check
  assert [p[:60] for p in held_out if p in train] == []


def test_a_module_quoting_a_held_out_paragraph_moves_to_validation():
  para = 'x' * documents.SHARED_PARAGRAPH
  docs = [(f'mod{i}.py', f'doc {i}') for i in range(40)]
  val_name = documents.split_documents(docs, 0.2)['validation'][0][0]
  docs = [(n, para if n == val_name else t) for n, t in docs]
  train_name = documents.split_documents(docs, 0.2)['train'][0][0]
  source = [(n, f'"""{para}"""\ncode' if n == train_name else 'code') for n, _ in docs]
  plain = documents.split_documents(source, 0.2)
  moved = documents.split_source_like_docs(source, docs, 0.2)
  assert train_name in [n for n, _ in plain['train']]  # the name hash alone would leak it
  assert train_name in [n for n, _ in moved['validation']]
  assert len(moved['train']) == len(plain['train']) - 1


@pytest.mark.slow
def test_quick_bases_train_export_and_check(tmp_path):
  out = str(tmp_path / 'bases')
  info = bases.make_bases(out, quick=True, shapes=('full', 'half'))
  full, half = info['bases']['full'], info['bases']['half']
  assert full['steps'] == half['steps'] == bases.QUICK['steps']
  assert full['tokens'] == bases.QUICK['steps'] * 4 * 8 * 128
  assert half['params'] < full['params']
  gap = info['regime'][0]
  assert gap['half_minus_full'] == pytest.approx(half['val_loss'] - full['val_loss'], abs=1e-4)
  assert gap['holds'] == (gap['half_minus_full'] >= bases.REGIME_GAP)
  with open(os.path.join(out, 'bases.json'), encoding='utf-8') as f:
    assert json.load(f)['bases']['full']['val_loss'] == full['val_loss']
  # The shipped folder holds the run's final params; the full base's hf/ holds the same model.
  params, model = deploy.load_deployed(os.path.join(out, 'full'))
  run_params, _ = checkpoint.latest_params(os.path.join(out, 'runs', 'full'))
  jax.tree.map(np.testing.assert_array_equal, params, run_params)
  hf_params, hf_model = hf.load_gpt2(os.path.join(out, 'full', 'hf'))
  x = np.arange(16, dtype=np.int32)[None] * 7 % 256
  logits = lambda p, m: GPT2(m).apply({'params': p}, x)
  np.testing.assert_allclose(logits(hf_params, hf_model), logits(params, model), rtol=1e-5,
                             atol=1e-5)
  assert not os.path.exists(os.path.join(out, 'half', 'hf'))  # 4 x 16 heads in 128: not HF
  assert deploy.load_deployed(os.path.join(out, 'half'))[1].n_inner == (256,) * 4
  # A rerun trains nothing and keeps the exports.
  stamp = os.path.getmtime(os.path.join(out, 'full', deploy.MODEL_FILE))
  again = bases.make_bases(out, quick=True, shapes=('full', 'half'))
  assert again['bases']['full']['timing'] == full['timing']
  assert len(full['timing']['segments']) == 1
  assert os.path.getmtime(os.path.join(out, 'full', deploy.MODEL_FILE)) == stamp


def test_base_families_keep_each_pairs_relations():
  """In every family `half` is `full`'s kappa = 0.5 attn_mlp subnet as a dense model, `narrow_*`
  the same pair at half the width, and the narrow pair trains to its full's tokens per parameter
  (to one round of 15 steps). The config file takes [FAMILY:]SHAPE."""
  from twist_jax.experiments import BASE_FAMILIES  # pylint: disable=import-outside-toplevel
  from twist_jax.model import ModelConfig  # pylint: disable=import-outside-toplevel

  def params(dims):
    d, h, k, f = dims
    return ModelConfig(n_embd=d, head_dim=k, n_head=(h,) * 4, n_inner=(f,) * 4).num_params()

  for fam in BASE_FAMILIES.values():
    (full, steps), (half, half_steps) = fam['full'], fam['half']
    assert half_steps == steps
    assert (half[0], half[1] * 2, half[2], half[3] * 2) == full
    (nfull, nsteps), (nhalf, _) = fam['narrow_full'], fam['narrow_half']
    assert nfull == (full[0] // 2, full[1], full[2] // 2, full[3] // 2)
    assert (nhalf[0], nhalf[1] * 2, nhalf[2], nhalf[3] * 2) == nfull
    per_param = steps / params(full)
    assert abs(nsteps - per_param * params(nfull)) <= 15 and nsteps % 15 == 0
  assert BASE_FAMILIES['d64']['full'][0] == BASE_FAMILIES['d128']['narrow_full'][0]
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('pysource_base', 'experiments/pysource_base.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('d64:half')
  assert (c.model.n_embd, c.model.n_head, c.model.n_inner, c.steps) == (64, 4, 128, 7200)
  c = module.get_config('half')
  assert (c.model.n_embd, c.model.n_head, c.model.n_inner, c.steps) == (128, 4, 256, 7200)


@pytest.mark.slow
def test_quick_bases_of_another_family(tmp_path):
  out = str(tmp_path / 'bases')
  info = bases.make_bases(out, quick=True, shapes=('narrow_half',), family='d64')
  assert info['family'] == 'd64'
  assert info['command'] == f'python -m twist_jax.studies.bases --out {out} --family d64 --quick'
  rec = info['bases']['narrow_half']
  assert rec['model'] == {'n_embd': 32, 'n_head': 4, 'head_dim': 4, 'n_inner': 64}
  model = deploy.load_deployed(os.path.join(out, 'narrow_half'))[1]
  assert (model.n_embd, model.n_head, model.n_inner) == (32, (4,) * 4, (64,) * 4)
  assert rec['params'] == model.num_params()
  assert info['regime'] == [] and not os.path.exists(os.path.join(out, 'bases.png'))


def test_unknown_family_is_a_one_line_usage_error(tmp_path, capsys):
  out = tmp_path / 'bases'
  assert bases.main(['--out', str(out), '--family', 'd96']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and '--family' in err[0] and 'd64' in err[0] and 'd128' in err[0]
  assert not out.exists()
