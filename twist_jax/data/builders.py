"""tfds builders for the built-in corpora: one `text` string per document, written as array_record.

Imported only when a corpus must be built or read, because importing tfds costs ~0.3 s.
"""

import dataclasses
import os

from etils import epath
import tensorflow_datasets as tfds

from twist_jax.data import documents
from twist_jax.errors import DataError

# Builder config name -> the WikiText config: the official zip is `{config}.zip`, and Hugging
# Face's dataset HF_WIKITEXT holds the same text as parquet under `{config}/`.
WIKITEXT_CONFIGS = {'wikitext2': 'wikitext-2-raw-v1', 'wikitext103': 'wikitext-103-raw-v1'}
WIKITEXT_URL = 'https://s3.amazonaws.com/research.metamind.io/wikitext/{config}.zip'
HF_WIKITEXT = 'Salesforce/wikitext'


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
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in WIKITEXT_CONFIGS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'See docs/data.md: the official zip or the HF parquet files.'

  def _info(self):
    return _text_info(self)

  def _split_generators(self, dl_manager):
    source = self._source(dl_manager)
    return {split: self._generate_examples(source, split) for split in documents.WIKITEXT_RAW_FILES}

  def _generate_examples(self, source, split):
    raw = documents.read_wikitext_split(source, split)
    for i, article in enumerate(documents.wikitext_articles(raw)):
      yield i, {'text': article}

  def _source(self, dl_manager) -> documents.WikitextSource:
    """What data.manual_dir holds if it is set (see `wikitext_manual_help`), else a download:
    Hugging Face's parquet files first, then the official zip."""
    name = self.builder_config.name
    config = WIKITEXT_CONFIGS[name]
    manual = _manual_dir(dl_manager)
    if manual:
      found = documents.find_wikitext(manual, config)
      if found is None:
        raise DataError(f'{name}: data.manual_dir ({manual}) holds nothing usable; '
                        f'{wikitext_manual_help(config)}')
      return found
    errors = []
    try:
      return _hf_parquet(config, os.path.join(os.fspath(dl_manager.download_dir), 'hf_wikitext'))
    except Exception as e:  # offline, proxy, HTTP error: the zip is tried next
      errors.append(f'{HF_WIKITEXT}: {type(e).__name__}')
    url = WIKITEXT_URL.format(config=config)
    try:
      return os.fspath(dl_manager.download(url))
    except Exception as e:  # offline, proxy, HTTP error: all get the same advice
      errors.append(f'{url}: {type(e).__name__}')
      raise DataError(f'{name}: could not download ({"; ".join(errors)}); download it yourself '
                      f'and set data.manual_dir: {wikitext_manual_help(config)}') from e


def wikitext_manual_help(config: str) -> str:
  """One line on what data.manual_dir must hold for WikiText `config` (docs/data.md)."""
  return (f'put {config}.zip (or the {config.removesuffix("-v1")}/ folder it extracts to) in it, '
          f'or the Hugging Face parquet files of {HF_WIKITEXT} config {config} '
          f'(train-*-of-*.parquet, validation-*.parquet, test-*.parquet) in it or in its '
          f'{config}/ subfolder; see docs/data.md')


def _hf_parquet(config: str, folder: str) -> dict[str, list[str]]:
  """Downloads (or finds already downloaded) Hugging Face's parquet files of `config`."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel

  huggingface_hub.snapshot_download(HF_WIKITEXT, repo_type='dataset', local_dir=folder,
                                    allow_patterns=[f'{config}/*.parquet'])
  found = documents.find_wikitext(os.path.join(folder, config), config)
  if not isinstance(found, dict):
    raise DataError(f'{HF_WIKITEXT} has no parquet files under {config}/')
  return found


def _manual_dir(dl_manager) -> str | None:
  try:
    return os.fspath(dl_manager.manual_dir)
  except (AssertionError, ValueError):  # tfds' way of saying "no manual dir set / empty"
    return None
