"""The paper-protocol study's figures, from its records and summary: golden-ticket distributions
of TwIST vs DDP random subnets per kappa (the paper's Figure 4), PPL vs sparsity for every
method, and loss vs fine-tune tokens (full model, kappa = 0.5 subnets, SparseGPT-50%)."""

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from twist_jax.evaluate import plots  # noqa: E402
from twist_jax.studies.paper_arms import KAPPAS  # noqa: E402

GOLDEN = ("A0", "B0", "B*")  # DDP vs TwIST random subnets


def golden_tickets(state: dict, path: str) -> bool:
  """One panel per kappa: every random subnet's PPL (all seeds) per arm, as strip plots."""
  recs = {label: [r for r in state["records"] if r["label"] == label and r["width"] == "wide"
                  and "random" in r["eval"]] for label in GOLDEN}
  recs = {k: v for k, v in recs.items() if v}
  if not recs:
    return False
  fig, axes = plt.subplots(1, len(KAPPAS), figsize=(4 * len(KAPPAS), 4))
  for ax, k in zip(axes, KAPPAS):
    for i, (label, rs) in enumerate(recs.items()):
      ppl = [math.exp(v) for r in rs for v in r["eval"]["random"][f"{k:g}"]["losses"]]
      jitter = [i + 0.25 * ((j * 0.618) % 1 - 0.5) for j in range(len(ppl))]
      ax.plot(jitter, ppl, "o", ms=3, alpha=0.6, color=f"C{i}")
      full = [math.exp(r["eval"]["full"]) for r in rs]
      ax.hlines(sum(full) / len(full), i - 0.35, i + 0.35, colors=f"C{i}", linestyles="--")
    ax.set_xticks(range(len(recs)), list(recs))
    ax.set_title(f"random subnets, kappa = {k:g}")
    ax.set_ylabel("PPL (bytes)")
  fig.suptitle("Golden tickets: TwIST vs DDP random subnets (dashed: full model)")
  fig.tight_layout()
  plots.save_png(fig, path)
  return True


def ppl_vs_sparsity(summary: dict, path: str) -> bool:
  """Mean PPL (over seeds) against sparsity for every row of the paper table."""
  rows = [r for r in summary["table"] if (len(r["cells"]) > 1 or "0.5" in r["cells"])
          and not r["same_as"]]  # B* = B0 would hide B0's line
  if not rows:
    return False
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  colors = plt.get_cmap("tab20")
  for i, row in enumerate(rows):
    sp = sorted(float(c) for c in row["cells"])
    y = [row["cells"][f"{c:g}"]["mean"] for c in sp]
    ax.plot(sp, y, "o-" if row["structured"] else "x--", color=colors(i % 20),
            label=row["method"])
  ax.set_yscale("log")
  ax.set_xlabel("sparsity of the block parameters")
  ax.set_ylabel("validation PPL (bytes)")
  ax.set_title("PPL vs sparsity (solid: structured, deployable smaller)")
  ax.legend(fontsize=7, ncol=2, loc="upper left")
  fig.tight_layout()
  plots.save_png(fig, path)
  return True


def curves(summary: dict, path: str) -> bool:
  if not summary["curves"]:
    return False
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (label, pts) in enumerate(summary["curves"].items()):
    t = [p["tokens"] for p in pts]
    ax.plot(t, [p["full"] for p in pts], "o-", color=f"C{i}", label=f"{label} full model")
    ax.plot(t, [p["sub"] for p in pts], "s:", color=f"C{i}", label=f"{label} kappa=0.5 subnets")
    if pts[0]["sparsegpt50"] is not None:
      ax.plot(t, [p["sparsegpt50"] for p in pts], "x--", color=f"C{i}",
              label=f"{label} SparseGPT-50%")
  ax.set_xlabel("fine-tune tokens")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_title("Fine-tuning curves (seed means)")
  ax.legend(fontsize=7, loc="upper right")
  fig.tight_layout()
  plots.save_png(fig, path)
  return True


def plot_all(state: dict, summary: dict, out: str) -> list[str]:
  """Writes the plots that have data yet; returns their paths."""
  made = []
  for name, ok in (("golden_tickets.png", lambda p: golden_tickets(state, p)),
                   ("ppl_vs_sparsity.png", lambda p: ppl_vs_sparsity(summary, p)),
                   ("curves.png", lambda p: curves(summary, p))):
    path = os.path.join(out, name)
    if ok(path):
      made.append(path)
  return made
