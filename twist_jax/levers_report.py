"""The levers study's measurements and report: a finished run's validation curve, training
time and subnet-loss distributions; seed statistics, the B* rule, gap closed, the markdown table
with its computed findings, and the loss-vs-FLOPs / subnet-distribution plot (levers.py runs the
study and calls these on its records)."""

import json
import os

import numpy as np

from twist_jax import evaluate, subnets
from twist_jax.evaluate import runs as runs_lib

TARGET_KAPPA = 0.5  # the subnets every target is measured on
MODE = "attn_mlp"  # their kind

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

def target_mean(record: dict, kappa: float = TARGET_KAPPA) -> float:
  """Mean loss of the arm's deployed kappa subnets (core + random for a core arm)."""
  ev = record["eval"]
  return ev[ev["target"]][f"{kappa:g}"]["mean"]


# ---- one finished run --------------------------------------------------------------------------


def run_flops(steps: int, dense_steps: int, ddp: float, twist: float) -> float:
  return dense_steps * ddp + (steps - dense_steps) * twist


def read_json(path: str):
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


def train_seconds(workdir: str) -> float:
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


# ---- across runs -------------------------------------------------------------------------------


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


_ORDER = ("A0", "A0'", "A1", "B0", "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B*", "B*-scratch",
          "C1")


def _what(label: str, r: dict) -> str:
  fixed = {"A0": "DDP", "A0'": "DDP + outer Nesterov 0.7/0.9",
           "A1": "dense model of the kappa=0.5 subnet's size, from scratch", "B0": "TwIST",
           "B*": "TwIST + " + (" + ".join(r["bstar"]["winners"]) or "no lever (= B0)"),
           "B*-scratch": "B* from scratch",
           "C1": "struct-Wanda-50% of A0, then DDP + distillation from A0 (fixed teacher)"}
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
    elif label == "C1":  # one model of the kappa = 0.5 subnet's size
      cells += ["–"] * 5 + [f"{gap_closed(sm['L_B0'], e['full']['mean'], sm['L_A1']):.1%} "
                            "(one model)"]
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
  lines += ["", "## What the numbers say", "", findings(r)]
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
               f"{rows['B*']['gap_closed']:.1%} of the gap (subnets "
               f"{_pm(rows['B*']['target_mean'])}, full {_pm(rows['B*']['full'])}).")
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
  if "C1" in rows:
    c1 = rows["C1"]
    out.append(f"C1 (struct-Wanda-50% of A0 distilled from A0, {c1['flops']:.3e} FLOPs "
               f"including A0's) reaches {c1['full']['mean']:.4f}: one model, where B* gives a "
               f"family of random subnets averaging {rows['B*']['target_mean']['mean']:.4f}.")
  flops = [e["flops"] for e in rows.values()]
  fine = [e["flops"] for k, e in rows.items() if k not in ("A1", "B*-scratch", "C1")]
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
  for rec in (x for x in r["arms"] if x["label"] == "C1"):
    bx.axhline(rec["eval"]["full"], color="C8", ls="-.", lw=1, label="C1 (prune + distill A0)")
  bx.set_ylabel("kappa=0.5 subnet loss (nats/token)")
  bx.set_title("Random kappa=0.5 subnets per arm (all seeds)")
  bx.legend(fontsize=7)
  fig.tight_layout()
  evaluate.plots.save_png(fig, path)


