"""The paper-protocol study's arms as data: the scale, the arm table, each arm's training config,
and its budget (steps, tokens, epochs and analytic training FLOPs).

Every arm fine-tunes a pretrained base (studies/bases.py) on python_docs for the same number of
tokens (the paper's protocol); what differs is the method, so FLOPs differ and are reported.
Seeds change the data order and the subnet draws, never the base: arm seed s trains with
cfg.seed = SEED_OFFSET + s (the bases were pretrained with seed 0 on another corpus). Arms of the
same seed deliberately share their data order (A0 s, B0 s, S s ... are paired); arms of different
seeds never do, and C1 (which continues from A0 s) draws an order of its own.
"""

import dataclasses
import hashlib
import json

import ml_collections

from twist_jax import config as config_lib, subnet_spec, subnets
from twist_jax.model import ModelConfig, flops_per_token

SEED_OFFSET = 1000  # fine-tune seed s is cfg.seed 1000 + s: nothing replays the base's order
C1_SEED_OFFSET = 2000  # C1 fine-tunes a pruned A0 further: a data order A0 never saw
VOCAB = 256  # python_docs with the bytes tokenizer
MODE, KAPPA = "attn_mlp", 0.5  # TwIST's subnets (the paper's settings) and the target ratio
KAPPAS = (0.25, 0.5, 0.75)  # evaluated random-subnet ratios
EVAL_SEED = 0  # one key for every arm's evaluation draws: the same subnet indices everywhere
WORKERS = 4
SPARSITIES = (0.25, 0.5, 0.75)
UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
STRUCTURED = ("struct-random", "struct-magnitude", "struct-wanda")  # smaller dense models
C1_DISTILL = 0.5  # alpha of C1's distillation from its fixed teacher (A0)

# Screening levers: one seed each, paired with B0's seed 0 (same data order).
LEVERS = {
    "sandwich": ((("twist.full_workers", 1),), "one of the 4 workers trains the full model"),
    "distill": ((("twist.distill", 0.5),), "distillation from the round-start model, alpha 0.5"),
    "nesterov": ((("twist.outer_lr", 0.7), ("twist.outer_momentum", 0.9)),
                 "outer Nesterov, lr 0.7, momentum 0.9"),
    "core": ((("subnet.core", 0.25),), "nested core 0.25"),
    "balanced": ((("subnet.sampler", "balanced"),), "balanced sampler"),
    "corr-none": ((("subnet.correction", "none"),), "activation-shift correction none"),
    "corr-norm": ((("subnet.correction", "norm"),), "activation-shift correction norm"),
}
NESTEROV = LEVERS["nesterov"][0]


def scale(quick: bool) -> dict:
  """Budgets. `steps`: every wide arm's fine-tune steps (A0 on the d128 full base ~2.8 steps/s on
  2 idle cores, `sec_per_full_step`: ~150 s plus its evaluation); a multiple of 4R so the curve's
  1/4 and 1/2 points are round ends."""
  if quick:
    return dict(steps=20, local_steps=5, batch=2, context=32, warmup=2, windows=16, samples=2,
                seeds=1, lrs=(1e-3, 3e-3), calib=8, c1_seeds=1, sec_per_full_step=0.05,
                eval_s=3.0, compile_s=5.0)
  return dict(steps=420, local_steps=15, batch=8, context=128, warmup=30, windows=512,
              samples=16, seeds=3, lrs=(3e-4, 1e-3, 3e-3), calib=64, c1_seeds=3,
              sec_per_full_step=1 / 2.8, eval_s=45.0, compile_s=15.0)


@dataclasses.dataclass(frozen=True)
class Arm:
  """One training run of the study (a table row's seed, or a grid point)."""

  label: str  # table row: A0, A0', S, B0, B-SE, B*, C1, a lever's name, grid:A0, grid:B0
  method: str  # ddp | twist | c1 (struct-Wanda-50% of A0, then DDP distilled from A0)
  seed: int = 0  # fine-tune seed index (cfg.seed = SEED_OFFSET + seed)
  lr_of: str = "A0"  # whose grid picks the learning rate (A0 or B0)
  lr: float = 0.0  # an explicit learning rate (grid points); 0 = lr_of's best
  base: str = "full"  # the base it starts from: full | half | narrow_full | narrow_half
  levers: tuple = ()  # (dotted config field, value) overrides
  dense_half: bool = False  # B-SE: twist.dense_steps = half the steps (plain DDP rounds)
  curve: bool = False  # evaluated at 1/4, 1/2 and the full budget

  @property
  def width(self) -> str:
    return "narrow" if self.base.startswith("narrow") else "wide"

  @property
  def name(self) -> str:
    """OUT/arms/<name>.json: unique per (label, width, lr, seed)."""
    slug = self.label.replace("'", "p").replace("*", "star").replace(":", "-")
    lr = f"-lr{self.lr:g}" if self.lr else ""
    return f"{slug}-{self.width}{lr}-s{self.seed}"

  @property
  def data_seed(self) -> int:
    """cfg.seed: SEED_OFFSET + seed; C1 continues from A0 seed s's weights, so it draws its own
    order (C1_SEED_OFFSET + s) instead of replaying the batches its starting point saw."""
    return (C1_SEED_OFFSET if self.method == "c1" else SEED_OFFSET) + self.seed

  @property
  def core(self) -> float:
    return float(dict(self.levers).get("subnet.core", 0.0))

  @property
  def subnet_sized(self) -> bool:
    """A dense model of the kappa = 0.5 subnet's shape (S, C1): no random subnets of it."""
    return self.base.endswith("half") or self.method == "c1"


def _seeds(s: dict, label: str, method: str, **kw) -> list[Arm]:
  return [Arm(label, method, seed, **kw) for seed in range(s["seeds"])]


def grid_arms(s: dict) -> list[Arm]:
  """The learning-rate grid at the full budget, seed 0: A0 and B0."""
  return ([Arm("grid:A0", "ddp", 0, "A0", lr, curve=True) for lr in s["lrs"]] +
          [Arm("grid:B0", "twist", 0, "B0", lr, curve=True) for lr in s["lrs"]])


def main_arms(s: dict) -> list[Arm]:
  """Every arm after the grid that does not depend on the screening's outcome."""
  arms = _seeds(s, "A0", "ddp", curve=True) + _seeds(s, "B0", "twist", lr_of="B0", curve=True)
  arms += [Arm("A0'", "ddp", 0, levers=NESTEROV)]
  arms += _seeds(s, "S", "ddp", base="half")
  arms += _seeds(s, "B-SE", "twist", lr_of="B0", dense_half=True)
  arms += [Arm(k, "twist", 0, "B0", levers=v[0]) for k, v in LEVERS.items()]
  arms += [Arm("C1", "c1", seed) for seed in range(s["c1_seeds"])]
  for label, method, base, lr_of in (("A0", "ddp", "narrow_full", "A0"),
                                     ("S", "ddp", "narrow_half", "A0"),
                                     ("B0", "twist", "narrow_full", "B0")):
    arms += _seeds(s, label, method, lr_of=lr_of, base=base)
  return arms


def bstar_arms(s: dict, levers: tuple) -> list[Arm]:
  """B* = B0 + the winning levers, three seeds; none when no lever won (B* is B0)."""
  if not levers:
    return []
  return _seeds(s, "B*", "twist", lr_of="B0", levers=levers, curve=True)


def merge_levers(winners) -> tuple:
  """The winners' overrides, merged, sorted (B*'s levers)."""
  merged = {}
  for label in winners:
    merged.update(dict(LEVERS[label][0]))
  return tuple(sorted(merged.items()))


# ---- configs -------------------------------------------------------------------------------------


def finetune_steps(s: dict, base_params: int, full_params: int) -> int:
  """Steps for the same fine-tune tokens per parameter as the wide full model (a multiple of R,
  at least one round)."""
  r = s["local_steps"]
  return r * max(1, round(s["steps"] * base_params / full_params / r))


def arm_configdict(s: dict, arm: Arm, base_dir: str, base_model: ModelConfig, steps: int,
                   lr: float, teacher_dir: str = "") -> ml_collections.ConfigDict:
  """The arm as a normal training config: python_docs, bytes, 4 workers x batch x context."""
  c = config_lib.default_config()
  c.seed = arm.data_seed
  c.steps = steps
  heads = base_model.n_head[0]
  c.model.update(n_layer=base_model.n_layer, n_embd=base_model.n_embd, n_head=heads,
                 head_dim=base_model.head_dim, n_inner=base_model.n_inner[0],
                 context=s["context"])
  c.data.update(name="python_docs", tokenizer="bytes", batch_size=s["batch"])
  variant = "true" if arm.method == "twist" else "ddp"
  c.twist.update(variant=variant, workers=WORKERS, local_steps=s["local_steps"])
  c.subnet.update(mode=MODE, kappa=KAPPA, sampler="cover", correction="mean")
  c.opt.update(lr=lr, warmup_steps=s["warmup"])  # cosine to 0.1 lr (the default)
  every = steps // 4 if arm.curve else steps
  c.eval.update(every=every, max_windows=s["windows"], golden_samples=0)
  c.ckpt.update(every=every, keep=4)  # the curve's 1/4, 1/2, 3/4 and final checkpoints
  c.log.progress = False
  c.init.from_run = base_dir
  for field, value in arm.levers:
    section, key = field.split(".")
    c[section][key] = value
  if arm.dense_half:
    c.twist.dense_steps = s["local_steps"] * (steps // (2 * s["local_steps"]))
  if c.twist.full_workers:  # full and subnet workers must each split evenly over the devices
    c.twist.devices = 1
  if arm.method == "c1":
    c.init.teacher_run = teacher_dir
    c.twist.distill = C1_DISTILL
  return c


def run_id(arm: Arm, cfg: config_lib.Config) -> str:
  """Run folder name: equal configs share one run (B* = B0 reuses B0's runs)."""
  text = json.dumps(config_lib.to_dict(cfg), sort_keys=True, default=str)
  return f"{arm.method}-{arm.base}-s{arm.seed}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


# ---- budgets -------------------------------------------------------------------------------------


def step_flops(cfg: config_lib.Config, teacher: ModelConfig | None = None) -> dict:
  """Analytic training FLOPs of one step, all W workers together: {"dense": a DDP step,
  "twist": a TwIST step} (equal for DDP). A subnet worker trains its subnet; a full worker the
  full model; a distilling worker adds its teacher's forward (a third of its training FLOPs):
  the round-start full model for TwIST, the fixed `teacher` for C1."""
  model = cfg.model.model_config(VOCAB)
  context, w = cfg.model.context, cfg.twist.workers
  tokens = cfg.data.batch_size * context  # per worker per step
  full = flops_per_token(model, context)
  fixed = flops_per_token(teacher, context) / 3 if teacher is not None else 0.0
  dense = w * tokens * (full + fixed)
  if cfg.twist.variant == "ddp":
    return {"dense": dense, "twist": dense}
  spec = subnet_spec.make_spec(model, cfg.subnet, w)
  sub = flops_per_token(subnets.subnet_model_config(model, spec), context)
  distill = full / 3 if cfg.twist.distill > 0 else 0.0
  k = cfg.twist.full_workers
  return {"dense": dense, "twist": tokens * (k * full + (w - k) * (sub + distill))}


def budget(cfg: config_lib.Config, train_tokens: int, params: int,
           teacher: ModelConfig | None = None) -> dict:
  """Steps, tokens, epochs of python_docs' train split, tokens per parameter and FLOPs."""
  per_step = step_flops(cfg, teacher)
  dense = cfg.twist.dense_steps if cfg.twist.variant != "ddp" else cfg.steps
  tokens = cfg.steps * cfg.twist.workers * cfg.data.batch_size * cfg.model.context
  flops = dense * per_step["dense"] + (cfg.steps - dense) * per_step["twist"]
  return {"steps": cfg.steps, "dense_steps": dense, "tokens": tokens,
          "epochs": tokens / train_tokens, "tokens_per_param": tokens / params,
          "flops": flops, "step_flops": per_step}
