"""The training loop: rounds of R local steps, validation, checkpoints, logging. No model math.

Every variant (ddp, true, masked, hybrid) runs through the same loop; only the round function
differs (`variants.make_round`). Subnets of round r are sampled from fold_in(seed key, r), so a
resumed run draws the same subnets as an uninterrupted one.
"""

import dataclasses
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from twist_jax import aggregate, checkpoint, config as config_lib, data, evaluate, files
from twist_jax import parallel
from twist_jax import subnet_spec, subnets, variants, worker
from twist_jax.errors import ConfigError, DivergenceError
from twist_jax.model import ModelConfig, flops_per_token, init_params


@dataclasses.dataclass
class Run:
  """Everything a run needs, built and validated before anything is written to the workdir."""

  cfg: config_lib.Config
  workdir: str
  dataset: data.Dataset
  model: ModelConfig
  spec: subnet_spec.SubnetSpec | None
  ctx: variants.RoundContext
  init_params: dict


# ---- setup ---------------------------------------------------------------------------------------


def _saved_params(path: str, field: str):
  """(params, ModelConfig) of a run's latest checkpoint or of a deployed model folder."""
  from twist_jax import deploy  # pylint: disable=import-outside-toplevel

  if deploy.is_deployed(path):
    return deploy.load_deployed(path)
  if not os.path.isdir(path):
    raise ConfigError(field, f"{path!r} is neither a run's workdir nor a deployed model folder")
  params, meta = checkpoint.latest_params(path)
  return params, ModelConfig.from_dict(meta["model"])


def _initial_params(cfg: config_lib.Config, model: ModelConfig):
  """Random init, another run's or a deployed model's params (init.from_run) or a Hugging Face
  GPT-2 (init.hf)."""
  if cfg.init.from_run:
    params, theirs = _saved_params(cfg.init.from_run, "init.from_run")
    shape = lambda m: (m.n_head, m.head_dim, m.n_inner, m.n_embd, m.vocab_size)
    if shape(theirs) != shape(model):
      raise ConfigError("init.from_run", f"that run's model {theirs} does not match {model}")
    if theirs.n_positions < model.n_positions:
      raise ConfigError("model.context", f"{model.n_positions} exceeds init.from_run's "
                        f"positions {theirs.n_positions}")
    params = dict(params, wpe={"embedding": params["wpe"]["embedding"][:model.n_positions]})
    return jax.tree.map(jnp.asarray, params)
  return init_params(model, jax.random.fold_in(jax.random.key(cfg.seed), 0))


def _teacher(cfg: config_lib.Config, model: ModelConfig):
  """init.teacher_run's (params, ModelConfig), or None."""
  if not cfg.init.teacher_run:
    return None
  params, teacher = _saved_params(cfg.init.teacher_run, "init.teacher_run")
  if teacher.vocab_size != model.vocab_size or teacher.n_positions < model.n_positions:
    raise ConfigError("init.teacher_run", f"the teacher's vocabulary {teacher.vocab_size} and "
                      f"positions {teacher.n_positions} must cover {model.vocab_size} and "
                      f"{model.n_positions}")
  return jax.tree.map(jnp.asarray, params), teacher


def _model_config(cfg: config_lib.Config, vocab_size: int):
  if not cfg.init.hf:
    return cfg.model.model_config(vocab_size), None
  from twist_jax import hf  # transformers-free, but only needed here

  params, model = hf.load_gpt2(cfg.init.hf, n_positions=cfg.model.context)
  if model.vocab_size != vocab_size:
    raise ConfigError("data.tokenizer", f"the tokenizer has {vocab_size} ids but the Hugging Face "
                      f"model has {model.vocab_size}; use data.tokenizer=gpt2")
  return model.replace(dtype=cfg.model.dtype, attention=cfg.model.attention,
                       remat=cfg.model.remat), params


def round_context(cfg: config_lib.Config, model: ModelConfig, spec, mesh,
                  teacher=None) -> variants.RoundContext:
  """What every round of `cfg` is built from (benchmarks compile the same rounds from it)."""
  tw = cfg.twist
  return variants.RoundContext(
      model, spec, worker.make_optimizer(cfg.opt),
      lambda t: config_lib.lr_at(cfg.opt, cfg.steps, t), mesh, tw.opt_state,
      aggregate.outer_optimizer(tw.outer_lr, tw.outer_momentum), tw.full_workers if spec else 0,
      tw.distill, tw.distill_temperature, teacher, cfg.data.microbatch, tw.worker_loop)


def build(cfg: config_lib.Config, workdir: str) -> Run:
  """Loads data and initial weights and builds the round function; writes nothing."""
  n_dev = parallel.device_count_for(cfg.twist.workers, cfg.twist.devices)  # refused before data
  dataset = data.load(cfg.data)
  model, params = _model_config(cfg, dataset.vocab_size)
  if params is None:
    params = _initial_params(cfg, model)
  if cfg.twist.variant == "hybrid" and jax.process_count() > 1:
    raise ConfigError("twist.variant", "hybrid runs in one process (its central device holds "
                      "the masked worker); use true or masked across hosts")
  spec = None
  if cfg.twist.variant != "ddp":
    spec = subnet_spec.make_spec(model, cfg.subnet, cfg.twist.workers)
  ctx = round_context(cfg, model, spec, parallel.make_mesh(n_dev), _teacher(cfg, model))
  tw = cfg.twist
  if spec is not None and tw.variant != "hybrid":
    variants.full_workers_per_device(ctx)  # refuse an uneven split now, before any writing
  # Fail now (exit 2, nothing written) if the data cannot feed one step.
  dataset.train_iterator(num_workers=cfg.twist.workers, batch_size=cfg.data.batch_size,
                         context=cfg.model.context, seed=cfg.seed)
  dataset.validation_windows(context=cfg.model.context, max_windows=1)
  return Run(cfg, workdir, dataset, model, spec, ctx, params)


# ---- workdir files -------------------------------------------------------------------------------


# What the learning-rate schedule reads (config.lr_at). The data order and the subnet draws depend
# on none of them, but a run resumed with other values follows another schedule from there on.
SCHEDULE_FIELDS = ("steps", "opt.lr", "opt.warmup_steps", "opt.min_lr_ratio")
# What a resumed run may change freely: how often it logs, evaluates and saves, and where it finds
# files; none of them changes what is trained.
RESUME_FREE = frozenset({"log.progress", "eval.every", "ckpt.every", "ckpt.keep", "log.every",
                         "data.gpt2_bpe_dir", "eval.golden_kappas", "eval.golden_samples",
                         "ckpt.allow_schedule_change", "deterministic",
                         "data.microbatch", "model.remat"})  # memory only: the same updates
SCHEDULE_EVENT = "schedule_change"  # metrics.jsonl event of a resume with other SCHEDULE_FIELDS


def _dotted(d: dict, field: str):
  for key in field.split("."):
    d = d[key]
  return d


def _check_resume_config(workdir: str, resolved: dict) -> dict:
  """Resuming a workdir with another config is refused, naming the fields that differ. The
  SCHEDULE_FIELDS may differ when ckpt.allow_schedule_change is set: returns {field: [old, new]}
  of those ({} for a new run or the same schedule)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  diff = config_lib.differing_fields(old, resolved, ignore=RESUME_FREE)
  other = [field for field in diff if field not in SCHEDULE_FIELDS]
  if other:
    raise ConfigError(other[0], f"workdir {workdir!r} holds a run with a different config; "
                      f"fields that differ: {', '.join(other)} (use a new --workdir)")
  changes = {field: [_dotted(old, field), _dotted(resolved, field)] for field in diff}
  if changes and not resolved["ckpt"]["allow_schedule_change"]:
    field, (was, now) = next(iter(changes.items()))
    raise ConfigError(field, f"{was} in the run in {workdir!r}, {now} now: resuming with it "
                      f"changes the learning-rate schedule; keep {field}={was}, use a new "
                      "--workdir, or add --config.ckpt.allow_schedule_change=True (the change is "
                      "logged in metrics.jsonl)")
  return changes


def _log_schedule_change(workdir: str, changes: dict) -> None:
  """Records in metrics.jsonl, at the step the run resumes from, which schedule fields changed;
  written before config.json takes the new values, so a crash cannot lose it."""
  mngr = checkpoint.manager(workdir, None)
  step = mngr.latest_step() or 0
  mngr.close()
  path = os.path.join(workdir, "metrics.jsonl")
  event = {"step": step, "event": SCHEDULE_EVENT, "changed": changes}
  files.write_text(path, "".join(_lines_up_to(path, step)) + json.dumps(event) + "\n")
  print(f"warning: resuming at step {step} with a changed schedule: "
        + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()), flush=True)


def _lines_up_to(path: str, step: int) -> list[str]:
  """metrics.jsonl lines a run resumed at `step` keeps: those before it, its training and
  validation lines, and schedule changes made there; a torn line (a crash) ends the file."""
  if not os.path.exists(path):
    return []
  keep = []
  with open(path) as f:
    for ln in f:
      if not ln.strip():
        continue
      try:
        rec = json.loads(ln)
      except json.JSONDecodeError:
        break
      if rec.get("step", 0) < step or (rec.get("step") == step and rec.get("event") in (
          None, SCHEDULE_EVENT)):
        keep.append(ln)
  return keep


class MetricsLog:
  """metrics.jsonl (one JSON object a line) plus TensorBoard scalars; written by process 0."""

  def __init__(self, workdir: str, resume_step: int | None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      self.truncate(resume_step or 0)
    from tensorboardX import SummaryWriter

    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def truncate(self, step: int) -> None:
    """Drops lines after the checkpoint we resume from, so no step appears twice."""
    if not self.enabled or not os.path.exists(self.path):
      return
    files.write_text(self.path, "".join(_lines_up_to(self.path, step)))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if isinstance(v, (int, float)) and k != "step":
        self.tb.add_scalar(k, v, record["step"])

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


# ---- the loop ------------------------------------------------------------------------------------


def _round_batches(it, rounds_steps: int, sharding):
  """(W, R, B, L+1) int32 batches for one round, sharded over the worker axis."""
  steps_RxWxBxLp1 = np.stack([next(it) for _ in range(rounds_steps)])
  return jax.device_put(np.ascontiguousarray(steps_RxWxBxLp1.transpose(1, 0, 2, 3)), sharding)


def _due(step: int, every: int, r_steps: int, last: int) -> bool:
  """True at the end of the round that reaches a multiple of `every`, and at the last step."""
  return step == last or (step // every) > ((step - r_steps) // every)


class _StopOnSignal:
  """SIGTERM / SIGINT set a flag that the loop checks between rounds (a second one aborts)."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def _handle(self, signum, frame):
    if self.signal is not None:  # second signal: stop at once
      signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)


class Trainer:
  """Owns the mutable state of one run (state, iterator, logs) and runs it to cfg.steps."""

  def __init__(self, run: Run):
    self.run, cfg = run, run.cfg
    self.round_fn = variants.make_sampling_round(cfg.twist.variant, run.ctx)
    # Dense warm-up: the first twist.dense_steps steps are DDP rounds on the same workers,
    # same optimizer state layout, same schedule; the round function is picked by the step.
    # They are plain DDP (no outer step; the outer momentum passes through untouched, so TwIST
    # starts with it at zero) unless twist.dense_outer asks for DiLoCo rounds (docs §9).
    dense_ctx = dataclasses.replace(run.ctx, spec=None,
                                    outer=run.ctx.outer if cfg.twist.dense_outer else None)
    self.dense_fn = (variants.make_sampling_round("ddp", dense_ctx)
                     if cfg.twist.dense_steps else None)
    # Raw key data on the host: every process passes the same value into the round.
    self.subnet_key = np.asarray(jax.random.key_data(
        jax.random.fold_in(jax.random.key(cfg.seed), 1)))
    self.it = run.dataset.train_iterator(num_workers=cfg.twist.workers,
                                         batch_size=cfg.data.batch_size,
                                         context=cfg.model.context, seed=cfg.seed)
    self.val_windows = run.dataset.validation_windows(
        context=cfg.model.context, max_windows=cfg.eval.max_windows or None)
    self.state = jax.device_put(variants.init_state(run.ctx, run.init_params),
                                parallel.replicated(run.ctx.mesh))
    self.step = 0
    self.best = None  # (val_loss, step) of the best checkpoint
    self.rollbacks = 0
    self.mngr = checkpoint.manager(run.workdir, None)

  # -- checkpoints --
  def meta(self) -> dict:
    return {"step": self.step, "data": self.it.get_state(), "model": self.run.model.to_dict(),
            "variant": self.run.cfg.twist.variant, "best": self.best}

  def save(self) -> None:
    """Saves this step, then deletes all but the last `ckpt.keep` and the best one."""
    checkpoint.save(self.mngr, self.step, self.state, self.meta())
    steps = sorted(self.mngr.all_steps())
    keep = set(steps[-self.run.cfg.ckpt.keep:]) | ({self.best[1]} if self.best else set())
    for s in steps:
      if s not in keep:
        self.mngr.delete(s)

  def restore(self, step: int) -> dict:
    self.state, meta = checkpoint.restore(self.mngr, step, self.state)
    self.step = int(meta["step"])
    self.best = tuple(meta["best"]) if meta.get("best") else None
    return meta

  def maybe_resume(self) -> int | None:
    latest = self.mngr.latest_step()
    if latest is None:
      return None
    self.it.set_state(self.restore(latest)["data"])
    return self.step

  # -- one round --
  def validate(self) -> dict:
    nll = evaluate.mean_nll(self.state["params"], self.run.model, self.val_windows,
                            self.run.cfg.eval.batch_size,
                            sharding=parallel.replicated(self.run.ctx.mesh))
    return {"step": self.step, "val_loss": nll, "val_ppl": evaluate.perplexity(nll)}

  def _diverged(self, log: "MetricsLog", bad_step: int) -> None:
    """Stops with a clear message, or (ckpt.on_divergence=rollback) restores the last good
    checkpoint and goes on with the data after the offending batches."""
    cfg, last = self.run.cfg, self.mngr.latest_step()
    where = f"step {last} in {self.mngr.directory}" if last is not None else "none"
    msg = (f"non-finite loss or parameters in the round ending at step {bad_step}; "
           f"last good checkpoint: {where}")
    if cfg.ckpt.on_divergence != "rollback" or last is None or (
        self.rollbacks >= cfg.ckpt.max_rollbacks):
      raise DivergenceError(msg)
    data_state = self.it.get_state()  # already past the offending batches: skip them
    self.restore(last)
    self.it.set_state(data_state)
    self.rollbacks += 1
    log.truncate(self.step)
    log.write({"step": self.step, "event": "rollback", "bad_step": bad_step})
    print(f"warning: {msg}; rolled back (rollback {self.rollbacks} of "
          f"{cfg.ckpt.max_rollbacks})", flush=True)

  def fit(self) -> dict:
    cfg, r_steps = self.run.cfg, self.run.cfg.twist.local_steps
    log = self._open_log()
    tokens_per_round = cfg.twist.workers * cfg.data.batch_size * cfg.model.context * r_steps
    sharding = parallel.worker_sharded(self.run.ctx.mesh)
    bar = tqdm.tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                    disable=not cfg.log.progress or jax.process_index() > 0)
    summary = {"step": self.step}
    if self.step >= cfg.steps:
      print(f"nothing to do: the run in {self.run.workdir} already reached step {self.step}",
            flush=True)
      summary["already_finished"] = True
    try:
      with _StopOnSignal() as stop:
        while self.step < cfg.steps:
          record = self._train_round(log, sharding, tokens_per_round)
          if record is None:  # diverged and rolled back
            bar.n = self.step
            continue
          bar.update(r_steps)
          bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
          summary.update(step=self.step, loss=record["loss"])
          improved = self._validate_if_due(log, bar, summary)
          if improved or _due(self.step, cfg.ckpt.every, r_steps, cfg.steps) or stop.signal:
            self.save()
          if stop.signal:
            summary["interrupted"] = stop.signal
            bar.write(f"{stop.signal}: checkpoint saved at step {self.step}; rerun the same "
                      "command to resume")
            break
    finally:
      bar.close()
      log.close()
    return summary

  def _open_log(self) -> "MetricsLog":
    """Resumes from the latest checkpoint (logging that), else saves step 0; the metrics log."""
    resumed = self.maybe_resume()
    log = MetricsLog(self.run.workdir, resumed)
    if resumed is not None:
      log.write({"step": resumed, "event": "resumed", "from": str(self.mngr.directory)})
      print(f"resumed from checkpoint at step {resumed} in {self.mngr.directory}", flush=True)
    else:
      self.save()  # step 0: a rollback target, and nothing is lost before the first interval
    return log

  def _train_round(self, log: "MetricsLog", sharding, tokens_per_round: int) -> dict | None:
    """One round from self.step; its metrics record (logged every log.every rounds and at the
    last step), or None when it diverged and `_diverged` rolled back (or it raises)."""
    cfg, r_steps = self.run.cfg, self.run.cfg.twist.local_steps
    rnd = self.step // r_steps
    t0 = time.perf_counter()
    batches = _round_batches(self.it, r_steps, sharding)
    # Round r's subnets are drawn inside the call from fold_in(subnet_key, r); the old
    # state is donated, so self.state is replaced before anything else can look at it.
    round_fn = (self.dense_fn if self.step < cfg.twist.dense_steps else self.round_fn)
    self.state, metrics = round_fn(self.state, self.subnet_key, batches, jnp.int32(self.step))
    metrics = jax.device_get(metrics)  # the one host sync per round
    if not bool(metrics["finite"]):
      self._diverged(log, self.step + r_steps)
      return None
    self.step += r_steps
    loss_WxR, subnets_W = metrics["loss"], metrics["subnets"]
    record = self._train_record(rnd, loss_WxR, metrics, subnets_W, time.perf_counter() - t0,
                                tokens_per_round)
    if rnd % cfg.log.every == 0 or self.step == cfg.steps:
      log.write(record)
    return record

  def _validate_if_due(self, log: "MetricsLog", bar, summary: dict) -> bool:
    """Validates when eval.every is due (logged, shown, in `summary`) and tracks the best;
    True when this validation is a new best."""
    cfg = self.run.cfg
    if not _due(self.step, cfg.eval.every, cfg.twist.local_steps, cfg.steps):
      return False
    val = self.validate()
    log.write(val)
    summary.update(val_loss=val["val_loss"], val_ppl=val["val_ppl"])
    bar.write(f"step {self.step}: val_loss {val['val_loss']:.4f} val_ppl {val['val_ppl']:.2f}")
    improved = self.best is None or val["val_loss"] < self.best[0]
    if improved:
      self.best = (val["val_loss"], self.step)
    return improved

  def _train_record(self, rnd, loss_WxR, metrics, subnets_W, dt, tokens) -> dict:
    record = {"step": self.step, "round": rnd, "loss": float(loss_WxR.mean()),
              "last_loss": float(loss_WxR[:, -1].mean()),
              "worker_loss": [float(x) for x in loss_WxR.mean(axis=1)],
              "delta_norm": float(metrics["delta_norm"]),
              "lr": float(config_lib.lr_at(self.run.cfg.opt, self.run.cfg.steps, self.step - 1)),
              "round_time_s": dt, "tokens_per_s": tokens / dt}
    if self.run.spec is not None and subnets_W:  # not in DDP rounds (dense warm-up)
      record.update(subnets.coverage(subnets_W, self.run.spec))
    return record


def train(cfg: config_lib.Config, workdir: str) -> dict:
  """Validates everything, then trains (resuming if WORKDIR has a checkpoint)."""
  config_lib.apply_determinism(cfg.deterministic)  # before anything touches a device
  resolved = config_lib.to_dict(cfg)
  schedule_changes = _check_resume_config(workdir, resolved)
  run = build(cfg, workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    if schedule_changes:
      _log_schedule_change(workdir, schedule_changes)
    files.write_json(os.path.join(workdir, "config.json"), resolved, sort_keys=True)
  n_params = run.model.num_params()
  if jax.process_index() == 0:
    print(f"twist_jax: {cfg.twist.variant} | model {n_params / 1e6:.2f}M params, "
          f"{flops_per_token(run.model, cfg.model.context) / 1e6:.1f} MFLOP/token | "
          f"W={cfg.twist.workers} on {run.ctx.mesh.devices.size} device(s), "
          f"{jax.process_count()} process(es) | "
          f"{data.protocol(cfg.data, cfg.model.context)}", flush=True)
  return Trainer(run).fit()
