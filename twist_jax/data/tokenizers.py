"""Tokenizers: `bytes` (UTF-8, 256 ids), `gpt2` (tiktoken, from the network, tiktoken's cache or a
local folder of GPT-2's vocab.bpe + encoder.json) and `bpe` (byte-level, trained here).

Each has `name`, `vocab_size`, `eot` (the end-of-document id appended after every document),
`encode`, `decode` and a batched `encode_batch` used to tokenise whole corpora.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable

import numpy as np

from twist_jax import files
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


# The standard GPT-2 BPE files (OpenAI's names): the merges, one per line after a version
# header, and the token -> id map, both in GPT-2's byte-to-printable-character alphabet.
GPT2_BPE_FILES = ('vocab.bpe', 'encoder.json')
GPT2_BPE_DIR_ENV = 'TWIST_GPT2_BPE_DIR'


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def encoding_from_bpe_files(folder: str, name: str = 'gpt2'):
  """A tiktoken Encoding with GPT-2's pre-tokeniser and the merges of `folder`'s vocab.bpe and
  encoder.json; <|endoftext|> keeps its encoder.json id (next free id if absent).

  tiktoken's own loader converts the two files. It copies what it reads into tiktoken's
  cache keyed by path; passing each file's hash makes an edited file replace a stale copy.
  """
  import tiktoken  # pylint: disable=g-import-not-at-top
  from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # pylint: disable=g-import-not-at-top
  from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's split regex
  vocab_bpe, encoder_json = (os.path.join(folder, f) for f in GPT2_BPE_FILES)
  try:
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json,
                                            _sha256(vocab_bpe), _sha256(encoder_json))
    with open(encoder_json, encoding='utf-8') as f:
      eot = json.load(f).get(ENDOFTEXT, len(ranks))
  except AssertionError as e:  # tiktoken asserts that the two files agree
    raise DataError(f'{folder}: {GPT2_BPE_FILES[1]} does not match the merges in '
                    f'{GPT2_BPE_FILES[0]} (not a pair of GPT-2 BPE files?)') from e
  except (OSError, ValueError, KeyError) as e:  # unreadable, bad JSON, unknown symbol
    raise DataError(f'{folder}: unreadable GPT-2 BPE files ({type(e).__name__}: '
                    f"{' '.join(str(e).split())})") from e
  return tiktoken.Encoding(name, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                           special_tokens={ENDOFTEXT: eot})


def _bpe_dir(bpe_dir: str) -> tuple[str, str]:
  """The folder of local GPT-2 BPE files and what named it: the config field, else the
  environment variable; ('', '') when neither is set (tiktoken fetches the files)."""
  if bpe_dir:
    return bpe_dir, 'data.gpt2_bpe_dir'
  env = os.environ.get(GPT2_BPE_DIR_ENV, '')
  return env, (GPT2_BPE_DIR_ENV if env else '')


def gpt2_from_folder(folder: str, source: str) -> Gpt2Tokenizer:
  """GPT-2's BPE from a local folder, checked to be GPT-2's vocabulary; `source` (the config
  field or environment variable that named the folder) leads every error."""
  if not os.path.isdir(folder):
    raise DataError(f'{source}={folder}: no such folder (it must hold GPT-2\'s '
                    f'{" and ".join(GPT2_BPE_FILES)})')
  missing = [f for f in GPT2_BPE_FILES if not os.path.isfile(os.path.join(folder, f))]
  if missing:
    raise DataError(f'{source}={folder}: {missing[0]} is missing (the folder must hold '
                    f'GPT-2\'s {" and ".join(GPT2_BPE_FILES)})')
  try:
    encoding = encoding_from_bpe_files(folder)
  except DataError as e:
    raise DataError(f'{source}={e}') from e
  if encoding.n_vocab != GPT2_VOCAB_SIZE or encoding.eot_token != GPT2_VOCAB_SIZE - 1:
    raise DataError(f'{source}={folder}: {encoding.n_vocab} tokens with {ENDOFTEXT}='
                    f'{encoding.eot_token}; GPT-2 has {GPT2_VOCAB_SIZE} with {ENDOFTEXT}='
                    f'{GPT2_VOCAB_SIZE - 1}')
  return Gpt2Tokenizer(encoding)


def gpt2(bpe_dir: str = '') -> Gpt2Tokenizer:
  """GPT-2's BPE: from local files when `bpe_dir` (data.gpt2_bpe_dir) or $TWIST_GPT2_BPE_DIR
  names a folder, else tiktoken's gpt2 encoding (fetched once, or from TIKTOKEN_CACHE_DIR).
  Both give the same ids, so tokenised corpora are cached under one name."""
  folder, source = _bpe_dir(bpe_dir)
  if folder:
    return gpt2_from_folder(folder, source)
  import tiktoken  # pylint: disable=g-import-not-at-top  (keeps `import twist_jax.data` fast)
  try:
    return Gpt2Tokenizer(tiktoken.get_encoding('gpt2'))
  except Exception as e:  # requests/urllib errors differ by setup; the advice does not
    cache_dir = os.environ.get('TIKTOKEN_CACHE_DIR', '(unset)')
    raise DataError(
        f'data.tokenizer=gpt2: could not load the gpt2 BPE files ({type(e).__name__}); set '
        f'TIKTOKEN_CACHE_DIR (now {cache_dir}) to a folder holding the cached gpt2 files, '
        f'or data.gpt2_bpe_dir (or {GPT2_BPE_DIR_ENV}) to a folder holding '
        f'{" and ".join(GPT2_BPE_FILES)}, or go online') from e


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
    files.atomic_write(path, lambda tmp: tok.save(tmp))
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
