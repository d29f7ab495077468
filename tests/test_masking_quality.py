"""Masking learns what the evaluation rewards, keeps its allocation when it meets the target,
and the search-quality benchmark reports it per masking target against uniform pruning."""

import pytest
import torch

from benchmarks.quality_presets import UNIFORM
from benchmarks.quality_report import interpolate_uniform, masking_per_target
from search.masking_core import MaskingConfig, learn_ratios, scale_to_target
from spaces.policy import Policy


@pytest.fixture(scope="module")
def digits(digits_setup):
    task, model, space = digits_setup
    return task, model, space(0.2)


def _continuous_flops_ratio(space, policy):
    kept = torch.tensor([g.channels * policy.ratio(g.name) for g in space.groups])
    return float(space.cost_model.flops_torch(kept)) / space.base_cost.flops


def test_residual_group_is_kept_wide_at_a_low_target(digits):
    # The residual stream feeding the classifier (block4.shortcut.0) is the group whose
    # channels cost the most accuracy (searchers' best digits policies keep 0.7-0.95 of it
    # at 30% FLOPs); a student trained with frozen BN statistics would push it towards r_min.
    task, model, space = digits
    _, info = learn_ratios(model, space, task.batches("train", 64, seed=0), task.batches("calibration", 64, seed=0),
                           task.example_inputs, MaskingConfig(target=0.3, steps=10, rerank_every=5, seed=0))
    learned = info["learned_ratios"]
    others = [v for n, v in learned.items() if n != "block4.shortcut.0"]
    assert learned["block4.shortcut.0"] > max(others)
    assert all(space.ratio_min <= v <= space.ratio_max for v in learned.values())


def test_scale_to_target_keeps_the_allocation(digits):
    _, _, space = digits
    names = space.group_names
    raw = Policy(ratios={n: 0.4 + 0.08 * i for i, n in enumerate(names)})
    scaled = scale_to_target(space, raw, 0.3)
    assert _continuous_flops_ratio(space, scaled) == pytest.approx(0.3, abs=1e-3)
    factors = [scaled.ratio(n) / raw.ratio(n) for n in names
               if space.ratio_min < scaled.ratio(n) < space.ratio_max]
    assert len(factors) >= 2 and max(factors) - min(factors) < 1e-4
    # already too small to reach the target even at full width: every group at ratio_max
    assert set(scale_to_target(space, raw, 1.0).ratios.values()) == {space.ratio_max}


def _uniform_points(curve):
    return [{"ok": True, "fidelity": "full", "flops_ratio": f, "accuracy": a} for f, a in curve]


def test_interpolate_uniform_is_linear_inside_the_sweep_only():
    points = _uniform_points([(0.2, 0.30), (0.4, 0.70), (1.0, 0.99)]) + [{"ok": False, "flops_ratio": None}]
    assert interpolate_uniform(points, 0.3) == pytest.approx(0.50)
    assert interpolate_uniform(points, 0.4) == pytest.approx(0.70)
    assert interpolate_uniform(points, 0.1) is None


def test_masking_per_target_pairs_runs_with_uniform_at_their_flops():
    uniform = {"points": _uniform_points([(0.2, 0.30), (0.4, 0.70)])}
    masking = {"points": [
        {"trial": 0, "ok": True, "fidelity": "full", "flops_ratio": 0.3, "accuracy": 0.60, "masking_target": 0.3},
        {"trial": 1, "ok": True, "fidelity": "full", "flops_ratio": 0.2, "accuracy": 0.25, "masking_target": 0.2},
        {"trial": 2, "ok": True, "fidelity": "full", "flops_ratio": 0.35, "accuracy": 0.70, "masking_target": 0.3},
        {"trial": 3, "ok": False, "fidelity": "full", "flops_ratio": None, "accuracy": None, "masking_target": 0.3},
        {"trial": 4, "ok": True, "fidelity": "full", "flops_ratio": 0.3, "accuracy": 0.90},  # not a masking run
    ]}
    rows = masking_per_target({"per_seed": {UNIFORM: {"0": uniform}, "masking": {"0": masking}}})
    assert [r["target"] for r in rows] == [0.2, 0.3]
    low, mid = rows
    assert low["runs"] == 1 and low["delta"]["mean"] == pytest.approx(-0.05)
    assert mid["runs"] == 2
    assert mid["flops_ratio"]["mean"] == pytest.approx(0.325)
    assert mid["uniform_accuracy"]["values"] == pytest.approx([0.50, 0.60])
    assert mid["delta"]["mean"] == pytest.approx(0.10)
    assert mid["per_seed"]["0"]["accuracy"] == pytest.approx(0.65)
    assert masking_per_target({"per_seed": {UNIFORM: {"0": uniform}}}) == []
