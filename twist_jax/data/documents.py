"""Plain-Python document readers behind the tfds builders: stdlib docs and source, text files,
WikiText (official zip or Hugging Face parquet).

A document is a `(name, text)` pair; the name only feeds the deterministic train/validation hash.
"""

import ast
import glob
import hashlib
import os
import pathlib
import re
import sysconfig
import zipfile

import tqdm

from twist_jax.errors import DataError

Document = tuple[str, str]

# Folders of the stdlib that hold tests or third-party code rather than library docs.
_SKIP_DIRS = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
                        '__pycache__'})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Definitions only nest inside statements, so the walk skips expressions (most of the tree).
_BLOCK_NODES = (ast.stmt, ast.excepthandler, ast.match_case)
# pydoc's topic help is a dict of language-reference pages: one document per topic.
_PYDOC_TOPICS = 'pydoc_data/topics.py'
# python_source keeps out of training any module quoting a python_docs validation paragraph of
# at least this many characters.
SHARED_PARAGRAPH = 200
# A top-level WikiText heading is ' = Title = '; sections are ' = = Title = = '.
_WIKI_HEADING = re.compile(r'^ = (?!=).* = $', re.MULTILINE)


def unit_hash(name: str) -> float:
  """A stable, platform-independent hash of `name` in [0, 1)."""
  digest = hashlib.sha256(name.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def split_documents(docs: list[Document], val_fraction: float) -> dict[str, list[Document]]:
  """Train/validation split by a hash of each document's name, keeping input order.

  Documents whose hash is below `val_fraction` go to validation. Both splits are kept non-empty:
  with >= 2 documents the count is clamped to [1, n-1] (taking the lowest hashes); a single
  document is cut at the line nearest to its last `val_fraction` of characters.
  """
  if len(docs) == 1:
    return _split_tail(docs[0], val_fraction)
  ranked = sorted(range(len(docs)), key=lambda i: (unit_hash(docs[i][0]), i))
  num_val = sum(unit_hash(name) < val_fraction for name, _ in docs)
  val = set(ranked[:min(max(num_val, 1), len(docs) - 1)])
  return {'train': [d for i, d in enumerate(docs) if i not in val],
          'validation': [d for i, d in enumerate(docs) if i in val]}


def _split_tail(doc: Document, val_fraction: float) -> dict[str, list[Document]]:
  name, text = doc
  cut = round(len(text) * (1 - val_fraction))
  newline = text.rfind('\n', 0, cut)
  cut = newline + 1 if newline > 0 else cut
  return {'train': [(name, text[:cut])], 'validation': [(name, text[cut:])]}


# --- python_docs: the running interpreter's standard library ---------------------------------


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stdlib_files(root: pathlib.Path) -> list[pathlib.Path]:
  """Sorted .py/.rst/.txt files of the stdlib, without site-packages and test folders."""
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    found += [pathlib.Path(folder, f) for f in sorted(files)
              if f.endswith(('.py', '.rst', '.txt')) and not f.startswith('test_')]
  return found


def docstrings(tree: ast.AST):
  """Docstrings of a module, its classes and functions, in source order."""
  if isinstance(tree, _DOC_NODES) and (doc := ast.get_docstring(tree)):
    yield doc
  for child in ast.iter_child_nodes(tree):
    if isinstance(child, _BLOCK_NODES):
      yield from docstrings(child)


def python_source_documents(name: str, source: bytes) -> list[Document]:
  """One document of docstrings per module (one per topic for pydoc's topics); parse, no import."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):  # a few stdlib files are deliberately invalid
    return []
  if name == _PYDOC_TOPICS:
    topics = next((n for n in ast.walk(tree) if isinstance(n, ast.Dict)), None)
    return [(f'{name}:{k.value}', v.value) for k, v in zip(topics.keys, topics.values)
            if isinstance(v, ast.Constant) and isinstance(v.value, str)] if topics else []
  return [(name, '\n\n'.join(docstrings(tree)))]


def stdlib_documents() -> list[Document]:
  """English docs of the running Python's stdlib: docstrings plus the .rst/.txt files."""
  root, docs = stdlib_root(), []
  for path in tqdm.tqdm(stdlib_files(root), desc='python_docs: reading stdlib', unit='file',
                        mininterval=1.0, leave=False):
    name = path.relative_to(root).as_posix()
    if path.suffix == '.py':
      docs += python_source_documents(name, path.read_bytes())
    else:
      docs.append((name, path.read_text('utf-8', errors='replace')))
  return [(name, text) for name, text in docs if text.strip()]


# --- python_source: the same stdlib's code ----------------------------------------------------


def stdlib_source_documents() -> list[Document]:
  """The full text of the running Python's stdlib `.py` files, one document per module.

  Same files as python_docs' modules (no tests, no site-packages) and the same names, so a module
  falls on the same side of the name-hash split in both corpora: at equal `val_fraction`, no
  python_docs validation docstring is python_source training text. pydoc's topics file is left
  out, because python_docs splits it per topic.
  """
  root, docs = stdlib_root(), []
  for path in tqdm.tqdm(stdlib_files(root), desc='python_source: reading stdlib', unit='file',
                        mininterval=1.0, leave=False):
    name = path.relative_to(root).as_posix()
    if path.suffix == '.py' and name != _PYDOC_TOPICS:
      docs.append((name, path.read_text('utf-8', errors='replace')))
  return [(name, text) for name, text in docs if text.strip()]


def split_source_like_docs(source: list[Document], docs: list[Document],
                           val_fraction: float) -> dict[str, list[Document]]:
  """python_source's split: by name hash as python_docs is (same names, same side), then any
  training module that quotes a paragraph (>= SHARED_PARAGRAPH characters) of a python_docs
  validation document moves to validation too (a few stdlib modules copy each other's
  docstrings)."""
  splits = split_documents(source, val_fraction)
  held_out = [p for _, text in split_documents(docs, val_fraction)['validation']
              for p in text.split('\n\n') if len(p) >= SHARED_PARAGRAPH]
  quotes = lambda text: any(p in text for p in held_out)
  moved = [d for d in splits['train'] if quotes(d[1])]
  return {'train': [d for d in splits['train'] if d not in moved],
          'validation': splits['validation'] + moved}


# --- text_files: the user's own files -------------------------------------------------------


def match_files(pattern: str) -> list[str]:
  """Sorted regular files matching a (recursive) glob; DataError when there are none."""
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise DataError(f"data.files: no files match the glob '{pattern}'")
  return [os.path.abspath(p) for p in paths]


def text_file_documents(paths: list[str]) -> list[Document]:
  """Each non-empty file is one document, named by its path below the files' common folder."""
  root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
  docs = [(os.path.relpath(p, root), pathlib.Path(p).read_text('utf-8', errors='replace'))
          for p in paths]
  docs = [(name, text) for name, text in docs if text.strip()]
  if not docs:
    raise DataError(f'data.files: all {len(paths)} matched files are empty (first: {paths[0]})')
  return docs


# --- wikitext2 / wikitext103: the official raw archive or Hugging Face's parquet copy ---------

WIKITEXT_RAW_FILES = {'train': 'wiki.train.raw', 'validation': 'wiki.valid.raw',
                      'test': 'wiki.test.raw'}
# Hugging Face shard names: 'train-00000-of-00002.parquet'.
_PARQUET_SHARD = re.compile(r'^(train|validation|test)-(\d+)-of-(\d+)\.parquet$')
# A raw WikiText file writes an empty line as one space; Hugging Face's rows hold '' for it.
_RAW_BLANK_LINE = ' \n'

WikitextSource = str | dict[str, list[str]]  # zip or extracted folder | {split: parquet shards}


def wikitext_articles(raw: str) -> list[str]:
  """Cut a raw WikiText file into articles at its top-level ' = Title = ' headings.

  Pieces are contiguous, so their concatenation is the file; text before the first heading
  stays with the first article.
  """
  starts = [m.start() for m in _WIKI_HEADING.finditer(raw)][1:]
  pieces = [raw[a:b] for a, b in zip([0] + starts, starts + [len(raw)])]
  return [p for p in pieces if p.strip()]


def find_wikitext(folder: str, config: str) -> WikitextSource | None:
  """What `folder` holds of WikiText `config` (e.g. 'wikitext-103-raw-v1'), or None.

  First the official `{config}.zip` or the folder it extracts to (`wikitext-103-raw`), as a path;
  else Hugging Face's parquet shards (dataset Salesforce/wikitext, config `config`) in
  `folder/{config}/` or loosely in `folder`, as {split: shard paths in order}. A shard set with
  a gap (an interrupted download) is a DataError naming what is missing.
  """
  for name in (f'{config}.zip', config.removesuffix('-v1')):
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  for where in (os.path.join(folder, config), folder):
    shards = _parquet_shards(where)
    if shards:
      return shards
  return None


def _parquet_shards(folder: str) -> dict[str, list[str]] | None:
  found: dict[str, dict[int, str]] = {}
  totals: dict[str, set[int]] = {}
  for path in glob.glob(os.path.join(folder, '*.parquet')):
    if m := _PARQUET_SHARD.match(os.path.basename(path)):
      found.setdefault(m[1], {})[int(m[2])] = path
      totals.setdefault(m[1], set()).add(int(m[3]))
  if not found:
    return None
  for split in WIKITEXT_RAW_FILES:
    total = max(totals.get(split, {1}))
    missing = [i for i in range(total) if i not in found.get(split, {})]
    if missing:
      raise DataError(f'wikitext: {folder} lacks {split}-{missing[0]:05d}-of-{total:05d}.parquet '
                      f'({len(missing)} of the {split} shards missing)')
  return {split: [found[split][i] for i in sorted(found[split])] for split in WIKITEXT_RAW_FILES}


def read_wikitext_split(source: WikitextSource, split: str) -> str:
  """The raw text of `split` (train | validation | test) from what `find_wikitext` found.

  Parquet rows are the raw file's lines; its blank lines come back as ' \n', so both formats
  give the same text.
  """
  if isinstance(source, dict):
    return ''.join(parquet_lines(path) for path in source[split])
  filename = WIKITEXT_RAW_FILES[split]
  if os.path.isdir(source):
    paths = glob.glob(os.path.join(source, '**', filename), recursive=True)
    if not paths:
      raise DataError(f'wikitext: no {filename} under {source}')
    return pathlib.Path(paths[0]).read_text('utf-8')
  with zipfile.ZipFile(source) as zf:
    members = [m for m in zf.namelist() if m.endswith('/' + filename) or m == filename]
    if not members:
      raise DataError(f'wikitext: archive {source} has no {filename}')
    return zf.read(members[0]).decode('utf-8')


def parquet_lines(path: str) -> str:
  """A Hugging Face WikiText shard's `text` rows joined back into raw-file lines.

  Hugging Face made a row of each line of the raw file, newline kept, and an empty row of each
  blank line (the raw files write those as one space), so this is the raw text again.
  """
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel  (only wikitext needs it)

  try:
    table = pq.read_table(path)
  except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
    raise DataError(f'wikitext: {path} is not a readable parquet file ({e})') from e
  if 'text' not in table.column_names:
    raise DataError(f'wikitext: {path} has no text column (columns: {table.column_names})')
  rows = table.column('text').to_pylist()
  return ''.join(row or _RAW_BLANK_LINE for row in rows)
