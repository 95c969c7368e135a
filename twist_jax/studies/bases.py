"""The pretrained bases of the paper-protocol study (studies/paper.py): dense GPT-2s pretrained
with DDP on python_source (the stdlib's code), the repo's stand-in for pretrained GPT-2.

  python -m twist_jax.studies.bases --out results/bases          # ~1.5 h on 2 idle cores
  python -m twist_jax.studies.bases --out results/bases_d64 --family d64   # half the widths
  python -m twist_jax.studies.bases --out /tmp/bases --quick     # tiny budget, ~2 min (CI)

Each shape of the family (twist_jax/experiments.py BASE_FAMILIES) trains as a normal run in
OUT/runs/<shape> (resumed if interrupted, skipped if finished); then OUT/<shape>/ is written by
deploy.save_deployed, so a run starts from it with --config.init.from_run=OUT/<shape>. The
full-width shapes also carry OUT/<shape>/hf, a Hugging Face GPT-2 folder (--config.init.hf=
OUT/full/hf works, and so does transformers); the half shapes cannot: their 4 heads of 16 in a
128-wide model are not a transformers GPT-2. OUT/bases.{json,md} record each base's size,
tokens, epochs, training time and loss on the whole python_source validation split, and the
regime check: each half base must trail its full base by at least REGIME_GAP nats, or model
size does not matter yet and TwIST-vs-pruning comparisons on top cannot show anything.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import time

import jax

from twist_jax import checkpoint, config as config_lib, data, deploy, evaluate, files, train
from twist_jax.config import default_config
from twist_jax.errors import ConfigError, UserError
from twist_jax.experiments import BASE_FAMILIES, BASE_SHAPES, pysource_base
from twist_jax.model import ModelConfig

REGIME_GAP = 0.06  # nats/byte the half base must trail the full one by (issue 18)
PAIRS = (("full", "half"), ("narrow_full", "narrow_half"))
QUICK = dict(steps=15, eval_every=15, windows=32)  # --quick: the code paths at a tiny budget
EVAL_BATCH = 64


def base_configdict(shape: str, quick: bool = False, family: str = "d128"):
  """The pretraining config of `shape` (experiments/pysource_base.py:<family>:<shape>), or its
  --quick shrink: same model, a few steps."""
  c = pysource_base(default_config(), shape, family)
  c.log.progress = False
  if quick:
    c.steps = QUICK["steps"]
    c.eval.update(every=QUICK["eval_every"], max_windows=QUICK["windows"])
    c.ckpt.every = QUICK["eval_every"]
  return c


def _uptime() -> str:
  with open("/proc/loadavg", encoding="utf-8") as f:
    return " ".join(f.read().split()[:3])


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _latest_step(workdir: str) -> int | None:
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  return checkpoint.manager(workdir).latest_step()


def train_base(shape: str, out: str, quick: bool, family: str = "d128") -> str:
  """Trains (or resumes, or skips) OUT/runs/<shape>; appends the segment's timing to its
  timing.jsonl (wall and CPU seconds, load average before and after); returns the workdir."""
  workdir = os.path.join(out, "runs", shape)
  cfg = config_lib.from_configdict(base_configdict(shape, quick, family))
  start = _latest_step(workdir)
  if start == cfg.steps:
    return workdir
  load, t0, c0 = _uptime(), time.time(), _cpu_s()
  print(f"base {shape}: training steps {start or 0}..{cfg.steps}", flush=True)
  train.train(cfg, workdir)
  seg = dict(start_step=start or 0, end_step=cfg.steps, wall_s=round(time.time() - t0, 1),
             cpu_s=round(_cpu_s() - c0, 1), loadavg_before=load, loadavg_after=_uptime(),
             cores=os.cpu_count(), jax=jax.__version__)
  with open(os.path.join(workdir, "timing.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(seg) + "\n")
  return workdir


def _timing(workdir: str) -> dict:
  path = os.path.join(workdir, "timing.jsonl")
  segs = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      segs = [json.loads(line) for line in f if line.strip()]
  cpu = [s.get("cpu_s") for s in segs]  # None where a segment's CPU time was not recorded
  return dict(segments=segs, wall_s=round(sum(s["wall_s"] for s in segs), 1),
              cpu_s=round(sum(cpu), 1) if segs and None not in cpu else None)


def export_base(shape: str, workdir: str, out: str, record: dict, command: str) -> str:
  """OUT/<shape>: the run's final params as a deployed folder (+ hf/ where transformers can
  hold the shape); rewritten only when the run moved past the exported step."""
  folder = os.path.join(out, shape)
  info_path = os.path.join(folder, deploy.SUBNET_FILE)
  if os.path.exists(info_path):
    with open(info_path, encoding="utf-8") as f:
      if json.load(f).get("step") == record["steps"]:
        return folder
    if not deploy.is_deployed(folder):
      raise UserError(f"{folder}: exists and is not a deployed base; move it away")
    shutil.rmtree(folder)  # an older export of a run that has trained on since
  params, meta = checkpoint.latest_params(workdir)
  model = ModelConfig.from_dict(meta["model"])
  hf = model.n_head[0] * model.head_dim == model.n_embd
  info = dict(base=shape, step=record["steps"], source="python_source", command=command)
  deploy.save_deployed(folder, params, model, info, hf=hf)
  return folder


def _copy_logs(workdir: str, dest: str) -> None:
  """The run's config, metrics and timing beside the shipped base (the runs stay uncommitted)."""
  os.makedirs(dest, exist_ok=True)
  for name in ("config.json", "metrics.jsonl", "timing.jsonl"):
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(dest, name))


def base_record(shape: str, workdir: str, windows, train_tokens: int) -> dict:
  """Size, budget, time and whole-validation loss of a finished base run."""
  params, meta = checkpoint.latest_params(workdir)
  model = ModelConfig.from_dict(meta["model"])
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    resolved = json.load(f)
  steps, t = resolved["steps"], resolved["twist"]
  tokens = steps * t["workers"] * resolved["data"]["batch_size"] * resolved["model"]["context"]
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  loss = evaluate.mean_nll(params, model, windows, batch_size=EVAL_BATCH)
  return dict(shape=shape, model=dict(n_embd=model.n_embd, n_head=model.n_head[0],
                                      head_dim=model.head_dim, n_inner=model.n_inner[0]),
              params=n_params, steps=steps, tokens=tokens,
              tokens_per_param=round(tokens / n_params, 2),
              epochs=round(tokens / train_tokens, 3), val_loss=round(float(loss), 5),
              val_windows=int(len(windows)), timing=_timing(workdir))


def regime(records: dict) -> list[dict]:
  """Per (full, half) pair present: half's loss minus full's, and whether it clears the bar."""
  rows = []
  for full, half in PAIRS:
    if full in records and half in records:
      gap = records[half]["val_loss"] - records[full]["val_loss"]
      rows.append(dict(full=full, half=half, half_minus_full=round(gap, 5),
                       required=REGIME_GAP, holds=bool(gap >= REGIME_GAP)))
  return rows


def report_markdown(info: dict) -> str:
  lines = ["# Pretrained bases (python_source, dense DDP)", "",
           f"Made by `{info['command']}`; losses in nats/byte on all "
           f"{info['val_windows']} windows of 129 bytes of the python_source validation split. "
           "Wall and CPU seconds are as measured, with each segment's load average in "
           "logs/SHAPE/timing.jsonl: not idle-machine figures unless that load says so.", "",
           "| base | model (D, heads x head dim, MLP) | params | steps | tokens | tokens/param "
           "| epochs | wall s | CPU s | val loss |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in info["bases"].values():
    m, tm = r["model"], r["timing"]
    lines.append(f"| {r['shape']} | {m['n_embd']}, {m['n_head']} x {m['head_dim']}, "
                 f"{m['n_inner']} | {r['params']:,} | {r['steps']} | {r['tokens']:,} | "
                 f"{r['tokens_per_param']} | {r['epochs']} | {tm['wall_s'] or '-'} | "
                 f"{tm['cpu_s'] or '-'} | {r['val_loss']:.4f} |")
  lines += ["", "Regime check (the half base must trail the full one by at least "
            f"{REGIME_GAP} nats):", ""]
  for g in info["regime"]:
    verdict = "holds" if g["holds"] else "FAILS: model size does not matter yet at this budget"
    lines.append(f"- {g['half']} - {g['full']} = {g['half_minus_full']:+.4f} nats: {verdict}")
  return "\n".join(lines) + "\n"


def make_bases(out: str, *, quick: bool = False, shapes=BASE_SHAPES, family: str = "d128") -> dict:
  """Trains, exports and checks the bases; writes OUT/bases.{json,md}; returns the json dict."""
  if family not in BASE_FAMILIES:
    raise ConfigError("--family", f"unknown {family!r}; allowed: {', '.join(BASE_FAMILIES)}")
  unknown = sorted(set(shapes) - set(BASE_SHAPES))
  if unknown:
    raise ConfigError("--shapes", f"unknown {unknown[0]!r}; allowed: "
                                 f"{', '.join(BASE_SHAPES)}")
  first = base_configdict(shapes[0], quick, family)
  dataset = data.load(first.data)
  windows = dataset.validation_windows(context=first.model.context,
                                       max_windows=QUICK["windows"] if quick else None)
  train_tokens = int(dataset.tokens("train").size)
  command = (f"python -m twist_jax.studies.bases --out {out}"
             + (f" --family {family}" if family != "d128" else "") + (" --quick" if quick else ""))
  records = {}
  for shape in shapes:
    workdir = train_base(shape, out, quick, family)
    records[shape] = base_record(shape, workdir, windows, train_tokens)
    _copy_logs(workdir, os.path.join(out, "logs", shape))
    export_base(shape, workdir, out, records[shape], command)
    print(f"base {shape}: val loss {records[shape]['val_loss']:.4f} "
          f"({records[shape]['tokens_per_param']} tokens/param)", flush=True)
  info = dict(command=command, family=family, quick=quick, corpus="python_source",
              val_windows=len(windows),
              train_tokens=train_tokens, bases=records, regime=regime(records))
  files.write_json(os.path.join(out, "bases.json"), info, sort_keys=True)
  files.write_text(os.path.join(out, "bases.md"), report_markdown(info))
  plot_bases(info, out)
  for g in info["regime"]:
    print(f"regime check: {g['half']} - {g['full']} = {g['half_minus_full']:+.4f} nats "
          f"({'holds' if g['holds'] else 'FAILS'}: needs >= {REGIME_GAP})", flush=True)
  return info


def _val_curve(out: str, shape: str) -> tuple[list, list]:
  path = os.path.join(out, "logs", shape, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if '"val_loss"' in line]
  return [r["step"] for r in lines], [r["val_loss"] for r in lines]


def plot_bases(info: dict, out: str) -> None:
  """OUT/bases.png: validation loss during pretraining (the runs' spread windows), one panel per
  width, full and half together, so the gap's growth is visible."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  pairs = [p for p in PAIRS if all(s in info["bases"] for s in p)]
  if not pairs:  # a single shape (--shapes): nothing to compare
    return
  fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.6), squeeze=False)
  for ax, pair in zip(axes[0], pairs):
    for shape in pair:
      steps, losses = _val_curve(out, shape)
      ax.plot(steps, losses, marker="o", ms=3, label=f"{shape} ({info['bases'][shape]['params']:,}"
              " params)")
    ax.set(xlabel="step", ylabel="val loss (nats/byte)", title=f"{pair[0]} vs {pair[1]}")
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  evaluate.plots.save_png(fig, os.path.join(out, "bases.png"))


def _parser() -> argparse.ArgumentParser:
  p = evaluate.OneLineParser(prog="python -m twist_jax.studies.bases", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="folder for the bases, their runs and report")
  p.add_argument("--quick", action="store_true", help="a few steps per base (pipeline check)")
  p.add_argument("--family", default="d128", help=f"which widths: {', '.join(BASE_FAMILIES)} "
                 "(twist_jax/experiments.py BASE_FAMILIES)")
  p.add_argument("--shapes", default=",".join(BASE_SHAPES),
                 help=f"comma-separated subset of {', '.join(BASE_SHAPES)}")
  return p


def _main(argv) -> evaluate.Output:
  a = _parser().parse_args(argv)
  info = make_bases(a.out, quick=a.quick, shapes=tuple(a.shapes.split(",")), family=a.family)
  return evaluate.Output(info, report_markdown(info))


def main(argv=None) -> int:
  return evaluate.run_cli(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
