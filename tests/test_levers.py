"""The levers study: FLOPs budgets solved by hand-checked cases, the B* rule, and the quick study end
to end (files, budget matching, gap closed recomputed from the JSON, a rerun that trains nothing)."""

import json
import time

import pytest

from twist_jax import config as config_lib, data, deploy, evaluate, levers
from twist_jax.model import flops_per_token


def test_solve_steps_hand_checked():
  # 1000 FLOPs at 30 per TwIST step, R = 5: 33.3 steps -> 7 rounds (35 steps, 1050 FLOPs).
  assert levers.solve_steps(1000.0, 100.0, 30.0, 5) == (35, 0)
  # A third dense: 1000 / (100/3 + 20) = 18.75 steps, 6.25 dense -> 5; (1000 - 500) / 30 = 16.7
  # -> 3 rounds of 5 (15 steps): 20 steps, 5 of them dense, 500 + 450 = 950 FLOPs.
  assert levers.solve_steps(1000.0, 100.0, 30.0, 5, 1 / 3) == (20, 5)
  assert levers.run_flops(20, 5, 100.0, 30.0) == 950.0
  # Never zero steps: a budget below one round still trains one round.
  assert levers.solve_steps(10.0, 100.0, 30.0, 5) == (5, 0)


def test_step_flops_counts_full_workers_and_the_teacher():
  s = levers.scale(quick=True)
  plain = levers._twist("B0", {})
  both = levers._twist("B7", levers.LEVERS["B7"][0])
  cfg = config_lib.from_configdict(levers._config(s, plain, 10, 0, "b"))
  model = cfg.model.model_config(levers.VOCAB)
  L, tok = cfg.model.context, cfg.data.batch_size * cfg.model.context
  full = flops_per_token(model, L)
  # The kappa = 0.5 attn_mlp subnet of the quick model: half the heads and MLP units.
  sub = flops_per_token(model.replace(n_head=(2, 2), n_inner=(64, 64)), L)
  ddp, twist = levers.step_flops(cfg)
  assert ddp == pytest.approx(4 * tok * full)
  assert twist == pytest.approx(4 * tok * sub)
  cfg7 = config_lib.from_configdict(levers._config(s, both, 10, 0, "b"))
  # One full worker; three subnet workers, each also running the teacher's forward (full / 3).
  assert levers.step_flops(cfg7)[1] == pytest.approx(tok * (full + 3 * (sub + full / 3)))


def test_choose_bstar_merges_levers_beating_b0_by_one_std():
  # B0 seeds 4.0, 4.2, 4.4: mean 4.2, sample std 0.2 -> threshold 4.0 (strictly below wins).
  losses = {"B1": 3.99, "B2": 4.1, "B3": 4.0, "B4": 3.5, "B5": 4.5, "B6": 4.3, "B7": 4.6}
  merged, winners, threshold = levers.choose_bstar([4.0, 4.2, 4.4], losses)
  assert threshold == pytest.approx(4.0)
  assert winners == ["B1", "B4"]
  assert merged == {"full_workers": 1, "core": 0.25}
  assert levers.choose_bstar([4.0, 4.2, 4.4], {"B1": 4.1})[0] == {}


def test_gap_closed_definition():
  assert levers.gap_closed(5.0, 4.5, 3.0) == pytest.approx(0.25)
  assert levers.gap_closed(5.0, 5.5, 3.0) == pytest.approx(-0.25)


@pytest.mark.slow
def test_quick_study_files_budgets_gap_and_rerun(tmp_path):
  out = str(tmp_path)
  t0 = time.perf_counter()
  result = levers.run(out, quick=True)
  first = time.perf_counter() - t0
  for name in ("levers.json", "levers.md", "levers.png"):
    assert (tmp_path / name).stat().st_size > 0
  saved = json.loads((tmp_path / "levers.json").read_text())
  assert saved["command"] == f"python -m twist_jax.levers --out {out} --quick"
  labels = {a["label"] for a in saved["arms"]}
  assert {"A0", "A0'", "A1", "B0", "B*", "B*-scratch", "C1", *levers.LEVERS} <= labels
  md = (tmp_path / "levers.md").read_text()
  assert "| B4 (fully random subnets) |" in md and "| C1 |" in md

  # Budgets: every fine-tuned arm within one round of A0's FLOPs (and of each other); the
  # from-scratch arms within one round of base + fine-tune; C1 gets a fine-tune's FLOPs on top
  # of A0's.
  base = saved["base"]
  a0 = next(a for a in saved["arms"] if a["label"] == "A0")
  for arm in saved["arms"]:
    target = base["ft_target"] + (a0["flops"] if arm["label"] == "C1" else base["flops"])
    assert abs(arm["flops"] - target) <= arm["round_flops"] / 2 + 1e-6, arm["label"]
    assert arm["steps"] % saved["scale"]["local_steps"] == 0
    assert arm["dense_steps"] % saved["scale"]["local_steps"] == 0
  # C1 starts from the struct-Wanda reference's model (same pruning, saved and reloaded), is
  # distilled from A0 and trained.
  c1 = next(a for a in saved["arms"] if a["label"] == "C1")
  assert c1["config"]["init"]["teacher_run"] == a0["workdir"]
  student, student_cfg = deploy.load_deployed(c1["config"]["init"]["from_run"])
  ref = next(r for r in saved["references"] if r["method"] == "struct-wanda")
  windows = data.load(config_lib.from_dict(a0["config"]).data).validation_windows(
      context=student_cfg.n_positions, max_windows=saved["scale"]["max_windows"])
  assert evaluate.mean_nll(student, student_cfg, windows) == pytest.approx(ref["val_loss"],
                                                                           abs=1e-5)
  assert c1["eval"]["full"] != pytest.approx(ref["val_loss"], abs=1e-4)
  fine = [a for a in saved["arms"] if not a["arm"]["scratch"] and a["label"] != "C1"]
  for a in fine:
    for b in fine:
      assert abs(a["flops"] - b["flops"]) <= max(a["round_flops"], b["round_flops"]) + 1e-6
  b5 = next(a for a in saved["arms"] if a["label"] == "B5")
  assert 0 < b5["dense_steps"] and abs(b5["dense_steps"] - b5["steps"] / 3) <= (
      saved["scale"]["local_steps"])

  # Gap closed, recomputed from the per-arm numbers in the JSON.
  def target(a):
    ev = a["eval"]
    return ev[ev["target"]]["0.5"]["mean"]
  by = lambda label: [a for a in saved["arms"] if a["label"] == label]
  l_b0 = sum(map(target, by("B0"))) / len(by("B0"))
  l_a1 = sum(a["eval"]["full"] for a in by("A1")) / len(by("A1"))
  for label, row in saved["summary"]["rows"].items():
    if "gap_closed" in row:
      l_k = sum(map(target, by(label))) / len(by(label))
      assert row["gap_closed"] == pytest.approx((l_b0 - l_k) / (l_b0 - l_a1)), label
  b4 = by("B4")[0]["eval"]
  assert b4["target"] == "core" and b4["core"]["0.5"]["mean"] != b4["random"]["0.5"]["mean"]

  # A rerun trains and evaluates nothing: same numbers, every arm skipped, much faster.
  t0 = time.perf_counter()
  again = levers.run(out, quick=True)
  assert time.perf_counter() - t0 < first / 3
  assert again["summary"] == result["summary"]
  assert [a["train_s"] for a in again["arms"]] == [a["train_s"] for a in result["arms"]]
