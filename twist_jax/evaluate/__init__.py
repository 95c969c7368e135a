"""Evaluation (docs/method.md §7): perplexity under a stated protocol, golden-ticket distributions
of random subnets and the kappa_train x kappa_deploy heatmap (the paper's Figures 4 and 5).

  metrics  losses of one model / many random subnets, distributions
  runs     trained runs as inputs: loading, shared windows, specs, per-run distributions
  report   golden_ticket_report, heatmap, their files and terminal tables, after_training
  plots    the figures
  cli      `python -m twist_jax.evaluate` and the plumbing other CLIs share

The names below are the package's API (`from twist_jax import evaluate; evaluate.mean_nll`).
"""

from twist_jax.evaluate.cli import OneLineParser, Output, add_json_flag, main, run_cli
from twist_jax.evaluate.metrics import (_subnets_nll_sums, distribution, kappa_key,
                                        keeps_everything, mean_nll, perplexity, random_subnets,
                                        ratio_losses, subnet_losses)
from twist_jax.evaluate.plots import plot_heatmap, plot_report
from twist_jax.evaluate.report import (REPORT_NAME, after_training, check_golden,
                                       golden_ticket_report, heatmap, report_markdown,
                                       report_paths, summary_table, write_report)
from twist_jax.evaluate.runs import check_run
from twist_jax.subnet_spec import deploy_spec

__all__ = ["OneLineParser", "Output", "REPORT_NAME", "_subnets_nll_sums", "add_json_flag",
           "after_training", "check_golden", "check_run", "deploy_spec", "distribution",
           "golden_ticket_report", "heatmap", "kappa_key", "keeps_everything", "main", "mean_nll",
           "perplexity", "plot_heatmap", "plot_report", "random_subnets", "ratio_losses",
           "report_markdown", "report_paths", "run_cli", "subnet_losses", "summary_table",
           "write_report"]
