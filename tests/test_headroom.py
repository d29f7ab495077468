"""The headroom benchmark: candidates at a level, its summary, its bad input and a tiny real run."""

from __future__ import annotations

import json

import pytest

from benchmarks import headroom
from tests.fakes import tiny_space


@pytest.fixture(scope="module")
def space():
    return tiny_space()


@pytest.mark.parametrize("level", [0.3, 0.6])
def test_candidates_are_distinct_policies_of_the_space_at_the_level(space, level):
    got = headroom.candidates(space, level, 10, seed=0)
    assert len(got) == 10 and len({p.key() for p in got}) == 10
    for policy in got:
        assert set(policy.ratios) == set(space.group_names)
        assert all(space.ratio_min - 1e-9 <= r <= space.ratio_max + 1e-9 for r in policy.ratios.values())
        flops = space.flops_ratio(policy)
        assert flops <= level + 1e-12
        # scaled up to the level: one more percent on every uncapped ratio crosses it
        grown = {n: min(space.ratio_max, r * 1.01) for n, r in policy.ratios.items()}
        assert space.flops_ratio(type(policy)(ratios=grown, method=policy.method)) > level or all(
            r >= space.ratio_max for r in policy.ratios.values())
    assert [p.key() for p in headroom.candidates(space, level, 10, seed=0)] == [p.key() for p in got]
    assert [p.key() for p in headroom.candidates(space, level, 10, seed=1)] != [p.key() for p in got]


@pytest.mark.parametrize("level", [0.3, 0.6])
def test_extremes_hold_one_group_at_an_end_of_the_range_and_solve_the_others_to_the_level(space, level):
    got = headroom.extremes(space, level)
    assert got and len({p.key() for _, p in got}) == len(got)
    for label, policy in got:
        name, ratio = label.split(" at ")
        assert policy.ratios[name] == pytest.approx(float(ratio))
        assert float(ratio) in (pytest.approx(space.ratio_min), pytest.approx(space.ratio_max))
        common = {r for n, r in policy.ratios.items() if n != name}
        assert len(common) == 1 and space.ratio_min <= common.pop() <= space.ratio_max
        assert space.flops_ratio(policy) <= level + 1e-12
    bottoms = [label for label, _ in got if label.endswith(f" at {space.ratio_min:g}")]
    assert len(bottoms) == len(space.group_names)   # every group can be cut to the bottom at these levels


def test_the_solved_ratio_is_the_largest_within_the_level(space):
    name = space.group_names[0]
    policy = headroom.solved(space, {name: space.ratio_max}, 0.5)
    common = next(r for n, r in policy.ratios.items() if n != name)
    wider = type(policy)(ratios={n: r if n == name else min(space.ratio_max, common + 0.02)
                                 for n, r in policy.ratios.items()}, method=policy.method)
    assert space.flops_ratio(policy) <= 0.5 + 1e-12 < space.flops_ratio(wider)
    assert headroom.solved(space, {name: space.ratio_max}, space.min_flops_ratio / 2) is None
    with pytest.raises(ValueError, match="below the space's smallest model"):
        headroom.extremes(space, space.min_flops_ratio / 2)


def test_a_draw_above_the_level_is_shrunk_and_a_level_below_the_space_is_refused(space):
    big = space.uniform(space.ratio_max)
    assert space.flops_ratio(headroom.at_level(space, big, 0.3)) <= 0.3 + 1e-12
    with pytest.raises(ValueError, match="below the space's smallest model"):
        headroom.at_level(space, big, space.min_flops_ratio / 2)


def test_the_screen_pick_is_the_screens_best_scored_on_fresh_seeds_against_the_better_baseline():
    screen = [{"accuracy": 0.80}, {"accuracy": 0.78}, {"accuracy": 0.70}]
    confirmed = [{"accuracy": 0.80, "accuracies": [0.74, 0.76]},   # screen order: the pick first
                 {"accuracy": 0.78, "accuracies": [0.79, 0.79]}]
    got = headroom.summarize(screen, confirmed, {"uniform": [0.75, 0.77], "global_magnitude": [0.70, 0.72]})
    assert got["better_baseline"] == "uniform"
    assert got["screen_pick"] == pytest.approx(0.75) and got["screen_pick_delta"] == pytest.approx(-0.01)
    assert got["best_of_top"] == pytest.approx(0.79) and got["best_of_top_delta"] == pytest.approx(0.03)
    assert got["screen_max"] == 0.80 and got["screen_above_better_baseline"] == pytest.approx(2 / 3)
    assert got["criteria_delta"] == {}


def test_a_criterion_row_is_compared_with_the_better_baseline_and_never_becomes_it():
    screen, confirmed = [{"accuracy": 0.80}], [{"accuracy": 0.80, "accuracies": [0.74]}]
    got = headroom.summarize(screen, confirmed, {"uniform": [0.75], "global_magnitude": [0.70], "uniform_taylor": [0.78]})
    assert got["better_baseline"] == "uniform"
    assert got["screen_pick_delta"] == pytest.approx(-0.01)
    assert got["criteria_delta"] == {"uniform_taylor": pytest.approx(0.03)}


@pytest.mark.parametrize("argv, words", [
    (["--candidates", "0"], "--candidates must be >= 1"),
    (["--candidates", "2", "--top", "3"], "--top 3 is more than --candidates 2"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--finetune-seeds", "0"], "--finetune-seeds must be >= 1"),
    (["--task", "nope"], "--task 'nope' is not a task"),
    (["--levels", "0"], "--levels must be FLOPs ratios in (0, 1]"),
    (["--levels", "0.3", "1.5"], "--levels must be FLOPs ratios in (0, 1]"),
    (["--ratio-range", "0.8", "0.5"], "--ratio-range must be 0 < MIN < MAX <= 1"),
    (["--ratio-range", "0.1", "1.2"], "--ratio-range must be 0 < MIN < MAX <= 1"),
    (["--quick", "--levels", "0.001"], "below the space's smallest model"),
    (["--criteria", "l1", "nope"], "--criteria 'nope' is not an importance criterion"),
    (["--draw", "nope"], "--draw 'nope' is not a draw"),
    (["--quick", "--draw", "extremes", "--levels", "0.001"], "below the space's smallest model"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        headroom.main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and words in err[-1]
    assert not out.exists()


def test_a_tiny_real_run_writes_every_asked_level_and_length(tmp_path):
    assert headroom.main(["--quick", "--candidates", "2", "--steps", "2", "--levels", "0.4", "0.6",
                          "--ratio-range", "0.3", "1.0", "--criteria", "fpgm", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "headroom_quick.json").read_text())["results"]
    assert data["task"] == "digits" and data["steps"] == [2] and sorted(data["levels"]) == ["0.4", "0.6"]
    assert (data["space"]["ratio_min"], data["space"]["ratio_max"]) == (0.3, 1.0)
    for level, by_steps in data["levels"].items():
        row = by_steps["2"]
        assert set(row["baselines"]) == {"uniform", "global_magnitude", "uniform_fpgm"}
        assert set(row["criteria_delta"]) == {"uniform_fpgm"}
        assert row["baseline_flops"]["uniform_fpgm"] == pytest.approx(row["baseline_flops"]["uniform"])
        assert len(row["screen"]) == 2 and len(row["confirmed"]) == 1
        assert all(s["flops_ratio"] <= float(level) + 1e-9 for s in row["screen"])
        assert all(0.3 - 1e-9 <= r <= 1.0 for s in row["screen"] for r in s["policy"]["ratios"].values())
        assert 0.0 <= row["screen_pick"] <= 1.0
    md = (tmp_path / "headroom_quick.md").read_text()
    assert "## Headroom over uniform pruning: digits" in md and "| uniform_fpgm | Δ |" in md


def test_an_extremes_run_screens_every_corner_and_names_the_best(tmp_path):
    assert headroom.main(["--quick", "--draw", "extremes", "--steps", "2", "--levels", "0.5",
                          "--ratio-range", "0.3", "1.0", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "headroom_quick.json").read_text())["results"]
    row = data["levels"]["0.5"]["2"]
    assert data["draw"] == "extremes" and len(row["screen"]) == data["candidates"] >= 2
    assert all(" at " in s["label"] and s["flops_ratio"] <= 0.5 + 1e-9 for s in row["screen"])
    md = (tmp_path / "headroom_quick.md").read_text()
    assert "alone at the range's bottom" in md and f"- 50%, 2 steps: {row['screen'][0]['label']} " in md
