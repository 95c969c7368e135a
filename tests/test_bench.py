"""Benchmark plumbing: the HLO collective counter on hand-written HLO, and the measured
traffic of a real TwIST round against DDP's (the systems claim: once per R steps)."""

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import hlo_stats  # noqa: E402

HLO = """HloModule jit_round, entry_computation_layout={(f32[4,2]{1,0})->f32[4,2]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[4,2])) -> (s32[], f32[4,2]) {
  %p = (s32[], f32[4,2]{1,0}) parameter(0)
  %x = f32[4,2]{1,0} get-tuple-element(%p), index=1
  %ar = f32[4,2]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,2]{1,0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[4,2])) -> pred[] {
  %p = (s32[], f32[4,2]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main.1_spmd (x: f32[4,2]) -> f32[4,2] {
  %x = f32[4,2]{1,0} parameter(0)
  %t0 = (s32[], f32[4,2]{1,0}) tuple(%x, %x)
  %w = (s32[], f32[4,2]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ag = bf16[8]{0} all-gather(%x), channel_id=2, dimensions={0}
  %ars = (f32[2]{0}, f32[2]{0}) all-reduce-start(%x), channel_id=3, to_apply=%add
  %ard = f32[2]{0} all-reduce-done(%ars)
  ROOT %y = f32[4,2]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_of_hand_written_hlo():
  got = hlo_stats.collective_bytes(HLO, default_trip=99)
  # all-reduce f32[4,2] = 32 B inside a 3-trip loop; all-gather bf16[8] = 16 B once;
  # async all-reduce f32[2] = 8 B once (its -done is not counted again).
  assert got["by_op"] == {"all-reduce": 3 * 32 + 8, "all-gather": 16}
  assert got["total"] == 120 and got["ops"] == 3
  # Without the trip count the loop runs `default_trip` times.
  assert hlo_stats.collective_bytes(HLO.replace('"known_trip_count":{"n":"3"}', '"x":1'),
                                    default_trip=5)["by_op"]["all-reduce"] == 5 * 32 + 8


@pytest.mark.slow
@pytest.mark.parametrize("opt_state,bound", [("slice", 0.21), ("reset", 0.075)])
def test_true_twist_moves_once_per_round(opt_state, bound):
  """W = 8 workers on 8 fake devices, R = 15: measured bytes per token of true / ddp stay near
  (trees exchanged) / R: 3/15 with Adam moments sliced, 1/15 with a reset optimizer. The
  per-round gathers of losses and subnet indices add a few percent at this tiny model size
  (the `small` preset measures 0.202 and 0.069: results/bench/)."""
  out = subprocess.run([sys.executable, os.path.join(BENCH, "twist_throughput.py"), "--quick",
                        "--variants", "ddp,true", "--opt-state", opt_state],
                       capture_output=True, text=True, timeout=900, check=True)
  cases = {c["variant"]: c for c in json.loads(out.stdout)["cases"]}
  assert cases["ddp"]["devices"] == 8 and cases["true"]["devices"] == 8
  ratio = cases["true"]["collective_bytes_per_token_vs_ddp"]
  assert 0.5 / 15 < ratio <= bound
  for c in cases.values():  # the reported numbers agree with each other and with the settings
    check_round_timing(c, workers=8, steps=15, batch=2, context=32)
    mem = c["memory_bytes_per_device"]
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    # Every device holds the whole central state: params, Adam's two moments (float32).
    assert mem["argument"] >= 3 * 4 * c["model_params"]
  assert cases["true"]["memory_vs_ddp"] == (cases["true"]["memory_bytes_per_device"]["total"] /
                                            cases["ddp"]["memory_bytes_per_device"]["total"])


def check_round_timing(rec, *, workers, steps, batch, context):
  """train_throughput.measure's numbers: tokens counted from the settings, the median of the
  timed rounds, and tokens/s and step time derived from those."""
  assert rec["tokens_per_round"] == workers * steps * batch * context
  assert rec["round_time_s"] == statistics.median(rec["round_times_s"])
  assert rec["tokens_per_s"] == pytest.approx(rec["tokens_per_round"] / rec["round_time_s"],
                                              rel=1e-12)
  assert rec["step_time_s"] == pytest.approx(rec["round_time_s"] / steps, rel=1e-12)


# ---- bench/gpu_check.sh --dry -------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_check_dry_writes_consistent_json(tmp_path):
  """The GPU check's code at tiny shapes on CPU: one JSON file whose numbers agree with each
  other and with the settings (tokens counted from the shapes, FLOPs from the model, MFU and
  the kappa ratio from the measured tokens/s), every case timed and its host load recorded."""
  proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry", "--out",
                         str(tmp_path), "--budget-s", "1500"],
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "gpu_check.json") as f:
    rec = json.load(f)
  assert rec["dry"] and rec["complete"], proc.stderr[-3000:]
  check_gpu_check_record(rec)


def check_gpu_check_record(rec):
  """gpu_check.json's numbers agree with each other and with the settings."""
  import common  # pylint: disable=import-outside-toplevel
  import gpu_check  # pylint: disable=import-outside-toplevel
  from twist_jax import model as model_lib  # pylint: disable=import-outside-toplevel

  assert rec["device"]["platform"] == "cpu" and rec["device"]["devices"] == 1
  for key in ("load_before", "load_after"):
    assert rec["host"][key]["uptime"] and len(rec["host"][key]["loadavg"]) == 3
  cases = {"dense": rec["dense"], "decode": rec["decode"], **rec["configs"]}
  assert set(cases) == set(gpu_check.CASES)
  for c in cases.values():
    assert c["status"] == "ok" and 0 < c["wall_s"] <= rec["total_wall_s"]
    assert len(c["load_before"]["loadavg"]) == 3

  dense, s = rec["dense"], rec["dense"]["settings"]
  check_round_timing(dense, workers=1, steps=s["steps"], batch=s["batch"], context=s["context"])
  n_layer, n_head, n_embd, vocab = common.PRESETS[s["preset"]]
  model = model_lib.ModelConfig.uniform(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                        vocab_size=vocab, n_positions=s["context"])
  assert dense["flops_per_token"] == model_lib.flops_per_token(model, s["context"])
  assert dense["peak_flops"] == gpu_check.DRY_PEAK_FLOPS
  assert dense["mfu"] == pytest.approx(
      dense["tokens_per_s"] * dense["flops_per_token"] / dense["peak_flops"], rel=1e-12)

  for name in gpu_check.CONFIGS:
    c, (cfg, vocab) = rec["configs"][name], gpu_check.load_config(name, dry=True)
    got = c["settings"]
    want = (cfg.twist.variant, cfg.twist.workers, cfg.data.batch_size, cfg.twist.local_steps,
            cfg.subnet.kappa, cfg.model.remat)
    assert [got[k] for k in ("variant", "workers", "batch", "local_steps", "kappa", "remat")] == (
        json.loads(json.dumps(want)))  # as JSON writes them: tuples become lists
    check_round_timing(c, workers=got["workers"], steps=got["local_steps"], batch=got["batch"],
                       context=got["context"])
    mem = c["xla_memory_bytes_per_device"]
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    assert mem["argument"] >= 3 * 4 * c["model_params"]  # params and Adam's moments, float32

  ratio = rec["kappa_ratio"]
  assert ratio["same_settings"] and set(np.atleast_1d(ratio["kappa"])) == {0.5}
  assert ratio["ddp_tokens_per_s"] == rec["configs"]["gpt2_ddp"]["tokens_per_s"]
  assert ratio["attn_mlp_tokens_per_s"] == rec["configs"]["gpt2_attn_mlp"]["tokens_per_s"]
  assert ratio["ratio"] == ratio["attn_mlp_tokens_per_s"] / ratio["ddp_tokens_per_s"]

  decode = rec["decode"]
  rows = decode["models"]
  assert set(rows) == {"full", "subnet"} and decode["dtype"] == "bfloat16"
  for r in rows.values():
    assert r["decode_tokens_per_s"] == decode["new_tokens"] / r["decode_s"]
  assert decode["speedup"]["subnet_vs_full"] == (rows["subnet"]["decode_tokens_per_s"] /
                                                 rows["full"]["decode_tokens_per_s"])
  assert decode["subnet"]["n_head"] == decode["shape"]["n_head"] // 2  # attn_mlp kappa = 0.5
