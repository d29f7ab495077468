"""`prunesearch describe CONFIG` (#21 item 4): groups, exclusions with reasons, the base
model, the reachable FLOPs range and each constraint's reachability, before any trial."""

from __future__ import annotations

import json
import textwrap

import pytest

from search.cli import main
from search.config import load_config
from search.setup import load_task_and_space
from tests.fakes import tiny_config

# A plugin task beside the study: a model with a grouped conv, which torch_pruning cannot
# prune channel-wise (so one group is excluded, with a reason).
PLUGIN = '''
import functools

import torch

from evaluators.tasks import Task
from tests.architectures import GroupedConvNet


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = GroupedConvNet()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (96,), generator=gen)
    return Task(name="grouped", build_model=functools.partial(GroupedConvNet, 10), train=(x[:32], y[:32]),
                calibration=(x[32:64], y[32:64]), validation=(x[64:], y[64:]), example_inputs=x[:1].clone(),
                num_classes=10, base_state={k: v.clone() for k, v in model.state_dict().items()})
'''


@pytest.fixture
def grouped(tmp_path, monkeypatch):
    (tmp_path / "grouped_task.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tiny_config(tmp_path, n_trials=4, constraints="max_flops_ratio = 0.7\nmin_accuracy = 0.99")
    path.write_text(path.read_text().replace("tests.fakes:tiny_task", "grouped_task:make"))
    return path


def test_describe_lists_groups_exclusions_base_and_reach(grouped, capsys):
    assert main(["describe", str(grouped), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    config = load_config(grouped)
    task, space = load_task_and_space(config)
    assert [(g["name"], g["channels"]) for g in data["groups"]] == [(g.name, g.channels) for g in space.groups]
    assert all(g["members"] for g in data["groups"])
    excluded = {e["name"]: e["reason"] for e in data["excluded"]}
    assert "grouped conv 'grouped.0'" in " ".join(excluded.values())  # the reason spaces.groups logged
    assert "produces the model's output" in excluded["fc"]
    assert data["base"]["accuracy"] is not None and data["base"]["eval_samples"] == 32
    assert data["base_cost"]["flops"] == space.base_cost.flops
    reach = data["reach"]
    assert reach["min_flops_ratio"] == pytest.approx(space.min_flops_ratio)
    assert 0 < reach["min_flops_ratio"] < reach["max_flops_ratio"] <= 1.0
    constraints = {c["name"]: c for c in data["constraints"]}
    assert constraints["max_flops_ratio"]["reachable"] is (0.7 >= reach["min_flops_ratio"])
    # an untrained 10-class model scores far below 0.99: the accuracy floor is out of reach
    assert data["base"]["accuracy"] < 0.99
    assert constraints["min_accuracy"]["reachable"] is False
    assert not (grouped.parent / "tiny.db").exists()  # describe writes no study


def test_describe_text_says_what_is_unreachable(grouped, capsys):
    grouped.write_text(grouped.read_text().replace("max_flops_ratio = 0.7", "max_flops_ratio = 0.01"))
    assert main(["describe", str(grouped)]) == 0
    out = capsys.readouterr().out
    assert "excluded (" in out and "grouped.0" in out
    assert "unpruned base model: accuracy" in out
    assert "constraint max_flops_ratio = 0.01: UNREACHABLE" in out and "lower [space] ratio_min" in out
    # a run refuses the same config before writing anything
    assert main(["run", str(grouped), "--no-progress"]) == 2
    assert "max_flops_ratio = 0.01 is below what the space can reach" in capsys.readouterr().err


def test_describe_names_the_fill_levels(grouped, capsys):
    assert main(["describe", str(grouped), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fill_levels"] == []
    grouped.write_text(grouped.read_text() + "\n[fill]\nlevels = [0.3, 0.6]\n")
    assert main(["describe", str(grouped)]) == 0
    assert "[fill]: every proposal grown to the FLOPs level above it: 0.3, 0.6" in capsys.readouterr().out
