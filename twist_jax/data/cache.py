"""The on-disk cache: where it lives and crash-safe writes (a temp file renamed into place)."""

import os
import pathlib
import uuid
from typing import Callable

import numpy as np


def data_root(data_dir: str) -> pathlib.Path:
  """`data_dir`, else $TWIST_DATA_DIR, else ~/.cache/twist_jax."""
  root = data_dir or os.environ.get('TWIST_DATA_DIR') or '~/.cache/twist_jax'
  return pathlib.Path(root).expanduser()


def atomic_write(path, write: Callable[[str], None]) -> None:
  """Calls `write(tmp)` then renames tmp to `path`, so readers never see half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # A unique name per writer: two processes building the same cache do not clobber each other.
  tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex}.tmp')
  try:
    write(str(tmp))
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def save_array(path, array: np.ndarray) -> None:
  def write(tmp):
    with open(tmp, 'wb') as f:  # a file object, so np.save does not append '.npy' to tmp
      np.save(f, array)
  atomic_write(path, write)


def load_array(path) -> np.ndarray:
  # Memory-mapped: loading is instant and large corpora are paged in on demand.
  return np.load(path, mmap_mode='r')
