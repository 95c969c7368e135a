"""Which corpus a data config names: validated spec, cache identity, and its documents via tfds."""

import dataclasses
import functools
import hashlib
import os
import platform
from typing import Iterator

import tqdm

from twist_jax.data import documents
from twist_jax.data.tokenizers import MIN_BPE_VOCAB, TOKENIZERS
from twist_jax.errors import ConfigError, DataError

BUILT_IN = ('python_docs', 'python_source', 'text_files', 'wikitext2', 'wikitext103')
DATASETS = BUILT_IN + ('tfds:<catalog name>',)
SPLITS = ('train', 'validation')
HASH_SPLIT = ('python_docs', 'python_source', 'text_files')  # split by document-name hash
_READ_CHUNK = 1024  # records per array_record read


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data config fields this package reads (defaults for any the config object lacks)."""
  name: str = 'python_docs'
  tokenizer: str = 'bytes'
  bpe_vocab_size: int = 4096
  data_dir: str = ''
  files: str = ''
  val_fraction: float = 0.05
  manual_dir: str = ''
  text_feature: str = 'text'
  max_train_bytes: int = 0
  gpt2_bpe_dir: str = ''  # local folder with GPT-2's vocab.bpe + encoder.json ('' = tiktoken)


def spec_from_config(cfg) -> DataSpec:
  """Reads the data fields of any config object and validates them."""
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DataSpec)
            if hasattr(cfg, f.name)}
  spec = DataSpec(**fields)
  validate(spec)
  return spec


def validate(spec: DataSpec) -> None:
  """ConfigError naming the field for any value this package cannot use."""
  if spec.name not in BUILT_IN and not (spec.name.startswith('tfds:') and len(spec.name) > 5):
    raise ConfigError('data.name', f"unknown dataset '{spec.name}'; allowed: {', '.join(DATASETS)}")
  if spec.tokenizer not in TOKENIZERS:
    raise ConfigError('data.tokenizer',
                      f"unknown tokenizer '{spec.tokenizer}'; allowed: {', '.join(TOKENIZERS)}")
  if spec.tokenizer == 'bpe' and not (isinstance(spec.bpe_vocab_size, int)
                                      and MIN_BPE_VOCAB <= spec.bpe_vocab_size < 2**31):
    raise ConfigError('data.bpe_vocab_size',
                      f'must be an int >= {MIN_BPE_VOCAB}, got {spec.bpe_vocab_size!r}')
  if spec.name in HASH_SPLIT and not 0 < spec.val_fraction < 1:
    raise ConfigError('data.val_fraction', f'must be in (0, 1), got {spec.val_fraction!r}')
  if spec.name == 'text_files' and not spec.files:
    raise ConfigError('data.files', 'text_files needs a glob, e.g. "~/corpus/**/*.txt"')
  if not (isinstance(spec.max_train_bytes, int) and spec.max_train_bytes >= 0):
    raise ConfigError('data.max_train_bytes', f'must be an int >= 0, got {spec.max_train_bytes!r}')


def corpus_id(spec: DataSpec) -> str:
  """A file-name-safe identity of the corpus and its split, used as the cache key."""
  if spec.name in ('python_docs', 'python_source'):
    return f'{spec.name}-py{platform.python_version()}-vf{spec.val_fraction:g}'
  if spec.name == 'text_files':
    return f'text_files-{files_fingerprint(spec.files)}-vf{spec.val_fraction:g}'
  if spec.name.startswith('tfds:'):
    safe = spec.name[5:].replace('/', '_').replace(':', '_')
    return f'tfds-{safe}-{spec.text_feature}'
  return spec.name


def files_fingerprint(pattern: str) -> str:
  """Hash of the matched paths, sizes and mtimes: editing or adding a file rebuilds."""
  lines = []
  for path in documents.match_files(pattern):
    st = os.stat(path)
    lines.append(f'{path}\t{st.st_size}\t{st.st_mtime_ns}')
  return hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:12]


@functools.cache
def _builders():
  from twist_jax.data import builders  # pylint: disable=g-import-not-at-top  (imports tfds)
  return builders


def _builder_args(spec: DataSpec) -> tuple[str, dict, dict]:
  """(registered tfds name, builder kwargs, download_and_prepare kwargs) for a built-in corpus."""
  b, vf = _builders(), spec.val_fraction
  if spec.name in ('python_docs', 'python_source'):
    config = b.SplitConfig(name=f'py{platform.python_version()}-vf{vf:g}', val_fraction=vf)
    builder = b.TwistPythonDocs if spec.name == 'python_docs' else b.TwistPythonSource
    return builder.name, {'config': config}, {}
  if spec.name == 'text_files':
    paths = documents.match_files(spec.files)
    config = b.SplitConfig(name=f'{files_fingerprint(spec.files)}-vf{vf:g}', val_fraction=vf,
                           paths=tuple(paths))
    return b.TwistTextFiles.name, {'config': config}, {}
  manual = os.path.expanduser(spec.manual_dir)
  if manual and not (os.path.isdir(manual) and os.listdir(manual)):
    # tfds would take an empty folder for no folder and download instead of saying so.
    what = 'an empty folder' if os.path.isdir(manual) else 'not a folder'
    raise DataError(f'data.manual_dir: {spec.manual_dir} is {what}; '
                    f'{b.wikitext_manual_help(b.WIKITEXT_CONFIGS[spec.name])}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  download = {'download_config': tfds.download.DownloadConfig(
      manual_dir=manual or None)}
  return b.TwistWikitext.name, {'config': spec.name}, download


def open_splits(spec: DataSpec, tfds_dir: str) -> dict:
  """{'train': source, 'validation': source}, building the tfds dataset on first use."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if spec.name.startswith('tfds:'):
    name, kwargs, prepare = spec.name[5:], {}, {}
  else:
    name, kwargs, prepare = _builder_args(spec)
  try:
    sources = tfds.data_source(
        name, data_dir=tfds_dir, builder_kwargs={'file_format': 'array_record', **kwargs},
        download_and_prepare_kwargs=prepare or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError('data.name', f"no tfds dataset '{name}' ({str(e).splitlines()[0]})") from e
  val = next((s for s in ('validation', 'test') if s in sources), None)
  if 'train' not in sources or val is None:
    raise DataError(
        f'{spec.name}: needs a train and a validation or test split, has {list(sources)}')
  return {'train': sources['train'], 'validation': sources[val]}


def iter_texts(source, feature: str, desc: str) -> Iterator[str]:
  """The `feature` string of every record, in order, read in chunks."""
  with tqdm.tqdm(total=len(source), desc=desc, unit='doc', delay=2.0, leave=False) as bar:
    for start in range(0, len(source), _READ_CHUNK):
      records = source.__getitems__(range(start, min(start + _READ_CHUNK, len(source))))
      for record in records:
        yield _text(record, feature)
      bar.update(len(records))


def _text(record, feature: str) -> str:
  if feature not in record:
    raise ConfigError('data.text_feature',
                      f"'{feature}' is not a feature of this dataset; it has {sorted(record)}")
  value = record[feature]
  return value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value)


def truncate_texts(texts: Iterator[str], max_bytes: int) -> Iterator[str]:
  """The first `max_bytes` UTF-8 bytes of the stream (0: all of it), cutting the last document."""
  if not max_bytes:
    yield from texts
    return
  left = max_bytes
  for text in texts:
    data = text.encode('utf-8')
    if len(data) >= left:
      yield data[:left].decode('utf-8', errors='ignore')  # drops a split multi-byte character
      return
    left -= len(data)
    yield text
