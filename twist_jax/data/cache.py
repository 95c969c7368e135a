"""The on-disk cache: where it lives, and arrays written crash-safe (twist_jax.files)."""

import os
import pathlib

import numpy as np

# Re-exported: the tokenizer cache writes through cache.atomic_write.
from twist_jax.files import atomic_write  # noqa: F401


def data_root(data_dir: str) -> pathlib.Path:
  """`data_dir`, else $TWIST_DATA_DIR, else ~/.cache/twist_jax."""
  root = data_dir or os.environ.get('TWIST_DATA_DIR') or '~/.cache/twist_jax'
  return pathlib.Path(root).expanduser()


def save_array(path, array: np.ndarray) -> None:
  def write(tmp):
    with open(tmp, 'wb') as f:  # a file object, so np.save does not append '.npy' to tmp
      np.save(f, array)
  atomic_write(path, write)


def load_array(path) -> np.ndarray:
  # Memory-mapped: loading is instant and large corpora are paged in on demand.
  return np.load(path, mmap_mode='r')
