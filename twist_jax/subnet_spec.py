"""What a subnet is, before any index is drawn: the run's subnet config, the static spec it
resolves to for a model (units per layer, how many each worker keeps, which layers are shared)
and the deployment spec of one extracted subnet. subnets.py draws, extracts and scatters them.
"""

import dataclasses
import math
from typing import Callable

from twist_jax.errors import ConfigError, UserError
from twist_jax.model import ModelConfig

# The unit kinds each mode samples within a layer (blocks mode samples whole blocks instead).
UNIT_KINDS = {"attn": ("head",), "mlp": ("unit",), "attn_mlp": ("head", "unit"), "blocks": ()}
MODES = tuple(UNIT_KINDS)  # attn | mlp | attn_mlp | blocks
SAMPLERS = ("cover", "uniform", "partition", "balanced")
CORRECTIONS = ("none", "mean", "norm")

@dataclasses.dataclass(frozen=True)
class SubnetConfig:
  """The `subnet` section of a run's config (validated by `config.from_configdict`)."""

  mode: str
  kappa: tuple[float, ...]  # one per layer
  shared_layers: tuple[int, ...]
  sampler: str
  correction: str
  core: float = 0.0  # nested core: the first ceil(core * U) units of a layer are always kept


@dataclasses.dataclass(frozen=True)
class SubnetSpec:
  """Static description of the subnets of one run (all Python values)."""

  mode: str
  workers: int  # S
  sampler: str
  correction: str
  head_dim: int  # K
  n_head: tuple[int, ...]  # H per layer of the full model
  n_inner: tuple[int, ...]  # F per layer of the full model
  partitioned: tuple[int, ...]  # layer ids whose units (or which as blocks) are sampled
  keep_head: tuple[int, ...]  # Hs per layer (H where heads are not partitioned)
  keep_unit: tuple[int, ...]  # Fs per layer
  keep_blocks: int  # Ns: partitioned blocks kept (blocks mode)
  core: float = 0.0  # fraction of each group's units (a prefix) in every subnet

  @property
  def n_layer(self) -> int:
    return len(self.n_head)

  @property
  def unit_kinds(self) -> tuple[str, ...]:
    return UNIT_KINDS[self.mode]

  def kept_layers(self) -> int:
    return self.n_layer - len(self.partitioned) + self.keep_blocks


def check_ratios(values, error: Callable[[object], Exception]) -> tuple[float, ...]:
  """`values` (one number or a sequence) as a tuple of floats when each is a keep ratio: a
  number (not a bool) in (0, 1]. Otherwise raises `error(value)` of the first that is not."""
  values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
  for k in values:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
      raise error(k)
  return tuple(float(k) for k in values)


def keep_count(kappa: float, total: int) -> int:
  """m = floor(kappa * U + 1/2): the one rounding rule (training, deployment, export).

  Python's round() would round halves to even (12.5 -> 12), leaving e.g. one of GPT-2 XL's 25
  heads untrained every round with kappa = 0.5 and S = 2.
  """
  return int(math.floor(kappa * total + 0.5))


def make_spec(model: ModelConfig, subnet: SubnetConfig, workers: int) -> SubnetSpec:
  """Builds the spec from the full model and a `SubnetConfig`; raises ConfigError."""
  n = model.n_layer
  kappas = tuple(subnet.kappa) if len(subnet.kappa) == n else (subnet.kappa[0],) * n
  partitioned = tuple(i for i in range(n) if i not in subnet.shared_layers)
  kinds = UNIT_KINDS[subnet.mode]
  keep_head, keep_unit = list(model.n_head), list(model.n_inner)
  for i in partitioned:
    if "head" in kinds:
      keep_head[i] = keep_count(kappas[i], model.n_head[i])
    if "unit" in kinds:
      keep_unit[i] = keep_count(kappas[i], model.n_inner[i])
    if min(keep_head[i], keep_unit[i]) < 1:
      raise ConfigError("subnet.kappa", f"kappa={kappas[i]} leaves layer {i} with zero units "
                        f"(H={model.n_head[i]}, F={model.n_inner[i]}); raise kappa")
  keep_blocks = 0
  if subnet.mode == "blocks":
    if len(set(model.n_head)) > 1 or len(set(model.n_inner)) > 1:
      raise ConfigError("subnet.mode", "blocks mode needs equal widths in every layer")
    keep_blocks = keep_count(kappas[partitioned[0]] if partitioned else 1.0, len(partitioned))
    if partitioned and keep_blocks < 1:
      raise ConfigError("subnet.kappa", f"kappa keeps zero of {len(partitioned)} blocks")
  spec = SubnetSpec(subnet.mode, workers, subnet.sampler, subnet.correction, model.head_dim,
                    tuple(model.n_head), tuple(model.n_inner), partitioned, tuple(keep_head),
                    tuple(keep_unit), keep_blocks, subnet.core)
  for layer, kind, total, keep in _groups(spec):
    if core_count(spec.core, total) > keep:
      raise ConfigError("subnet.core", f"core={spec.core} keeps {core_count(spec.core, total)} "
                        f"of {total} {kind}s of layer {layer} in every subnet, more than its "
                        f"{keep}; lower subnet.core or raise subnet.kappa")
  if subnet.sampler == "partition":
    for _, _, total, keep in _groups(spec):
      if keep * workers != total:
        raise ConfigError("subnet.sampler", f"'partition' needs kappa * workers == 1 exactly "
                          f"(got {keep} of {total} units x {workers} workers)")
  if subnet.sampler == "cover":
    _check_cover(spec, kappas)
  return spec


def core_count(core: float, total: int) -> int:
  """ceil(core * U) (rounded first, so 0.3 * 10 is 3, not 4)."""
  return int(math.ceil(round(core * total, 9)))


def _check_cover(spec: SubnetSpec, kappas) -> None:
  """With S * kappa >= 1 every unit should get a holder each round. The c = ceil(core U) core
  units are in every subnet and the sampler deals the other U - c over S (m - c) slots, so that
  needs S (m - c) >= U - c (S m >= U without a core)."""
  for layer, kind, total, keep in _groups(spec):
    kappa = kappas[layer if layer >= 0 else spec.partitioned[0]]
    s, core = spec.workers, core_count(spec.core, total)
    if s * kappa < 1 or s * (keep - core) >= total - core:
      continue
    if core and s * keep >= total:  # only the core leaves units unheld (s > 1 here)
      most = (s * keep - total) // (s - 1)  # the largest core count that still covers
      raise ConfigError("subnet.core", f"layer {layer}: core={spec.core} puts {core} of {total} "
                        f"{kind}s in every subnet, so {s} workers x {keep - core} other {kind}s "
                        f"leave {total - core - s * (keep - core)} of the other {total - core} "
                        f"untrained every round; set subnet.core <= "
                        f"{math.floor(most / total * 1e4) / 1e4:.4g} for that layer, or raise "
                        f"subnet.kappa or twist.workers")
    need = (total + s - 1) // s
    raise ConfigError("subnet.kappa", f"layer {layer}: {s} workers x {keep} of "
                      f"{total} {kind}s leave {total - s * keep} untrained every "
                      f"round; set subnet.kappa >= {(need - 0.5) / total:.4g} for that layer "
                      f"or twist.workers >= {-(-total // keep)}")


def _groups(spec: SubnetSpec):
  """(layer, kind, U, m) of every sampled unit group (blocks mode: layer -1)."""
  if spec.mode == "blocks":
    return [(-1, "block", len(spec.partitioned), spec.keep_blocks)] if spec.partitioned else []
  out = []
  for i in spec.partitioned:
    if "head" in spec.unit_kinds:
      out.append((i, "head", spec.n_head[i], spec.keep_head[i]))
    if "unit" in spec.unit_kinds:
      out.append((i, "unit", spec.n_inner[i], spec.keep_unit[i]))
  return out


# ---- deployment specs ----------------------------------------------------------------------


def check_kappa(kappa) -> tuple[float, ...] | float:
  """`kappa` unchanged when it is a keep ratio or a sequence of them; else UserError."""
  check_ratios(kappa, lambda k: UserError(f"kappa: got {k!r}; each keep ratio must be in (0, 1]"))
  return kappa


def deploy_spec(model_cfg: ModelConfig, mode: str, kappa, shared_layers=(),
                correction: str = "mean", core: float = 0.0) -> SubnetSpec:
  """The W = 1 spec of a deployed subnet; `kappa` is a float or one ratio per layer."""
  check_kappa(kappa)
  if mode not in MODES:
    raise UserError(f"mode: got {mode!r}; allowed: {', '.join(MODES)}")
  if correction not in CORRECTIONS:
    raise UserError(f"correction: got {correction!r}; allowed: {', '.join(CORRECTIONS)}")
  n = model_cfg.n_layer
  kappas = tuple(float(k) for k in kappa) if isinstance(kappa, (tuple, list)) else (
      (float(kappa),) * n)
  if len(kappas) != n:
    raise UserError(f"kappa: got {len(kappas)} values; need 1 or n_layer={n}")
  for i in shared_layers:
    if not 0 <= i < n:
      raise UserError(f"shared_layers: layer {i} is outside 0..{n - 1}")
  if mode == "blocks" and len({k for i, k in enumerate(kappas) if i not in shared_layers}) > 1:
    raise UserError(f"kappa: blocks mode keeps one fraction of the blocks; got {kappas}")
  # `uniform`: with W = 1 every sampler draws a uniformly random subset; this one says so.
  if not 0 <= core < 1:
    raise UserError(f"core: got {core!r}; must be in [0, 1)")
  sub = SubnetConfig(mode, kappas, tuple(sorted(set(shared_layers))), "uniform", correction,
                     float(core))
  return make_spec(model_cfg, sub, 1)
