"""What the built-in tasks share: options, seeded splits, the weight cache and trained_task."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from evaluators import task_training
from evaluators.task_training import (
    cached_weights,
    check_split,
    check_widths,
    config_hash,
    seeded_split,
    task_options,
    trained_task,
)

OPTS = {"seed": 0, "split": [0.5, 0.25, 0.25], "epochs": 1, "batch_size": 4, "lr": 0.05}


def test_task_options_merge_over_defaults_and_refuse_unknown_keys():
    assert task_options("t", {"a": 2}, {"a": 1, "b": 3}) == {"a": 2, "b": 3}
    with pytest.raises(ValueError, match=r"unknown option\(s\) for task 't': c \(known: a, b\)"):
        task_options("t", {"c": 1}, {"a": 1, "b": 3})


@pytest.mark.parametrize("check, value, match", [
    (check_split, [0.5, 0.5], "t option split must be 3 positive fractions summing to 1"),
    (check_split, [0.5, 0.5, 0.0], "split must be 3 positive fractions"),
    (check_split, "0.5", "split must be 3 positive fractions"),
    (check_widths, [8, 8], "t option widths must be 3 integers >= 2"),
    (check_widths, [8, 8, 1], "widths must be 3 integers >= 2"),
    (check_widths, [8, 8, True], "widths must be 3 integers >= 2"),
])
def test_bad_split_and_widths(check, value, match):
    with pytest.raises(ValueError, match=match):
        check("t", value)


def test_seeded_split_is_disjoint_complete_and_seeded():
    a = seeded_split(20, (0.6, 0.2, 0.2), seed=1)
    assert [len(i) for i in a] == [12, 4, 4]
    assert sorted(torch.cat(a).tolist()) == list(range(20))
    assert all(torch.equal(x, y) for x, y in zip(a, seeded_split(20, (0.6, 0.2, 0.2), seed=1)))
    assert not torch.equal(a[0], seeded_split(20, (0.6, 0.2, 0.2), seed=2)[0])
    assert [len(i) for i in seeded_split(3, (0.9, 0.05, 0.05), seed=0)] == [1, 1, 1]  # every split non-empty


def test_stored_order_batches_and_config_hash():
    from evaluators.datasets import read_batches

    x, y = torch.arange(10.0), torch.arange(10)
    assert [len(b[1]) for b in read_batches((x, y), 4, seed=None)] == [4, 4, 2]
    assert config_hash({"a": 1, "b": [2]}) == config_hash({"b": [2], "a": 1}) != config_hash({"a": 2, "b": [2]})


def test_cached_weights_train_once(tmp_path):
    calls = []

    def train():
        calls.append(1)
        return {"w": torch.ones(2)}

    path = tmp_path / "sub" / "m.pt"
    assert torch.equal(cached_weights(path, train)["w"], torch.ones(2))
    assert torch.equal(cached_weights(path, train)["w"], torch.ones(2))
    assert len(calls) == 1 and path.is_file()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, generator=g), torch.arange(16) % 2


def test_trained_task_trains_caches_and_reuses(tmp_path, monkeypatch):
    x, y = _data()

    def build():
        return nn.Linear(3, 2)

    task = trained_task("tiny", x, y, build=build, num_classes=2, opts=OPTS, config={"c": 1}, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tiny-*.pt"))) == 1
    assert [len(s[1]) for s in (task.train, task.calibration, task.validation)] == [8, 4, 4]
    assert torch.equal(task.example_inputs, x[:1])

    def no_training(*args, **kwargs):
        raise AssertionError("cached weights should have been used")

    monkeypatch.setattr(task_training, "train_classifier", no_training)
    again = trained_task("tiny", x, y, build=build, num_classes=2, opts=OPTS, config={"c": 1}, cache_dir=tmp_path)
    assert all(torch.equal(again.base_state[k], v) for k, v in task.base_state.items())
    given = {k: torch.zeros_like(v) for k, v in task.base_state.items()}
    other = trained_task("tiny", x, y, build=build, num_classes=2, opts=OPTS, config={"c": 2},
                         cache_dir=tmp_path / "unused", state=given)
    assert torch.equal(other.base_state["weight"], given["weight"]) and not (tmp_path / "unused").exists()


def test_a_few_batches_of_training_run_at_a_constant_rate():
    """Fewer than 10 steps cannot warm up a one-cycle schedule (it would divide by zero)."""
    import torch

    from evaluators.task_training import train_classifier

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    state = train_classifier(model, (x, y), epochs=1, batch_size=8, lr=0.1)
    assert set(state) == {"weight", "bias"}
