"""Figures of the evaluation reports: golden-ticket distributions per kappa (the paper's Figure 4)
and the kappa_train x kappa_deploy PPL heatmap (Figure 5)."""

import numpy as np

from twist_jax import files


def _pyplot():
  # No backend is forced: headless machines fall back to Agg by themselves, and a notebook
  # keeps its inline backend.
  import matplotlib.pyplot as plt

  return plt


def save_png(fig, path: str) -> None:
  """Writes `fig` to `path` atomically and closes it."""
  files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
  _pyplot().close(fig)


def plot_report(report: dict):
  """One panel per kappa: box + points of every run side by side (the paper's Figure 4); a
  dashed line marks each run's full model."""
  plt = _pyplot()
  kappas, labels = list(next(iter(report["runs"].values()))["kappas"]), list(report["runs"])
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  fig, axes = plt.subplots(1, len(kappas), figsize=(2.2 + 1.2 * len(labels) * len(kappas), 4),
                           sharey=True, squeeze=False)
  jitter = np.random.default_rng(0)  # fixed: the figure is reproducible
  for ax, k in zip(axes[0], kappas):
    data = [report["runs"][lb]["kappas"][k]["losses"] for lb in labels]
    ax.boxplot(data, widths=0.5, showfliers=False)
    for j, (lb, values) in enumerate(zip(labels, data)):
      c = colors[j % len(colors)]
      x = j + 1 + jitter.uniform(-0.12, 0.12, len(values))
      ax.scatter(x, values, s=10, alpha=0.7, color=c, zorder=3)
      ax.axhline(report["runs"][lb]["full"]["loss"], color=c, ls="--", lw=0.8)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20)
    ax.set_title(f"kappa = {k}")
  axes[0][0].set_ylabel("eval loss (nats/token)")
  fig.suptitle(f"{report['samples']} random '{report['mode']}' subnets per ratio "
               "(dashed: full model)")
  fig.tight_layout()
  return fig


def plot_heatmap(grid: dict):
  plt = _pyplot()
  from matplotlib.colors import LogNorm, Normalize

  ppl = np.asarray(grid["ppl"], np.float64)
  lo, hi = ppl.min(), max(ppl.max(), ppl.min() * 1.001)
  # PPL of heavily pruned DDP subnets can be orders of magnitude above the rest: log colours then.
  norm = LogNorm(lo, hi) if hi / lo > 10 else Normalize(lo, hi)
  fig, ax = plt.subplots(figsize=(3.5 + 1.0 * ppl.shape[1], 1.8 + 0.55 * ppl.shape[0]))
  im = ax.imshow(ppl, cmap="viridis_r", norm=norm, aspect="auto")
  for (i, j), v in np.ndenumerate(ppl):
    dark = norm(v) > 0.5  # viridis_r is dark at high PPL
    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="w" if dark else "k")
  ax.set_xticks(range(ppl.shape[1]), [f"{k:g}" for k in grid["kappas_deploy"]])
  ax.set_yticks(range(ppl.shape[0]),
                [f"{lb} ({k:g})" for lb, k in zip(grid["rows"], grid["kappa_train"])])
  ax.set_xlabel("kappa deploy")
  ax.set_ylabel("run (kappa train)")
  ax.set_title(f"PPL, mean loss of {grid['samples']} random '{grid['mode']}' subnets",
               fontsize=9)
  fig.colorbar(im, ax=ax, label="PPL", format="%.4g")
  fig.tight_layout()
  return fig
