"""The on-disk cache: where it lives, and arrays written crash-safe (twist_jax.files)."""

import contextlib
import fcntl
import os
import pathlib

import numpy as np

from twist_jax.files import atomic_write


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


@contextlib.contextmanager
def build_lock(root: pathlib.Path):
  """Holds an exclusive lock on the cache root: jobs started together build a corpus once.

  The second job waits for the first, then finds the cache filled. The lock is an advisory
  `flock` on `root/.lock`, released by the OS if its holder dies. Where no lock can be taken (a
  read-only, pre-built cache; a network filesystem without locks) loading goes on unserialised:
  every cache file is still written atomically.
  """
  with contextlib.ExitStack() as stack:  # closing the lock file releases the lock
    try:
      root.mkdir(parents=True, exist_ok=True)
      fcntl.flock(stack.enter_context(open(root / '.lock', 'a')), fcntl.LOCK_EX)
    except OSError:
      pass  # no lock to be had: go on unserialised (see above)
    yield
