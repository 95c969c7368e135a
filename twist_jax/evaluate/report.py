"""Golden-ticket reports (random subnets of trained runs, docs/method.md §7), the kappa_train x
kappa_deploy heatmap, their files (.json / .md / .png) and the short tables the CLIs print."""

import json
import os
import time

from twist_jax import files
from twist_jax.evaluate import plots, runs as runs_lib
from twist_jax.evaluate.metrics import perplexity

REPORT_NAME = "golden_tickets"


def report_paths(out_dir: str) -> dict:
  """{"json" | "md" | "png": path} of the report files in `out_dir`."""
  base = os.path.join(os.path.abspath(out_dir), REPORT_NAME)
  return {ext: f"{base}.{ext}" for ext in ("json", "md", "png")}


def golden_ticket_report(runs: dict, kappas, samples: int, *, mode: str | None = None,
                         correction: str | None = None, max_windows: int = 64, seed: int = 0,
                         batch_size: int = 32, out_dir: str | None = None,
                         progress: bool = True) -> dict:
  """Distributions of N random subnets per run and kappa on the same validation windows.

  runs: {label: workdir}. mode defaults to the first subnet-trained run's mode (a DDP run is cut
  like the TwIST run it is compared with); correction defaults to each run's own config. Writes
  golden_tickets.{json,png,md} into out_dir (default: the first run's workdir) and returns the
  report.
  """
  kappas = runs_lib.check_args(kappas, samples, max_windows, mode, correction)
  loaded = runs_lib.load_runs(runs)
  protocol = runs_lib.shared_protocol(loaded)
  ref = runs_lib.reference(loaded)
  mode = mode or ref.cfg.subnet.mode
  specs = runs_lib.specs(loaded, kappas, mode, ref.cfg.subnet.shared_layers, correction)
  windows = runs_lib.validation_windows(loaded[0], max_windows)
  t0 = time.perf_counter()
  results = runs_lib.evaluate_runs(loaded, kappas, samples, specs, windows, seed, batch_size,
                                   progress)
  report = {"protocol": protocol, "mode": mode, "samples": samples,
            "shared_layers": list(ref.cfg.subnet.shared_layers), "windows": int(len(windows)),
            "heuristic": "random (uniform, independent draws)", "seed": seed,
            "kappas_deploy": [float(k) for k in kappas], "runs": results,
            "time_s": time.perf_counter() - t0}
  write_report(report, out_dir or loaded[0].workdir)
  return report


def write_report(report: dict, out_dir: str) -> dict:
  """Writes golden_tickets.{json,md,png} (each atomically); returns their paths."""
  paths = report_paths(out_dir)
  files.write_json(paths["json"], report)
  files.write_text(paths["md"], report_markdown(report))
  plots.save_png(plots.plot_report(report), paths["png"])
  return paths


def read_report(out_dir: str) -> dict | None:
  """The report saved in `out_dir`, or None if there is none."""
  path = report_paths(out_dir)["json"]
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def report_markdown(report: dict) -> str:
  lines = ["# Golden tickets: random subnets after training", "",
           f"Protocol: {report['protocol']}", "",
           f"Mode `{report['mode']}`, {report['samples']} random subnets per ratio (heuristic "
           f"{report['heuristic']}, seed {report['seed']}) on the same {report['windows']} "
           "validation windows; loss = mean token NLL (nats), PPL = exp(mean loss).", "",
           "| run | kappa | params | correction | mean loss | std | min | max | PPL (mean) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for label, run in report["runs"].items():
    for k, d in run["kappas"].items():
      lines.append(f"| {label} | {k} | {d['params']:,} | {d['correction']} | {d['mean']:.4f} | "
                   f"{d['std']:.4f} | {d['min']:.4f} | {d['max']:.4f} | {d['ppl_mean']:.2f} |")
    f = run["full"]
    lines.append(f"| {label} | full | {f['params']:,} | - | {f['loss']:.4f} | - | - | - | "
                 f"{f['ppl']:.2f} |")
  return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  """Left-aligned text columns, two spaces apart."""
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]


def summary_table(report: dict) -> str:
  """A few lines for the terminal: per run the full model, then per kappa the mean +- std and
  the worst (highest) loss of the random subnets, in loss and PPL."""
  rows = []
  for label, run in report["runs"].items():
    f = run["full"]
    rows.append([label, "full", f"{f['params']:,}", f"{f['loss']:.4f}", "-", f"{f['ppl']:.2f}",
                 "-"])
    for k, d in run["kappas"].items():
      rows.append([label, k, f"{d['params']:,}", f"{d['mean']:.4f} ± {d['std']:.4f}",
                   f"{d['max']:.4f}", f"{d['ppl_mean']:.2f}", f"{perplexity(d['max']):.2f}"])
  # The protocol (one long line) is in the .json / .md files; the terminal gets the counts.
  head = (f"golden tickets: {report['samples']} random '{report['mode']}' subnets per kappa on "
          f"{report['windows']} validation windows (loss: mean token NLL, nats)")
  return "\n".join([head] + _table(
      ["run", "kappa", "params", "loss mean ± std", "worst", "PPL(mean)", "PPL(worst)"], rows))


# ---- kappa_train x kappa_deploy heatmap ----------------------------------------------------------


def heatmap(workdirs, kappas_deploy, samples: int, out_png: str, *, mode: str | None = None,
            correction: str | None = None, max_windows: int = 64, seed: int = 0,
            batch_size: int = 32, progress: bool = True) -> dict:
  """PPL of the mean loss over random subnets for every (training run, deploy kappa) pair (the
  paper's Figure 5); rows sorted by training kappa (DDP = 1). Writes out_png and a .json beside."""
  kappas = runs_lib.check_args(kappas_deploy, samples, max_windows, mode, correction)
  loaded = runs_lib.load_runs(runs_lib.folder_labels(workdirs))
  protocol = runs_lib.shared_protocol(loaded)
  ref = runs_lib.reference(loaded)
  mode = mode or ref.cfg.subnet.mode
  specs = runs_lib.specs(loaded, kappas, mode, ref.cfg.subnet.shared_layers, correction)
  windows = runs_lib.validation_windows(loaded[0], max_windows)
  results = runs_lib.evaluate_runs(loaded, kappas, samples, specs, windows, seed, batch_size,
                                   progress)
  rows = sorted(results, key=lambda lb: (results[lb]["variant"] == "ddp",
                                         results[lb]["kappa_train"]))
  grid = {"protocol": protocol, "mode": mode, "samples": samples, "windows": int(len(windows)),
          "kappas_deploy": [float(k) for k in kappas], "rows": rows,
          "kappa_train": [results[lb]["kappa_train"] for lb in rows],
          "workdirs": [results[lb]["workdir"] for lb in rows],
          "ppl": [[results[lb]["kappas"][f"{k:g}"]["ppl_mean"] for k in kappas] for lb in rows],
          "loss_std": [[results[lb]["kappas"][f"{k:g}"]["std"] for k in kappas] for lb in rows]}
  write_heatmap(grid, out_png)
  return grid


def heatmap_json_path(out_png: str) -> str:
  return os.path.splitext(os.path.abspath(out_png))[0] + ".json"


def write_heatmap(grid: dict, out_png: str) -> None:
  plots.save_png(plots.plot_heatmap(grid), out_png)
  files.write_json(heatmap_json_path(out_png), grid)


def heatmap_table(grid: dict) -> str:
  """PPL (of the mean loss) per run (rows, with kappa_train) and deploy kappa (columns)."""
  rows = [[lb, f"{kt:g}"] + [f"{v:.2f}" for v in ppl]
          for lb, kt, ppl in zip(grid["rows"], grid["kappa_train"], grid["ppl"])]
  head = (f"heatmap: PPL of the mean loss of {grid['samples']} random '{grid['mode']}' subnets "
          f"({grid['windows']} windows)")
  return "\n".join([head] + _table(
      ["run", "kappa_train"] + [f"deploy {k:g}" for k in grid["kappas_deploy"]], rows))


# ---- the training job's last step ---------------------------------------------------------------


def check_golden(cfg) -> None:
  """Before training: every eval.golden_kappas ratio cuts a valid subnet of subnet.mode, so the
  job does not fail at its very end (ConfigError naming the field)."""
  from twist_jax.errors import ConfigError
  from twist_jax.subnet_spec import deploy_spec

  if cfg.eval.golden_samples == 0:
    return
  model, s = cfg.model.model_config(256), cfg.subnet  # the vocabulary does not matter here
  for k in cfg.eval.golden_kappas:
    try:
      deploy_spec(model, s.mode, k, s.shared_layers, s.correction)
    except ConfigError as e:
      raise ConfigError("eval.golden_kappas", f"{k:g} in {s.mode} mode: "
                        f"{str(e).split(': ', 1)[-1]}") from None


def after_training(workdir: str, cfg, *, progress: bool = True) -> str | None:
  """Golden tickets of a finished run: its final model and `eval.golden_samples` random subnets
  per ratio in `eval.golden_kappas` of the run's subnet.mode, on the validation windows of
  val_loss. Returns the lines to print (table + PNG path), or None when disabled
  (golden_samples = 0). A report already in `workdir` is shown, not recomputed.
  """
  e = cfg.eval
  if e.golden_samples == 0:
    return None
  paths = report_paths(workdir)
  report = read_report(workdir)
  note = " (saved earlier; not recomputed)" if report is not None else ""
  if report is None:
    label = runs_lib.variant_label(cfg.twist.variant)
    report = golden_ticket_report({label: workdir}, e.golden_kappas, e.golden_samples,
                                  mode=cfg.subnet.mode, max_windows=e.max_windows,
                                  batch_size=e.batch_size, progress=progress)
  return f"{summary_table(report)}\nplot: {paths['png']}{note}"
