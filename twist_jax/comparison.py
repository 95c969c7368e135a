"""The paper's comparison at CPU scale: TwIST golden tickets vs post-training pruning of DDP.

  python -m twist_jax.comparison --out results            # ~30 min on 2 CPU cores
  python -m twist_jax.comparison --out /tmp/c --quick     # seconds-scale check of the pipeline

(a) pretrain a base model with DDP (standing in for pretrained GPT-2); (b) fine-tune it for the
same token budget with DDP and with TwIST; (c) prune the DDP model with every baseline and
evaluate random subnets of the TwIST model; (d) controls: a dense model of the subnet's size
trained on all the tokens, local SGD (kappa = 1, same R), TwIST from scratch; plus the
activation-shift ablation (TwIST fine-tuned with correction none / mean / norm).
Every stage is a normal run in OUT/runs/NAME (rerunning resumes or skips finished stages).
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402

from twist_jax import config as config_lib, evaluate, files, subnets, train  # noqa: E402
from twist_jax.baselines import __main__ as baselines_cli  # noqa: E402
from twist_jax.model import flops_per_token  # noqa: E402

SPARSITIES = (0.25, 0.5, 0.75)
UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
STRUCTURED = ("struct-random", "struct-magnitude", "struct-wanda")


def scale(quick: bool) -> dict:
  """Model size and step budgets: CPU scale (minutes per run) or quick (seconds)."""
  if quick:
    return dict(model=dict(n_layer=2, n_head=4, n_embd=32, context=32), batch=4, pretrain=20,
                finetune=10, local_steps=5, samples=3, max_windows=16)
  return dict(model=dict(n_layer=4, n_head=8, n_embd=128, context=128), batch=8, pretrain=600,
              finetune=300, local_steps=15, samples=16, max_windows=256)


def _config(s: dict, variant: str, steps: int, *, lr: float, warmup: int,
            **subnet) -> ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.model.update(**s["model"])
  c.data.batch_size = s["batch"]
  c.twist.update(variant=variant, workers=4, local_steps=s["local_steps"])
  c.subnet.update({"mode": "attn_mlp", "kappa": 0.5, **subnet})
  c.steps = steps
  c.opt.update(lr=lr, warmup_steps=warmup)
  c.eval.update(every=steps, max_windows=s["max_windows"])
  c.ckpt.update(every=steps, keep=1)
  c.log.progress = False
  return c


def stages(s: dict, out: str) -> dict[str, ml_collections.ConfigDict]:
  """name -> config, in dependency order (fine-tunes start from the base run)."""
  p, f = s["pretrain"], s["finetune"]
  run = lambda name: os.path.join(out, "runs", name)
  ft = dict(lr=1e-3, warmup=max(f // 15, 1))
  base = _config(s, "ddp", p, lr=3e-3, warmup=max(p // 12, 1))

  def finetune(variant, **subnet):
    c = _config(s, variant, f, **ft, **subnet)
    c.init.from_run = run("base_ddp")
    return c
  small = _config(s, "ddp", p + f, lr=3e-3, warmup=max(p // 12, 1))
  small.model.update(n_head=s["model"]["n_head"] // 2,
                     head_dim=s["model"]["n_embd"] // s["model"]["n_head"],
                     n_inner=2 * s["model"]["n_embd"])  # the attn_mlp kappa = 0.5 subnet's shape
  return {"base_ddp": base, "ft_ddp": finetune("ddp"), "ft_twist": finetune("true"),
          "ft_twist_none": finetune("true", correction="none"),
          "ft_twist_norm": finetune("true", correction="norm"),
          "ctl_local_sgd": finetune("true", kappa=1.0),
          "ctl_small_dense": small,
          "ctl_twist_scratch": _config(s, "true", p + f, lr=3e-3, warmup=max(p // 12, 1))}


def _train_all(configs: dict, out: str) -> dict:
  done = {}
  for name, c in configs.items():
    workdir = os.path.join(out, "runs", name)
    cfg = config_lib.from_configdict(c)
    t0 = time.perf_counter()
    print(f"[comparison] training {name} ({cfg.twist.variant}, {cfg.steps} steps)", flush=True)
    summary = train.train(cfg, workdir)
    done[name] = {"workdir": workdir, "cfg": cfg, "summary": summary,
                  "time_s": time.perf_counter() - t0}
  return done


def _budget(run: dict, vocab: int) -> tuple[int, float]:
  """(tokens, training FLOPs) of one run (a worker trains its subnet's FLOPs per token)."""
  cfg = run["cfg"]
  tokens = cfg.steps * cfg.twist.workers * cfg.data.batch_size * cfg.model.context
  model = cfg.model.model_config(vocab)
  if cfg.twist.variant != "ddp":
    model = subnets.subnet_model_config(model, subnets.make_spec(model, cfg.subnet, 1))
  return tokens, tokens * flops_per_token(model, cfg.model.context)


def _baselines(workdir: str, s: dict) -> list[dict]:
  rows = []
  for sparsity in SPARSITIES:
    for method in UNSTRUCTURED + STRUCTURED:
      print(f"[comparison] baseline {method} at sparsity {sparsity}", flush=True)
      out = baselines_cli._main(["--workdir", workdir, "--method", method,
                                 "--sparsity", str(sparsity), "--calib-windows", "64",
                                 "--max-windows", str(s["max_windows"])])
      rows.append(out.record)
  return rows


def run(out: str, quick: bool = False) -> dict:
  s = scale(quick)
  os.makedirs(out, exist_ok=True)
  runs = _train_all(stages(s, out), out)
  kappas = (0.25, 0.5, 0.75, 1.0)
  report = evaluate.golden_ticket_report(
      {"TwIST": runs["ft_twist"]["workdir"], "DDP": runs["ft_ddp"]["workdir"],
       "LocalSGD": runs["ctl_local_sgd"]["workdir"],
       "TwIST-scratch": runs["ctl_twist_scratch"]["workdir"]},
      kappas, s["samples"], mode="attn_mlp", max_windows=s["max_windows"], out_dir=out)
  ablation = evaluate.golden_ticket_report(
      {"mean": runs["ft_twist"]["workdir"], "none": runs["ft_twist_none"]["workdir"],
       "norm": runs["ft_twist_norm"]["workdir"]},
      (0.25, 0.5, 0.75, 1.0), s["samples"], mode="attn_mlp", max_windows=s["max_windows"],
      out_dir=os.path.join(out, "ablation"))
  base_rows = _baselines(runs["ft_ddp"]["workdir"], s)
  small = evaluate.golden_ticket_report({"small": runs["ctl_small_dense"]["workdir"]}, (1.0,), 1,
                                        mode="attn_mlp", max_windows=s["max_windows"],
                                        out_dir=os.path.join(out, "small_dense"), progress=False)
  result = {"scale": s, "quick": quick, "out": out, "golden_tickets": report, "ablation": ablation,
            "baselines": base_rows, "small_dense": small,
            "runs": {k: {"workdir": v["workdir"], "time_s": v["time_s"],
                         "summary": v["summary"]} for k, v in runs.items()},
            "machine": _machine()}
  vocab = 256
  result["budgets"] = {k: dict(zip(("tokens", "flops"), _budget(v, vocab)))
                       for k, v in runs.items()}
  files.write_text(os.path.join(out, "comparison.json"),
                   json.dumps(result, indent=1, default=str) + "\n")
  files.write_text(os.path.join(out, "comparison.md"), markdown(result))
  plot(result, os.path.join(out, "comparison.png"))
  return result


def _machine() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpus": os.cpu_count(), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _stats(report: dict, label: str, kappa: float) -> dict:
  return report["runs"][label]["kappas"][f"{kappa:g}"]


def _ppl_cell(st: dict) -> str:
  """PPL of the mean loss; for several subnets also the loss std and the PPL range."""
  import math

  if len(st["losses"]) == 1 or st["std"] == 0:
    return f"{math.exp(st['mean']):.2f}"
  return (f"{math.exp(st['mean']):.2f} ±{st['std']:.3f} "
          f"[{math.exp(st['min']):.2f}–{math.exp(st['max']):.2f}]")


def markdown(r: dict) -> str:
  """The comparison table (PPL per method per sparsity) with budgets, ablation and setup."""
  gt, b = r["golden_tickets"], r["budgets"]
  pre = b["base_ddp"]
  with_pre = lambda name, k: b[name][k] + (pre[k] if name.startswith(("ft_", "ctl_local")) else 0)
  fmt = lambda name: f"{with_pre(name, 'tokens') / 1e6:.2f}M / {with_pre(name, 'flops'):.2e}"
  lines = ["# TwIST vs post-training pruning (CPU scale, built-in corpus)", "",
           "Command: `python -m twist_jax.comparison --out "
           f"{r['out']}{' --quick' if r['quick'] else ''}`",
           f"Machine: {r['machine']}", "", f"Protocol: {gt['protocol']}", "",
           f"Sparsity = 1 - kappa of the transformer blocks' parameters (attn_mlp: heads and MLP "
           f"units); random-subnet cells show PPL of the mean loss over {gt['samples']} random "
           "subnets, ± the std of their losses (nats), [best–worst subnet PPL]. Tokens / FLOPs "
           "include the DDP pretraining stage for fine-tuned models.", "",
           "| method | model | tokens / train FLOPs | " +
           " | ".join(f"sparsity {1 - k:g}" for k in (1.0, 0.75, 0.5, 0.25)) + " |",
           "|---|---|---|" + "---|" * 4]
  for label, run_name in (("TwIST random subnets (fine-tuned)", "ft_twist"),
                          ("DDP random subnets (fine-tuned)", "ft_ddp"),
                          ("local SGD random subnets", "ctl_local_sgd"),
                          ("TwIST random subnets (from scratch)", "ctl_twist_scratch")):
    key = {"ft_twist": "TwIST", "ft_ddp": "DDP", "ctl_local_sgd": "LocalSGD",
           "ctl_twist_scratch": "TwIST-scratch"}[run_name]
    cells = [_ppl_cell(_stats(gt, key, k)) for k in (1.0, 0.75, 0.5, 0.25)]
    lines.append(f"| {label} | {run_name} | {fmt(run_name)} | " + " | ".join(cells) + " |")
  import math

  for method in UNSTRUCTURED + STRUCTURED:
    cells = ["–"]
    for sp in (0.25, 0.5, 0.75):
      row = next(x for x in r["baselines"] if x["method"] == method and x["sparsity"] == sp)
      cells.append(f"{row['val_ppl']:.2f}")
    lines.append(f"| {method} (post-training, on DDP) | ft_ddp | {fmt('ft_ddp')} | " +
                 " | ".join(cells) + " |")
  small = r["small_dense"]["runs"]["small"]["kappas"]["1"]
  lines.append(f"| dense model of the kappa=0.5 subnet's size | ctl_small_dense | "
               f"{fmt('ctl_small_dense')} | – | – | {math.exp(small['mean']):.2f} | – |")
  lines += ["", "## Activation-shift ablation (TwIST fine-tuned with each correction)", "",
            "| correction | " + " | ".join(f"kappa {k:g}" for k in (1.0, 0.75, 0.5, 0.25)) + " |",
            "|---|" + "---|" * 4]
  for corr in ("none", "mean", "norm"):
    lines.append(f"| {corr} | " + " | ".join(_ppl_cell(_stats(r["ablation"], corr, k))
                                            for k in (1.0, 0.75, 0.5, 0.25)) + " |")
  return "\n".join(lines) + "\n"


def plot(r: dict, path: str) -> None:
  """PPL vs sparsity: TwIST/DDP random subnets (mean, min-max band) and every baseline."""
  import math

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, color in (("TwIST", "C0"), ("DDP", "C3"), ("LocalSGD", "C2")):
    ks = (1.0, 0.75, 0.5, 0.25)
    st = [_stats(r["golden_tickets"], label, k) for k in ks]
    sp = [1 - k for k in ks]
    ax.plot(sp, [math.exp(x["mean"]) for x in st], "o-", color=color,
            label=f"{label}: random subnets")
    ax.fill_between(sp, [math.exp(x["min"]) for x in st], [math.exp(x["max"]) for x in st],
                    color=color, alpha=0.15)
  for i, method in enumerate(UNSTRUCTURED + STRUCTURED):
    rows = sorted((x for x in r["baselines"] if x["method"] == method), key=lambda x: x["sparsity"])
    ax.plot([x["sparsity"] for x in rows], [x["val_ppl"] for x in rows], "x--",
            color=f"C{i + 4}", label=f"{method} (DDP)")
  ax.set_yscale("log")
  ax.set_xlabel("sparsity of block parameters (1 - kappa)")
  ax.set_ylabel("validation perplexity (bytes)")
  ax.set_title("Zero-cost TwIST subnets vs post-training pruning")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  evaluate.plots.save_png(fig, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="results", help="folder for comparison.{md,json,png} and runs/")
  p.add_argument("--quick", action="store_true", help="tiny models, seconds per stage")
  a = p.parse_args(argv)
  r = run(a.out, a.quick)
  print(markdown(r))
  return 0


if __name__ == "__main__":
  sys.exit(main())
