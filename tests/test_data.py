"""Data package: tfds-built corpora (no TF, no network), tokenizers, caches, window iterators."""

import json
import os
import pathlib
import threading
import types
import zipfile

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from twist_jax import data, files as files_lib
from twist_jax.data import cache, documents, sources, tokenizers, windows
from twist_jax.errors import ConfigError, DataError

ENDOFTEXT = tokenizers.ENDOFTEXT

WORDS = ('the model trains many small subnetworks of one transformer and averages what they '
         'learn; each worker sees its own shard of text and the central weights gather it all. '
         'héllo wörld — ünïcode ✓ 字 ').split(' ')


def _cfg(data_dir, **fields):
  return types.SimpleNamespace(data_dir=str(data_dir), **fields)


def _prose(seed: int, num_words: int) -> str:
  rng = np.random.default_rng(seed)
  lines = [' '.join(rng.choice(WORDS, size=12)) for _ in range(num_words // 12)]
  return '\n'.join(lines) + '\n'


def _write_files(folder, count: int, num_words: int = 120) -> dict:
  texts = {}
  for i in range(count):
    path = folder / f'sub{i % 3}' / f'doc{i:02d}.txt'
    path.parent.mkdir(parents=True, exist_ok=True)
    texts[str(path)] = f'document {i}\n' + _prose(i, num_words)
    path.write_text(texts[str(path)], encoding='utf-8')
  return texts


def _decode_docs(ds, split) -> list[str]:
  """A bytes-tokenised split back as its documents (NUL ends each one)."""
  text = ds.tokenizer.decode(ds.tokens(split))
  assert text.endswith('\0')
  return text[:-1].split('\0')


@pytest.fixture(scope='module')
def python_docs_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('python_docs')
  data.load(_cfg(root))
  return root


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize('field, value', [('name', 'imagenet'), ('tokenizer', 'spm'),
                                          ('val_fraction', 1.0), ('bpe_vocab_size', 100)])
def test_bad_config_names_field(tmp_path, field, value):
  cfg = _cfg(tmp_path, **{'tokenizer': 'bpe', field: value})
  with pytest.raises(ConfigError, match=f"data.{field}"):
    data.load(cfg)
  assert not (tmp_path / 'tokens').exists()


def test_unknown_name_lists_allowed(tmp_path):
  with pytest.raises(ConfigError,
                     match='python_docs, python_source, text_files, wikitext2, wikitext103, tfds:'):
    data.load(_cfg(tmp_path, name='wiki'))


def test_protocol_names_window_and_stride():
  line = data.protocol(types.SimpleNamespace(name='wikitext103', tokenizer='gpt2'), 1024)
  assert '\n' not in line
  for part in ('wikitext103', 'gpt2', '50257', '1025 tokens', 'stride 1024', 'validation'):
    assert part in line


# --- python_docs ---------------------------------------------------------------------------------


def test_stdlib_files_skip_tests_and_site_packages():
  files = [p.relative_to(documents.stdlib_root()).as_posix()
           for p in documents.stdlib_files(documents.stdlib_root())]
  assert 'json/decoder.py' in files and 'pydoc_data/topics.py' in files
  assert not [f for f in files if f.startswith(('site-packages/', 'test/'))
              or '/tests/' in f or '/test_' in f]


def test_python_source_documents_read_docstrings_without_import():
  source = (b'"""Module doc."""\nimport not_a_module\nclass A:\n  """Class doc."""\n'
            b'  def f(self):\n    """Method doc."""\n')
  assert documents.python_source_documents('m.py', source) == [
      ('m.py', 'Module doc.\n\nClass doc.\n\nMethod doc.')]
  assert documents.python_source_documents('bad.py', b'def (:') == []


def test_python_docs_builds_and_splits_deterministically(python_docs_dir):
  ds = data.load(_cfg(python_docs_dir))
  assert ds.name == 'python_docs' and ds.vocab_size == 256
  docs = {s: _decode_docs(ds, s) for s in ('train', 'validation')}
  assert len(docs['train']) > 500 and len(docs['validation']) > 10
  assert ds.tokens('train').dtype == np.uint16 and ds.tokens('train').size > 1_000_000
  # Sampled modules sit, whole, in the split their name's hash picks, and only there.
  root = documents.stdlib_root()
  for path in [p for p in documents.stdlib_files(root) if p.suffix == '.py'][::40]:
    name = path.relative_to(root).as_posix()
    for _, text in documents.python_source_documents(name, path.read_bytes()):
      if text.strip():
        split = 'validation' if documents.unit_hash(name) < 0.05 else 'train'
        other = 'train' if split == 'validation' else 'validation'
        assert text in docs[split] and text not in docs[other], name


def test_cached_load_skips_tfds_and_rewrites_nothing(python_docs_dir, monkeypatch):
  before = {p: p.stat().st_mtime_ns for p in (python_docs_dir / 'tokens').rglob('*.npy')}
  monkeypatch.setattr(sources, 'open_splits', lambda *a: pytest.fail('rebuilt a cached corpus'))
  ds = data.load(_cfg(python_docs_dir))
  assert ds.tokens('train').size > 0
  assert {p: p.stat().st_mtime_ns for p in before} == before


def test_load_waits_for_the_cache_lock(python_docs_dir):
  # While another job holds the cache root's lock (it is building), a load waits for it; a
  # cached load takes well under a second when nothing holds the lock.
  loaded = []
  with cache.build_lock(python_docs_dir):
    reader = threading.Thread(target=lambda: loaded.append(data.load(_cfg(python_docs_dir))))
    reader.start()
    reader.join(timeout=2.0)
    assert reader.is_alive() and not loaded
  reader.join(timeout=60)
  assert not reader.is_alive() and loaded[0].tokens('validation').size > 0


def test_load_goes_on_where_the_filesystem_has_no_locks(python_docs_dir, monkeypatch):
  def no_locks(*_):
    raise OSError(37, 'No locks available')
  monkeypatch.setattr(cache.fcntl, 'flock', no_locks)
  assert data.load(_cfg(python_docs_dir)).tokens('validation').size > 0


def test_split_documents_is_a_deterministic_partition():
  docs = [(f'doc{i}', f'text {i}') for i in range(200)]
  split = documents.split_documents(docs, 0.2)
  assert split == documents.split_documents(list(docs), 0.2)
  assert sorted(split['train'] + split['validation']) == sorted(docs)
  assert 20 < len(split['validation']) < 60
  # Keeps both splits non-empty with few documents, and splits a lone document at a line.
  assert [len(s) for s in documents.split_documents(docs[:2], 0.01).values()] == [1, 1]
  alone = documents.split_documents([('a', 'line one\nline two\nline three\n')], 0.3)
  assert alone == {'train': [('a', 'line one\nline two\n')], 'validation': [('a', 'line three\n')]}


# --- text_files ----------------------------------------------------------------------------------


def test_text_files_partition_the_files(tmp_path):
  texts = _write_files(tmp_path / 'corpus', 24)
  ds = data.load(_cfg(tmp_path / 'cache', name='text_files', val_fraction=0.25,
                      files=str(tmp_path / 'corpus/**/*.txt')))
  train, val = _decode_docs(ds, 'train'), _decode_docs(ds, 'validation')
  assert sorted(train + val) == sorted(texts.values())
  assert train and val and not set(train) & set(val)


def test_text_files_missing_glob_names_it(tmp_path):
  pattern = str(tmp_path / 'nothing/*.txt')
  with pytest.raises(DataError, match='nothing/\\*.txt'):
    data.load(_cfg(tmp_path, name='text_files', files=pattern))


def test_text_files_all_empty_is_an_error(tmp_path):
  for name in ('a.txt', 'b.txt'):
    (tmp_path / name).write_text('  \n')
  with pytest.raises(DataError, match='empty'):
    data.load(_cfg(tmp_path / 'cache', name='text_files', files=str(tmp_path / '*.txt')))


def test_editing_a_file_rebuilds_and_max_train_bytes_truncates(tmp_path):
  (tmp_path / 'one.txt').write_text('first line\n' * 50)
  cfg = _cfg(tmp_path / 'cache', name='text_files', files=str(tmp_path / '*.txt'),
             val_fraction=0.2)
  assert _decode_docs(data.load(cfg), 'train')[0].startswith('first')
  (tmp_path / 'one.txt').write_text('second line\n' * 50)
  assert _decode_docs(data.load(cfg), 'train')[0].startswith('second')
  short = data.load(_cfg(**{**vars(cfg), 'max_train_bytes': 30}))
  assert short.tokens('train').size == 31  # 30 bytes + the end-of-document token
  assert short.tokens('validation').size == data.load(cfg).tokens('validation').size


# --- wikitext ------------------------------------------------------------------------------------

WIKI_TRAIN = (' \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n It is old . \n'
              ' \n = Beta = \n \n Beta follows alpha . \n')
WIKI_SPLITS = {'train': WIKI_TRAIN, 'validation': ' \n = Gamma = \n \n Gamma is third . \n',
               'test': ' \n = Delta = \n \n Delta is fourth . \n'}


def _wikitext_zip(folder, config='wikitext-2-raw-v1'):
  folder.mkdir(parents=True)
  with zipfile.ZipFile(folder / f'{config}.zip', 'w') as zf:
    for split, filename in documents.WIKITEXT_RAW_FILES.items():
      zf.writestr(f'{config.removesuffix("-v1")}/{filename}', WIKI_SPLITS[split])
  return folder


def _hf_rows(raw: str) -> list[str]:
  """Rows as Hugging Face made them: one per line of the raw file, newline kept, and '' for a
  line that is only whitespace."""
  return [line if line.strip() else '' for line in raw.splitlines(keepends=True)]


def _wikitext_parquet(folder, train_shards=2, skip=()):
  """Hugging Face's file names; train is cut into `train_shards` shards mid-article."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  folder.mkdir(parents=True)
  for split, raw in WIKI_SPLITS.items():
    rows = _hf_rows(raw)
    n = train_shards if split == 'train' else 1
    cuts = [len(rows) * i // n for i in range(n + 1)]
    for i in range(n):
      name = f'{split}-{i:05d}-of-{n:05d}.parquet'
      if name not in skip:
        pq.write_table(pa.table({'text': rows[cuts[i]:cuts[i + 1]]}), folder / name)
  return folder


def test_wikitext_articles_split_at_top_level_headings():
  articles = documents.wikitext_articles(WIKI_TRAIN)
  assert ''.join(articles) == WIKI_TRAIN
  assert [a.split('\n')[1 if i == 0 else 0] for i, a in enumerate(articles)] == [
      ' = Alpha = ', ' = Beta = ']


def test_wikitext_from_manual_dir(tmp_path):
  manual = _wikitext_zip(tmp_path / 'manual')
  ds = data.load(_cfg(tmp_path / 'cache', name='wikitext2', manual_dir=str(manual)))
  assert ''.join(_decode_docs(ds, 'train')) == WIKI_TRAIN
  assert len(_decode_docs(ds, 'train')) == 2
  assert _decode_docs(ds, 'validation') == [' \n = Gamma = \n \n Gamma is third . \n']


def test_wikitext_parquet_rows_rebuild_the_raw_file(tmp_path):
  shards = documents.find_wikitext(str(_wikitext_parquet(tmp_path / 'hf', train_shards=3)),
                                   'wikitext-2-raw-v1')
  assert [os.path.basename(p) for p in shards['train']] == [
      f'train-0000{i}-of-00003.parquet' for i in range(3)]
  for split, raw in WIKI_SPLITS.items():
    assert documents.read_wikitext_split(shards, split) == raw


@pytest.mark.parametrize('layout', ['loose', 'subfolder'])
def test_wikitext_zip_and_parquet_give_the_same_documents_and_tokens(tmp_path, layout):
  zipped = _wikitext_zip(tmp_path / 'zip')
  hf = tmp_path / 'hf'
  if layout == 'subfolder':  # a snapshot of the HF repo: one folder per config
    _wikitext_parquet(hf / 'wikitext-2-raw-v1')
    (hf / 'wikitext-2-v1').mkdir()  # the tokenised variant, which must not be read
    (hf / 'wikitext-2-v1' / 'train-00000-of-00001.parquet').write_text('not parquet')
  else:
    _wikitext_parquet(hf)
  a = data.load(_cfg(tmp_path / 'cache_zip', name='wikitext2', manual_dir=str(zipped)))
  b = data.load(_cfg(tmp_path / 'cache_hf', name='wikitext2', manual_dir=str(hf)))
  for split, raw in (('train', WIKI_TRAIN), ('validation', WIKI_SPLITS['validation'])):
    assert _decode_docs(b, split) == documents.wikitext_articles(raw) == _decode_docs(a, split)
    np.testing.assert_array_equal(b.tokens(split), a.tokens(split))
  assert len(_decode_docs(b, 'train')) == 2


@pytest.mark.parametrize('contents', ['a raw file', 'nothing', 'no folder'])
def test_wikitext_manual_dir_without_either_format_names_both(tmp_path, contents):
  manual = tmp_path / 'm'
  if contents != 'no folder':
    manual.mkdir()
  if contents == 'a raw file':  # neither the zip, nor its folder, nor parquet
    (manual / 'wiki.train.raw').write_text(WIKI_TRAIN)
  with pytest.raises(DataError) as e:
    data.load(_cfg(tmp_path / 'c', name='wikitext103', manual_dir=str(manual)))
  msg = str(e.value)
  assert '\n' not in msg
  for part in ('data.manual_dir', 'wikitext-103-raw-v1.zip', 'Salesforce/wikitext',
               'train-*-of-*.parquet', 'wikitext-103-raw-v1/ subfolder', 'docs/data.md'):
    assert part in msg, msg
  assert not (tmp_path / 'c' / 'tokens').exists()


def test_wikitext_parquet_with_a_missing_shard_names_it(tmp_path):
  hf = _wikitext_parquet(tmp_path / 'hf', skip=('train-00001-of-00002.parquet',))
  with pytest.raises(DataError, match='lacks train-00001-of-00002.parquet'):
    data.load(_cfg(tmp_path / 'c', name='wikitext2', manual_dir=str(hf)))


def _offline(*args, **kwargs):
  raise ConnectionError('network is blocked in tests')


def test_wikitext_download_takes_the_hf_parquet(tmp_path, monkeypatch):
  import huggingface_hub

  calls = []

  def snapshot(repo_id, *, repo_type, local_dir, allow_patterns):
    calls.append((repo_id, repo_type, allow_patterns))
    _wikitext_parquet(pathlib.Path(local_dir) / 'wikitext-2-raw-v1')
    return local_dir
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', _offline)
  ds = data.load(_cfg(tmp_path, name='wikitext2'))
  assert calls == [('Salesforce/wikitext', 'dataset', ['wikitext-2-raw-v1/*.parquet'])]
  assert _decode_docs(ds, 'train') == documents.wikitext_articles(WIKI_TRAIN)


def test_wikitext_offline_without_manual_dir_says_what_to_do(tmp_path, monkeypatch):
  import huggingface_hub

  monkeypatch.setattr(huggingface_hub, 'snapshot_download', _offline)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', _offline)
  with pytest.raises(DataError) as e:
    data.load(_cfg(tmp_path, name='wikitext103'))
  for part in ('could not download', 'Salesforce/wikitext: ConnectionError',
               'wikitext-103-raw-v1.zip: ConnectionError', 'set data.manual_dir'):
    assert part in str(e.value), str(e.value)


# --- tfds catalog datasets -----------------------------------------------------------------------


class TwistTestSentences(tfds.core.GeneratorBasedBuilder):
  """A tiny catalog-style dataset: `sentence` feature, train and test splits only."""

  VERSION = tfds.core.Version('1.0.0')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self):
    features = tfds.features.FeaturesDict(
        {'sentence': tfds.features.Text(), 'label': tfds.features.ClassLabel(num_classes=2)})
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=features)

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, 30), 'test': self._generate_examples(30, 40)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      yield i, {'sentence': f'sentence number {i}.', 'label': i % 2}


def test_tfds_catalog_dataset_by_name(tmp_path):
  ds = data.load(_cfg(tmp_path, name='tfds:twist_test_sentences', text_feature='sentence'))
  assert _decode_docs(ds, 'train') == [f'sentence number {i}.' for i in range(30)]
  # No validation split: the test split stands in.
  assert _decode_docs(ds, 'validation')[0] == 'sentence number 30.'
  with pytest.raises(ConfigError, match="data.text_feature.*'label', 'sentence'"):
    data.load(_cfg(tmp_path, name='tfds:twist_test_sentences'))
  with pytest.raises(ConfigError, match='data.name'):
    data.load(_cfg(tmp_path, name='tfds:no_such_dataset_anywhere'))


# --- tokenizers ----------------------------------------------------------------------------------


def test_bytes_round_trip():
  tok = tokenizers.BytesTokenizer()
  text = 'plain ASCII, ünïcode ✓ and 字\n'
  assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < 256
  ids = tokenizers.tokenize_documents(tok, ['ab', 'c'])
  assert ids.tolist() == [97, 98, 0, 99, 0] and ids.dtype == np.uint16


def test_bpe_trains_caches_and_round_trips(tmp_path, monkeypatch):
  _write_files(tmp_path / 'corpus', 12, num_words=600)
  cfg = _cfg(tmp_path / 'cache', name='text_files', files=str(tmp_path / 'corpus/**/*.txt'),
             tokenizer='bpe', bpe_vocab_size=400, val_fraction=0.25)
  ds = data.load(cfg)
  assert ds.vocab_size == 400 and ds.tokenizer.eot == 0
  for text in ('the central weights gather it', 'unseen: Zebra 42 ✓ \n\t  x'):
    assert ds.tokenizer.decode(ds.tokenizer.encode(text)) == text
  train = ds.tokens('train')
  assert train.max() < 400 and train.size < 0.6 * len(ds.tokenizer.decode(train).encode())
  json_files = list((tmp_path / 'cache').rglob('tokenizer.json'))
  assert len(json_files) == 1
  # The second load reuses the saved tokenizer and token caches.
  monkeypatch.setattr(tokenizers, 'train_bpe', lambda *a: pytest.fail('retrained the BPE'))
  monkeypatch.setattr(sources, 'open_splits', lambda *a: pytest.fail('re-read the corpus'))
  again = data.load(cfg)
  np.testing.assert_array_equal(again.tokens('validation'), ds.tokens('validation'))


def _block_tiktoken(monkeypatch, tmp_path):
  import tiktoken.load, tiktoken.registry  # pylint: disable=g-import-not-at-top
  def offline(blobpath):
    raise ConnectionError(f'network is blocked in tests: {blobpath}')
  monkeypatch.setattr(tiktoken.load, 'read_file', offline)
  monkeypatch.setattr(tiktoken.registry, 'ENCODINGS', {})  # no encoding loaded earlier
  monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'empty'))


def test_gpt2_offline_error_names_tiktoken_cache_dir(tmp_path, monkeypatch):
  _block_tiktoken(monkeypatch, tmp_path)
  with pytest.raises(DataError, match='TIKTOKEN_CACHE_DIR') as err:
    data.load(_cfg(tmp_path, tokenizer='gpt2'))
  assert '\n' not in str(err.value)


def test_gpt2_tokenizer_through_load(tmp_path, monkeypatch):
  import tiktoken  # pylint: disable=g-import-not-at-top
  # Byte-level ranks stand in for GPT-2's merges, whose files tests do not fetch.
  stand_in = tiktoken.Encoding('gpt2', pat_str=r"\S+|\s+", special_tokens={ENDOFTEXT: 50256},
                               mergeable_ranks={bytes([i]): i for i in range(256)})
  monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: stand_in)
  texts = _write_files(tmp_path / 'corpus', 4)
  ds = data.load(_cfg(tmp_path / 'cache', name='text_files', tokenizer='gpt2',
                      files=str(tmp_path / 'corpus/*/*.txt')))
  assert ds.vocab_size == 50257 and ds.tokenizer.eot == 50256
  train = ds.tokens('train')
  assert train.dtype == np.uint16 and train[-1] == 50256
  docs = ds.tokenizer.decode(train).split(ENDOFTEXT)
  assert docs[-1] == '' and set(docs[:-1]) <= set(texts.values())
  # Text that spells the special token stays plain text.
  assert 50256 not in ds.tokenizer.encode(f'a {ENDOFTEXT} b')


# --- caching -------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  def crash(tmp):
    with open(tmp, 'wb') as f:
      f.write(b'half')
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    files_lib.atomic_write(tmp_path / 'x.npy', crash)
  assert list(tmp_path.iterdir()) == []
  cache.save_array(tmp_path / 'x.npy', np.arange(5, dtype=np.uint16))
  assert [p.name for p in tmp_path.iterdir()] == ['x.npy']
  np.testing.assert_array_equal(cache.load_array(tmp_path / 'x.npy'), np.arange(5))


def test_data_root_default(monkeypatch):
  monkeypatch.setenv('TWIST_DATA_DIR', '/some/where')
  assert str(cache.data_root('')) == '/some/where'
  assert str(cache.data_root('/explicit')) == '/explicit'
  monkeypatch.delenv('TWIST_DATA_DIR')
  assert cache.data_root('').parts[-2:] == ('.cache', 'twist_jax')


# --- windows and the train iterator ---------------------------------------------------------------

# Token i is i: a window's first token says which window it is.
TOKENS = np.arange(16 * 50 + 1, dtype=np.int32)
L = 16


def _iterator(seed=0, workers=3, batch=4, tokens=TOKENS):
  return windows.TrainIterator(tokens, num_workers=workers, batch_size=batch, context=L, seed=seed)


def _window_ids(batch_WxBxLp1):
  """Which window each row is, checked against a NumPy gather: token i is i, so window k starts
  at k*L and runs for L+1 tokens."""
  ids_WxB = batch_WxBxLp1[..., 0] // L
  np.testing.assert_array_equal(batch_WxBxLp1, TOKENS[ids_WxB[..., None] * L + np.arange(L + 1)])
  return ids_WxB


def test_iterator_shapes_and_windows():
  batch = next(_iterator())
  chex.assert_shape(batch, (3, 4, L + 1))
  chex.assert_type(batch, np.int32)
  assert np.all(batch[..., 0] % L == 0)
  _window_ids(batch)


def test_iterator_is_deterministic_in_seed():
  a, b, c = _iterator(0), _iterator(0), _iterator(1)
  first = [next(a) for _ in range(10)]
  chex.assert_trees_all_equal(first, [next(b) for _ in range(10)])
  assert not np.array_equal(first[0], next(c))
  negative = next(_iterator(-1))  # any int is a seed, and -1 is not 1
  _window_ids(negative)
  assert not np.array_equal(negative, first[0]) and not np.array_equal(negative, next(_iterator(1)))


def test_each_epoch_deals_distinct_windows_and_reshuffles():
  it = _iterator()
  assert it.steps_per_epoch == 50 // 12
  epochs = []
  for _ in range(6):
    ids = np.stack([_window_ids(next(it)) for _ in range(it.steps_per_epoch)])  # (steps, W, B)
    assert len(np.unique(ids)) == ids.size == 48  # no window twice, across workers and steps
    assert ids.min() >= 0 and ids.max() < 50
    epochs.append(ids)
  assert len({e.tobytes() for e in epochs}) == 6  # a new order every epoch
  # The two windows left over differ between epochs: over six epochs every window is seen.
  assert set(np.concatenate(epochs).ravel()) == set(range(50))


def test_steps_are_gathered_from_the_grain_index_order():
  # The same pipeline without the gather yields the window indices; step k of the iterator is
  # exactly gather_windows of block k, reshaped to (W, B) in row-major order.
  it = _iterator(seed=5)
  dataset = windows.train_dataset(TOKENS, num_workers=3, batch_size=4, context=L, seed=5)
  assert len(dataset) > 10**15  # endless
  for k in range(9):
    ids_WxB = _window_ids(next(it))
    np.testing.assert_array_equal(dataset[k], windows.gather_windows(TOKENS, ids_WxB, L))


def test_resume_from_state_continues_exactly():
  it = _iterator(seed=3)
  for _ in range(6):  # past the first epoch boundary (4 steps per epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(7)]
  resumed = _iterator(seed=3)
  resumed.set_state(state)
  chex.assert_trees_all_equal([next(resumed) for _ in range(7)], expected)
  # A fresh iterator is at step 0 and differs from where the saved one stood.
  assert not np.array_equal(next(_iterator(seed=3)), expected[0])
  with pytest.raises(DataError, match='batch_size'):
    _iterator(seed=3, batch=2).set_state(state)


def test_state_of_the_old_pipeline_is_refused_in_one_line():
  old = {'version': 1, 'seed': 3, 'num_workers': 3, 'batch_size': 4, 'context': L,
         'num_windows': 50, 'epoch': 1, 'step': 2}
  with pytest.raises(DataError, match='older data pipeline.*new --workdir') as err:
    _iterator(seed=3).set_state(old)
  assert '\n' not in str(err.value)


def test_too_few_windows_says_how_many():
  with pytest.raises(DataError, match='50 windows.*60'):
    _iterator(workers=6, batch=10)


def test_dataset_iterator_uses_train_split(tmp_path):
  _write_files(tmp_path / 'corpus', 6, num_words=300)
  files = str(tmp_path / 'corpus/*/*.txt')
  ds = data.load(_cfg(tmp_path / 'cache', name='text_files', files=files))
  it = ds.train_iterator(num_workers=2, batch_size=3, context=32, seed=0)
  batch = next(it)
  chex.assert_shape(batch, (2, 3, 33))
  chex.assert_type(batch, np.int32)
  train = ds.tokens('train')
  start = batch[0, 0, 0]
  assert any(np.array_equal(train[i:i + 33], batch[0, 0]) for i in np.flatnonzero(train == start))


def test_validation_windows_cover_the_split_with_stride_l():
  tokens = np.arange(100, dtype=np.uint16)
  w = windows.validation_windows(tokens, 16)
  assert w.shape == (6, 17) and w.dtype == np.int32
  np.testing.assert_array_equal(w[:, 1:].ravel(), tokens[1:97])  # every target once, in order
  np.testing.assert_array_equal(w[:, 0], tokens[0:96:16])
  assert windows.validation_windows(tokens, 16, max_windows=2).shape == (2, 17)
  np.testing.assert_array_equal(windows.spread_indices(6, 2), [0, 3])
  np.testing.assert_array_equal(windows.validation_windows(tokens, 16, max_windows=4),
                                windows.gather_windows(tokens, windows.spread_indices(6, 4), 16))
  np.testing.assert_array_equal(windows.spread_indices(6, 6), np.arange(6))
  with pytest.raises(DataError, match='100 tokens'):
    windows.validation_windows(tokens, 100)
