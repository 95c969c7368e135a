"""Data: tfds-built corpora, tokenizers and the packed, resumable window iterators.

`load(cfg)` returns a `Dataset`; `protocol(cfg, context)` describes the perplexity protocol.
"""

from twist_jax.data.dataset import Dataset, load, protocol
from twist_jax.data.windows import TrainIterator

__all__ = ['Dataset', 'TrainIterator', 'load', 'protocol']
