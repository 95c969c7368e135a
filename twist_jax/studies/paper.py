"""The paper's protocol at CPU scale: pretrained bases fine-tuned on a shifted domain at equal
tokens; TwIST's random subnets against post-training pruning, a small model and DDP, with seeds.

  python -m twist_jax.studies.paper --out results/paper --bases results/bases   # <= 2.5 h
  python -m twist_jax.studies.paper --out /tmp/paper --quick   # tiny bases and budget, <= 5 min

Arms are data (paper_arms.py); one runner turns an arm into a normal training run in
OUT/runs/<id> (resumed from its checkpoint if interrupted) plus an evaluation, recorded in
OUT/arms/<arm>.json (skipped on a rerun when its config matches). After every finished arm the
report (OUT/paper.{md,json}, plots) is rewritten from the records, so a partial study gives
partial tables. Order: the learning-rate grid (A0, B0; seed 0, full budget), every other arm at
its method's best learning rate (each dense A0/A0' arm followed by its pruning references), then
B* from the screening.
"""

import dataclasses
import json
import os
import sys
import time

from twist_jax import checkpoint, config as config_lib, data, deploy, evaluate, files, train
from twist_jax.baselines import __main__ as baselines_cli
from twist_jax.errors import UserError
from twist_jax.experiments import BASE_FAMILIES
from twist_jax.model import ModelConfig
from twist_jax.studies import paper_arms as arms_lib, paper_eval, paper_report
from twist_jax.studies.paper_arms import KAPPA, Arm

SHAPES = ("full", "half", "narrow_full", "narrow_half")


@dataclasses.dataclass
class Study:
  """What every arm of one study shares, and what it has produced so far."""

  out: str
  s: dict
  quick: bool
  bases_dir: str
  bases_info: dict
  base_models: dict  # shape -> ModelConfig
  dataset: object
  windows: object
  train_tokens: int
  lrs: dict = dataclasses.field(default_factory=dict)  # "A0"/"B0" -> best lr
  records: list = dataclasses.field(default_factory=list)
  references: dict = dataclasses.field(default_factory=dict)  # arm name -> rows
  bstar: dict | None = None
  t0: float = dataclasses.field(default_factory=time.perf_counter)

  def command(self) -> str:
    return (f"python -m twist_jax.studies.paper --out {self.out} --bases {self.bases_dir}"
            + (" --quick" if self.quick else ""))


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# ---- setup ---------------------------------------------------------------------------------------


def load_bases(bases_dir: str | None, out: str, quick: bool) -> tuple[str, dict]:
  """(bases folder, its bases.json): --bases, or for --quick tiny bases made in OUT/bases."""
  if bases_dir is None:
    if not quick:
      raise UserError("--bases: give the folder written by `python -m twist_jax.studies.bases`")
    from twist_jax.studies import bases  # pylint: disable=import-outside-toplevel
    bases_dir = os.path.join(out, "bases")
    bases.make_bases(bases_dir, quick=True)
  if not os.path.isdir(bases_dir):
    raise UserError(f"--bases {bases_dir}: no such folder")
  missing = [s for s in SHAPES if not deploy.is_deployed(os.path.join(bases_dir, s))]
  if missing:
    raise UserError(f"--bases {bases_dir}: no deployed base {missing[0]!r} (have the bases been "
                    "made with `python -m twist_jax.studies.bases`?)")
  return bases_dir, _read_json(os.path.join(bases_dir, "bases.json")) or {}


def setup(out: str, bases_dir: str | None, quick: bool, **overrides) -> Study:
  """The study's shared state; `overrides` replace scale() entries (e.g. windows=128)."""
  s = arms_lib.scale(quick)
  unknown = sorted(set(overrides) - set(s))
  if unknown:
    raise UserError(f"{unknown[0]}: not a study scale entry; allowed: {', '.join(sorted(s))}")
  s.update(overrides)
  bases_dir, info = load_bases(bases_dir, out, quick)
  models = {shape: deploy.load_deployed(os.path.join(bases_dir, shape))[1] for shape in SHAPES}
  spec = config_lib.from_configdict(arms_lib.arm_configdict(
      s, Arm("A0", "ddp"), os.path.join(bases_dir, "full"), models["full"], s["steps"], 1e-3))
  dataset = data.load(spec.data)
  windows = dataset.validation_windows(context=s["context"], max_windows=s["windows"])
  return Study(out, s, quick, bases_dir, info, models, dataset, windows,
               int(dataset.tokens("train").size))


# ---- one arm -------------------------------------------------------------------------------------


def _steps(st: Study, arm: Arm) -> int:
  """Equal tokens per parameter within each width: the wide arms' steps, scaled for narrow."""
  if arm.width == "wide":
    return st.s["steps"]
  m = st.base_models
  return arms_lib.finetune_steps(st.s, m["narrow_full"].num_params(), m["full"].num_params())


def _a0_record(st: Study, arm: Arm) -> dict:
  """The A0 record of the arm's seed and width (C1's teacher and pruning source)."""
  for rec in st.records:
    if rec["label"] == "A0" and rec["arm"]["seed"] == arm.seed and rec["width"] == arm.width:
      return rec
  raise UserError(f"{arm.label} seed {arm.seed} needs A0 seed {arm.seed}, which has not run")


def c1_student(st: Study, a0: dict) -> str:
  """struct-Wanda-50% of A0 (the kappa = 0.5 subnet's shape, nothing rescaled) as a deployed
  folder: C1's starting point."""
  folder = os.path.join(st.out, "runs", f"c1-student-{a0['run']}")
  if not deploy.is_deployed(folder):
    cfg, model, params = checkpoint.load_run(a0["workdir"])
    calib = baselines_cli.calibration_windows(st.dataset, cfg, st.s["calib"])
    small, small_model = paper_eval.prune(params, model, "struct-wanda", 0.5, calib)
    deploy.save_deployed(folder, small, small_model, {"source": os.path.abspath(a0["workdir"]),
                                                      "method": "struct-wanda", "sparsity": 0.5})
  return folder


def arm_config(st: Study, arm: Arm):
  """(frozen config, base folder, teacher ModelConfig or None) of an arm whose lr is known."""
  lr = arm.lr or st.lrs[arm.lr_of]
  base_dir, teacher_dir, teacher = os.path.join(st.bases_dir, arm.base), "", None
  base_model = st.base_models[arm.base]
  if arm.method == "c1":
    a0 = _a0_record(st, arm)
    base_dir, teacher_dir = c1_student(st, a0), a0["workdir"]
    base_model = deploy.load_deployed(base_dir)[1]
    teacher = checkpoint.load_run(a0["workdir"])[1]
  c = arms_lib.arm_configdict(st.s, arm, base_dir, base_model, _steps(st, arm), lr, teacher_dir)
  return config_lib.from_configdict(c), teacher


def _eval_key(st: Study, arm: Arm) -> dict:
  return {"windows": int(len(st.windows)), "samples": st.s["samples"],
          "kappas": list(arms_lib.KAPPAS), "eval_seed": arms_lib.EVAL_SEED, "core": arm.core,
          "subnets": not arm.subnet_sized, "curve": arm.curve,
          "curve_sparsegpt": arm.curve and arm.method == "ddp"}


def _measure(st: Study, arm: Arm, cfg, workdir: str) -> tuple[dict, list]:
  """(final evaluation, curve points) of a finished run; cached in the run folder so arms that
  share a run (B* = B0, a grid point = its seed-0 arm) evaluate it once."""
  key = _eval_key(st, arm)
  path = os.path.join(workdir, "paper_eval.json")
  cached = _read_json(path)
  if cached is not None and cached["key"] == key:
    return cached["eval"], cached["curve"]
  cfg_run, model, params = checkpoint.load_run(workdir)
  kw = dict(samples=st.s["samples"], correction=cfg.subnet.correction, core=arm.core,
            subnets_too=not arm.subnet_sized)
  ev = paper_eval.evaluate_model(params, model, st.windows, **kw)
  curve = []
  if arm.curve:
    calib = (baselines_cli.calibration_windows(st.dataset, cfg_run, st.s["calib"])
             if key["curve_sparsegpt"] else None)
    for step in (cfg.steps // 4, cfg.steps // 2, cfg.steps):
      p = params if step == cfg.steps else checkpoint.params_at(workdir, step)
      point = {"step": step, **paper_eval.evaluate_model(
          p, model, st.windows, **dict(kw, core=0.0), kappas=(KAPPA,))}
      if calib is not None:
        small, m = paper_eval.prune(p, model, "sparsegpt", 0.5, calib)
        point["sparsegpt50"] = evaluate.mean_nll(small, m, st.windows)
      curve.append(point)
  files.write_json(path, {"key": key, "eval": ev, "curve": curve})
  return ev, curve


def _run_folder(st: Study, arm: Arm, cfg, resolved: dict) -> str:
  """The arm's run folder under OUT/runs: an existing one whose config.json is the same run
  (config.differing_fields: fields added since and older spellings count as equal), else a new
  one named by the config's hash."""
  rid = arms_lib.run_id(arm, cfg)
  prefix = rid.rsplit("-", 1)[0] + "-"
  runs = os.path.join(st.out, "runs")
  names = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
  for name in (n for n in names if n != rid and n.startswith(prefix)):
    saved = _read_json(os.path.join(runs, name, "config.json"))
    if saved is not None and not config_lib.differing_fields(saved, resolved):
      return name
  return rid


def run_arm(st: Study, arm: Arm, index: str = "") -> dict:
  """Trains (or resumes, or skips) one arm and evaluates it; returns its record."""
  cfg, teacher = arm_config(st, arm)
  resolved = json.loads(json.dumps(config_lib.to_dict(cfg)))
  path = os.path.join(st.out, "arms", f"{arm.name}.json")
  saved = _read_json(path)
  if (saved is not None and saved["eval_key"] == _eval_key(st, arm)
      and not config_lib.differing_fields(saved["config"], resolved)):
    print(f"[paper] {index} {arm.label} ({arm.name}): done earlier, skipped", flush=True)
    return saved
  rid = _run_folder(st, arm, cfg, resolved)
  workdir = os.path.join(st.out, "runs", rid)
  model = cfg.model.model_config(arms_lib.VOCAB)
  bud = arms_lib.budget(cfg, st.train_tokens, model.num_params(), teacher)
  print(f"[paper] {index} {arm.label} ({arm.name}): {arm.method}, lr {cfg.opt.lr:g}, "
        f"{bud['steps']} steps ({bud['dense_steps']} dense), {bud['tokens']:,} tokens, "
        f"{bud['flops']:.3e} FLOPs", flush=True)
  t0 = time.perf_counter()
  train.train(cfg, workdir)
  t1 = time.perf_counter()
  ev, curve = _measure(st, arm, cfg, workdir)
  record = {"label": arm.label, "name": arm.name, "arm": dataclasses.asdict(arm),
            "width": arm.width, "run": rid, "workdir": workdir, "config": resolved,
            "eval_key": _eval_key(st, arm), "budget": bud, "eval": ev, "curve": curve,
            "train_s": t1 - t0, "eval_s": time.perf_counter() - t1}
  files.write_json(path, record)
  sub = (f", kappa 0.5 random subnets {paper_eval.target_loss(ev):.4f}"
         if "random" in ev else "")
  print(f"[paper] {arm.label}: train {record['train_s']:.0f} s, eval {record['eval_s']:.0f} s; "
        f"full {ev['full']:.4f}{sub}", flush=True)
  return record


def _go(st: Study, arm: Arm, index: str) -> dict:
  """Runs one arm, records it and rewrites the report; a dense A0/A0' arm is followed by its
  pruning references, so the headline comparison lands with it."""
  rec = run_arm(st, arm, index)
  st.records = [r for r in st.records if r["name"] != rec["name"]] + [rec]
  paper_report.write(st.out, report_state(st))
  if rec["label"] in ("A0", "A0'"):
    run_references(st, rec)
  return rec


# ---- the study -----------------------------------------------------------------------------------


def best_lrs(st: Study) -> dict:
  """A0's lr minimises its full loss, B0's the mean loss of its kappa = 0.5 random subnets."""
  out = {}
  for label, score in (("A0", lambda ev: ev["full"]), ("B0", paper_eval.target_loss)):
    grid = [r for r in st.records if r["label"] == f"grid:{label}"]
    out[label] = min(grid, key=lambda r: score(r["eval"]))["config"]["opt"]["lr"]
  return out


def run_references(st: Study, rec: dict) -> None:
  """Every pruning method at 25/50/75% of one trained dense arm (cached per arm)."""
  path = os.path.join(st.out, "arms", f"ref-{rec['name']}.json")
  saved = _read_json(path)
  if saved is None or saved["run"] != rec["run"] or saved["windows"] != len(st.windows):
    print(f"[paper] pruning references of {rec['label']} ({rec['name']})", flush=True)
    t0 = time.perf_counter()
    cfg, model, params = checkpoint.load_run(rec["workdir"])
    calib = baselines_cli.calibration_windows(st.dataset, cfg, st.s["calib"])
    rows = paper_eval.references(params, model, calib, st.windows)
    saved = {"source": rec["name"], "label": rec["label"], "width": rec["width"],
             "run": rec["run"], "windows": len(st.windows), "calib": st.s["calib"],
             "rows": rows, "time_s": time.perf_counter() - t0}
    files.write_json(path, saved)
  st.references[rec["name"]] = saved
  paper_report.write(st.out, report_state(st))


def estimate(st: Study) -> dict:
  """A cost model (not a measurement): each arm's steps x seconds per step of A0 on the d128 full
  base scaled by its step FLOPs, plus its evaluation; B* counted at three seeds (none run if no
  lever passes)."""
  reused = lambda a: a.label in ("A0", "B0") and a.width == "wide" and a.seed == 0  # grid runs
  plan = arms_lib.grid_arms(st.s) + [a for a in arms_lib.main_arms(st.s) if not reused(a)]
  plan += arms_lib.bstar_arms(st.s, arms_lib.NESTEROV)
  (d, h, k, f), _ = BASE_FAMILIES["d128"]["full"]  # sec_per_full_step's model, whatever --bases
  ref = ModelConfig.uniform(n_layer=st.base_models["full"].n_layer, n_head=h, n_embd=d,
                            n_inner=f, head_dim=k)
  a0 = config_lib.from_configdict(arms_lib.arm_configdict(
      st.s, Arm("A0", "ddp"), "", ref, st.s["steps"], 1e-3))
  per_a0 = arms_lib.step_flops(a0)["dense"] / a0.model.n_embd
  total = 0.0
  for arm in plan:
    model = st.base_models["half" if arm.method == "c1" else arm.base]
    c = arms_lib.arm_configdict(st.s, dataclasses.replace(arm, method=(
        "ddp" if arm.method == "c1" else arm.method)), "", model, _steps(st, arm), 1e-3)
    cfg = config_lib.from_configdict(c)
    f = arms_lib.step_flops(cfg, st.base_models["full"] if arm.method == "c1" else None)
    dense = cfg.steps if cfg.twist.variant == "ddp" else cfg.twist.dense_steps
    flops = f["dense"] * dense + f["twist"] * (cfg.steps - dense)
    # Seconds per step scale with FLOPs per width unit: narrower models run less efficiently.
    train_s = st.s["sec_per_full_step"] * flops / (per_a0 * cfg.model.n_embd)
    ev = st.s["eval_s"] * (0.15 if arm.subnet_sized else 1.0) * (1.6 if arm.curve else 1.0)
    total += train_s + ev + st.s["compile_s"]
  refs = (st.s["seeds"] * 2 + 1) * 18 * st.s["eval_s"] / 10
  return {"arms": len(plan), "seconds": total + refs, "model": "a cost model, not a measurement"}


def report_state(st: Study) -> dict:
  return {"command": st.command(), "quick": st.quick, "scale": st.s,
          "bases": st.bases_info, "bases_dir": st.bases_dir,
          "windows": int(len(st.windows)), "train_split_tokens": st.train_tokens,
          "protocol": data.protocol(config_lib.from_configdict(arms_lib.arm_configdict(
              st.s, Arm("A0", "ddp"), "", st.base_models["full"], st.s["steps"], 1e-3)).data,
              st.s["context"]),
          "lrs": st.lrs, "records": st.records, "references": st.references,
          "bstar": st.bstar, "study_s": time.perf_counter() - st.t0}


def run(out: str, bases_dir: str | None = None, quick: bool = False) -> dict:
  st = setup(out, bases_dir, quick)  # checks --bases before anything is written
  os.makedirs(out, exist_ok=True)
  est = estimate(st)
  print(f"[paper] {est['arms']} arms; estimated {est['seconds'] / 60:.0f} min on 2 idle cores "
        f"({est['model']}); {len(st.windows)} validation windows", flush=True)
  grid = arms_lib.grid_arms(st.s)
  for i, arm in enumerate(grid):
    _go(st, arm, f"grid {i + 1}/{len(grid)}")
  st.lrs = best_lrs(st)
  print(f"[paper] best learning rates: A0 {st.lrs['A0']:g}, B0 {st.lrs['B0']:g}", flush=True)
  main = arms_lib.main_arms(st.s)
  for i, arm in enumerate(main):
    _go(st, arm, f"{i + 1}/{len(main)}")
  b0 = [paper_eval.target_loss(r["eval"]) for r in st.records
        if r["label"] == "B0" and r["width"] == "wide"]
  levers = {r["label"]: paper_eval.target_loss(r["eval"]) for r in st.records
            if r["label"] in arms_lib.LEVERS}
  st.bstar = paper_eval.select(b0, levers)
  st.bstar["levers"] = [list(x) for x in arms_lib.merge_levers(st.bstar["winners"])]
  print(f"[paper] B* levers: {', '.join(st.bstar['winners']) or 'none (B* = B0)'}", flush=True)
  extra = arms_lib.bstar_arms(st.s, arms_lib.merge_levers(st.bstar["winners"]))
  for i, arm in enumerate(extra):
    _go(st, arm, f"B* {i + 1}/{len(extra)}")
  state = report_state(st)
  paper_report.write(out, state)
  print(f"[paper] done in {state['study_s'] / 60:.1f} min: {os.path.join(out, 'paper.md')}",
        flush=True)
  return state


# The table's core rows: the dense fine-tune and its pruning, the small model, TwIST.
CORE_ARMS = (Arm("A0", "ddp"), Arm("S", "ddp", base="half"), Arm("B0", "twist", lr_of="B0"))


def core_rows(out: str, bases_dir: str | None, lrs: dict, quick: bool = False,
              **overrides) -> dict:
  """Seed 0 of A0 (with its pruning references), S and B0 at learning rates `lrs` ({"A0": ..,
  "B0": ..}, e.g. the full study's), for a short look at the table (the golden-tickets
  notebook); `overrides` as in setup(), e.g. fewer windows and samples. Returns the report
  state; OUT/paper.{md,json} hold the partial table."""
  st = setup(out, bases_dir, quick, **overrides)
  os.makedirs(out, exist_ok=True)
  st.lrs = {"A0": float(lrs["A0"]), "B0": float(lrs["B0"])}
  for i, arm in enumerate(CORE_ARMS):
    _go(st, arm, f"{i + 1}/{len(CORE_ARMS)}")
  return report_state(st)


def _main(argv) -> evaluate.Output:
  p = evaluate.OneLineParser(prog="python -m twist_jax.studies.paper",
                             description=__doc__.splitlines()[0])
  p.add_argument("--out", default="results/paper", help="folder for paper.{md,json}, plots, "
                 "arms/ and runs/")
  p.add_argument("--bases", help="folder of the pretrained bases (studies/bases.py); --quick "
                 "without it makes tiny ones in OUT/bases")
  p.add_argument("--quick", action="store_true", help="every arm at a tiny budget, one seed")
  a = p.parse_args(argv)
  state = run(a.out, a.bases, a.quick)
  return evaluate.Output(state, paper_report.markdown(paper_report.summarize(state)))


def main(argv=None) -> int:
  """Usage errors and bad configs: one line on stderr, exit status 2."""
  return evaluate.run_cli(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
