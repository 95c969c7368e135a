"""tfds builders for the built-in corpora: one `text` string per document, written as array_record.

Imported only when a corpus must be built or read, because importing tfds costs ~0.3 s.
"""

import dataclasses
import os

from etils import epath
import tensorflow_datasets as tfds

from twist_jax.data import documents
from twist_jax.errors import DataError

WIKITEXT_URLS = {
    'wikitext2': 'https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip',
    'wikitext103': 'https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip',
}
_WIKITEXT_FILES = {'train': 'wiki.train.raw', 'validation': 'wiki.valid.raw',
                   'test': 'wiki.test.raw'}


@dataclasses.dataclass
class SplitConfig(tfds.core.BuilderConfig):
  """A corpus split by document-name hash; `paths` lists the inputs (text_files only)."""
  val_fraction: float = 0.05
  paths: tuple[str, ...] = ()


def _text_info(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetInfo:
  # Shuffling off: records keep generation order, so corpora read back in document order.
  return tfds.core.DatasetInfo(
      builder=builder, description=builder.__doc__, disable_shuffling=True,
      features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))


class _HereCodePath:
  """Points tfds at this file directly: its own lookup goes through importlib resources and
  fails (wanting the `importlib_resources` backport) when twist_jax is a namespace package."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


def _examples(docs: list[documents.Document]):
  for i, (_, text) in enumerate(docs):
    yield i, {'text': text}


class _SplitCorpus(_HereCodePath, tfds.core.GeneratorBasedBuilder):
  """A corpus of named documents split by name hash; subclasses say where the documents come
  from."""

  VERSION = tfds.core.Version('1.0.0')

  def _documents(self) -> list[documents.Document]:
    raise NotImplementedError

  def _split(self, docs, val_fraction):
    return documents.split_documents(docs, val_fraction)

  def _info(self):
    return _text_info(self)

  def _split_generators(self, dl_manager):
    splits = self._split(self._documents(), self.builder_config.val_fraction)
    return {split: self._generate_examples(split_docs) for split, split_docs in splits.items()}

  def _generate_examples(self, docs):
    return _examples(docs)


class TwistPythonDocs(_SplitCorpus):
  """Docstrings and doc files of the running Python's standard library (no download)."""

  def _documents(self):
    return documents.stdlib_documents()


class TwistPythonSource(_SplitCorpus):
  """The running Python's standard-library source code, one module a document (no download)."""

  def _documents(self):
    return documents.stdlib_source_documents()

  def _split(self, docs, val_fraction):
    return documents.split_source_like_docs(docs, documents.stdlib_documents(), val_fraction)


class TwistTextFiles(_SplitCorpus):
  """The user's text files, one document each."""

  def _documents(self):
    return documents.text_file_documents(list(self.builder_config.paths))


class TwistWikitext(_HereCodePath, tfds.core.GeneratorBasedBuilder):
  """WikiText raw (Merity et al. 2016), one document per article (top-level heading)."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in WIKITEXT_URLS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put wikitext-2-raw-v1.zip / wikitext-103-raw-v1.zip here.'

  def _info(self):
    return _text_info(self)

  def _split_generators(self, dl_manager):
    archive = self._archive(dl_manager)
    return {split: self._generate_examples(archive, filename)
            for split, filename in _WIKITEXT_FILES.items()}

  def _generate_examples(self, archive, filename):
    raw = documents.read_wikitext_split(archive, filename)
    for i, article in enumerate(documents.wikitext_articles(raw)):
      yield i, {'text': article}

  def _archive(self, dl_manager) -> str:
    """The zip (or extracted folder) from the manual dir if one is set, else downloaded."""
    url = WIKITEXT_URLS[self.builder_config.name]
    zip_name = url.rsplit('/', 1)[1]
    manual = _manual_dir(dl_manager)
    if manual:
      for candidate in (zip_name, zip_name.replace('-v1.zip', '')):
        if os.path.exists(os.path.join(manual, candidate)):
          return os.path.join(manual, candidate)
      raise DataError(f'{self.builder_config.name}: no {zip_name} in data.manual_dir ({manual})')
    try:
      return os.fspath(dl_manager.download(url))
    except Exception as e:  # offline, proxy, HTTP error: all get the same advice
      raise DataError(
          f'{self.builder_config.name}: could not download {url} ({type(e).__name__}); '
          f'put {zip_name} in a folder and set data.manual_dir to it') from e


def _manual_dir(dl_manager) -> str | None:
  try:
    return os.fspath(dl_manager.manual_dir)
  except (AssertionError, ValueError):  # tfds' way of saying "no manual dir set / empty"
    return None
