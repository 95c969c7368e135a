"""The paper-protocol study's report, computed from its records only: the paper-style table
(method x sparsity -> PPL, mean +- seed std), the regime line and checks, issue 18's targets
(met / missed by how much), the width trend, screening, learning-rate grid, budgets and curves;
OUT/paper.json holds every number, OUT/paper.md the tables, three PNG plots beside them.
Losses are nats per byte, PPL = exp(loss) per byte."""

import math
import os

import numpy as np

from twist_jax import files
from twist_jax.studies.paper_arms import KAPPA, KAPPAS, LEVERS, SPARSITIES, STRUCTURED

REGIME_BASES = 0.06  # the half base must trail the full one by this much (nats)
REGIME_PRUNE = 0.1  # SparseGPT-50% of A0 must cost at least this much (nats)
TARGETS = dict(ppl_ratio=0.75, vs_structured=0.1, vs_small=0.1, full_vs_a0=0.05)
TWIST_ROWS = ("B0", "B-SE", "B*")


def seed_stats(values) -> dict:
  """mean, sample std (ddof 1; 0 for one seed), n and the values."""
  x = np.asarray(values, np.float64)
  return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
          "n": int(len(x)), "values": [float(v) for v in x]}


def _ppl_stats(losses) -> dict:
  """Seed stats of exp(loss): each seed's PPL, then their mean and std."""
  return dict(seed_stats([math.exp(v) for v in losses]), loss=seed_stats(losses))


def _rows(state: dict, width: str) -> dict:
  """label -> the records of one width (B* = B0's records when no lever won)."""
  out = {}
  for rec in state["records"]:
    if rec["width"] == width:
      out.setdefault(rec["label"], []).append(rec)
  bstar = state.get("bstar")
  if bstar is not None and not bstar["winners"] and "B0" in out and width == "wide":
    out["B*"] = out["B0"]
  return out


def _sub(rec: dict, kappa: float, kind: str = "random") -> float:
  return rec["eval"][kind][f"{kappa:g}"]["mean"]


def _refs(state: dict, width: str, label: str = "A0") -> dict:
  """(method, sparsity) -> per-seed losses of the pruning references of `label`'s seeds."""
  out = {}
  for ref in state["references"].values():
    if ref["width"] == width and ref["label"] == label:
      for row in ref["rows"]:
        out.setdefault((row["method"], row["sparsity"]), []).append(row["loss"])
  return out


# ---- the paper-style table -----------------------------------------------------------------------


def paper_table(state: dict, width: str = "wide") -> list[dict]:
  """Rows: {method, what, structured, deployable, same_as, cells: {"0"|"0.25"|"0.5"|"0.75": ppl
  stats}}. Sparsity s of a random-subnet row is its kappa = 1 - s subnets; `same_as` names the
  row label whose records a row repeats (B* when no lever won: "B0"), else None."""
  rows, table = _rows(state, width), []

  def add(method, what, structured, cells, same_as=None):
    if cells:
      table.append({"method": method, "what": what, "structured": structured,
                    "deployable": structured is not False, "same_as": same_as, "cells": cells})
  bstar = state.get("bstar") or {}
  star = ("TwIST + " + " + ".join(bstar["winners"]) if bstar.get("winners") else
          "= B0 (no lever passed)")
  for label, what in (("A0", "DDP"), ("B0", "TwIST"), ("B-SE", "TwIST, dense first half"),
                      ("B*", star)):
    recs = rows.get(label, [])
    if not recs:
      continue
    same = "B0" if label == "B*" and recs is rows.get("B0") else None
    add(f"{label} full model", what, None, {"0": _ppl_stats([r["eval"]["full"] for r in recs])},
        same)
    if "random" in recs[0]["eval"]:
      add(f"{label} random subnets", f"{what}; zero-cost random attn_mlp subnets", True,
          {f"{1 - k:g}": _ppl_stats([_sub(r, k) for r in recs]) for k in KAPPAS}, same)
  refs = _refs(state, width)
  for method in ("sparsegpt", "wanda", "magnitude") + STRUCTURED:
    cells = {f"{sp:g}": _ppl_stats(refs[(method, sp)]) for sp in SPARSITIES
             if (method, sp) in refs}
    add(f"{method} of A0", "post-training pruning", method in STRUCTURED, cells)
  for label, what in (("S", "the half base fine-tuned with DDP"),
                      ("C1", "struct-Wanda-50% of A0, then DDP distilled from A0")):
    if rows.get(label):
      add(label, what, True, {"0.5": _ppl_stats([r["eval"]["full"] for r in rows[label]])})
  return table


# ---- regime, targets, width trend ----------------------------------------------------------------


def _mean(recs, fn) -> float | None:
  return float(np.mean([fn(r) for r in recs])) if recs else None


def key_losses(state: dict, width: str) -> dict:
  """Seed means of the numbers the targets compare (None where not run yet)."""
  rows, refs = _rows(state, width), _refs(state, width)
  struct = [float(np.mean(refs[(m, 0.5)])) for m in STRUCTURED if (m, 0.5) in refs]
  out = {"A0": _mean(rows.get("A0"), lambda r: r["eval"]["full"]),
         "S": _mean(rows.get("S"), lambda r: r["eval"]["full"]),
         "sparsegpt50": float(np.mean(refs[("sparsegpt", 0.5)])) if ("sparsegpt", 0.5) in refs
         else None, "best_structured50": min(struct) if struct else None}
  for label in TWIST_ROWS:
    out[f"{label}_sub"] = _mean(rows.get(label), lambda r: _sub(r, KAPPA))
    out[f"{label}_full"] = _mean(rows.get(label), lambda r: r["eval"]["full"])
  return out


def regime(state: dict) -> dict:
  bases, k = state.get("bases") or {}, key_losses(state, "wide")
  gap = next((g["half_minus_full"] for g in bases.get("regime", []) if g.get("full") == "full"),
             None)
  prune = k["sparsegpt50"] - k["A0"] if None not in (k["sparsegpt50"], k["A0"]) else None
  checks = {"bases_half_minus_full": {"value": gap, "required": REGIME_BASES},
            "sparsegpt50_minus_a0": {"value": prune, "required": REGIME_PRUNE}}
  for c in checks.values():
    c["holds"] = None if c["value"] is None else bool(c["value"] >= c["required"])
  why = [f"{name} = {c['value']:+.4f} nats < {c['required']}" for name, c in checks.items()
         if c["holds"] is False]
  return {"checks": checks, "testable": not why, "why": "; ".join(why)}


def _target(name: str, value, bound: float, le: bool, unit: str) -> dict:
  if value is None:
    return {"target": name, "value": None, "bound": bound, "met": None}
  met = value <= bound if le else value >= bound
  return {"target": name, "value": value, "bound": bound, "met": bool(met), "unit": unit,
          "missed_by": 0.0 if met else abs(value - bound)}


def targets(state: dict, label: str = "B*") -> list[dict]:
  """Issue 18's targets for one TwIST row (value vs bound; missed_by in the target's unit)."""
  k = key_losses(state, "wide")
  sub, full = k[f"{label}_sub"], k[f"{label}_full"]
  both = lambda a, b, f: None if a is None or b is None else f(a, b)
  return [
      _target(f"{label} kappa=0.5 subnets PPL / SparseGPT-50% of A0 PPL <= 0.75",
              both(sub, k["sparsegpt50"], lambda a, b: math.exp(a - b)), TARGETS["ppl_ratio"],
              True, "ratio"),
      _target(f"best structured-50% of A0 minus {label} subnets >= 0.1 nats",
              both(k["best_structured50"], sub, lambda a, b: a - b), TARGETS["vs_structured"],
              False, "nats"),
      _target(f"{label} subnets minus S <= 0.1 nats", both(sub, k["S"], lambda a, b: a - b),
              TARGETS["vs_small"], True, "nats"),
      _target(f"{label} full model minus A0 <= 0.05 nats",
              both(full, k["A0"], lambda a, b: a - b), TARGETS["full_vs_a0"], True, "nats")]


def width_trend(state: dict) -> dict:
  """B0's kappa=0.5 subnets minus SparseGPT-50% of A0 and minus S, per width."""
  out = {}
  for width in ("narrow", "wide"):
    k = key_losses(state, width)
    out[width] = {"vs_sparsegpt50": None if None in (k["B0_sub"], k["sparsegpt50"])
                  else k["B0_sub"] - k["sparsegpt50"],
                  "vs_S": None if None in (k["B0_sub"], k["S"]) else k["B0_sub"] - k["S"]}
  for gap in ("vs_sparsegpt50", "vs_S"):
    a, b = out["narrow"][gap], out["wide"][gap]
    out[f"{gap}_shrinks"] = None if None in (a, b) else bool(b < a)
  return out


# ---- summary -------------------------------------------------------------------------------------


def budgets(state: dict) -> list[dict]:
  out = []
  for width in ("wide", "narrow"):
    for label, recs in _rows(state, width).items():
      b = recs[0]["budget"]
      out.append({"label": label, "width": width, "seeds": len(recs),
                  "lr": recs[0]["config"]["opt"]["lr"], "steps": b["steps"],
                  "dense_steps": b["dense_steps"], "tokens": b["tokens"], "epochs": b["epochs"],
                  "tokens_per_param": b["tokens_per_param"],
                  "flops": seed_stats([r["budget"]["flops"] for r in recs])["mean"],
                  "train_s": seed_stats([r["train_s"] for r in recs]),
                  "eval_s": seed_stats([r["eval_s"] for r in recs])})
  return out


def screening(state: dict) -> list[dict]:
  rows, bstar = _rows(state, "wide"), state.get("bstar") or {}
  out = []
  for label in LEVERS:
    for rec in rows.get(label, []):
      ev = rec["eval"]
      out.append({"label": label, "what": LEVERS[label][1], "random": _sub(rec, KAPPA),
                  "core": _sub(rec, KAPPA, "core") if "core" in ev else None,
                  "full": ev["full"], "passes": label in bstar.get("winners", [])})
  return out


def curves(state: dict) -> dict:
  """label -> [{step, tokens, full, sub, sparsegpt50}] averaged over seeds (wide arms)."""
  out = {}
  for label, recs in _rows(state, "wide").items():
    if label.startswith("grid:") or not recs[0]["curve"]:
      continue
    pts = []
    for i, p in enumerate(recs[0]["curve"]):
      per = [r["curve"][i] for r in recs]
      tokens = p["step"] * recs[0]["budget"]["tokens"] // recs[0]["budget"]["steps"]
      pts.append({"step": p["step"], "tokens": tokens,
                  "full": float(np.mean([q["full"] for q in per])),
                  "sub": float(np.mean([q["random"][f"{KAPPA:g}"]["mean"] for q in per])),
                  "sparsegpt50": float(np.mean([q["sparsegpt50"] for q in per]))
                  if "sparsegpt50" in p else None})
    out[label] = pts
  return out


def lr_grid(state: dict) -> list[dict]:
  out = []
  for rec in state["records"]:
    if rec["label"].startswith("grid:"):
      ev = rec["eval"]
      out.append({"method": rec["label"][5:], "lr": rec["config"]["opt"]["lr"],
                  "full": ev["full"], "sub": _sub(rec, KAPPA) if "random" in ev else None})
  return sorted(out, key=lambda x: (x["method"], x["lr"]))


def grid_edge_lines(grid: list[dict], lrs: dict) -> list[str]:
  """A warning per method whose chosen learning rate is the grid's smallest or largest: the
  best one may lie outside the grid."""
  out = []
  for method, lr in sorted(lrs.items()):
    tried = sorted(g["lr"] for g in grid if g["method"] == method)
    if len(tried) > 1 and lr in (tried[0], tried[-1]):
      side = "largest" if lr == tried[-1] else "smallest"
      out.append(f"- {method}'s best learning rate ({lr:g}) is the grid's {side}: a better one "
                 "may lie outside it (not tried).")
  return out


def summarize(state: dict) -> dict:
  return {"command": state["command"], "quick": state["quick"], "windows": state["windows"],
          "protocol": state["protocol"], "samples": state["scale"]["samples"],
          "lrs": state["lrs"], "table": paper_table(state), "narrow_table":
          paper_table(state, "narrow"), "regime": regime(state), "targets": {
              label: targets(state, label) for label in TWIST_ROWS},
          "width_trend": width_trend(state), "budgets": budgets(state),
          "screening": screening(state), "bstar": state.get("bstar"), "lr_grid": lr_grid(state),
          "curves": curves(state), "bases": (state.get("bases") or {}).get("bases", {}),
          "train_split_tokens": state["train_split_tokens"], "study_s": state["study_s"]}


def write(out: str, state: dict) -> dict:
  """OUT/paper.json (state + summary), OUT/paper.md and the plots, from the records so far."""
  from twist_jax.studies import paper_plots  # pylint: disable=import-outside-toplevel

  summary = summarize(state)
  files.write_json(os.path.join(out, "paper.json"), {"summary": summary, "state": state})
  files.write_text(os.path.join(out, "paper.md"), markdown(summary))
  paper_plots.plot_all(state, summary, out)
  return summary


# ---- markdown ------------------------------------------------------------------------------------


def _cell(st: dict | None) -> str:
  if st is None:
    return "–"
  return f"{st['mean']:.3f}" + (f" ± {st['std']:.3f}" if st["n"] > 1 else "")


def table_markdown(table: list[dict]) -> list[str]:
  cols = ("0", "0.25", "0.5", "0.75")
  lines = ["| method | what | structured (deployable as a smaller dense model) | dense | 25% | "
           "50% | 75% |", "|---|---|---|---|---|---|---|"]
  for row in table:
    kind = {None: "– (the full model)", True: "yes", False: "no"}[row["structured"]]
    lines.append(f"| {row['method']} | {row['what']} | {kind} | "
                 + " | ".join(_cell(row["cells"].get(c)) for c in cols) + " |")
  return lines


def _fmt(x, digits: int = 4) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def _target_line(t: dict) -> str:
  if t["met"] is None:
    return f"- {t['target']}: not measured yet"
  verdict = "met" if t["met"] else f"missed by {t['missed_by']:.4f} {t['unit']}"
  return f"- {t['target']}: {t['value']:.4f} (bound {t['bound']}) → {verdict}"


def _width(sm: dict, shape: str) -> str:
  """': D = 128' from the bases' record of `shape`, or '' where the bases carry none."""
  model = sm["bases"].get(shape, {}).get("model")
  return f": D = {model['n_embd']}" if model else ""


def regime_lines(sm: dict) -> list[str]:
  r, bases = sm["regime"], sm["bases"]
  lines = []
  for shape in ("full", "half"):
    if shape in bases:
      b = bases[shape]
      lines.append(f"- pretraining ({shape} base): {b['tokens']:,} tokens, "
                   f"{b['tokens_per_param']} tokens/param, {b['epochs']} epochs of python_source")
  ft = [b for b in sm["budgets"] if b["label"] == "A0" and b["width"] == "wide"]
  if ft:
    lines.append(f"- fine-tuning (every wide arm): {ft[0]['tokens']:,} tokens, "
                 f"{ft[0]['tokens_per_param']:.2f} tokens/param (A0), {ft[0]['epochs']:.3f} "
                 "epochs of python_docs")
  for name, c in r["checks"].items():
    state = "not measured" if c["holds"] is None else ("holds" if c["holds"] else "FAILS")
    lines.append(f"- regime check {name} = {_fmt(c['value'])} nats (needs >= {c['required']}): "
                 f"{state}")
  if not r["testable"]:
    lines.append(f"- **not testable at this scale**: {r['why']} -- model size or pruning "
                 "does not cost enough here for TwIST's claim to show or fail")
  return lines


def curve_lines(cv: dict) -> list[str]:
  """What the curves say more budget would do: each TwIST row's kappa=0.5 subnet gap to A0's
  SparseGPT-50% and to A0's full model, at half and at the full budget."""
  a0 = cv.get("A0")
  if not a0 or len(a0) < 3 or a0[-1]["sparsegpt50"] is None:
    return []
  out = [""]
  for label in TWIST_ROWS:
    pts = cv.get(label)
    if not pts or len(pts) < 3:
      continue
    half, full = (pts[1]["sub"] - a0[1]["sparsegpt50"], pts[2]["sub"] - a0[2]["sparsegpt50"])
    trend = "shrank" if full < half else "grew"
    out.append(f"Curves: {label}'s kappa=0.5 subnets minus A0's SparseGPT-50% went from "
               f"{half:+.4f} nats at half the budget to {full:+.4f} at the full budget (it "
               f"{trend}); {label}'s full model minus A0's went from "
               f"{pts[1]['full'] - a0[1]['full']:+.4f} to {pts[2]['full'] - a0[2]['full']:+.4f}.")
  return out


def markdown(sm: dict) -> str:
  lines = ["# The paper's protocol at CPU scale: TwIST vs pruning and small models", "",
           f"Command: `{sm['command']}`", "",
           f"Protocol: {sm['protocol']}; {sm['windows']} validation windows spread evenly over "
           f"python_docs' validation split, the same for every arm; {sm['samples']} random "
           "attn_mlp subnets per kappa drawn with one fixed key (the same indices for every "
           "arm). PPL = exp(nats/byte); ± is the std over seeds of each seed's PPL. "
           f"Learning rates: A0 {sm['lrs'].get('A0', '–')}, B0 {sm['lrs'].get('B0', '–')} "
           "(S, A0', C1 and the narrow arms use A0's; B-SE, screening and B* use B0's).", "",
           "## Regime", ""] + regime_lines(sm)
  lines += ["", f"## PPL by method and sparsity (wide{_width(sm, 'full')})", ""]
  lines += table_markdown(sm["table"])
  lines += ["", "## Targets (issue 18)", ""]
  for label, ts in sm["targets"].items():
    lines += [_target_line(t) for t in ts if t["met"] is not None or label == "B*"]
  wt = sm["width_trend"]
  lines += curve_lines(sm["curves"])
  lines += ["", "## Width trend (B0's kappa=0.5 subnets, nats)", "",
            "| width | minus SparseGPT-50% of A0 | minus S |", "|---|---|---|"]
  for w in ("narrow", "wide"):
    lines.append(f"| {w} | {_fmt(wt[w]['vs_sparsegpt50'])} | {_fmt(wt[w]['vs_S'])} |")
  for gap in ("vs_sparsegpt50", "vs_S"):
    s = wt[f"{gap}_shrinks"]
    lines.append(f"\nGap {gap}: " + ("not measured yet" if s is None else
                                     ("shrinks" if s else "does not shrink")
                                     + " from narrow to wide."))
  lines += ["", f"### Narrow{_width(sm, 'narrow_full')}", ""] + table_markdown(sm["narrow_table"])
  lines += ["", "## Screening (one seed each, paired with B0 seed 0)", ""]
  bs = sm["bstar"]
  if bs:
    won = ", ".join(bs["winners"]) or "nothing (no lever passed: B* is B0, no extra runs)"
    lines += [f"Rule: {bs['rule']}. Bound: {_fmt(bs['bound'])}. B* = B0 + {won}.", ""]
  lines += ["| lever | what | kappa=0.5 random subnets | core + random | full | passes |",
            "|---|---|---|---|---|---|"]
  for r in sm["screening"]:
    lines.append(f"| {r['label']} | {r['what']} | {r['random']:.4f} | {_fmt(r['core'])} | "
                 f"{r['full']:.4f} | {'yes' if r['passes'] else 'no'} |")
  lines += ["", "## Learning-rate grid (seed 0, full budget)", "",
            "| method | lr | full | kappa=0.5 subnets |", "|---|---|---|---|"]
  lines += [f"| {g['method']} | {g['lr']:g} | {g['full']:.4f} | {_fmt(g['sub'])} |"
            for g in sm["lr_grid"]]
  lines += [""] + grid_edge_lines(sm["lr_grid"], sm["lrs"])
  lines += ["", "## Budgets (analytic training FLOPs: 6 x active params + attention per token; "
            "a distilling worker adds its teacher's forward)", "",
            "| arm | width | seeds | lr | steps | dense steps | tokens | epochs | tokens/param | "
            "FLOPs | train s | eval s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for b in sm["budgets"]:
    lines.append(f"| {b['label']} | {b['width']} | {b['seeds']} | {b['lr']:g} | {b['steps']} | "
                 f"{b['dense_steps']} | {b['tokens']:,} | {b['epochs']:.3f} | "
                 f"{b['tokens_per_param']:.2f} | {b['flops']:.3e} | {b['train_s']['mean']:.0f} "
                 f"| {b['eval_s']['mean']:.0f} |")
  lines += ["", "## Curves (seed means)", "",
            "| arm | step | tokens | full | kappa=0.5 subnets | SparseGPT-50% |",
            "|---|---|---|---|---|---|"]
  for label, pts in sm["curves"].items():
    lines += [f"| {label} | {p['step']} | {p['tokens']:,} | {p['full']:.4f} | {p['sub']:.4f} | "
              f"{_fmt(p['sparsegpt50'])} |" for p in pts]
  lines += ["", f"Study time so far: {sm['study_s'] / 60:.1f} min."]
  return "\n".join(lines) + "\n"
