"""Multi-fidelity promotion (search.promotion + the driver's rungs): successive halving over
fine-tune steps per FLOPs level, recorded as intermediate values of one trial."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from evaluators.metrics import Metrics
from search.config import ConfigError, ConstraintsSection, load_config
from search.promotion import Ladder, PromotionConfig, score_objective
from search.records import pareto_front
from tests.fakes import Harness, synthetic_metrics, tiny_config, tiny_space

LADDER = PromotionConfig(steps=(20, 60), eta=3, levels=2)


def _m(accuracy: float, flops_ratio: float) -> Metrics:
    return Metrics(accuracy=accuracy, flops_ratio=flops_ratio)


def _ladder(config: PromotionConfig = LADDER, **constraints) -> Ladder:
    return Ladder.for_study(config, ("accuracy", "flops"), ConstraintsSection(**constraints))


# -- the configuration ---------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"steps": [0]}, "steps must be an integer >= 1"),
    ({"steps": [50, 20]}, "strictly increasing"),
    ({"steps": [20, 20]}, "strictly increasing"),
    ({"steps": 20}, "list of fine-tune step counts"),
    ({"steps": [20], "eta": 1}, "eta must be > 1"),
    ({"steps": [20], "levels": 0}, "levels"),
    ({"steps": [20], "rungs": 2}, "unknown key"),
    ({"steps": [20], "eval_samples": 0}, "eval_samples must be an integer >= 1"),
    ({"steps": [20], "repeats": 0}, "repeats must be an integer >= 1"),
])
def test_bad_promotion_tables_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        PromotionConfig.from_dict(data)


def test_off_by_default_and_overrides_name_the_rung():
    assert not PromotionConfig().enabled
    assert LADDER.overrides(2) == {"recovery": "finetune", "finetune_steps": 60}
    assert PromotionConfig.from_dict(LADDER.to_dict()) == LADDER
    wider = PromotionConfig(steps=(20,), eval_samples=2400)
    assert wider.overrides(1) == {"recovery": "finetune", "finetune_steps": 20, "eval_samples": 2400}
    assert PromotionConfig.from_dict(wider.to_dict()) == wider
    repeated = PromotionConfig(steps=(20,), repeats=2)
    assert repeated.overrides(1) == {"recovery": "finetune", "finetune_steps": 20, "repeats": 2}
    assert PromotionConfig.from_dict(repeated.to_dict()) == repeated


def test_score_is_the_first_objective_that_is_not_a_cost():
    assert score_objective(("flops", "accuracy")) == "accuracy"
    assert score_objective(("flops", "latency_ms")) is None


@pytest.mark.parametrize("extra, message", [
    ('[promotion]\nsteps = [20]\nrecovery = "nope"\n', "unknown recovery 'nope'"),
    ('[promotion]\nsteps = [0]\n', r"\[promotion\]"),
])
def test_bad_promotion_in_a_study_file_is_one_config_error(tmp_path, extra, message):
    path = tiny_config(tmp_path, searchers='[[searchers]]\nkind = "random"\n' + extra)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_promotion_without_a_quality_objective_is_refused(tmp_path):
    path = tiny_config(tmp_path, searchers='[[searchers]]\nkind = "random"\n[promotion]\nsteps = [20]\n')
    text = path.read_text().replace("[study]\n", '[study]\nobjectives = ["flops", "params"]\n')
    path.write_text(text)
    with pytest.raises(ConfigError, match="every \\[study\\] objective is a cost"):
        load_config(path)


# -- the promotion rule ------------------------------------------------------------------
def test_first_trials_of_a_level_go_on_only_as_its_best_so_far():
    ladder = _ladder()
    assert ladder.promote(0, _m(0.5, 0.2))          # first at level 0
    assert not ladder.promote(0, _m(0.4, 0.3))      # worse, fewer than eta trials: not promoted
    assert not ladder.promote(0, _m(0.6, 0.1))      # a new best, but 3 trials allow 1 promotion
    assert ladder.promote(0, _m(0.7, 0.1))          # 4 trials: a second one
    assert ladder.promote(0, _m(0.45, 0.8))         # level 1 is ranked on its own


def test_with_enough_trials_the_best_third_goes_on():
    ladder = _ladder()
    for acc in (0.9, 0.8, 0.7, 0.6, 0.5):
        ladder.observe(0, _m(acc, 0.2))
    # 6 trials at the level with this one: the best 6 // 3 = 2 go on
    assert ladder.promote(0, _m(0.85, 0.2))
    assert not ladder.promote(0, _m(0.75, 0.2))     # 7 trials: best 2 are 0.9 and 0.85


def test_top_rung_and_failures_and_infeasible_trials_stop():
    ladder = _ladder(max_flops_ratio=0.5)
    assert not ladder.promote(2, _m(0.99, 0.2))     # no rung above the last
    assert not ladder.promote(0, Metrics.failure("boom"))
    assert not ladder.promote(0, _m(0.99, 0.7))     # over max_flops_ratio
    assert ladder.promote(0, _m(0.1, 0.4))


def test_a_bound_on_the_score_itself_does_not_block_promotion():
    ladder = _ladder(min_accuracy=0.9)
    assert ladder.promote(0, _m(0.5, 0.2))          # the proxy may be below what fine-tuning reaches


def test_levels_span_up_to_the_flops_bound():
    ladder = _ladder(PromotionConfig(steps=(10,), levels=4), max_flops_ratio=0.4)
    assert [ladder.level(_m(0.5, r)) for r in (0.05, 0.15, 0.25, 0.39, 0.9)] == [0, 1, 2, 3, 3]


def test_a_trial_exactly_at_a_level_edge_competes_below_it():
    # six levels 0.05 wide up to 0.3: a 15% model is ranked with the models under a 15%
    # budget, not with the 15-20% ones
    ladder = _ladder(PromotionConfig(steps=(10,), levels=6), max_flops_ratio=0.3)
    assert [ladder.level(_m(0.5, r)) for r in (0.0, 0.05, 0.1, 0.15, 0.1501, 0.3)] == [0, 0, 1, 2, 3, 5]


# -- through the driver --------------------------------------------------------------------
def finetuned(space):
    """Synthetic metrics that a fine-tune improves (more steps, more accuracy)."""
    def metrics(proposal):
        m = synthetic_metrics(space, proposal.policy, proposal.settings)
        steps = proposal.settings.finetune_steps if proposal.settings is not None else 0
        return dataclasses.replace(m, accuracy=min(1.0, m.accuracy + steps / 1000))
    return metrics


def _run(n: int = 18, promotion: PromotionConfig = LADDER) -> Harness:
    space = tiny_space()
    harness = Harness(space, constraints=ConstraintsSection(max_flops_ratio=0.8), promotion=promotion)
    harness.run(harness.searcher("random", seed=3), n, metrics=finetuned(space))
    return harness


def test_promoted_trials_record_each_rung_as_an_intermediate_value():
    harness = _run()
    trials = optuna.load_study(study_name=harness.name, storage=harness.storage).trials
    records = {r.number: r for r in harness.records()}
    promoted = [t for t in trials if records[t.number].promotion]
    assert promoted and len(promoted) < len(trials)
    for t in trials:
        r = records[t.number]
        steps = sorted(t.intermediate_values)
        assert steps[0] == 0 and steps[-1] == r.rung_steps
        # values and metrics are the highest rung's; the rung's settings are kept
        assert t.values[0] == pytest.approx(t.intermediate_values[r.rung_steps])
        if r.promotion:
            assert r.eval_overrides == {"recovery": "finetune", "finetune_steps": r.rung_steps}
            assert [e["steps"] for e in r.promotion["rungs"]] == steps
    assert any(records[t.number].rung_steps == 60 for t in trials)


def test_front_is_taken_at_the_highest_rung_reached():
    harness = _run()
    records = harness.records()
    front = pareto_front(records, ("maximize", "minimize"))
    assert front and all(r.rung_steps == 60 for r in front)


def test_every_searcher_trial_is_still_one_trial_and_the_budget_counts_trials():
    harness = _run(n=12)
    records = harness.records()
    assert len(records) == 12 and all(r.evaluated for r in records)


def test_same_seed_same_promotions():
    a = [(r.policy.key(), r.rung_steps) for r in _run().records()]
    b = [(r.policy.key(), r.rung_steps) for r in _run().records()]
    assert a == b


def test_resumed_runs_rank_against_earlier_rungs():
    space = tiny_space()
    harness = Harness(space, constraints=ConstraintsSection(max_flops_ratio=0.8), promotion=LADDER)
    harness.run(harness.searcher("random", seed=3), 12, metrics=finetuned(space))
    first = harness.records()
    harness.run(harness.searcher("random", seed=4), 12, metrics=finetuned(space))
    later = [r for r in harness.records() if r.number >= len(first)]
    fresh = Harness(space, constraints=ConstraintsSection(max_flops_ratio=0.8), promotion=LADDER, name="fresh")
    fresh.run(fresh.searcher("random", seed=4), 12, metrics=finetuned(space))
    # with the earlier trials counted, fewer of the same proposals are promoted
    assert sum(bool(r.promotion) for r in later) < sum(bool(r.promotion) for r in fresh.records())


# -- a real study: recorded rungs are what the evaluator gives ------------------------------
GA_AND_RANDOM = """
[[searchers]]
kind = "random"
[[searchers]]
kind = "genetic"
[searchers.options]
population = 4
top_k = 1
[promotion]
steps = [4]
levels = 2
eval_samples = 48
"""


def test_a_real_study_records_the_fine_tuned_rung_exactly(tmp_path):
    from evaluators.evaluate import evaluate
    from search.runner import run_study
    from tests.fakes import local_pool

    path = tiny_config(tmp_path, n_trials=10, searchers=GA_AND_RANDOM)
    path.write_text(path.read_text().replace("batch_size = 32", "batch_size = 32\neval_samples = 16"))
    config = load_config(path)

    def factory(prepared, address):
        return local_pool(prepared.task, prepared.space, prepared.config.evaluation)

    summary = run_study(config, pool_factory=factory, progress=False)
    promoted = [r for r in summary.records if r.promotion]
    assert promoted and all(r.fidelity == "full" for r in promoted)   # GA's cheap trials stay proxies
    record = promoted[0]
    assert record.eval_overrides["eval_samples"] == 48   # the rung is scored on more samples than the proxy's 16
    from tests.fakes import tiny_task
    from spaces.space import SearchSpace

    task = tiny_task()
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, ratio_min=0.2, ratio_step=0.1)
    again = evaluate(record.policy, task, config.evaluation.replace(**record.eval_overrides), groups=space.groups)
    assert again.accuracy == pytest.approx(record.metrics.accuracy)
    proxy = record.promotion["rungs"][0]["score"]
    assert proxy == pytest.approx(evaluate(record.policy, task, config.evaluation, groups=space.groups).accuracy)
    assert all(r.rung_steps == 4 for r in summary.front)

    # the export rebuilds a promoted trial with its rung's fine-tune: it measures what was recorded
    from search.export import export_study

    exported = export_study(config, formats=())
    for number, info in exported.metrics.items():
        assert info["remeasured"]["accuracy"] == pytest.approx(info["recorded"]["accuracy"])


def test_a_rung_with_repeats_records_their_mean_and_exports_its_first_seeds_model(tmp_path):
    from evaluators.evaluate import evaluate
    from search.export import export_study
    from search.runner import run_study
    from tests.fakes import local_pool, tiny_task

    path = tiny_config(tmp_path, n_trials=8, searchers=GA_AND_RANDOM.replace("eval_samples = 48", "repeats = 2"))
    config = load_config(path)
    summary = run_study(config, pool_factory=lambda p, _a: local_pool(p.task, p.space, p.config.evaluation),
                        progress=False)
    exported = export_study(config, formats=())
    record = next(r for r in summary.front if r.promotion and r.number in exported.metrics)
    assert record.eval_overrides["repeats"] == 2
    task, space = tiny_task(), summary_space(config)
    rung = config.evaluation.replace(**record.eval_overrides)
    seeds = [evaluate(record.policy, task, rung.replace(repeats=1, seed=rung.seed + j), groups=space.groups).accuracy
             for j in range(2)]
    assert record.metrics.accuracy == pytest.approx(sum(seeds) / 2)
    info = exported.metrics[record.number]
    assert info["recorded_repeats"] == 2 and info["remeasured"]["accuracy"] == pytest.approx(seeds[0])


def summary_space(config):
    from search.setup import load_task_and_space

    return load_task_and_space(config)[1]


def test_an_improving_searcher_gets_at_most_a_third_promoted_per_level():
    ladder = _ladder(PromotionConfig(steps=(20,), eta=3, levels=1))
    promoted = [ladder.promote(0, _m(0.1 + 0.01 * i, 0.2)) for i in range(30)]   # every trial a new best
    assert sum(promoted) == 10


def test_status_and_the_live_front_say_the_front_is_at_the_promotion_rung():
    from search.progress import LiveFront
    from search.report import format_front, format_states

    harness = _run()
    records = harness.records()
    front = pareto_front(records, ("maximize", "minimize"))
    assert "after the 60-step promotion fine-tune" in format_front(front, ("accuracy", "flops"))
    states = format_states(records).splitlines()
    assert "promoted" in states[0]
    live = LiveFront(("maximize", "minimize"))
    for r in records:
        live.add(r)
    assert {r.number for r in live.front} == {r.number for r in front}
