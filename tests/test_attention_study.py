"""A study over an attention model end to end (in-process evaluation, no Ray): every
searcher proposes head counts as ordinary ratios, every trial measures the FLOPs the space
predicted, and an exported trial reloads with its heads."""

from __future__ import annotations

import pytest
import torch

from search.cli import main
from search.config import load_config
from search.export import load_exported
from search.runner import run_study
from search.setup import load_task_and_space
from search.storage import load_records
from tests.fakes import local_pool, tiny_config

SEARCHERS = """
[[searchers]]
kind = "random"
[[searchers]]
kind = "tpe"
[[searchers]]
kind = "nsga2"
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attention-study")
    path = tiny_config(tmp, name="heads", n_trials=9, searchers=SEARCHERS, constraints="max_flops_ratio = 0.6")
    text = path.read_text().replace('"tests.fakes:tiny_task"', '"tests.attention_models:tiny_attention_task"')
    path.write_text(text.replace("[space]", "[task.options]\nheads = 4\n\n[space]", 1))
    config = load_config(path)
    run_study(config, pool_factory=lambda p, a: local_pool(p.task, p.space, config.evaluation), progress=False)
    return config, tmp


def test_every_searcher_proposes_heads_and_measures_what_was_predicted(study):
    config, _ = study
    _, space = load_task_and_space(config)
    heads = next(g.name for g in space.groups if g.counts)
    records = [r for r in load_records(config) if r.metrics is not None]
    assert {r.searcher for r in records} == {"random", "tpe", "nsga2"}
    assert len({r.policy.ratio(heads) for r in records}) > 1  # the head count is searched
    for r in records:
        assert r.metrics.error is None
        assert r.metrics.flops == space.predict_cost(r.policy).flops
        assert r.constraints["max_flops_ratio"] == pytest.approx(space.flops_ratio(r.policy) - 0.6)


def test_an_exported_trial_reloads_with_its_heads(study):
    config, tmp = study
    assert main(["export", config.source]) == 0
    task, space = load_task_and_space(config)
    dirs = sorted((tmp / "exports" / "heads").glob("trial-*"))
    assert dirs
    for d in dirs:
        model = load_exported(d, task)  # groups rediscovered, as a fresh process does
        policy = [r.policy for r in load_records(config) if d.name == f"trial-{r.number}"][0]
        expected = space.kept(policy)[next(g.name for g in space.groups if g.counts)]
        assert {m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)} == {expected}
        program = torch.export.load(str(d / "model.pt2"))
        x = task.validation[0][:3]
        with torch.no_grad():
            assert torch.allclose(program.module()(x), model(x), atol=1e-5)
