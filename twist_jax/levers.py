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

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

from twist_jax import comparison, config as config_lib, evaluate, files, subnets, train
from twist_jax.baselines import __main__ as baselines_cli
from twist_jax.evaluate import runs as runs_lib
from twist_jax.model import flops_per_token

VOCAB = 256  # the built-in corpus's byte tokenizer
KAPPAS = (0.25, 0.5, 0.75)
TARGET_KAPPA = 0.5
MODE = "attn_mlp"
FT_LR = 1e-3  # comparison.py's fine-tuning learning rate
SCRATCH_LR = 3e-3  # comparison.py's from-scratch learning rate
REFERENCES = ("sparsegpt", "struct-wanda")
NOT_RUN = {"C1": "struct-Wanda-50% of A0 fine-tuned with distillation from A0: needs a "
                 "fixed-teacher student, which twist_jax does not have yet"}

# Each lever as config overrides ("dense_third": twist.dense_steps = a third of the arm's steps,
# solved with its budget). Short codes name the run folders, so equal configs share one run.
LEVERS = {
    "B1": ({"full_workers": 1}, "full_workers=1 (one worker trains the full model)"),
    "B2": ({"distill": 0.5, "distill_temperature": 1.0}, "distill=0.5, T=1"),
    "B3": ({"outer_lr": 0.7, "outer_momentum": 0.9}, "outer Nesterov lr 0.7, momentum 0.9"),
    "B4": ({"core": 0.25}, "nested core 0.25"),
    "B5": ({"dense_third": True}, "dense (DDP) first third of the steps"),
    "B6": ({"sampler": "balanced"}, "balanced sampler"),
    "B7": ({"full_workers": 1, "distill": 0.5, "distill_temperature": 1.0},
           "full_workers=1 + distill=0.5"),
}
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


def run_flops(steps: int, dense_steps: int, ddp: float, twist: float) -> float:
  return dense_steps * ddp + (steps - dense_steps) * twist


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


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def val_curve(workdir: str, dense_steps: int, ddp: float, twist: float,
              offset: float) -> list[list[float]]:
  """[[training FLOPs (incl. the base for fine-tunes), full-model validation loss], ...]."""
  out = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "val_loss" in rec:
        step = rec["step"]
        flops = run_flops(step, min(step, dense_steps), ddp, twist) + offset
        out.append([flops, rec["val_loss"]])
  return out


def _train_seconds(workdir: str) -> float:
  """Sum of the logged round times (compile included, validation and checkpoints not)."""
  total = 0.0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      total += json.loads(line).get("round_time_s", 0.0)
  return total


def evaluate_run(workdir: str, windows, kappas, samples: int, core: float,
                 subnets_too: bool = True) -> dict:
  """Full-model loss and random-subnet distributions on the shared validation windows.

  A core arm deploys core + random units ("core"); its fully random subnets are reported too.
  """
  run = runs_lib.load_runs({"arm": workdir})[0]
  full = evaluate.mean_nll(run.params, run.model, windows)
  out = {"full": full, "full_ppl": evaluate.perplexity(full), "params": run.model.num_params()}
  if not subnets_too:
    return out
  kinds = {"random": 0.0, **({"core": core} if core else {})}
  for kind, c in kinds.items():
    out[kind] = {}
    for k in kappas:
      spec = subnets.deploy_spec(run.model, MODE, k, (), run.cfg.subnet.correction, core=c)
      losses = evaluate.ratio_losses(run.params, run.model, spec, k, samples, windows,
                                     full_loss=full)
      out[kind][f"{k:g}"] = evaluate.distribution(losses)
  out["target"] = "core" if core else "random"
  return out


def run_arm(s: dict, arm: Arm, base: dict, out: str, windows, train_tokens: int) -> dict:
  """Trains (or resumes) one arm and evaluates it; skipped when OUT/arms/NAME.json holds the same
  config."""
  base_dir = os.path.join(out, "runs", "base")
  c, cfg, budget = sized_config(s, arm, base, base_dir)
  resolved = json.loads(json.dumps(config_lib.to_dict(cfg)))
  path = os.path.join(out, "arms", f"{arm.name}.json")
  saved = _read_json(path)
  if saved is not None and saved["config"] == resolved:
    print(f"[levers] {arm.label} ({arm.name}): done earlier, skipped", flush=True)
    return saved
  workdir = os.path.join(out, "runs", arm.name)
  print(f"[levers] {arm.label} ({arm.name}): {cfg.twist.variant}, {budget['steps']} steps "
        f"({budget['dense_steps']} dense), {budget['run_flops']:.3e} FLOPs", flush=True)
  t0 = time.perf_counter()
  train.train(cfg, workdir)
  t_call = time.perf_counter() - t0
  t1 = time.perf_counter()
  ev = evaluate_run(workdir, windows, KAPPAS if arm.budget == 1 else (TARGET_KAPPA,),
                    s["samples"], arm.core, subnets_too=not arm.small)
  record = {"label": arm.label, "name": arm.name, "arm": dataclasses.asdict(arm),
            "workdir": workdir, "config": resolved, **budget,
            "epochs": budget["tokens"] / train_tokens,
            "train_s": _train_seconds(workdir), "call_s": t_call,
            "eval_s": time.perf_counter() - t1, "eval": ev,
            "curve": val_curve(workdir, budget["dense_steps"], *budget["step_flops"].values(),
                               budget["flops_offset"])}
  files.write_json(path, record)
  print(f"[levers] {arm.label}: {record['train_s']:.0f} s training; full loss {ev['full']:.4f}"
        + (f", kappa 0.5 subnets {target_mean(record):.4f}" if not arm.small else ""), flush=True)
  return record


def target_mean(record: dict, kappa: float = TARGET_KAPPA) -> float:
  """Mean loss of the arm's deployed kappa subnets (core + random for a core arm)."""
  ev = record["eval"]
  return ev[ev["target"]][f"{kappa:g}"]["mean"]


# ---- the base and the reference rows -------------------------------------------------------------


def run_base(s: dict, out: str, train_tokens: int) -> dict:
  workdir = os.path.join(out, "runs", "base")
  cfg = config_lib.from_configdict(base_config(s))
  path = os.path.join(out, "arms", "base.json")
  saved = _read_json(path)
  resolved = json.loads(json.dumps(config_lib.to_dict(cfg)))
  ddp, _ = step_flops(cfg)
  f_ddp = s["finetune"]
  if saved is None or saved["config"] != resolved:
    print(f"[levers] base: ddp, {cfg.steps} steps", flush=True)
    t0 = time.perf_counter()
    train.train(cfg, workdir)
    tokens = cfg.steps * cfg.twist.workers * cfg.data.batch_size * cfg.model.context
    saved = {"label": "base", "workdir": workdir, "config": resolved, "steps": cfg.steps,
             "flops": cfg.steps * ddp, "tokens": tokens, "epochs": tokens / train_tokens,
             "train_s": _train_seconds(workdir), "call_s": time.perf_counter() - t0,
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
    saved = _read_json(path)
    if saved is None or saved.get("workdir") != os.path.abspath(a0_dir):
      print(f"[levers] reference {method} 50% of A0", flush=True)
      saved = baselines_cli._main(["--workdir", a0_dir, "--method", method, "--sparsity", "0.5",
                                   "--calib-windows", "64",
                                   "--max-windows", str(s["max_windows"])]).record
      files.write_json(path, saved)
    rows.append(saved)
  return rows


# ---- the study -----------------------------------------------------------------------------------


def seed_stats(values) -> dict:
  """mean and sample std (ddof = 1; 0 for one seed) over seeds."""
  arr = np.asarray(values, np.float64)
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
          "n": int(len(arr)), "values": [float(x) for x in arr]}


def choose_bstar(b0_losses, lever_losses: dict) -> tuple[dict, list[str], float]:
  """(combined overrides, winning arms, threshold): the levers whose kappa = 0.5 subnet mean
  loss is below B0's seed mean minus one B0 seed std, merged."""
  st = seed_stats(b0_losses)
  threshold = st["mean"] - st["std"]
  winners = [label for label, loss in lever_losses.items() if loss < threshold]
  merged = {}
  for label in winners:
    merged.update(LEVERS[label][0])
  return merged, winners, threshold


def gap_closed(l_b0: float, l_bk: float, l_a1: float) -> float:
  """(L_B0 - L_Bk) / (L_B0 - L_A1) on the mean loss of random kappa = 0.5 subnets."""
  return (l_b0 - l_bk) / (l_b0 - l_a1)


def rows_by_label(records: list[dict]) -> dict:
  out = {}
  for rec in records:
    out.setdefault(rec["label"], []).append(rec)
  return out


def summarize(rows: dict) -> dict:
  """Per label: seed stats of every reported number, budgets and gap closed."""
  l_b0 = seed_stats([target_mean(r) for r in rows["B0"]])["mean"]
  l_a1 = seed_stats([r["eval"]["full"] for r in rows["A1"]])["mean"]
  table = {}
  for label, recs in rows.items():
    entry = {"runs": [r["name"] for r in recs], "seeds": len(recs),
             "flops": seed_stats([r["flops"] for r in recs])["mean"],
             "tokens": seed_stats([r["tokens"] for r in recs])["mean"],
             "epochs": seed_stats([r["epochs"] for r in recs])["mean"],
             "train_s": seed_stats([r["train_s"] for r in recs]),
             "full": seed_stats([r["eval"]["full"] for r in recs])}
    ev = recs[0]["eval"]
    if "random" in ev:
      entry["target"] = ev["target"]
      for kind in ("random", "core"):
        if kind not in ev:
          continue
        entry[kind] = {k: {stat: seed_stats([r["eval"][kind][k][stat] for r in recs])
                           for stat in ("mean", "std", "max")} for k in ev[kind]}
      if f"{TARGET_KAPPA:g}" in ev["random"]:
        entry["target_mean"] = seed_stats([target_mean(r) for r in recs])
        entry["gap_closed"] = gap_closed(l_b0, entry["target_mean"]["mean"], l_a1)
    table[label] = entry
  return {"L_B0": l_b0, "L_A1": l_a1, "definition": "gap closed = (L_B0 - L_Bk) / (L_B0 - L_A1), "
          "L = mean loss of the arm's deployed random kappa=0.5 attn_mlp subnets (seed mean); "
          "L_A1 = the full loss of the dense model of that subnet's size (seed mean)",
          "rows": table}


def run(out: str, quick: bool = False) -> dict:
  s = scale(quick)
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  from twist_jax import data

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
  result = {"command": f"python -m twist_jax.levers --out {out}{' --quick' if quick else ''}",
            "quick": quick, "scale": s, "machine": comparison._machine(),
            "protocol": data.protocol(base_cfg.data, base_cfg.model.context),
            "windows": int(len(windows)), "samples": s["samples"], "kappas": list(KAPPAS),
            "mode": MODE, "train_split_tokens": train_tokens, "base": base,
            "levers": {k: {"overrides": v[0], "what": v[1]} for k, v in LEVERS.items()},
            "bstar": {"overrides": overrides, "winners": winners, "threshold": threshold,
                      "rule": "levers (B1..B7) whose kappa=0.5 subnet mean loss < B0 seed mean "
                              "- one B0 seed std (ddof=1), overrides merged"},
            "arms": records, "grid": grid, "references": refs, "not_run": NOT_RUN,
            "summary": summarize(rows_by_label(records)),
            "grid_summary": summarize_grid(grid),
            "study_s": time.perf_counter() - t0}
  files.write_json(os.path.join(out, "levers.json"), result)
  files.write_text(os.path.join(out, "levers.md"), markdown(result))
  plot(result, os.path.join(out, "levers.png"))
  return result


def summarize_grid(grid: list[dict]) -> dict:
  """Per grid arm: lr multiplier -> kappa 0.5 subnet mean and full loss, and the best one."""
  out = {}
  for rec in grid:
    g = out.setdefault(rec["label"], {"points": {}})
    g["points"][f"{rec['arm']['lr_mult']:g}"] = {"lr": rec["config"]["opt"]["lr"],
                                                 "target_mean": target_mean(rec),
                                                 "full": rec["eval"]["full"]}
  for g in out.values():
    g["best_lr_mult"] = min(g["points"], key=lambda m: g["points"][m]["target_mean"])
  return out


# ---- report --------------------------------------------------------------------------------------


_ORDER = ("A0", "A0'", "A1", "B0", "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B*", "B*-scratch")


def _what(label: str, r: dict) -> str:
  fixed = {"A0": "DDP", "A0'": "DDP + outer Nesterov 0.7/0.9",
           "A1": "dense model of the kappa=0.5 subnet's size, from scratch", "B0": "TwIST",
           "B*": "TwIST + " + (" + ".join(r["bstar"]["winners"]) or "no lever (= B0)"),
           "B*-scratch": "B* from scratch"}
  return fixed.get(label) or f"TwIST + {LEVERS[label][1]}"


def _pm(st: dict, digits: int = 4) -> str:
  return f"{st['mean']:.{digits}f}" + (f" ±{st['std']:.{digits}f}" if st["n"] > 1 else "")


def markdown(r: dict) -> str:
  sm = r["summary"]
  rows = sm["rows"]
  lines = ["# Training levers: TwIST random subnets vs a dense model of their size "
           "(CPU scale, built-in corpus)", "", f"Command: `{r['command']}`",
           f"Machine: {r['machine']}", "", f"Protocol: {r['protocol']}; {r['windows']} windows; "
           f"{r['samples']} random {r['mode']} subnets per kappa (one draw set for every arm).", "",
           "FLOPs are analytic training FLOPs (6 x active params + attention per token; a "
           "distilling worker adds the teacher's forward); fine-tuned arms include the DDP base "
           f"({r['base']['flops']:.3e} FLOPs, {r['base']['tokens']:,} tokens). Epochs = tokens / "
           f"train-split tokens ({r['train_split_tokens']:,}). Losses are nats/token; ± is the "
           "std over seeds; subnet std / worst are within one run (seed mean). Wall time = logged "
           "round times (compile included, validation not).", "",
           "| arm | what | seeds | FLOPs | tokens | epochs | wall s | full loss | "
           "k=0.5 subnets mean | std | worst | k=0.25 mean | k=0.75 mean | gap closed |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for label in _ORDER:
    if label not in rows:
      continue
    e = rows[label]
    cells = [label, _what(label, r), str(e["seeds"]), f"{e['flops']:.3e}", f"{e['tokens']:,.0f}",
             f"{e['epochs']:.3f}", f"{e['train_s']['mean']:.0f}", _pm(e["full"])]
    if "target_mean" in e:
      t = e[e["target"]]
      cells += [_pm(e["target_mean"]), f"{t['0.5']['std']['mean']:.4f}",
                f"{t['0.5']['max']['mean']:.4f}",
                f"{t['0.25']['mean']['mean']:.4f}" if "0.25" in t else "–",
                f"{t['0.75']['mean']['mean']:.4f}" if "0.75" in t else "–",
                f"{e['gap_closed']:.1%}"]
      if e["target"] == "core":
        cells[1] += " (subnets: core + random)"
    else:
      cells += ["–"] * 6
    lines.append("| " + " | ".join(cells) + " |")
    if "core" in e:
      rnd = e["random"]
      lines.append(f"| {label} (fully random subnets) | same run | | | | | | | "
                   f"{rnd['0.5']['mean']['mean']:.4f} | {rnd['0.5']['std']['mean']:.4f} | "
                   f"{rnd['0.5']['max']['mean']:.4f} | {rnd['0.25']['mean']['mean']:.4f} | "
                   f"{rnd['0.75']['mean']['mean']:.4f} | – |")
  for ref in r["references"]:
    lines.append(f"| {ref['method']}-50% of A0 | post-training pruning | 1 | (A0's) | | | | "
                 f"{ref['val_loss']:.4f} | – | – | – | – | – | "
                 f"{gap_closed(sm['L_B0'], ref['val_loss'], sm['L_A1']):.1%} (one model) |")
  lines += ["", f"Gap closed = (L_B0 - L_Bk) / (L_B0 - L_A1): L_B0 = {sm['L_B0']:.4f} (B0's "
            f"kappa=0.5 subnets), L_A1 = {sm['L_A1']:.4f} (A1's full loss). Core arms' targets use "
            "core + random subnets (what such a run deploys)."]
  if r["grid_summary"]:
    lines += ["", "## Learning-rate grid (1/4 of the fine-tune FLOPs, seed 0)", "",
              "| arm | lr x | lr | k=0.5 subnets mean | full loss |", "|---|---|---|---|---|"]
    for label, g in r["grid_summary"].items():
      for m, p in sorted(g["points"].items(), key=lambda kv: float(kv[0])):
        lines.append(f"| {label} | {m} | {p['lr']:g} | {p['target_mean']:.4f} | "
                     f"{p['full']:.4f} |")
  lines += ["", "## What the numbers say", "", findings(r), "", "## Not run", ""]
  lines += [f"- {k}: {v}" for k, v in r["not_run"].items()]
  return "\n".join(lines) + "\n"


def findings(r: dict) -> str:
  """One paragraph computed from the numbers (no hand-written claims)."""
  sm, rows, bs = r["summary"], r["summary"]["rows"], r["bstar"]
  b0 = rows["B0"]["target_mean"]
  out = [f"B0's random kappa=0.5 subnets average {b0['mean']:.4f} nats over {b0['n']} seed(s) "
         f"(seed std {b0['std']:.4f}); the dense model of their size (A1) reaches "
         f"{sm['L_A1']:.4f}, a gap of {b0['mean'] - sm['L_A1']:.4f}."]
  if b0["n"] < 2:
    out.append("With one B0 seed the std is 0, so any improvement counts as a win: this run "
               "checks the pipeline, not the levers.")
  singles = sorted(LEVERS, key=lambda k: rows[k]["target_mean"]["mean"])
  out.append("Single levers ranked by subnet loss: " + ", ".join(
      f"{k} {rows[k]['target_mean']['mean']:.4f} ({rows[k]['gap_closed']:+.1%})" for k in singles)
      + ".")
  if bs["winners"]:
    out.append(f"Beating B0 by more than one seed std (threshold {bs['threshold']:.4f}): "
               f"{', '.join(bs['winners'])}; B* combines {bs['overrides']} and closes "
               f"{rows['B*']['gap_closed']:.1%} of the gap (subnets {_pm(rows['B*']['target_mean'])},"
               f" full {_pm(rows['B*']['full'])}).")
  else:
    out.append(f"No lever beat B0 by more than one seed std (threshold {bs['threshold']:.4f}); "
               "B* is B0.")
  out.append(f"From scratch, B*'s recipe reaches subnets "
             f"{rows['B*-scratch']['target_mean']['mean']:.4f} (gap closed "
             f"{rows['B*-scratch']['gap_closed']:.1%}) with full loss "
             f"{rows['B*-scratch']['full']['mean']:.4f}.")
  out.append(f"Full models: A0 {rows['A0']['full']['mean']:.4f}, A0' "
             f"{rows['A0' + chr(39)]['full']['mean']:.4f}, B0 {rows['B0']['full']['mean']:.4f}, "
             f"B* {rows['B*']['full']['mean']:.4f}.")
  for ref in r["references"]:
    out.append(f"{ref['method']}-50% of A0: {ref['val_loss']:.4f}.")
  flops = [e["flops"] for e in rows.values()]
  fine = [e["flops"] for k, e in rows.items() if k not in ("A1", "B*-scratch")]
  out.append(f"Budgets: fine-tuned arms span {min(fine):.4e}..{max(fine):.4e} FLOPs "
             f"({(max(fine) - min(fine)) / min(fine):.2%}), all arms {min(flops):.4e}.."
             f"{max(flops):.4e}.")
  for label, g in r["grid_summary"].items():
    out.append(f"The lr grid's best multiplier for {label[5:]} is x{g['best_lr_mult']}" +
               (" (the lr used)." if g["best_lr_mult"] == "1" else
                " -- not the lr the full-budget arms use."))
  return " ".join(out)


def plot(r: dict, path: str) -> None:
  """Left: full-model validation loss vs training FLOPs (A0, A1, B0, B*; the base in grey) with
  the final kappa = 0.5 subnet means as markers. Right: every arm's subnet-loss distribution."""
  plt = evaluate.plots._pyplot()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
  base = np.asarray(r["base"]["curve"])
  if len(base):
    ax.plot(base[:, 0], base[:, 1], "-", color="0.6", label="DDP base")
  for i, label in enumerate(("A0", "A1", "B0", "B*")):
    for j, rec in enumerate(x for x in r["arms"] if x["label"] == label):
      # A fine-tune starts where the base ended.
      start = [] if rec["arm"]["scratch"] or not len(base) else [base[-1]]
      curve = np.asarray(start + rec["curve"])
      ax.plot(curve[:, 0], curve[:, 1], "-", color=f"C{i}", alpha=0.8,
              label=f"{label} full model" if j == 0 else None)
      if "random" in rec["eval"]:
        ax.plot([rec["flops"]], [target_mean(rec)], "v", color=f"C{i}",
                label=f"{label} kappa=0.5 subnets (mean)" if j == 0 else None)
  ax.set_xlabel("training FLOPs (analytic)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Loss vs FLOPs")
  ax.legend(fontsize=7)
  labels = [k for k in _ORDER if any(x["label"] == k and "random" in x["eval"] for x in r["arms"])]
  data = [[v for x in r["arms"] if x["label"] == k
           for v in x["eval"][x["eval"]["target"]]["0.5"]["losses"]] for k in labels]
  bx.boxplot(data, tick_labels=labels)
  bx.tick_params(axis="x", labelrotation=45)
  bx.axhline(r["summary"]["L_A1"], color="C1", ls="--", lw=1, label="A1 (dense, subnet size)")
  for i, ref in enumerate(r["references"]):
    bx.axhline(ref["val_loss"], color=f"C{5 + i}", ls=":", lw=1, label=f"{ref['method']}-50% A0")
  bx.set_ylabel("kappa=0.5 subnet loss (nats/token)")
  bx.set_title("Random kappa=0.5 subnets per arm (all seeds)")
  bx.legend(fontsize=7)
  fig.tight_layout()
  evaluate.plots.save_png(fig, path)


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
