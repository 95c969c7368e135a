"""GPT-2's BPE from a local folder (vocab.bpe + encoder.json), offline: hand-checked merges on a
tiny made-up vocabulary, the full-size path through `data.load`, and one-line errors."""

import json

import numpy as np
import pytest

from twist_jax import data
from twist_jax.data import tokenizers
from twist_jax.data.tokenizers import ENDOFTEXT
from twist_jax.errors import DataError, UserError


def byte_alphabet() -> list[str]:
  """GPT-2's byte -> printable character map, in id order: the printable Latin-1 bytes stand
  for themselves (ids 0..187), the other 68 bytes get the characters from U+0100 on."""
  keep = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  chars = {b: chr(b) for b in keep}
  for n, b in enumerate(b for b in range(256) if b not in chars):
    chars[b] = chr(256 + n)
  return [chars[b] for b in keep] + [chars[b] for b in range(256) if b not in keep]


def write_bpe(folder, merges, eot=True, version_line=True):
  """GPT-2-style files for `merges` (pairs of symbols): ids 0..255 are the bytes, merge k gets
  id 256 + k, and <|endoftext|> the next id."""
  folder.mkdir(parents=True, exist_ok=True)
  encoder = {c: i for i, c in enumerate(byte_alphabet())}
  for first, second in merges:
    encoder[first + second] = len(encoder)
  if eot:
    encoder[ENDOFTEXT] = len(encoder)
  header = '#version: 0.2\n' if version_line else ''
  (folder / 'vocab.bpe').write_text(header + ''.join(f'{a} {b}\n' for a, b in merges),
                                    encoding='utf-8')
  (folder / 'encoder.json').write_text(json.dumps(encoder), encoding='utf-8')
  return folder


# 'Ġ' is how GPT-2's files spell the space byte (0x20, the 33rd non-printable byte: U+0120).
TINY_MERGES = [('h', 'e'), ('l', 'l'), ('he', 'll'), ('Ġ', 'w'), ('o', 'r'), ('Ġw', 'or')]


@pytest.fixture(autouse=True)
def _private_tiktoken_cache(tmp_path, monkeypatch):
  """tiktoken copies what its loader reads into its cache; keep the tests' copies private."""
  monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'tiktoken_cache'))
  monkeypatch.delenv(tokenizers.GPT2_BPE_DIR_ENV, raising=False)


def test_byte_alphabet_is_gpt2s():
  chars = byte_alphabet()
  # Spot checks against GPT-2's encoder.json: '!' is 0, 'A' is 32, space is 'Ġ' (220), newline
  # is 'Ċ' (198).
  assert (chars[0], chars[32], chars[220], chars[198]) == ('!', 'A', 'Ġ', 'Ċ')
  assert len(set(chars)) == 256


def test_tiny_vocab_applies_merges_by_rank(tmp_path):
  enc = tokenizers.encoding_from_bpe_files(str(write_bpe(tmp_path / 'bpe', TINY_MERGES)), 'tiny')
  # By hand: 'hello' -> h e l l o -> (h,e)=256 -> (l,l)=257 -> (he,ll)=258 -> [258, 'o'=78]
  # (ASCII '!'..'~' have ids 0..93, so 'o' = 111 - 33). ' world' is one pre-token:
  # Ġ w o r l d -> (Ġ,w)=259 -> (o,r)=260 -> (Ġw,or)=261 -> [261, 'l'=75, 'd'=67].
  # '!' stays a byte (0). 'é' is the UTF-8 bytes 0xC3 0xA9: 0xA1..0xAC have ids 94..105
  # (b - 67), 0xAE..0xFF ids 106..187 (b - 68), so [0xC3 - 68, 0xA9 - 67] = [127, 102].
  assert enc.encode_ordinary('hello world!') == [258, 78, 261, 75, 67, 0]
  assert enc.encode_ordinary('é') == [127, 102]
  # Merges apply only within a pre-token: 'he ll' splits as 'he' | ' ll', so (he,ll) never
  # fires; the space is byte 0x20, the 33rd non-printable byte, id 188 + 32 = 220.
  assert enc.encode_ordinary('hell') == [258]
  assert enc.encode_ordinary('he ll') == [256, 220, 257]
  assert enc.eot_token == 262 and enc.n_vocab == 263
  for text in ['hello world!', 'é\n\tañ 日本 <|endoftext|>', '']:
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_gpt2_from_env_variable_through_load(tmp_path, monkeypatch):
  """A full-size (50257-token) GPT-2-shaped vocabulary in a folder named by the environment
  variable: data.load tokenises a corpus with it, offline (tiktoken's fetch is blocked)."""
  import tiktoken.load  # pylint: disable=g-import-not-at-top
  def offline(path):
    if '://' in path:
      raise ConnectionError(f'network is blocked in tests: {path}')
    with open(path, 'rb') as f:
      return f.read()
  monkeypatch.setattr(tiktoken.load, 'read_file', offline)
  chars = byte_alphabet()
  merges = TINY_MERGES + [(a, b) for a in chars for b in chars
                          if a + b not in {'he', 'll', 'Ġw', 'or'}][:50256 - 256 - len(TINY_MERGES)]
  monkeypatch.setenv(tokenizers.GPT2_BPE_DIR_ENV, str(write_bpe(tmp_path / 'gpt2', merges)))
  (tmp_path / 'corpus').mkdir()
  texts = ['hello world\n' * 40 + f'doc {i}' for i in range(6)]
  for i, text in enumerate(texts):
    (tmp_path / 'corpus' / f'{i}.txt').write_text(text)
  cfg = dict(name='text_files', tokenizer='gpt2', data_dir=str(tmp_path / 'cache'),
             files=str(tmp_path / 'corpus' / '*.txt'), val_fraction=0.34)
  ds = data.load(type('Cfg', (), cfg))
  assert ds.tokenizer.vocab_size == 50257 and ds.tokenizer.eot == 50256
  train = ds.tokens('train')
  assert train[-1] == 50256 and 258 in train and 261 in train
  docs = ds.tokenizer.decode(train).split(ENDOFTEXT)
  assert docs[-1] == '' and set(docs[:-1]) <= set(texts)


def test_config_field_wins_over_env_variable(tmp_path, monkeypatch):
  monkeypatch.setenv(tokenizers.GPT2_BPE_DIR_ENV, str(tmp_path / 'nowhere'))
  with pytest.raises(DataError, match=r'^data.gpt2_bpe_dir=\S*elsewhere: no such folder'):
    tokenizers.gpt2(str(tmp_path / 'elsewhere'))
  with pytest.raises(DataError, match=rf'^{tokenizers.GPT2_BPE_DIR_ENV}=\S*nowhere: no such'):
    tokenizers.gpt2()


@pytest.mark.parametrize('make, message', [
    (lambda d: d, 'no such folder'),
    (lambda d: (write_bpe(d, TINY_MERGES) / 'vocab.bpe').unlink(), 'vocab.bpe is missing'),
    (lambda d: (write_bpe(d, TINY_MERGES) / 'encoder.json').unlink(), 'encoder.json is missing'),
    (lambda d: (write_bpe(d, TINY_MERGES) / 'encoder.json').write_text('{oops'),
     'unreadable GPT-2 BPE files'),
    (lambda d: write_bpe(d, TINY_MERGES, version_line=False), 'does not match the merges'),
    (lambda d: write_bpe(d, TINY_MERGES), '263 tokens.*GPT-2 has 50257'),
])
def test_bad_folder_is_one_line_error_naming_the_field(tmp_path, make, message):
  folder = tmp_path / 'bpe'
  make(folder)
  with pytest.raises(UserError, match=f'^data.gpt2_bpe_dir={folder}: .*{message}') as err:
    tokenizers.gpt2(str(folder))
  assert '\n' not in str(err.value) and err.value.exit_code == 2
