"""`load(cfg)`: the tokenised corpus behind a data config, built once and cached as .npy.

Cache layout under the data dir: `tfds/` (array_record corpora) and
`tokens/<corpus>/<tokenizer>/{train.npy, validation.npy, tokenizer.json}`.
"""

import dataclasses
import functools
from typing import Any

import numpy as np
import tqdm

from twist_jax.data import cache, sources, tokenizers, windows
from twist_jax.data.sources import SPLITS, DataSpec
from twist_jax.errors import DataError

_TOKENIZE_BATCH = 256  # documents per encode_batch call


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A tokenised corpus: both splits as flat token arrays plus the tokenizer that made them."""
  name: str
  tokenizer: Any
  splits: dict

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def tokens(self, split: str) -> np.ndarray:
    """A whole split, each document followed by `tokenizer.eot`; uint16 (int32 if V >= 2^16)."""
    if split not in self.splits:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    return self.splits[split]

  def train_iterator(self, *, num_workers: int, batch_size: int, context: int,
                     seed: int) -> windows.TrainIterator:
    """Endless, resumable (W, B, L+1) int32 step batches of the train split (see
    `windows.train_dataset`)."""
    return windows.TrainIterator(self.splits['train'], num_workers=num_workers,
                                 batch_size=batch_size, context=context, seed=seed)

  def validation_windows(self, *, context: int, max_windows: int | None = None) -> np.ndarray:
    return windows.validation_windows(self.splits['validation'], context, max_windows)


@dataclasses.dataclass(frozen=True)
class _Corpus:
  """Where one corpus/tokenizer pair is cached; the tfds sources open only on a cache miss."""
  spec: DataSpec
  root: Any

  @functools.cached_property
  def tfds_splits(self) -> dict:
    return sources.open_splits(self.spec, str(self.root / 'tfds'))

  @functools.cached_property
  def folder(self):
    return self.root / 'tokens' / sources.corpus_id(self.spec) / _tokenizer_id(self.spec)

  def texts(self, split: str):
    texts = sources.iter_texts(self.tfds_splits[split], self.spec.text_feature,
                               f'{self.spec.name} {split}: reading')
    return sources.truncate_texts(texts, self.spec.max_train_bytes if split == 'train' else 0)


def _tokenizer_id(spec: DataSpec) -> str:
  if spec.tokenizer != 'bpe':
    return spec.tokenizer
  # The BPE is trained on the (possibly truncated) train split, so both splits depend on it.
  suffix = f'-max{spec.max_train_bytes}' if spec.max_train_bytes else ''
  return f'bpe{spec.bpe_vocab_size}{suffix}'


def _split_file(spec: DataSpec, split: str) -> str:
  if split == 'train' and spec.max_train_bytes:
    return f'train-max{spec.max_train_bytes}.npy'
  return f'{split}.npy'


def make_tokenizer(spec: DataSpec, corpus: _Corpus):
  """The configured tokenizer; `bpe` is trained on the corpus' train split on first use."""
  if spec.tokenizer == 'bytes':
    return tokenizers.BytesTokenizer()
  if spec.tokenizer == 'gpt2':
    return tokenizers.gpt2(spec.gpt2_bpe_dir)
  return tokenizers.bpe(str(corpus.folder / 'tokenizer.json'), spec.bpe_vocab_size,
                        lambda: corpus.texts('train'))


def tokenize_texts(tokenizer, texts, desc: str) -> np.ndarray:
  """All documents of a stream, batched through `encode_batch`, with a progress bar."""
  pieces, batch = [], []
  with tqdm.tqdm(desc=desc, unit='doc', delay=2.0, leave=False) as bar:
    for text in texts:
      batch.append(text)
      if len(batch) == _TOKENIZE_BATCH:
        pieces.append(tokenizers.tokenize_documents(tokenizer, batch))
        bar.update(len(batch))
        batch = []
    pieces.append(tokenizers.tokenize_documents(tokenizer, batch))
  return np.concatenate(pieces)


def _split_tokens(corpus: _Corpus, tokenizer, split: str) -> np.ndarray:
  """The cached tokens of a split, tokenising (and building the corpus) on a miss."""
  path = corpus.folder / _split_file(corpus.spec, split)
  if not path.exists():
    desc = f'{corpus.spec.name} {split}: tokenising'
    tokens = tokenize_texts(tokenizer, corpus.texts(split), desc)
    if tokens.size == 0:
      raise DataError(f'{corpus.spec.name}: the {split} split is empty')
    cache.save_array(path, tokens)
  return cache.load_array(path)


def load(cfg) -> Dataset:
  """The tokenised dataset a data config names (reads the fields of `DataSpec`)."""
  spec = sources.spec_from_config(cfg)
  root = cache.data_root(spec.data_dir)
  corpus = _Corpus(spec, root)
  with cache.build_lock(root):  # concurrent jobs on one cache: the first builds, the rest read
    tokenizer = make_tokenizer(spec, corpus)
    splits = {split: _split_tokens(corpus, tokenizer, split) for split in SPLITS}
  return Dataset(spec.name, tokenizer, splits)


def protocol(cfg, context: int) -> str:
  """One line saying how perplexity is measured on this data, printed next to every number."""
  spec = sources.spec_from_config(cfg)
  vocab = {'bytes': 256, 'gpt2': tokenizers.GPT2_VOCAB_SIZE}.get(spec.tokenizer,
                                                                  spec.bpe_vocab_size)
  split = 'validation' if spec.name in sources.BUILT_IN else 'validation (or test)'
  if spec.name in sources.HASH_SPLIT:
    split += f' (val_fraction={spec.val_fraction:g})'
  return (f'data={spec.name} split={split} tokenizer={spec.tokenizer} (V={vocab}) '
          f'windows of {context + 1} tokens at stride {context}, non-overlapping (each token '
          f'after the first predicted once with 1..{context} tokens of context; '
          'a final partial window is dropped)')
