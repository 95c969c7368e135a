"""The frozen, validated configuration (what `config.from_configdict` returns) and its JSON form
(a run's config.json); `config.differing_fields` compares two such forms.

Fields added after a run was made carry defaults, so older config.json files still load.
"""

import dataclasses
from typing import Any

from twist_jax.model import ModelConfig
from twist_jax.subnet_spec import SubnetConfig


@dataclasses.dataclass(frozen=True)
class TwistConfig:
  variant: str
  workers: int
  local_steps: int
  opt_state: str
  outer_lr: float
  outer_momentum: float
  devices: int
  full_workers: int = 0
  distill: float = 0.0
  distill_temperature: float = 1.0
  dense_steps: int = 0
  dense_outer: bool = False
  worker_loop: str = "vmap"


@dataclasses.dataclass(frozen=True)
class OptConfig:
  name: str
  lr: float
  warmup_steps: int
  min_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip: float


@dataclasses.dataclass(frozen=True)
class DataConfig:
  name: str
  tokenizer: str
  bpe_vocab_size: int
  data_dir: str
  files: str
  val_fraction: float
  manual_dir: str
  text_feature: str
  max_train_bytes: int
  batch_size: int
  gpt2_bpe_dir: str = ""  # defaulted: config.json files written before it existed still load
  microbatch: int = 0  # rows per gradient-accumulation microbatch; 0 = the whole batch


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int
  max_windows: int
  batch_size: int
  golden_kappas: tuple[float, ...] = (0.25, 0.5, 0.75)  # defaults: older config.json files load
  golden_samples: int = 16


@dataclasses.dataclass(frozen=True)
class CkptConfig:
  every: int
  keep: int
  on_divergence: str = "stop"
  max_rollbacks: int = 3
  allow_schedule_change: bool = False  # resume with other SCHEDULE_FIELDS (train.py)


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every: int
  progress: bool


@dataclasses.dataclass(frozen=True)
class InitConfig:
  from_run: str  # a run's workdir or a deployed model folder (same shape as `model`)
  hf: str
  teacher_run: str = ""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  n_layer: int
  n_head: int
  n_embd: int
  n_inner: int
  context: int
  dtype: str
  attention: str
  head_dim: int = 0
  remat: bool | str = False  # a model.REMAT_POLICIES name, or False / True (none / block)

  def model_config(self, vocab_size: int) -> ModelConfig:
    return ModelConfig.uniform(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                               n_inner=self.n_inner or None, head_dim=self.head_dim or None,
                               vocab_size=vocab_size,
                               n_positions=self.context, dtype=self.dtype,
                               attention=self.attention, remat=self.remat)


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  steps: int
  model: ModelSpec
  subnet: SubnetConfig
  twist: TwistConfig
  opt: OptConfig
  data: DataConfig
  eval: EvalConfig
  ckpt: CkptConfig
  log: LogConfig
  init: InitConfig
  deterministic: bool = False  # defaulted: config.json files written before it existed load


def to_dict(cfg: Config) -> dict[str, Any]:
  """JSON-ready dict of the resolved config (written to WORKDIR/config.json)."""
  return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
  """Inverse of `to_dict` (reads a run's config.json); lists become tuples."""
  tup = lambda v: tuple(v) if isinstance(v, list) else v
  sections = {f.name: f.type for f in dataclasses.fields(Config)}
  kw = {}
  for name, value in d.items():
    if isinstance(value, dict):
      cls = {"model": ModelSpec, "subnet": SubnetConfig, "twist": TwistConfig, "opt": OptConfig,
             "data": DataConfig, "eval": EvalConfig, "ckpt": CkptConfig, "log": LogConfig,
             "init": InitConfig}[name]
      kw[name] = cls(**{k: tup(v) for k, v in value.items()})
    elif name in sections:
      kw[name] = value
  return Config(**kw)
