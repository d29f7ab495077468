"""The headroom re-check: which policy it re-checks, its bad input and a tiny real run."""

from __future__ import annotations

import json

import pytest

from benchmarks import headroom, headroom_recheck


def test_the_best_of_top_is_the_confirmed_candidate_with_the_best_mean():
    row = {"confirmed": [{"label": "a", "accuracies": [0.80, 0.70]},    # the screen pick
                         {"label": "b", "accuracies": [0.77, 0.78]}]}
    assert headroom_recheck.best_of_top(row)["label"] == "b"


HEAD = {"task": "digits", "steps": [80], "seed": 0, "finetune_seeds": 1}


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("{not json", "not a JSON file"),
    ('{"results": {"task": "digits"}}', "not a headroom result"),
    ("[1, 2]", "not a headroom result"),
    (json.dumps({"results": {**HEAD, "levels": []}}), "levels are not a table"),
    (json.dumps({"results": {**HEAD, "levels": {"0.3": {"80": {"screen": []}}}}}),
     "level 0.3 steps 80 has no confirmed candidates"),
    (json.dumps({"results": {**HEAD, "levels": {"0.3": {"80": {"confirmed": [{"policy": {}}]}}}}}),
     "level 0.3 steps 80 has no confirmed candidates"),
    (json.dumps({"results": {**HEAD, "levels": {"0.3": {"80": {"confirmed": [{"policy": {}, "accuracies": [0.5]}]}}}}}),
     "level 0.3 steps 80 has no best_of_top_delta"),
])
def test_a_source_that_is_not_a_headroom_result_exits_2_with_one_line_and_writes_nothing(
        tmp_path, capsys, content, words):
    source, out = tmp_path / "headroom.json", tmp_path / "out"
    if content is not None:
        source.write_text(content)
    with pytest.raises(SystemExit) as exc:
        headroom_recheck.main(["--from", str(source), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and words in err[-1] and len(err[-1]) < 200
    assert not out.exists()


def test_zero_further_seeds_exit_2_before_reading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        headroom_recheck.main(["--from", str(tmp_path / "missing.json"), "--finetune-seeds", "0",
                               "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--finetune-seeds must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_tiny_real_recheck_fine_tunes_the_best_of_top_on_seeds_after_the_runs_own(tmp_path):
    first = tmp_path / "first"
    assert headroom.main(["--quick", "--candidates", "2", "--top", "2", "--steps", "2", "--levels", "0.5",
                          "--out", str(first)]) == 0
    source = first / "headroom_quick.json"
    assert headroom_recheck.main(["--from", str(source), "--finetune-seeds", "2", "--out", str(tmp_path)]) == 0
    old = json.loads(source.read_text())["results"]["levels"]["0.5"]["2"]
    data = json.loads((tmp_path / "headroom_recheck_quick.json").read_text())["results"]
    row = data["levels"]["0.5"]["2"]
    assert data["selection_seeds"] == 1 and data["finetune_seeds"] == 2 and data["finetunes"] == 6
    assert row["policy"] == headroom_recheck.best_of_top(old)["policy"]
    assert row["selection_delta"] == old["best_of_top_delta"]
    assert all(len(accs) == 2 for accs in row["unseen"].values())
    better = max(row["baselines"].values())
    assert row["delta"] == pytest.approx(row["best_of_top"] - better)
    # the run's own fresh seed is 0 + 1000 (k = 0); the re-check's are the next two
    assert data["finetune_seed_values"] == [2000, 3000]
    md = (tmp_path / "headroom_recheck_quick.md").read_text()
    assert "## Headroom re-checked on unseen seeds: digits" in md and "| 50% | 2 |" in md
