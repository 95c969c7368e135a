"""Evaluation: perplexity under a stated protocol, golden-ticket distributions of random subnets
and the kappa_train x kappa_deploy heatmap (docs/method.md §7; the paper's Figures 4 and 5).

Perplexity = exp(mean token NLL) over non-overlapping windows of context + 1 tokens of the
validation split; `data.protocol` gives the one-line description printed with every number.
Many subnets of one ratio share one compiled function: index values are data (vmapped), only
the sizes (the spec) are static.

  python -m twist_jax.evaluate --workdir RUN [--compare RUN_DDP] --kappas 0.25,0.5,0.75,1 \
      --samples 16 [--max-windows 64] [--heatmap RUN1,RUN2,... --out heatmap.png]

Dimension alphabet: S subnets, B batch (windows), L length, M all windows.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from twist_jax import config as config_lib, subnets
from twist_jax.errors import ConfigError, DataError, UserError
from twist_jax.model import GPT2, ModelConfig, next_token_nll
from twist_jax.subnets import deploy_spec  # noqa: F401  (re-exported: evaluate.deploy_spec)

REPORT_NAME = "golden_tickets"


# ---- perplexity of one model ---------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1,))
def _window_nll_sum(params, cfg: ModelConfig, windows_BxLp1, masks=None):
  logits = GPT2(cfg).apply({"params": params}, windows_BxLp1[:, :-1], masks)
  return next_token_nll(logits, windows_BxLp1[:, 1:]).sum()


def mean_nll(params, cfg: ModelConfig, windows_MxLp1: np.ndarray, batch_size: int = 32,
             masks=None, sharding=None) -> float:
  """Mean next-token NLL (nats) over all windows (a smaller last batch is kept, not dropped).

  `sharding`: where to put each batch, e.g. replicated over the training mesh when the params
  live there (several processes); default: the default device.
  """
  windows_MxLp1 = np.asarray(windows_MxLp1, np.int32)
  put = (lambda x: jax.device_put(x, sharding)) if sharding is not None else jnp.asarray
  total, count = 0.0, 0
  for start in range(0, len(windows_MxLp1), batch_size):
    chunk = windows_MxLp1[start:start + batch_size]
    total += float(_window_nll_sum(params, cfg, put(chunk), masks))
    count += chunk.shape[0] * (chunk.shape[1] - 1)
  return total / count


def perplexity(nll: float) -> float:
  return float(math.exp(min(nll, 700.0)))


# ---- many subnets of one ratio -------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def random_subnets(key: jax.Array, spec: subnets.SubnetSpec, samples: int):
  """`samples` independent uniform subnets, leading axis S; sample n depends on (key, n) only,
  so a larger `samples` extends the same draws."""
  keys_S = jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(samples))
  draws = jax.vmap(lambda k: subnets.sample_subnets(k, spec, 1))(keys_S)
  return jax.tree.map(lambda x: x[:, 0], draws)  # drop the W = 1 axis


def keeps_everything(spec: subnets.SubnetSpec) -> bool:
  """True when every subnet of `spec` is the whole model (then all draws are identical)."""
  if spec.mode == "blocks":
    return spec.keep_blocks == len(spec.partitioned)
  return spec.keep_head == spec.n_head and spec.keep_unit == spec.n_inner


@functools.partial(jax.jit, static_argnums=(1, 2))
def _subnets_nll_sums(params, cfg: ModelConfig, spec: subnets.SubnetSpec, subnets_S,
                      windows_BxLp1, weight_B):
  """(S,) NLL sums of the extracted dense subnets on one batch (padding windows weigh 0)."""
  small_cfg = subnets.subnet_model_config(cfg, spec)

  def one(subnet):
    # The deployed model itself: sliced weights, correction folded into the scales.
    small = subnets.extract_subnet(params, subnet, spec)
    logits = GPT2(small_cfg).apply({"params": small}, windows_BxLp1[:, :-1])
    return jnp.dot(next_token_nll(logits, windows_BxLp1[:, 1:]).sum(axis=1), weight_B)

  return jax.vmap(one)(subnets_S)


def _pad(x, size: int):
  """x padded along axis 0 to `size` by repeating its last row (keeps shapes static)."""
  extra = size - x.shape[0]
  return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])


def subnet_losses(params, cfg: ModelConfig, spec: subnets.SubnetSpec, subnets_S,
                  windows_MxLp1: np.ndarray, *, batch_size: int = 32, subnet_batch: int = 8,
                  bar=None) -> np.ndarray:
  """(S,) mean next-token NLL of every subnet on the same windows.

  One call evaluates `subnet_batch` subnets on batch_size // subnet_batch windows, so peak memory
  is that of a plain eval batch; the last chunks are padded, so one compile serves all subnets.
  """
  windows_MxLp1 = np.asarray(windows_MxLp1, np.int32)
  m, s = windows_MxLp1.shape[0], jax.tree.leaves(subnets_S)[0].shape[0]
  sb = min(subnet_batch, s)
  bw = min(max(1, batch_size // sb), m)
  out = []
  for lo in range(0, s, sb):
    chunk = jax.tree.map(lambda x: _pad(x[lo:lo + sb], sb), subnets_S)
    total_S = jnp.zeros((sb,), jnp.float32)
    for start in range(0, m, bw):
      real = min(bw, m - start)
      win = _pad(jnp.asarray(windows_MxLp1[start:start + bw]), bw)
      weight = jnp.asarray(np.arange(bw) < real, jnp.float32)
      total_S = total_S + _subnets_nll_sums(params, cfg, spec, chunk, win, weight)
    out.append(np.asarray(total_S, np.float64)[:min(sb, s - lo)])  # one host sync per chunk
    if bar is not None:
      bar.update(out[-1].shape[0])
  return np.concatenate(out) / (m * (windows_MxLp1.shape[1] - 1))


def distribution(losses) -> dict:
  """All values plus mean / std (population, ddof=0) / min / max and the PPL of the mean."""
  arr = np.asarray(losses, np.float64)
  return {"losses": [float(x) for x in arr], "mean": float(arr.mean()), "std": float(arr.std()),
          "min": float(arr.min()), "max": float(arr.max()), "ppl_mean": perplexity(arr.mean())}


# ---- runs ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Run:
  label: str
  workdir: str
  cfg: config_lib.Config
  model: ModelConfig
  params: dict


def check_run(workdir: str) -> None:
  """Cheap up-front check so a typo fails before any run is loaded."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise DataError(f"{workdir!r} is not a twist_jax run (no config.json)")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise DataError(f"no checkpoints in {workdir!r}")


def _load_runs(runs: dict) -> list[_Run]:
  from twist_jax import checkpoint  # orbax import only when runs are actually read

  if not runs:
    raise UserError("no runs to evaluate")
  for workdir in runs.values():
    check_run(workdir)
  out = []
  for label, workdir in runs.items():
    cfg, model, params = checkpoint.load_run(workdir)
    out.append(_Run(label, workdir, cfg, model, params))
  return out


def _protocol(runs: list[_Run]) -> str:
  """The shared protocol string; runs measured differently cannot share validation windows."""
  from twist_jax import data

  protocols = {r.label: data.protocol(r.cfg.data, r.cfg.model.context) for r in runs}
  first = runs[0]
  for r in runs[1:]:
    if protocols[r.label] != protocols[first.label] or r.cfg.data.name != first.cfg.data.name:
      raise UserError(f"runs {first.label!r} and {r.label!r} use different data/protocols; "
                      f"they cannot be compared on the same windows")
  return protocols[first.label]


def _reference(runs: list[_Run]) -> _Run:
  """The run whose subnet mode is used for all: the first that trained subnets (a DDP run has
  none, so it is cut like the TwIST run it is compared with)."""
  return next((r for r in runs if r.cfg.twist.variant != "ddp"), runs[0])


def _windows(run: _Run, max_windows: int) -> np.ndarray:
  from twist_jax import data

  dataset = data.load(run.cfg.data)
  return dataset.validation_windows(context=run.cfg.model.context,
                                    max_windows=max_windows or None)


def _check_args(kappas, samples: int, max_windows: int, mode, correction) -> tuple:
  kappas = tuple(float(k) for k in kappas)
  if not kappas:
    raise UserError("kappas: give at least one ratio in (0, 1]")
  for k in kappas:
    if not 0 < k <= 1:
      raise UserError(f"kappas: got {k:g}; each ratio must be in (0, 1]")
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
    raise UserError(f"samples: got {samples!r}; must be an integer >= 1")
  if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 0:
    raise UserError(f"max_windows: got {max_windows!r}; must be an integer >= 0 (0 = all)")
  if mode is not None and mode not in config_lib.MODES:
    raise UserError(f"mode: got {mode!r}; allowed: {', '.join(config_lib.MODES)}")
  if correction is not None and correction not in config_lib.CORRECTIONS:
    raise UserError(f"correction: got {correction!r}; allowed: "
                    f"{', '.join(config_lib.CORRECTIONS)}")
  return kappas


def _specs(runs, kappas, mode, shared, correction) -> dict:
  """{(label, kappa): spec}, all built (and validated) before any evaluation."""
  specs = {}
  for r in runs:
    for k in kappas:
      try:
        specs[(r.label, k)] = deploy_spec(r.model, mode, k, shared,
                                          correction or r.cfg.subnet.correction)
      except ConfigError as e:  # name the CLI's argument, not the training config field
        raise UserError(f"kappa {k:g} ({mode} mode, run {r.label!r}): "
                        f"{str(e).split(': ', 1)[-1]}") from None
  return specs


def _kappa_key(seed: int, kappa: float) -> jax.Array:
  # Keyed by the ratio's value, not its position, so adding kappas leaves the others' draws.
  return jax.random.fold_in(jax.random.key(seed), int(round(kappa * 1_000_000)))


def _evaluate_runs(runs, kappas, samples, specs, windows, seed, batch_size, progress) -> dict:
  """{label: {"kappas": {"0.5": distribution + params}, "full": {...}}} for every run."""
  total = len(runs) * (len(kappas) * samples + 1)
  results = {}
  with tqdm.tqdm(total=total, unit="eval", desc="subnets", disable=not progress,
                 dynamic_ncols=True) as bar:
    for r in runs:
      full = mean_nll(r.params, r.model, windows, batch_size)
      bar.update(1)
      entry = {"workdir": os.path.abspath(r.workdir), "variant": r.cfg.twist.variant,
               "kappa_train": _kappa_train(r), "kappas": {},
               "full": {"loss": full, "ppl": perplexity(full), "params": r.model.num_params()}}
      for k in kappas:
        spec = specs[(r.label, k)]
        losses = _losses_at(r, spec, k, samples, windows, seed, batch_size, bar, full)
        entry["kappas"][f"{k:g}"] = {**distribution(losses), "correction": spec.correction,
                                     "params": subnets.subnet_model_config(
                                         r.model, spec).num_params()}
      results[r.label] = entry
  return results


def _losses_at(run, spec, kappa, samples, windows, seed, batch_size, bar, full) -> np.ndarray:
  if keeps_everything(spec):  # every draw is the full model: evaluated once already
    bar.update(samples)
    return np.full((samples,), full)
  subnets_S = random_subnets(_kappa_key(seed, kappa), spec, samples)
  return subnet_losses(run.params, run.model, spec, subnets_S, windows, batch_size=batch_size,
                       bar=bar)


def _kappa_train(run: _Run) -> float:
  """The ratio a run trained its subnets at (DDP: 1, the whole model); per-layer ratios are
  averaged over the partitioned layers."""
  if run.cfg.twist.variant == "ddp":
    return 1.0
  s = run.cfg.subnet
  part = [k for i, k in enumerate(s.kappa) if i not in s.shared_layers] or list(s.kappa)
  return float(np.mean(part))


# ---- golden-ticket report ------------------------------------------------------------------------


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
  kappas = _check_args(kappas, samples, max_windows, mode, correction)
  loaded = _load_runs(runs)
  protocol = _protocol(loaded)
  ref = _reference(loaded)
  mode = mode or ref.cfg.subnet.mode
  specs = _specs(loaded, kappas, mode, ref.cfg.subnet.shared_layers, correction)
  windows = _windows(loaded[0], max_windows)
  t0 = time.perf_counter()
  results = _evaluate_runs(loaded, kappas, samples, specs, windows, seed, batch_size, progress)
  report = {"protocol": protocol, "mode": mode, "samples": samples,
            "shared_layers": list(ref.cfg.subnet.shared_layers), "windows": int(len(windows)),
            "heuristic": "random (uniform, independent draws)", "seed": seed,
            "kappas_deploy": [float(k) for k in kappas], "runs": results,
            "time_s": time.perf_counter() - t0}
  write_report(report, out_dir or loaded[0].workdir)
  return report


def _write_atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  _write_atomic(path, write)


def write_report(report: dict, out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, REPORT_NAME)
  _write_text(base + ".json", json.dumps(report, indent=2) + "\n")
  _write_text(base + ".md", report_markdown(report))
  fig = plot_report(report)
  _write_atomic(base + ".png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
  _close(fig)


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


# ---- plots ---------------------------------------------------------------------------------------


def _pyplot():
  # No backend is forced: headless machines fall back to Agg by themselves, and a notebook
  # keeps its inline backend.
  import matplotlib.pyplot as plt

  return plt


def _close(fig) -> None:
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


# ---- kappa_train x kappa_deploy heatmap ----------------------------------------------------------


def heatmap(workdirs, kappas_deploy, samples: int, out_png: str, *, mode: str | None = None,
            correction: str | None = None, max_windows: int = 64, seed: int = 0,
            batch_size: int = 32, progress: bool = True) -> dict:
  """PPL of the mean loss over random subnets for every (training run, deploy kappa) pair (the
  paper's Figure 5); rows sorted by training kappa (DDP = 1). Writes out_png and a .json beside."""
  kappas = _check_args(kappas_deploy, samples, max_windows, mode, correction)
  runs = _load_runs(_labels(workdirs))
  protocol = _protocol(runs)
  ref = _reference(runs)
  mode = mode or ref.cfg.subnet.mode
  specs = _specs(runs, kappas, mode, ref.cfg.subnet.shared_layers, correction)
  windows = _windows(runs[0], max_windows)
  results = _evaluate_runs(runs, kappas, samples, specs, windows, seed, batch_size, progress)
  rows = sorted(results, key=lambda lb: (results[lb]["variant"] == "ddp",
                                         results[lb]["kappa_train"]))
  grid = {"protocol": protocol, "mode": mode, "samples": samples, "windows": int(len(windows)),
          "kappas_deploy": [float(k) for k in kappas], "rows": rows,
          "kappa_train": [results[lb]["kappa_train"] for lb in rows],
          "workdirs": [results[lb]["workdir"] for lb in rows],
          "ppl": [[results[lb]["kappas"][f"{k:g}"]["ppl_mean"] for k in kappas] for lb in rows],
          "loss_std": [[results[lb]["kappas"][f"{k:g}"]["std"] for k in kappas] for lb in rows]}
  _write_heatmap(grid, out_png)
  return grid


def _labels(workdirs) -> dict:
  """Row labels: the run's folder name."""
  return _unique([os.path.basename(os.path.normpath(w)) for w in workdirs], workdirs)


def _unique(names: list[str], workdirs) -> dict:
  """{label: workdir}, a repeated name made unique with its position (no run is dropped)."""
  return {(n if names.count(n) == 1 else f"{n}#{i}"): w
          for i, (n, w) in enumerate(zip(names, workdirs))}


def _write_heatmap(grid: dict, out_png: str) -> None:
  folder = os.path.dirname(os.path.abspath(out_png))
  os.makedirs(folder, exist_ok=True)
  fig = plot_heatmap(grid)
  _write_atomic(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
  _close(fig)
  _write_text(os.path.splitext(out_png)[0] + ".json", json.dumps(grid, indent=2) + "\n")


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


# ---- command line --------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
  """argparse whose usage errors are UserErrors (one line, exit 2) instead of a usage dump."""

  def error(self, message):
    raise UserError(message)


def run_cli(body, argv=None) -> int:
  """Runs body(argv); a UserError becomes `error: ...` on stderr and status 2."""
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  try:
    summary = body(argv)
  except UserError as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
    return UserError.exit_code
  print(json.dumps(summary, indent=2), flush=True)
  return 0


def _float_list(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise UserError(f"kappas: {text!r} is not a comma-separated list of numbers") from None


def _parser() -> OneLineParser:
  p = OneLineParser(prog="python -m twist_jax.evaluate", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", help="run for the golden-ticket report (files are written here)")
  p.add_argument("--compare", action="append", default=[], help="run(s) shown beside it (DDP)")
  p.add_argument("--kappas", default="0.25,0.5,0.75,1", help="deploy ratios, comma-separated")
  p.add_argument("--samples", type=int, default=16, help="random subnets per ratio")
  p.add_argument("--max-windows", type=int, default=64, help="validation windows (0 = all)")
  p.add_argument("--mode", choices=config_lib.MODES, help="default: the TwIST run's mode")
  p.add_argument("--correction", choices=config_lib.CORRECTIONS,
                 help="default: each run's own subnet.correction")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=32, help="windows x subnets per call")
  p.add_argument("--heatmap", help="runs of a kappa_train sweep, comma-separated")
  p.add_argument("--out", help="heatmap PNG (default: heatmap.png in the first sweep run)")
  p.add_argument("--no-progress", action="store_true")
  return p


def _run_labels(workdir: str, compare: list[str]) -> dict:
  """Report labels: TwIST / DDP by variant (made unique by position if two runs share one)."""
  def kind(w):
    with open(os.path.join(w, "config.json")) as f:
      return "DDP" if json.load(f)["twist"]["variant"] == "ddp" else "TwIST"
  workdirs = [workdir] + compare
  return _unique([kind(w) for w in workdirs], workdirs)


def _main(argv) -> dict:
  a = _parser().parse_args(argv)
  kappas = _check_args(_float_list(a.kappas), a.samples, a.max_windows, a.mode, a.correction)
  if a.batch_size < 1:
    raise UserError(f"--batch-size: got {a.batch_size}; must be >= 1")
  if not a.workdir and not a.heatmap:
    raise UserError("give --workdir RUN (golden-ticket report) and/or --heatmap RUN1,RUN2,...")
  if a.out and not a.heatmap:
    raise UserError("--out names the heatmap PNG; it needs --heatmap")
  sweep = [w for w in (a.heatmap or "").split(",") if w]
  for w in ([a.workdir] if a.workdir else []) + a.compare + sweep:
    check_run(w)
  if a.compare and not a.workdir:
    raise UserError("--compare needs --workdir")
  opts = dict(mode=a.mode, correction=a.correction, max_windows=a.max_windows, seed=a.seed,
              batch_size=a.batch_size, progress=not a.no_progress)
  out = {}
  if a.workdir:
    report = golden_ticket_report(_run_labels(a.workdir, a.compare), kappas, a.samples, **opts)
    out["report"] = os.path.join(os.path.abspath(a.workdir), REPORT_NAME + ".json")
    out.update(_summary(report))
  if sweep:
    png = a.out or os.path.join(sweep[0], "heatmap.png")
    grid = heatmap(sweep, kappas, a.samples, png, **opts)
    out["heatmap"] = {"png": os.path.abspath(png), "rows": grid["rows"],
                      "kappas_deploy": grid["kappas_deploy"], "ppl": grid["ppl"],
                      "protocol": grid["protocol"]}
  return out


def _summary(report: dict) -> dict:
  """The report without the per-subnet losses (those are in the JSON file)."""
  runs = {lb: {"full": r["full"],
               "kappas": {k: {f: d[f] for f in ("mean", "std", "min", "max", "ppl_mean", "params")}
                          for k, d in r["kappas"].items()}}
          for lb, r in report["runs"].items()}
  return {"protocol": report["protocol"], "mode": report["mode"], "samples": report["samples"],
          "runs": runs}


def main(argv=None) -> int:
  return run_cli(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
