"""The comparison pipeline end to end at its quick scale: every stage, table row and plot."""

import json
import os

import pytest

from twist_jax import comparison


@pytest.mark.slow
def test_quick_comparison_writes_table_plots_and_json(tmp_path):
  result = comparison.run(str(tmp_path), quick=True)
  md = (tmp_path / "comparison.md").read_text()
  for method in comparison.UNSTRUCTURED + comparison.STRUCTURED:
    assert f"| {method} (post-training, on DDP)" in md
  for row in ("TwIST random subnets (fine-tuned)", "DDP random subnets (fine-tuned)",
              "local SGD random subnets", "TwIST random subnets (from scratch)",
              "dense model of the kappa=0.5 subnet's size", "| none |", "| mean |", "| norm |"):
    assert row in md
  for name in ("comparison.png", "golden_tickets.png", "golden_tickets.json",
               os.path.join("ablation", "golden_tickets.png")):
    assert (tmp_path / name).stat().st_size > 0
  saved = json.loads((tmp_path / "comparison.json").read_text())
  assert len(saved["baselines"]) == len(comparison.SPARSITIES) * 6
  assert set(saved["runs"]) == set(comparison.stages(comparison.scale(True), str(tmp_path)))
  # Fine-tuned runs start from the DDP base; budgets are counted per run.
  assert result["budgets"]["ft_twist"]["tokens"] == result["budgets"]["ft_ddp"]["tokens"]
  assert result["budgets"]["ft_twist"]["flops"] < result["budgets"]["ft_ddp"]["flops"]
