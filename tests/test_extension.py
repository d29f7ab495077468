"""Extending prunesearch is one file plus one registration.

Each extension lives in its own module under ``tests/plugins`` (written as a user would
write it) and is used through the product's ordinary entry points: a searcher in a real
study, a criterion by ``apply_policy``, a recovery by ``evaluate``, an objective as a study
objective. The ``plugin`` fixture imports the module afresh and restores the registries
afterwards, so tests that enumerate ``available_*()`` never see these names.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from evaluators.importance import IMPORTANCES
from evaluators.metrics import OBJECTIVES
from evaluators.recover import RECOVERIES
from search.base import SEARCHERS
from search.config import load_config
from search.runner import run_study
from search.storage import load_records
from tests.fakes import FakePool, tiny_config, tiny_space, tiny_task


@pytest.fixture
def plugin(monkeypatch):
    """``plugin(module, registry)``: import ``tests.plugins.<module>`` into a copy of
    ``registry``; the original registry (and module cache) come back after the test."""

    def load(module: str, registry):
        registry.names()  # load the registry's own plugins first, so the copy holds them
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        name = f"tests.plugins.{module}"
        monkeypatch.delitem(sys.modules, name, raising=False)
        return importlib.import_module(name)

    return load


def _study(tmp_path, n_trials: int, searchers: str = "", objectives: str = "", name: str = "ext"):
    extra = f"objectives = {objectives}" if objectives else ""
    path = tiny_config(tmp_path, name=name, n_trials=n_trials, journal=True,
                       searchers=searchers or None)
    text = path.read_text()
    if extra:  # [study] table: objectives follow its first line
        text = text.replace("[study]\n", f"[study]\n{extra}\n", 1)
        path.write_text(text)
    config = load_config(path)
    run_study(config, pool_factory=lambda prepared, _address: FakePool(prepared.space), progress=False)
    return config, sorted(load_records(config), key=lambda r: r.number)


def test_a_searcher_is_one_class_and_one_decorator(tmp_path, plugin):
    plugin("walk_searcher", SEARCHERS)
    config, records = _study(tmp_path, 5, searchers="""
        [[searchers]]
        kind = "ext_walk"
        """)
    assert [r.searcher for r in records] == ["ext_walk"] * 5
    ratios = [set(r.policy.ratios.values()) for r in records]
    assert all(len(r) == 1 for r in ratios)  # uniform policies, as proposed
    assert [r.pop() for r in ratios] == [1.0, 0.9, 0.8, 0.7, 0.6]
    told = [r.meta["told"] for r in records]
    assert told == sorted(told) and told[-1] > 0  # outcomes come back to the searcher
    assert all(r.evaluated and r.metrics.ok for r in records)


def _kept_filters(pruned_weight: torch.Tensor, weight: torch.Tensor) -> set[int]:
    """Indices of ``weight``'s rows that ``pruned_weight`` kept (rows are matched exactly)."""
    kept = set()
    for row in pruned_weight:
        matches = [i for i, w in enumerate(weight) if torch.equal(w[: row.shape[0]], row)]
        assert len(matches) == 1
        kept.add(matches[0])
    return kept


def test_an_importance_criterion_is_one_class_and_one_decorator(plugin):
    from evaluators.prune import apply_policy
    from spaces.policy import Policy

    plugin("reverse_importance", IMPORTANCES)
    task, space = tiny_task(), tiny_space()
    base = task.base_model()
    first = next(g for g in space.groups if g.channels == 16)
    conv = base.features[0][0].weight

    def kept(method: str) -> set[int]:
        policy = Policy(ratios={first.name: 0.5}, method=method)
        pruned = apply_policy(base, policy, task.example_inputs, groups=space.groups)
        return _kept_filters(pruned.features[0][0].weight, conv)

    by_l1, by_reverse = kept("l1"), kept("ext_reverse_l1")
    assert len(by_l1) == len(by_reverse) == 8
    assert by_l1.isdisjoint(by_reverse)  # the opposite half of the filters


def test_a_recovery_is_one_function_and_one_decorator(plugin):
    from evaluators.evaluate import evaluate
    from evaluators.settings import EvalSettings

    plugin("constant_recovery", RECOVERIES)
    task, space = tiny_task(), tiny_space()
    settings = EvalSettings(recovery="ext_constant", calibration_samples=16, batch_size=16)
    metrics = evaluate(space.uniform(0.5), task, settings, groups=space.groups)
    assert metrics.ok, metrics.error
    labels = task.validation[1]
    assert metrics.accuracy == pytest.approx((labels == 0).float().mean().item())


def test_an_objective_is_one_registration(tmp_path, plugin):
    module = plugin("cost_objective", OBJECTIVES)
    config, records = _study(tmp_path, 4, objectives='["accuracy", "ext_mean_cost"]')
    assert config.study.directions == ("maximize", "minimize")
    done = [r for r in records if r.values is not None]
    assert len(done) == 4
    for r in done:
        assert r.values[1] == pytest.approx(module.mean_cost(r.metrics))
        assert r.values[1] == pytest.approx((r.metrics.flops_ratio + r.metrics.params_ratio) / 2)
