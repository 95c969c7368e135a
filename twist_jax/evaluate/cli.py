"""Command-line plumbing shared by the evaluation CLIs (evaluate, baselines): one-line usage
errors with exit status 2, and a short human summary on stdout with the full record in a file
(or on stdout with --json)."""

import argparse
import dataclasses
import json
import os
import sys

from twist_jax import config as config_lib
from twist_jax.errors import UserError
from twist_jax.evaluate import report as report_lib, runs as runs_lib


class OneLineParser(argparse.ArgumentParser):
  """argparse whose usage errors are UserErrors (one line, exit 2) instead of a usage dump."""

  def error(self, message):
    raise UserError(message)


@dataclasses.dataclass(frozen=True)
class Output:
  """What a CLI prints: `text` by default, `record` (the full JSON) with --json."""
  record: dict
  text: str
  as_json: bool = False


def run_cli(body, argv=None) -> int:
  """Runs body(argv) -> Output; a UserError becomes `error: ...` on stderr and status 2."""
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  try:
    out = body(argv)
  except UserError as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
    return UserError.exit_code
  print(json.dumps(out.record, indent=2) if out.as_json else out.text, flush=True)
  return 0


def add_json_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--json", action="store_true",
                 help="print the full JSON record instead of the short summary")


def _float_list(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise UserError(f"kappas: {text!r} is not a comma-separated list of numbers") from None


USAGE = """\
  python -m twist_jax.evaluate --workdir RUN [--compare RUN_DDP] --kappas 0.25,0.5,0.75,1 \\
      --samples 16 [--max-windows 64] [--heatmap RUN1,RUN2,... --out heatmap.png] [--json]

Prints a short table (per run and kappa: mean +- std and worst loss, and PPL); the full report
is in RUN/golden_tickets.json (and .md, .png), the heatmap's in the .json beside its PNG.
--json prints that JSON instead (with both --workdir and --heatmap:
{"golden_tickets": report, "heatmap": grid}).
"""


def _parser() -> OneLineParser:
  p = OneLineParser(prog="python -m twist_jax.evaluate", epilog=USAGE,
                    description="Golden tickets of trained runs and the kappa heatmap.",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
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
  add_json_flag(p)
  return p


def _run_labels(workdir: str, compare: list[str]) -> dict:
  """Report labels: TwIST / DDP by variant (made unique by position if two runs share one)."""
  def kind(w):
    with open(os.path.join(w, "config.json")) as f:
      return runs_lib.variant_label(json.load(f)["twist"]["variant"])
  workdirs = [workdir] + compare
  return runs_lib.unique_labels([kind(w) for w in workdirs], workdirs)


def _check(a) -> tuple[tuple[float, ...], list[str]]:
  """Everything checkable before a run is loaded: (kappas, heatmap workdirs)."""
  kappas = runs_lib.check_args(_float_list(a.kappas), a.samples, a.max_windows, a.mode,
                               a.correction)
  if a.batch_size < 1:
    raise UserError(f"--batch-size: got {a.batch_size}; must be >= 1")
  if not a.workdir and not a.heatmap:
    raise UserError("give --workdir RUN (golden-ticket report) and/or --heatmap RUN1,RUN2,...")
  if a.out and not a.heatmap:
    raise UserError("--out names the heatmap PNG; it needs --heatmap")
  sweep = [w for w in (a.heatmap or "").split(",") if w]
  for w in ([a.workdir] if a.workdir else []) + a.compare + sweep:
    runs_lib.check_run(w)
  if a.compare and not a.workdir:
    raise UserError("--compare needs --workdir")
  return kappas, sweep


def _main(argv) -> Output:
  a = _parser().parse_args(argv)
  kappas, sweep = _check(a)
  opts = dict(mode=a.mode, correction=a.correction, max_windows=a.max_windows, seed=a.seed,
              batch_size=a.batch_size, progress=not a.no_progress)
  records, text = {}, []
  if a.workdir:
    report = report_lib.golden_ticket_report(_run_labels(a.workdir, a.compare), kappas,
                                             a.samples, **opts)
    paths = report_lib.report_paths(a.workdir)
    records["golden_tickets"] = report
    text += [report_lib.summary_table(report), f"report: {paths['json']} (.md, .png)"]
  if sweep:
    png = os.path.abspath(a.out or os.path.join(sweep[0], "heatmap.png"))
    grid = report_lib.heatmap(sweep, kappas, a.samples, png, **opts)
    records["heatmap"] = grid
    text += [report_lib.heatmap_table(grid),
             f"heatmap: {png} ({report_lib.heatmap_json_path(png)})"]
  record = next(iter(records.values())) if len(records) == 1 else records
  return Output(record, "\n".join(text), a.json)


def main(argv=None) -> int:
  return run_cli(_main, argv)
