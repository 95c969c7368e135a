"""Packing a token stream into windows of L+1 tokens (stride L), and the grain pipeline that
deals shuffled training windows out to the workers, resumable exactly.

Window i of a split is tokens[i*L : i*L + L + 1]: inputs are its first L tokens, targets its
last L, so consecutive windows predict every token after the first exactly once.
"""

import functools

import chex
import grain
import numpy as np

from twist_jax.errors import DataError

# Saved with every checkpoint. 1 was the hand-written iterator before grain: another window
# order, so its workdirs cannot continue with this one.
_STATE_VERSION = 2
# One background thread gathers the next steps' windows while the devices train.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)


def num_windows(num_tokens: int, context: int) -> int:
  return max(num_tokens - 1, 0) // context


def gather_windows(tokens: np.ndarray, index: np.ndarray, context: int) -> np.ndarray:
  """int32 windows `index` (any shape ...) -> (..., L+1)."""
  starts = np.asarray(index, np.int64)[..., None] * context
  return np.asarray(tokens[starts + np.arange(context + 1)], np.int32)


def spread_indices(count: int, max_windows: int | None = None) -> np.ndarray:
  """Which of a split's `count` windows `validation_windows` takes, in increasing order: all,
  or with `max_windows` (> 0) fewer than count, window i * count // max_windows for i below it
  (spread evenly over the whole split, not its first part)."""
  if max_windows and max_windows < count:
    return np.arange(max_windows) * count // max_windows
  return np.arange(count)


def validation_windows(tokens: np.ndarray, context: int, max_windows: int | None = None):
  """The split's non-overlapping windows in order; with `max_windows` (> 0) at most that many,
  spread evenly over the whole split (`spread_indices`), not its first part."""
  count = num_windows(len(tokens), context)
  if count == 0:
    raise DataError(f'validation split has {len(tokens)} tokens; a window needs {context + 1}')
  return gather_windows(tokens, spread_indices(count, max_windows), context)


def _shuffle_seed(seed: int) -> int:
  """grain reshuffles epoch e with seed + e; hashing the run seed first keeps run s's epoch 1
  from being run s+1's epoch 0. Any int is a seed (SeedSequence takes only non-negative ones)."""
  return int(np.random.SeedSequence(seed % 2**64).generate_state(1)[0])


def _step_batch(tokens: np.ndarray, shape: tuple, context: int, index: np.ndarray) -> np.ndarray:
  """W*B window indices -> their (W, B, L+1) int32 windows: worker w takes row w."""
  return gather_windows(tokens, np.asarray(index).reshape(shape), context)


def train_dataset(tokens: np.ndarray, *, num_workers: int, batch_size: int, context: int,
                  seed: int) -> grain.MapDataset:
  """Endless grain dataset whose element k is step k's (W, B, L+1) int32 batch.

  Each epoch shuffles all window indices (grain reseeds the shuffle every epoch) and cuts the
  order into consecutive W*B blocks, one per step, reshaped to (W, B): within an epoch no
  window reaches two workers (or one worker twice). The leftover (windows mod W*B) is dropped
  that epoch; the next epoch reshuffles everything. Batching before `repeat` keeps every block
  inside one epoch. Element k depends only on (tokens, seed, W, B, L, k), so every process
  builds the same global batch and a resumed run reads on from step k.
  """
  count = num_windows(len(tokens), context)
  per_step = num_workers * batch_size
  if count < per_step:
    raise DataError(
        f'train split has {count} windows of {context + 1} tokens but one step needs '
        f'num_workers*batch_size = {num_workers}*{batch_size} = {per_step}; '
        'use more data or a smaller context, batch or worker count')
  gather = functools.partial(_step_batch, tokens, (num_workers, batch_size), context)
  return (grain.MapDataset.range(count).shuffle(_shuffle_seed(seed))
          .batch(per_step, drop_remainder=True).repeat(None).map(gather))


class TrainIterator:
  """Iterates `train_dataset`, checking each batch's shape, with a versioned state.

  `get_state` is grain's iterator state (the next step) plus the settings the order depends on;
  `set_state` refuses a state written with other settings or by an older data pipeline.
  """

  def __init__(self, tokens: np.ndarray, *, num_workers: int, batch_size: int, context: int,
               seed: int):
    self.dataset = train_dataset(tokens, num_workers=num_workers, batch_size=batch_size,
                                 context=context, seed=seed)
    self._it = self.dataset.to_iter_dataset(_READ_OPTIONS).__iter__()
    self._shape = (num_workers, batch_size, context + 1)
    self._settings = {'seed': seed, 'num_workers': num_workers, 'batch_size': batch_size,
                      'context': context, 'num_windows': num_windows(len(tokens), context)}

  @property
  def steps_per_epoch(self) -> int:
    return self._settings['num_windows'] // (self._shape[0] * self._shape[1])

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    batch_WxBxLp1 = next(self._it)
    chex.assert_shape(batch_WxBxLp1, self._shape)
    chex.assert_type(batch_WxBxLp1, np.int32)
    return batch_WxBxLp1

  def get_state(self) -> dict:
    """A small JSON-serialisable dict; `set_state` of it continues exactly from here."""
    return {'version': _STATE_VERSION, **self._settings, 'grain': self._it.get_state()}

  def set_state(self, state: dict) -> None:
    if state.get('version') != _STATE_VERSION:
      raise DataError(
          f'the checkpoint was written by an older data pipeline (data state version '
          f'{state.get("version")}, now {_STATE_VERSION}) whose window order this one cannot '
          'continue; start a new --workdir')
    mismatched = {k: (state.get(k), v) for k, v in self._settings.items() if state.get(k) != v}
    if mismatched:
      raise DataError(f'data iterator state does not match this data/config: (saved, now) = '
                      f'{mismatched}')
    self._it.set_state(state['grain'])
