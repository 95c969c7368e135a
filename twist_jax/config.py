"""Experiment configuration: the default ConfigDict and its validation into the frozen form
(the dataclasses in config_types).

Experiments (`experiments/*.py`) start from `default_config()` and override fields; the trainer
converts the result once with `from_configdict`, which checks every field and raises
`ConfigError` naming the field and what is allowed. `differing_fields` compares two runs'
config.json dicts.
"""

import dataclasses
import functools
import json
import math
import os

import ml_collections
from flax import traverse_util

from twist_jax import subnet_spec
from twist_jax.errors import ConfigError
from twist_jax.model import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES, ModelConfig
from twist_jax.config_types import (CkptConfig, Config, DataConfig, EvalConfig, InitConfig,
                                    LogConfig, ModelSpec, OptConfig, TwistConfig, from_dict,
                                    to_dict)
from twist_jax.subnet_spec import CORRECTIONS, MODES, SAMPLERS, SubnetConfig, check_ratios
VARIANTS = ("ddp", "true", "masked", "hybrid")
OPT_STATES = ("slice", "reset")
WORKER_LOOPS = ("vmap", "scan")
OPTIMIZERS = ("adamw", "sgd")
HEURISTICS = ("random", "first", "best_of_k", "magnitude")


def default_config() -> ml_collections.ConfigDict:
  """Every field with its default (each section's fields in its `_SECTION_defaults` below);
  experiments override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # root seed: init, data order and subnet samples all derive from it
  c.steps = 600  # optimizer steps per worker (a round is twist.local_steps of them)
  # GPU: XLA's deterministic reductions and scatter-adds, so that a rerun or a resume repeats a
  # run bit for bit (CPU runs do anyway); costs GPU speed (docs/method.md §10). Applied before
  # JAX starts its backend (launch.py does; in-process on a started GPU it is an error).
  c.deterministic = False

  c.model = _model_defaults()
  c.subnet = _subnet_defaults()
  c.twist = _twist_defaults()
  c.opt = _opt_defaults()
  c.data = _data_defaults()
  c.eval = _eval_defaults()
  c.ckpt = _ckpt_defaults()
  c.log = _log_defaults()
  c.init = _init_defaults()
  return c


def _model_defaults() -> ml_collections.ConfigDict:
  """The model's shape and how it computes."""
  m = ml_collections.ConfigDict()
  m.n_layer = 4  # N
  m.n_head = 8  # H
  m.n_embd = 128  # D
  m.n_inner = 0  # F; 0 means 4 * n_embd
  m.head_dim = 0  # K; 0 means n_embd / n_head (set it for a narrow dense control model)
  m.context = 128  # L: training window and model positions
  m.dtype = "float32"  # compute dtype (float32 | bfloat16); params are float32
  m.attention = "xla"  # xla | cudnn (GPU flash attention) | auto
  # Activation checkpointing per block (memory for recompute): none keeps everything, block
  # only each block's input, dots its weight matmuls' outputs (model.py; old runs' True/False
  # mean block/none).
  m.remat = "none"
  return m


def _subnet_defaults() -> ml_collections.ConfigDict:
  """How subnets are drawn (docs/method.md §2-§4)."""
  s = ml_collections.ConfigDict()
  s.mode = "attn"  # attn | mlp | attn_mlp | blocks (docs/method.md §2)
  s.kappa = 0.5  # keep ratio, a float or one per layer (tuple)
  s.shared_layers = ()  # blocks never partitioned (the paper: first and last two)
  s.sampler = "cover"  # cover | uniform | partition | balanced (docs/method.md §3)
  s.core = 0.0  # nested core: the first ceil(core * U) units of a layer are in every subnet
  s.correction = "mean"  # none | mean | norm: activation-shift correction (docs/method.md §4)
  return s


def _twist_defaults() -> ml_collections.ConfigDict:
  """The training variant, workers, rounds and outer step."""
  t = ml_collections.ConfigDict()
  t.variant = "ddp"  # ddp | true | masked | hybrid
  t.workers = 4  # S (W): subnets / data-parallel shards per round
  t.local_steps = 15  # R: steps between aggregations (DDP: steps per compiled call)
  t.opt_state = "slice"  # slice: Adam moments aggregated like params | reset each round
  t.outer_lr = 1.0  # outer optimizer on (central - masked mean); 1 and 0 momentum = plain TwIST
  t.outer_momentum = 0.0  # Nesterov momentum of the outer SGD (DiLoCo uses 0.9)
  t.devices = 0  # devices of the worker mesh; 0 means all local devices
  # How a device runs its workers: vmap (all at once) | scan (one after another into running
  # sums: one worker's activations and slices in memory at a time; same result up to roundoff)
  t.worker_loop = "vmap"
  # Training levers (docs/method.md §9), all off by default:
  t.full_workers = 0  # k of the S workers train the full model every round (sandwich rule)
  t.distill = 0.0  # alpha: subnet loss (1 - alpha) CE + alpha T^2 KL(round-start model || subnet)
  t.distill_temperature = 1.0  # T of the distillation softmax
  t.dense_steps = 0  # the first n steps (a multiple of R) are DDP on the same workers
  t.dense_outer = False  # warm-up rounds also take the outer step (DiLoCo) and carry its
  #                        momentum; False: plain DDP, outer buffer untouched (§9)
  return t


def _opt_defaults() -> ml_collections.ConfigDict:
  """Each worker's optimizer and learning-rate schedule."""
  o = ml_collections.ConfigDict()
  o.name = "adamw"  # adamw | sgd
  o.lr = 3e-3  # peak learning rate
  o.warmup_steps = 50
  o.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio at the last step
  o.weight_decay = 0.1  # on matrices (ndim >= 2) only
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.grad_clip = 1.0  # global-norm clip per worker step; 0 disables
  return o


def _data_defaults() -> ml_collections.ConfigDict:
  """The corpus, its tokenizer and the batches."""
  d = ml_collections.ConfigDict()
  d.name = "python_docs"  # python_docs | python_source | text_files | wikitext2 | wikitext103 | tfds:NAME
  d.tokenizer = "bytes"  # bytes | gpt2 | bpe
  d.gpt2_bpe_dir = ""  # gpt2 offline: folder with GPT-2's vocab.bpe + encoder.json; '' = the
  #                      $TWIST_GPT2_BPE_DIR folder if set, else tiktoken (network or its cache)
  d.bpe_vocab_size = 4096
  d.data_dir = ""  # cache root; '' = $TWIST_DATA_DIR or ~/.cache/twist_jax
  d.files = ""  # glob, for text_files
  d.val_fraction = 0.05
  d.manual_dir = ""  # wikitext: folder with the official zip or Hugging Face's parquet files
  #                    (docs/data.md); '' = download
  d.text_feature = "text"  # tfds catalog datasets
  d.max_train_bytes = 0  # 0 = whole training split
  d.batch_size = 8  # per worker per step
  # Rows per sequential microbatch of a worker's step (gradient accumulation, one update per
  # step, same update as the whole batch); must divide batch_size; 0 = the whole batch at once.
  d.microbatch = 0
  return d


def _eval_defaults() -> ml_collections.ConfigDict:
  """Validation during training and the golden-ticket check after it."""
  e = ml_collections.ConfigDict()
  e.every = 150  # steps between validations (at the end of the round that crosses it)
  e.max_windows = 256  # validation windows (of context + 1 tokens); 0 = all
  e.batch_size = 32
  # After training: the final model vs random subnets of subnet.mode at these ratios, on the
  # val_loss windows (WORKDIR/golden_tickets.{md,json,png}); 0 samples per ratio = skip it.
  e.golden_kappas = (0.25, 0.5, 0.75)
  e.golden_samples = 16
  return e


def _ckpt_defaults() -> ml_collections.ConfigDict:
  """Checkpoints, divergence handling and resuming."""
  k = ml_collections.ConfigDict()
  k.every = 300  # steps between checkpoints (and one at the end)
  k.keep = 2  # most recent checkpoints kept (plus the best by validation loss)
  k.on_divergence = "stop"  # NaN/Inf loss or params: stop | rollback (to the last checkpoint,
  #                           skipping the offending batches)
  k.max_rollbacks = 3  # rollbacks allowed before stopping anyway
  # Resuming with another steps / opt.lr / opt.warmup_steps / opt.min_lr_ratio (the learning-rate
  # schedule) is refused unless this is True; the change is then logged in metrics.jsonl.
  k.allow_schedule_change = False
  return k


def _log_defaults() -> ml_collections.ConfigDict:
  """Metrics lines and the progress bar."""
  g = ml_collections.ConfigDict()
  g.every = 1  # rounds between metrics lines
  g.progress = True  # tqdm progress bar
  return g


def _init_defaults() -> ml_collections.ConfigDict:
  """Where the initial parameters (and a fixed teacher) come from."""
  i = ml_collections.ConfigDict()
  i.from_run = ""  # workdir of another run: start from its latest params
  i.hf = ""  # Hugging Face GPT-2: hub id or local folder
  i.teacher_run = ""  # ddp only: a fixed teacher (run workdir or deployed folder, any width);
  #                     with twist.distill > 0 every worker distills from it
  return i


def _choice(field, value, allowed):
  if value not in allowed:
    raise ConfigError(field, f"got {value!r}; allowed: {', '.join(allowed)}")


def _positive(field, value, *, allow_zero=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ConfigError(field, f"got {value!r}; must be {'>= 0' if allow_zero else '> 0'}")


def _int(field, value, *, allow_zero=False):
  if not isinstance(value, int) or isinstance(value, bool):
    raise ConfigError(field, f"got {value!r}; must be an integer")
  _positive(field, value, allow_zero=allow_zero)


def _ratio_error(field):
  return lambda k: ConfigError(field, f"got {k!r}; each ratio must be in (0, 1]")


def _kappas(value, n_layer) -> tuple[float, ...]:
  kappas = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n_layer
  if len(kappas) != n_layer:
    raise ConfigError("subnet.kappa", f"got {len(kappas)} values; need 1 or n_layer={n_layer}")
  return check_ratios(kappas, _ratio_error("subnet.kappa"))


def _ratios(field, value) -> tuple[float, ...]:
  """A non-empty tuple of ratios in (0, 1] (one number is a tuple of one)."""
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if not values:
    raise ConfigError(field, "got (); give at least one ratio in (0, 1]")
  return check_ratios(values, _ratio_error(field))


def _section(cls, d: ml_collections.ConfigDict, name: str):
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d.keys()) - fields)
  if unknown:
    raise ConfigError(f"{name}.{unknown[0]}", f"unknown field; known: {', '.join(sorted(fields))}")
  return cls(**{k: d[k] for k in fields})


def from_configdict(c: ml_collections.ConfigDict) -> Config:
  """Validates `c` and returns the frozen Config (raises ConfigError)."""
  c = ml_collections.ConfigDict(c.to_dict())  # a private copy
  m = _model_spec(c.model)
  s = _subnet_config(c.subnet, m.n_layer)
  t = _twist_config(c.twist, c.steps)
  o = _opt_config(c.opt)
  d = _data_config(c.data)
  e = _eval_config(c.eval)
  k = _ckpt_config(c.ckpt)
  g = _section(LogConfig, c.log, "log")
  _int("log.every", g.every)
  i = _init_config(c.init, t)
  _check_top_level(c, t)
  cfg = Config(int(c.seed), int(c.steps), m, s, t, o, d, e, k, g, i,
               deterministic=c.get("deterministic", False))
  _check_subnet_sizes(cfg)
  return cfg


def _model_spec(c: ml_collections.ConfigDict) -> ModelSpec:
  m = _section(ModelSpec, c, "model")
  for f in ("n_layer", "n_head", "n_embd", "context"):
    _int(f"model.{f}", getattr(m, f))
  _int("model.n_inner", m.n_inner, allow_zero=True)
  _int("model.head_dim", m.head_dim, allow_zero=True)
  if not m.head_dim and m.n_embd % m.n_head:
    raise ConfigError("model.n_head", f"n_embd={m.n_embd} must be divisible by n_head={m.n_head}")
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.attention", m.attention, ATTENTION_IMPLS)
  if not isinstance(m.remat, bool) and not (isinstance(m.remat, str) and
                                            m.remat in REMAT_POLICIES):
    raise ConfigError("model.remat", f"got {m.remat!r}; allowed: {', '.join(REMAT_POLICIES)} "
                      "(or False / True = none / block)")
  return m


def _subnet_config(s: ml_collections.ConfigDict, n_layer: int) -> SubnetConfig:
  _choice("subnet.mode", s.mode, MODES)
  _choice("subnet.sampler", s.sampler, SAMPLERS)
  _choice("subnet.correction", s.correction, CORRECTIONS)
  shared = tuple(int(i) for i in s.shared_layers)
  for i in shared:
    if not 0 <= i < n_layer:
      raise ConfigError("subnet.shared_layers", f"layer {i} is outside 0..{n_layer - 1}")
  if not (isinstance(s.core, (int, float)) and 0 <= s.core < 1):
    raise ConfigError("subnet.core", f"got {s.core!r}; must be in [0, 1)")
  return SubnetConfig(s.mode, _kappas(s.kappa, n_layer), tuple(sorted(set(shared))), s.sampler,
                      s.correction, float(s.core))


def _twist_config(c: ml_collections.ConfigDict, steps) -> TwistConfig:
  t = _section(TwistConfig, c, "twist")
  _choice("twist.variant", t.variant, VARIANTS)
  _choice("twist.opt_state", t.opt_state, OPT_STATES)
  _choice("twist.worker_loop", t.worker_loop, WORKER_LOOPS)
  _int("twist.workers", t.workers)
  _int("twist.local_steps", t.local_steps)
  _int("twist.devices", t.devices, allow_zero=True)
  _positive("twist.outer_lr", t.outer_lr)
  if not 0 <= t.outer_momentum < 1:
    raise ConfigError("twist.outer_momentum", f"got {t.outer_momentum!r}; must be in [0, 1)")
  _check_levers(t, steps)
  return t


def _opt_config(c: ml_collections.ConfigDict) -> OptConfig:
  o = _section(OptConfig, c, "opt")
  _choice("opt.name", o.name, OPTIMIZERS)
  _positive("opt.lr", o.lr)
  _int("opt.warmup_steps", o.warmup_steps, allow_zero=True)
  for f in ("min_lr_ratio", "weight_decay", "grad_clip", "eps"):
    _positive(f"opt.{f}", getattr(o, f), allow_zero=True)
  for f in ("b1", "b2"):
    if not 0 <= getattr(o, f) < 1:
      raise ConfigError(f"opt.{f}", f"got {getattr(o, f)!r}; must be in [0, 1)")
  return o


def _data_config(c: ml_collections.ConfigDict) -> DataConfig:
  d = _section(DataConfig, c, "data")
  _int("data.batch_size", d.batch_size)
  _int("data.microbatch", d.microbatch, allow_zero=True)
  if d.microbatch and d.batch_size % d.microbatch:
    raise ConfigError("data.microbatch", f"got {d.microbatch}; must divide data.batch_size="
                      f"{d.batch_size} (or 0: the whole batch at once)")
  if not 0 < d.val_fraction < 1:
    raise ConfigError("data.val_fraction", f"got {d.val_fraction!r}; must be in (0, 1)")
  _int("data.max_train_bytes", d.max_train_bytes, allow_zero=True)
  return d


def _eval_config(c: ml_collections.ConfigDict) -> EvalConfig:
  e = _section(EvalConfig, c, "eval")
  _int("eval.every", e.every)
  _int("eval.max_windows", e.max_windows, allow_zero=True)
  _int("eval.batch_size", e.batch_size)
  _int("eval.golden_samples", e.golden_samples, allow_zero=True)
  return dataclasses.replace(e, golden_kappas=_ratios("eval.golden_kappas", e.golden_kappas))


def _ckpt_config(c: ml_collections.ConfigDict) -> CkptConfig:
  k = _section(CkptConfig, c, "ckpt")
  _int("ckpt.every", k.every)
  _int("ckpt.keep", k.keep)
  _choice("ckpt.on_divergence", k.on_divergence, ("stop", "rollback"))
  _int("ckpt.max_rollbacks", k.max_rollbacks, allow_zero=True)
  if not isinstance(k.allow_schedule_change, bool):
    raise ConfigError("ckpt.allow_schedule_change", f"got {k.allow_schedule_change!r}; must be "
                      "True or False")
  return k


def _init_config(c: ml_collections.ConfigDict, t: TwistConfig) -> InitConfig:
  i = _section(InitConfig, c, "init")
  if i.from_run and i.hf:
    raise ConfigError("init", "set at most one of init.from_run and init.hf")
  if i.teacher_run and (t.variant != "ddp" or not t.distill):
    raise ConfigError("init.teacher_run", "a fixed teacher needs twist.variant='ddp' and "
                      "twist.distill > 0 (TwIST workers distill from the round-start model)")
  return i


def _check_top_level(c: ml_collections.ConfigDict, t: TwistConfig) -> None:
  """steps, deterministic and no unknown top-level field."""
  _int("steps", c.steps)
  if not isinstance(c.get("deterministic", False), bool):
    raise ConfigError("deterministic", f"got {c.deterministic!r}; must be True or False")
  if c.steps % t.local_steps:
    raise ConfigError("steps", f"got {c.steps}; must be a multiple of twist.local_steps="
                      f"{t.local_steps}")
  known = {"seed", "steps", "deterministic", "model", "subnet", "twist", "opt", "data", "eval",
           "ckpt", "log", "init"}
  unknown = sorted(set(c.keys()) - known)
  if unknown:
    raise ConfigError(unknown[0], f"unknown field; known: {', '.join(sorted(known))}")


def _check_levers(t: TwistConfig, steps) -> None:
  """Ranges of the training levers (docs/method.md §9); mesh-dependent checks live in train."""
  _int("twist.full_workers", t.full_workers, allow_zero=True)
  if t.full_workers > t.workers:
    raise ConfigError("twist.full_workers", f"got {t.full_workers}; must be in 0..twist.workers"
                      f"={t.workers}")
  if t.variant == "hybrid" and t.full_workers > 1:
    raise ConfigError("twist.full_workers", f"got {t.full_workers}; hybrid allows 0 or 1 (its "
                      "masked worker 0 is the full worker)")
  if not (isinstance(t.distill, (int, float)) and 0 <= t.distill <= 1):
    raise ConfigError("twist.distill", f"got {t.distill!r}; must be in [0, 1]")
  _positive("twist.distill_temperature", t.distill_temperature)
  _int("twist.dense_steps", t.dense_steps, allow_zero=True)
  if t.dense_steps % t.local_steps or (isinstance(steps, int) and t.dense_steps > steps):
    raise ConfigError("twist.dense_steps", f"got {t.dense_steps}; must be a multiple of "
                      f"twist.local_steps={t.local_steps} and at most steps={steps}")
  if not isinstance(t.dense_outer, bool):
    raise ConfigError("twist.dense_outer", f"got {t.dense_outer!r}; must be True or False")


def _check_subnet_sizes(cfg: Config) -> None:
  """Every partitioned layer keeps >= 1 unit; `partition` needs kappa * S == 1 exactly."""
  if cfg.twist.variant == "ddp":
    return
  subnet_spec.make_spec(cfg.model.model_config(256), cfg.subnet, cfg.twist.workers)


@functools.cache
def _default_fields() -> dict:
  return _flat_json(to_dict(from_configdict(default_config())))


def _flat_json(d: dict) -> dict:
  return traverse_util.flatten_dict(json.loads(json.dumps(d)), sep=".")


# Older spellings of a value that mean the same run: compared as their current spelling.
_SAME_AS = {"model.remat": {False: "none", True: "block"}}


def _canonical(key: str, value):
  alias = _SAME_AS.get(key, {})
  return alias.get(value, value) if isinstance(value, bool) else value


def differing_fields(old: dict, new: dict, ignore=()) -> list[str]:
  """Dotted names of the fields where two config.json dicts differ, sorted. A field one of them
  lacks (added after it was written) counts as its default value; an older spelling of the same
  value (model.remat False = "none", True = "block") counts as the same."""
  defaults = _default_fields()
  a, b = _flat_json(old), _flat_json(new)
  value = lambda d, k: _canonical(k, d.get(k, defaults.get(k)))
  return sorted(k for k in set(a) | set(b) if value(a, k) != value(b, k) and k not in ignore)


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def apply_determinism(deterministic: bool) -> None:
  """With `deterministic`, appends DETERMINISTIC_FLAG to XLA_FLAGS (docs/method.md §10).

  XLA reads XLA_FLAGS once, when JAX starts its first backend, so this must run before anything
  touches a device. Later it is a ConfigError, unless the flag is already set or the backend is
  the CPU (whose reductions and scatters are deterministic without it).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if not deterministic or DETERMINISTIC_FLAG in flags.split():
    return
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel  (no public check)

  if not xla_bridge.backends_are_initialized():
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()
  elif jax.default_backend() != "cpu":
    raise ConfigError("deterministic", f"JAX's {jax.default_backend()} backend started before "
                      f"the flag could be set; run through launch.py, or set XLA_FLAGS="
                      f"{DETERMINISTIC_FLAG} before starting Python")


def lr_at(opt: OptConfig, total_steps: int, step):
  """Warmup then cosine decay to lr * min_lr_ratio; `step` may be traced."""
  import jax.numpy as jnp

  step = jnp.asarray(step, jnp.float32)
  warm = opt.lr * (step + 1) / max(opt.warmup_steps, 1)
  frac = jnp.clip((step - opt.warmup_steps) / max(total_steps - opt.warmup_steps, 1), 0, 1)
  cos = opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + jnp.cos(math.pi * frac))
  return jnp.where(step < opt.warmup_steps, warm, opt.lr * cos)
