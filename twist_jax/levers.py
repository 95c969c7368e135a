"""Training levers at CPU scale: which changes to TwIST fine-tuning close the gap between its
random subnets and a dense model of the subnet's size, at equal analytic training FLOPs.

  python -m twist_jax.levers --out results/levers            # sized for ~90 min on 2 idle cores
  python -m twist_jax.levers --out /tmp/levers --quick       # every arm at a tiny budget, 1 seed

One DDP base (comparison.py's pretraining stage) is fine-tuned by every arm: A0 DDP, A0' DDP +
outer Nesterov, B0 TwIST, B1..B6 one lever each, B7 = B1 + B2, B* = the levers whose arm beat B0
by more than one B0 seed std, combined (and once from scratch); A1 is a dense model of the
kappa = 0.5 subnet's size trained from scratch on base + fine-tune FLOPs. Every arm's step count
is solved so its analytic FLOPs match A0's to within one round. Every run lives in OUT/runs/NAME
and every evaluated arm in OUT/arms/NAME.json: a rerun skips both.
"""

import dataclasses
import json
import os
import sys
import time

import jax

from twist_jax import checkpoint, comparison, config as config_lib, data, deploy, evaluate, files
from twist_jax import subnets, train
from twist_jax.baselines import __main__ as baselines_cli
from twist_jax.levers_report import (LEVERS, MODE, TARGET_KAPPA, read_json,  # noqa: F401
                                     choose_bstar, evaluate_run, gap_closed, markdown, plot,
                                     rows_by_label, run_flops, summarize, summarize_grid,
                                     target_mean, val_curve, train_seconds)
from twist_jax.model import flops_per_token

VOCAB = 256  # the built-in corpus's byte tokenizer
KAPPAS = (0.25, 0.5, 0.75)
FT_LR = 1e-3  # comparison.py's fine-tuning learning rate
SCRATCH_LR = 3e-3  # comparison.py's from-scratch learning rate
REFERENCES = ("sparsegpt", "struct-wanda")

_CODES = {"full_workers": "fw", "distill": "kd", "distill_temperature": "T", "outer_lr": "olr",
          "outer_momentum": "om", "core": "core", "dense_third": "dense3", "sampler": "samp"}
_SUBNET_FIELDS = ("core", "sampler")


def scale(quick: bool) -> dict:
  """comparison.scale plus this study's budgets: `finetune` is A0's DDP steps (the FLOPs every
  fine-tuned arm gets), `pretrain` the base's."""
  s = comparison.scale(quick)
  if quick:
    return dict(s, samples=4, seeds=dict(B0=1, Bstar=1, A1=1), grid=())
  return dict(s, pretrain=180, finetune=180, samples=32, max_windows=128,
              seeds=dict(B0=3, Bstar=3, A1=2), grid=(0.5, 1.0, 2.0), grid_fraction=0.25)


# ---- budgets -------------------------------------------------------------------------------------


def step_flops(cfg: config_lib.Config, vocab: int = VOCAB) -> tuple[float, float]:
  """(FLOPs of one DDP step, of one TwIST step) of a run, all W workers together.

  A subnet worker trains its subnet (plus the teacher's forward, a third of the full model's
  training FLOPs, when it distills); a full worker trains the full model.
  """
  model = cfg.model.model_config(vocab)
  context, w = cfg.model.context, cfg.twist.workers
  tokens = cfg.data.batch_size * context  # per worker per step
  full = flops_per_token(model, context)
  ddp = w * tokens * full
  if cfg.twist.variant == "ddp":
    return ddp, ddp
  sub = flops_per_token(subnets.subnet_model_config(model, subnets.make_spec(model, cfg.subnet, w)),
                        context)
  teacher = full / 3 if cfg.twist.distill > 0 else 0.0
  k = cfg.twist.full_workers
  return ddp, tokens * (k * full + (w - k) * (sub + teacher))


def solve_steps(target: float, ddp: float, twist: float, r: int,
                dense_fraction: float = 0.0) -> tuple[int, int]:
  """(steps, dense_steps), both multiples of R, whose FLOPs are within half a round of `target`.

  dense_steps is `dense_fraction` of the steps (rounded to a multiple of R); the TwIST rounds
  after it fill the rest of the budget.
  """
  dense = 0
  if dense_fraction:
    total = target / (dense_fraction * ddp + (1 - dense_fraction) * twist)
    dense = r * round(dense_fraction * total / r)
  rest = r * max(1, round((target - dense * ddp) / (r * twist)))
  return dense + rest, dense


# ---- arms ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arm:
  """One training run of the study (a row's seed)."""

  label: str  # table row: A0, A0', A1, B0..B7, B*, B*-scratch, grid:B0@lr, ...
  variant: str  # ddp | true
  levers: tuple  # sorted (field, value) overrides
  seed: int = 0
  scratch: bool = False  # from scratch on base + fine-tune FLOPs (else fine-tunes the base)
  small: bool = False  # the dense model of the kappa = 0.5 subnet's shape
  lr_mult: float = 1.0
  budget: float = 1.0  # fraction of the fine-tune FLOPs (the lr grid runs at 1/4)

  @property
  def name(self) -> str:
    """Run folder: equal configs get equal names (B* = B1 reuses B1's run)."""
    kind = ("small" if self.small else self.variant) + ("-scratch" if self.scratch else "-ft")
    codes = "".join(f"-{_CODES[k]}" + ("" if v is True else f"{v}") for k, v in self.levers)
    extra = (f"-lr{self.lr_mult:g}" if self.lr_mult != 1 else "") + (
        f"-b{self.budget:g}" if self.budget != 1 else "")
    return f"{kind}{codes}{extra}-s{self.seed}"

  @property
  def core(self) -> float:
    return float(dict(self.levers).get("core", 0.0))


def _levers(overrides: dict) -> tuple:
  return tuple(sorted(overrides.items()))


def _twist(label: str, overrides: dict, seed: int = 0, **kw) -> Arm:
  return Arm(label, "true", _levers(overrides), seed, **kw)


def first_arms(s: dict) -> list[Arm]:
  """Every arm that does not depend on another arm's result, in the order they run."""
  arms = [Arm("A0", "ddp", ()), Arm("A0'", "ddp", _levers(LEVERS["B3"][0]))]
  arms += [Arm("A1", "ddp", (), seed, scratch=True, small=True) for seed in range(s["seeds"]["A1"])]
  arms += [_twist("B0", {}, seed) for seed in range(s["seeds"]["B0"])]
  arms += [_twist(label, overrides) for label, (overrides, _) in LEVERS.items()]
  return arms


def bstar_arms(s: dict, overrides: dict) -> list[Arm]:
  arms = [_twist("B*", overrides, seed) for seed in range(s["seeds"]["Bstar"])]
  arms.append(_twist("B*-scratch", overrides, scratch=True))
  for label, levers in (("B0", {}), ("B*", overrides)):
    arms += [_twist(f"grid:{label}", levers, lr_mult=m, budget=s["grid_fraction"])
             for m in s["grid"]]
  return arms


def _config(s: dict, arm: Arm, steps: int, dense_steps: int, base_dir: str):
  """The arm's ConfigDict on top of comparison._config (same model, data, optimizer)."""
  p = s["pretrain"]
  lr = (SCRATCH_LR if arm.scratch else FT_LR) * arm.lr_mult
  warmup = max(p // 12, 1) if arm.scratch else max(steps // 15, 1)
  c = comparison._config(s, arm.variant, steps, lr=lr, warmup=warmup)
  c.seed = arm.seed
  if arm.small:  # the attn_mlp kappa = 0.5 subnet's shape, as comparison.py's small control
    m = s["model"]
    c.model.update(n_head=m["n_head"] // 2, head_dim=m["n_embd"] // m["n_head"],
                   n_inner=2 * m["n_embd"])
  for field, value in arm.levers:
    if field == "dense_third":
      continue
    (c.subnet if field in _SUBNET_FIELDS else c.twist)[field] = value
  c.twist.dense_steps = dense_steps
  if c.twist.full_workers:  # full and subnet workers must each split evenly over the devices
    c.twist.devices = 1
  r = s["local_steps"]
  c.eval.every = r * max(1, steps // (6 * r))  # about six points on the loss-vs-FLOPs curve
  c.eval.golden_samples = 0
  if not arm.scratch:
    c.init.from_run = base_dir
  return c


def base_config(s: dict):
  """comparison.py's DDP pretraining stage (with a validation curve)."""
  c = comparison.stages(s, "unused")["base_ddp"]
  c.eval.every = s["local_steps"] * max(1, s["pretrain"] // (6 * s["local_steps"]))
  c.eval.golden_samples = 0
  return c


def sized_config(s: dict, arm: Arm, base: dict, base_dir: str) -> tuple:
  """(ConfigDict, frozen config, budget record): steps solved for the arm's FLOPs target."""
  ft_target = base["ft_target"] * arm.budget
  target = ft_target + (base["flops"] if arm.scratch else 0.0)
  probe = config_lib.from_configdict(_config(s, arm, s["local_steps"], 0, base_dir))
  ddp, twist = step_flops(probe)
  steps, dense = solve_steps(target, ddp, twist, s["local_steps"],
                             1 / 3 if dict(arm.levers).get("dense_third") else 0.0)
  c = _config(s, arm, steps, dense, base_dir)
  cfg = config_lib.from_configdict(c)
  flops = run_flops(steps, dense, ddp, twist)
  tokens = steps * cfg.twist.workers * cfg.data.batch_size * cfg.model.context
  charged = 0.0 if arm.scratch else base["flops"]
  budget = {"steps": steps, "dense_steps": dense, "target_flops": target, "run_flops": flops,
            "flops": flops + charged, "run_tokens": tokens,
            "tokens": tokens + (0 if arm.scratch else base["tokens"]),
            "round_flops": s["local_steps"] * twist, "step_flops": {"ddp": ddp, "twist": twist},
            "flops_offset": charged}
  return c, cfg, budget


# ---- running and evaluating one arm --------------------------------------------------------------


def _saved_same(path: str, resolved: dict):
  """OUT/arms/NAME.json when it was made with the same config (fields added since at their
  defaults count as equal), else None."""
  saved = read_json(path)
  if saved is not None and not config_lib.differing_fields(saved["config"], resolved):
    return saved
  return None


def run_arm(s: dict, arm: Arm, base: dict, out: str, windows, train_tokens: int) -> dict:
  """Trains (or resumes) one arm and evaluates it; skipped when OUT/arms/NAME.json holds the same
  config."""
  _, cfg, budget = sized_config(s, arm, base, os.path.join(out, "runs", "base"))
  return _train_and_record(out, arm.label, arm.name, dataclasses.asdict(arm), cfg, budget,
                           windows, train_tokens, s["samples"], arm.core, small=arm.small,
                           kappas=KAPPAS if arm.budget == 1 else (TARGET_KAPPA,))


def _train_and_record(out: str, label: str, name: str, arm: dict, cfg, budget: dict, windows,
                      train_tokens: int, samples: int, core: float, small: bool,
                      kappas=KAPPAS) -> dict:
  resolved = json.loads(json.dumps(config_lib.to_dict(cfg)))
  path = os.path.join(out, "arms", f"{name}.json")
  saved = _saved_same(path, resolved)
  if saved is not None:
    print(f"[levers] {label} ({name}): done earlier, skipped", flush=True)
    return saved
  workdir = os.path.join(out, "runs", name)
  print(f"[levers] {label} ({name}): {cfg.twist.variant}, {budget['steps']} steps "
        f"({budget['dense_steps']} dense), {budget['run_flops']:.3e} FLOPs", flush=True)
  t0 = time.perf_counter()
  train.train(cfg, workdir)
  t_call = time.perf_counter() - t0
  t1 = time.perf_counter()
  ev = evaluate_run(workdir, windows, kappas, samples, core, subnets_too=not small)
  record = {"label": label, "name": name, "arm": arm, "workdir": workdir, "config": resolved,
            **budget, "epochs": budget["tokens"] / train_tokens,
            "train_s": train_seconds(workdir), "call_s": t_call,
            "eval_s": time.perf_counter() - t1, "eval": ev,
            "curve": val_curve(workdir, budget["dense_steps"], *budget["step_flops"].values(),
                               budget["flops_offset"])}
  files.write_json(path, record)
  print(f"[levers] {label}: {record['train_s']:.0f} s training; full loss {ev['full']:.4f}"
        + (f", kappa 0.5 subnets {target_mean(record):.4f}" if not small else ""), flush=True)
  return record


# ---- the base and the reference rows -------------------------------------------------------------


def run_base(s: dict, out: str, train_tokens: int) -> dict:
  workdir = os.path.join(out, "runs", "base")
  cfg = config_lib.from_configdict(base_config(s))
  path = os.path.join(out, "arms", "base.json")
  resolved = json.loads(json.dumps(config_lib.to_dict(cfg)))
  saved = _saved_same(path, resolved)
  ddp, _ = step_flops(cfg)
  f_ddp = s["finetune"]
  if saved is None:
    print(f"[levers] base: ddp, {cfg.steps} steps", flush=True)
    t0 = time.perf_counter()
    train.train(cfg, workdir)
    tokens = cfg.steps * cfg.twist.workers * cfg.data.batch_size * cfg.model.context
    saved = {"label": "base", "workdir": workdir, "config": resolved, "steps": cfg.steps,
             "flops": cfg.steps * ddp, "tokens": tokens, "epochs": tokens / train_tokens,
             "train_s": train_seconds(workdir), "call_s": time.perf_counter() - t0,
             "curve": val_curve(workdir, cfg.steps, ddp, ddp, 0.0)}
    files.write_json(path, saved)
  else:
    print("[levers] base: done earlier, skipped", flush=True)
  # Every fine-tuned arm gets the FLOPs of A0's `finetune` DDP steps.
  return dict(saved, ft_target=f_ddp * ddp)


def reference_rows(s: dict, a0_dir: str, out: str) -> list[dict]:
  """SparseGPT-50% and struct-Wanda-50% of A0, as comparison.py runs them."""
  rows = []
  for method in REFERENCES:
    path = os.path.join(out, "arms", f"ref-{method}.json")
    saved = read_json(path)
    if saved is None or saved.get("workdir") != os.path.abspath(a0_dir):
      print(f"[levers] reference {method} 50% of A0", flush=True)
      saved = baselines_cli._main(["--workdir", a0_dir, "--method", method, "--sparsity", "0.5",
                                   "--calib-windows", "64",
                                   "--max-windows", str(s["max_windows"])]).record
      files.write_json(path, saved)
    rows.append(saved)
  return rows


C1_DISTILL = {"distill": 0.5, "distill_temperature": 1.0}  # B2's settings


def run_c1(s: dict, base: dict, a0: dict, out: str, dataset, windows,
           train_tokens: int) -> dict:
  """C1, what a practitioner would do instead: struct-Wanda-50% of A0 (attn_mlp: the kappa = 0.5
  subnet's shape, nothing rescaled; the same model as the struct-wanda reference row), then DDP
  with distillation (alpha 0.5, T = 1) from A0 as a fixed teacher, for the fine-tune FLOPs each
  TwIST arm gets (the teacher's forward included). It starts from A0, so it is charged A0's
  FLOPs and tokens on top of its own."""
  student = os.path.join(out, "runs", "c1-student")
  if not deploy.is_deployed(student):
    print("[levers] C1: struct-Wanda-50% of A0 as the student", flush=True)
    a0_cfg, model, params = checkpoint.load_run(a0["workdir"])
    calib = baselines_cli.calibration_windows(dataset, a0_cfg, 64)  # A0 trained on it
    spec = baselines_cli.structured_spec(model, 1 - 0.5, MODE, ())
    small, small_cfg = baselines_cli.prune_structured(params, model, "wanda", spec, calib,
                                                      jax.random.key(0))
    deploy.save_deployed(student, small, small_cfg, {"source": os.path.abspath(a0["workdir"]),
                                                     "method": "struct-wanda", "sparsity": 0.5})
  arm = Arm("C1", "ddp", _levers(C1_DISTILL), small=True)

  def config(steps: int):
    c = _config(s, arm, steps, 0, student)  # init.from_run: the pruned student
    c.init.teacher_run = a0["workdir"]
    return config_lib.from_configdict(c)
  probe = config(s["local_steps"])
  teacher = config_lib.from_dict(a0["config"]).model.model_config(VOCAB)
  per_token = probe.twist.workers * probe.data.batch_size * probe.model.context
  step = step_flops(probe)[0] + per_token * flops_per_token(teacher, probe.model.context) / 3
  steps, _ = solve_steps(base["ft_target"], step, step, s["local_steps"])
  budget = {"steps": steps, "dense_steps": 0, "target_flops": base["ft_target"],
            "run_flops": steps * step, "flops": steps * step + a0["flops"],
            "run_tokens": steps * per_token, "tokens": steps * per_token + a0["tokens"],
            "round_flops": s["local_steps"] * step, "step_flops": {"ddp": step, "twist": step},
            "flops_offset": a0["flops"]}
  return _train_and_record(out, "C1", "c1-distill-s0", dataclasses.asdict(arm), config(steps),
                           budget, windows, train_tokens, s["samples"], 0.0, small=True)


# ---- the study -----------------------------------------------------------------------------------


def run(out: str, quick: bool = False) -> dict:
  s = scale(quick)
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  base_cfg = config_lib.from_configdict(base_config(s))
  dataset = data.load(base_cfg.data)
  train_tokens = int(dataset.tokens("train").size)
  windows = dataset.validation_windows(context=base_cfg.model.context,
                                       max_windows=s["max_windows"] or None)
  base = run_base(s, out, train_tokens)
  go = lambda arm: run_arm(s, arm, base, out, windows, train_tokens)
  records = [go(arm) for arm in first_arms(s)]
  rows = rows_by_label(records)
  b0 = [target_mean(r) for r in rows["B0"]]
  lever_losses = {label: target_mean(rows[label][0]) for label in LEVERS}
  overrides, winners, threshold = choose_bstar(b0, lever_losses)
  grid_arms = [a for a in bstar_arms(s, overrides) if a.label.startswith("grid:")]
  main_arms = [a for a in bstar_arms(s, overrides) if not a.label.startswith("grid:")]
  records += [go(arm) for arm in main_arms]
  grid = [go(arm) for arm in grid_arms]
  refs = reference_rows(s, os.path.join(out, "runs", first_arms(s)[0].name), out)
  records.append(run_c1(s, base, rows["A0"][0], out, dataset, windows, train_tokens))
  result = {"command": f"python -m twist_jax.levers --out {out}{' --quick' if quick else ''}",
            "quick": quick, "scale": s, "machine": comparison._machine(),
            "protocol": data.protocol(base_cfg.data, base_cfg.model.context),
            "windows": int(len(windows)), "samples": s["samples"], "kappas": list(KAPPAS),
            "mode": MODE, "train_split_tokens": train_tokens, "base": base,
            "levers": {k: {"overrides": v[0], "what": v[1]} for k, v in LEVERS.items()},
            "bstar": {"overrides": overrides, "winners": winners, "threshold": threshold,
                      "rule": "levers (B1..B7) whose kappa=0.5 subnet mean loss < B0 seed mean "
                              "- one B0 seed std (ddof=1), overrides merged"},
            "arms": records, "grid": grid, "references": refs,
            "summary": summarize(rows_by_label(records)),
            "grid_summary": summarize_grid(grid),
            "study_s": time.perf_counter() - t0}
  files.write_json(os.path.join(out, "levers.json"), result)
  files.write_text(os.path.join(out, "levers.md"), markdown(result))
  plot(result, os.path.join(out, "levers.png"))
  return result


def _main(argv) -> evaluate.Output:
  p = evaluate.OneLineParser(prog="python -m twist_jax.levers",
                             description=__doc__.splitlines()[0])
  p.add_argument("--out", default="results/levers", help="folder for levers.{md,json,png}, runs/")
  p.add_argument("--quick", action="store_true", help="every arm at a tiny budget, one seed")
  a = p.parse_args(argv)
  r = run(a.out, a.quick)
  return evaluate.Output(r, markdown(r))


def main(argv=None) -> int:
  """Usage errors and bad configs: one line on stderr, exit status 2."""
  return evaluate.run_cli(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
