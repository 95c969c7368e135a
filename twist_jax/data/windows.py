"""Packing a token stream into windows of L+1 tokens (stride L) and the resumable train iterator.

Window i of a split is tokens[i*L : i*L + L + 1]: inputs are its first L tokens, targets its
last L, so consecutive windows predict every token after the first exactly once.
"""

import numpy as np

from twist_jax.errors import DataError

_STATE_VERSION = 1


def num_windows(num_tokens: int, context: int) -> int:
  return max(num_tokens - 1, 0) // context


def gather_windows(tokens: np.ndarray, index: np.ndarray, context: int) -> np.ndarray:
  """int32 windows `index` (any shape ...) -> (..., L+1)."""
  starts = np.asarray(index, np.int64)[..., None] * context
  return np.asarray(tokens[starts + np.arange(context + 1)], np.int32)


def validation_windows(tokens: np.ndarray, context: int, max_windows: int | None = None):
  """All non-overlapping windows of a split in order (the first `max_windows` if given)."""
  count = num_windows(len(tokens), context)
  if count == 0:
    raise DataError(f'validation split has {len(tokens)} tokens; a window needs {context + 1}')
  if max_windows is not None:
    count = min(count, max_windows)
  return gather_windows(tokens, np.arange(count), context)


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
  """The window order of one epoch: a permutation drawn from (seed, epoch) alone."""
  return np.random.default_rng([seed, epoch]).permutation(count)


class TrainIterator:
  """Endless (W, B, L+1) int32 batches of shuffled training windows, resumable exactly.

  Each epoch permutes all windows with `epoch_order(seed, epoch)` and deals them out W*B at a
  time: step k of an epoch takes permuted positions [k*W*B, (k+1)*W*B) reshaped to (W, B), so
  within an epoch no window reaches two workers (or one worker twice). The leftover
  (windows mod W*B) is skipped that epoch; the next epoch reshuffles everything. Batches depend
  only on (tokens, seed, W, B, L); the state is the (epoch, step) position.
  """

  def __init__(self, tokens: np.ndarray, *, num_workers: int, batch_size: int, context: int,
               seed: int):
    self._tokens = tokens
    self._shape = (num_workers, batch_size)
    self._context, self._seed = context, seed
    self._count = num_windows(len(tokens), context)
    if self._count < num_workers * batch_size:
      raise DataError(
          f'train split has {self._count} windows of {context + 1} tokens but one step needs '
          f'num_workers*batch_size = {num_workers}*{batch_size} = {num_workers * batch_size}; '
          'use more data or a smaller context, batch or worker count')
    self._epoch, self._step = 0, 0
    self._order = (None, None)  # (epoch, permutation): the permutation is reused all epoch

  @property
  def steps_per_epoch(self) -> int:
    return self._count // (self._shape[0] * self._shape[1])

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    if self._step == self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    if self._order[0] != self._epoch:
      self._order = (self._epoch, epoch_order(self._seed, self._epoch, self._count))
    per_step = self._shape[0] * self._shape[1]
    index = self._order[1][self._step * per_step:(self._step + 1) * per_step]
    self._step += 1
    return gather_windows(self._tokens, index.reshape(self._shape), self._context)

  def _settings(self) -> dict:
    return {'seed': self._seed, 'num_workers': self._shape[0], 'batch_size': self._shape[1],
            'context': self._context, 'num_windows': self._count}

  def get_state(self) -> dict:
    """A small JSON-serialisable dict; `set_state` of it continues exactly from here."""
    return {'version': _STATE_VERSION, **self._settings(), 'epoch': self._epoch,
            'step': self._step}

  def set_state(self, state: dict) -> None:
    mismatched = {k: (state.get(k), v) for k, v in self._settings().items() if state.get(k) != v}
    if state.get('version') != _STATE_VERSION or mismatched:
      raise DataError(f'data iterator state does not match this data/config: (saved, now) = '
                      f'{mismatched or {"version": (state.get("version"), _STATE_VERSION)}}')
    self._epoch, self._step = int(state['epoch']), int(state['step'])
