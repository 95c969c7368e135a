"""Tokenizers: `bytes` (UTF-8, 256 ids), `gpt2` (tiktoken) and `bpe` (byte-level, trained here).

Each has `name`, `vocab_size`, `eot` (the end-of-document id appended after every document),
`encode`, `decode` and a batched `encode_batch` used to tokenise whole corpora.
"""

import dataclasses
import os
from typing import Any, Iterable

import numpy as np

from twist_jax.data import cache
from twist_jax.errors import DataError

TOKENIZERS = ('bytes', 'gpt2', 'bpe')
GPT2_VOCAB_SIZE = 50257
ENDOFTEXT = '<|endoftext|>'
# The smallest BPE vocab: 256 byte symbols plus the end-of-document token.
MIN_BPE_VOCAB = 257


class BytesTokenizer:
  """UTF-8 bytes as ids. There is no spare id, so the end-of-document token is NUL (0), a byte
  that does not occur in text."""

  name = 'bytes'
  vocab_size = 256
  eot = 0

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def decode(self, ids: Iterable[int]) -> str:
    return np.asarray(ids, np.uint8).tobytes().decode('utf-8', errors='replace')

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode('utf-8'), np.uint8) for t in texts]


@dataclasses.dataclass(frozen=True)
class Gpt2Tokenizer:
  """GPT-2's BPE via tiktoken; <|endoftext|> (50256) ends each document. `encode` treats
  text that spells a special token as ordinary text."""

  encoding: Any
  name = 'gpt2'
  vocab_size = GPT2_VOCAB_SIZE
  eot = GPT2_VOCAB_SIZE - 1

  def encode(self, text: str) -> list[int]:
    return self.encoding.encode_ordinary(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self.encoding.decode(list(ids))

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    ids = self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
    return [np.asarray(x, np.uint16) for x in ids]


@dataclasses.dataclass(frozen=True)
class BpeTokenizer:
  """A byte-level BPE (HF `tokenizers`) trained on the training split; id 0 is <|endoftext|>.

  `vocab_size` is the configured size; a small corpus may learn fewer merges, and the
  ids above the learned ones are simply never produced.
  """

  tokenizer: Any
  vocab_size: int
  name = 'bpe'
  eot = 0

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=False)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encs]


def gpt2() -> Gpt2Tokenizer:
  """tiktoken's gpt2 encoding; a one-line DataError when its BPE files cannot be fetched."""
  import tiktoken  # pylint: disable=g-import-not-at-top  (keeps `import twist_jax.data` fast)
  try:
    return Gpt2Tokenizer(tiktoken.get_encoding('gpt2'))
  except Exception as e:  # requests/urllib errors differ by setup; the advice does not
    cache_dir = os.environ.get('TIKTOKEN_CACHE_DIR', '(unset)')
    raise DataError(
        f'data.tokenizer=gpt2: could not load the gpt2 BPE files ({type(e).__name__}); set '
        f'TIKTOKEN_CACHE_DIR (now {cache_dir}) to a folder holding the cached gpt2 files, '
        'or go online') from e


def train_bpe(texts: Iterable[str], vocab_size: int):
  """Trains a byte-level BPE with <|endoftext|> as id 0; exact round trip for any text."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  # No prefix space and no normaliser: decode(encode(s)) == s.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=True,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return tok


def bpe(path: str, vocab_size: int, train_texts) -> BpeTokenizer:
  """The BPE cached at `path`, trained on `train_texts()` (called only on a miss) and saved."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    tok = train_bpe(train_texts(), vocab_size)
    cache.atomic_write(path, lambda tmp: tok.save(tmp))
  return BpeTokenizer(Tokenizer.from_file(path), vocab_size)


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size < 2**16 else np.int32)


def tokenize_documents(tokenizer, texts: list[str]) -> np.ndarray:
  """The documents' ids, each followed by the end-of-document id, as one flat array."""
  eot = np.array([tokenizer.eot], token_dtype(tokenizer.vocab_size))
  pieces = []
  for ids in tokenizer.encode_batch(texts):
    pieces += [ids.astype(eot.dtype, copy=False), eot]
  return np.concatenate(pieces) if pieces else eot[:0]
