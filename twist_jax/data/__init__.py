"""Data: tfds-built corpora, tokenizers and the packed windows, dealt to the workers by a
resumable grain pipeline.

`load(cfg)` returns a `Dataset`; `protocol(cfg, context)` describes the perplexity protocol.
"""

from twist_jax.data.dataset import Dataset, load, protocol
from twist_jax.data.windows import TrainIterator, train_dataset

__all__ = ['Dataset', 'TrainIterator', 'load', 'protocol', 'train_dataset']
