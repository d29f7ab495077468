"""The benchmarks' bookkeeping: hypervolume, the uniform sweep, per-seed summaries, targets,
study configs, the shared pool, the results page, the latency and watermark helpers.

No Ray, no trained task: these are the functions that decide the reported numbers and
whether a target was met, checked on hand-made inputs and the tiny test model.
"""

import math

import pytest

from benchmarks.hypervolume import hypervolume, hypervolume_curve
from benchmarks.quality_presets import UNIFORM, BenchConfig, TaskPreset
from benchmarks.quality_report import check_targets, summarize


def test_hypervolume_is_the_dominated_area_up_to_the_reference_point():
    # (accuracy, flops): losses (0.2, 0.5) and (0.5, 0.2) -> union of two boxes in [0, 1]^2
    area = 0.8 * 0.5 + 0.5 * 0.8 - 0.5 * 0.5
    assert hypervolume([(0.8, 0.5), (0.5, 0.2)]) == pytest.approx(area)
    # a dominated point adds nothing; a point beyond the reference is ignored
    assert hypervolume([(0.8, 0.5), (0.5, 0.2), (0.6, 0.6), (0.99, 1.0)]) == pytest.approx(area)
    assert hypervolume([]) == 0.0


def test_hypervolume_curve_counts_every_trial_and_never_decreases():
    curve = hypervolume_curve([None, (0.5, 0.5), None, (0.9, 0.4), (0.1, 0.9)])
    assert len(curve) == 5
    assert curve[0] == 0.0
    assert curve[1] == pytest.approx(0.25)
    assert curve == sorted(curve)
    assert curve[-1] == pytest.approx(hypervolume([(0.5, 0.5), (0.9, 0.4), (0.1, 0.9)]))


@pytest.mark.parametrize("level", [0.15, 0.3, 0.5, 1.0])
def test_uniform_ratio_is_the_largest_within_the_level(level):
    from benchmarks.quality_run import uniform_policies
    from tests.fakes import tiny_space

    space = tiny_space()  # kept channels are integers: the uniform FLOPs ratio is a step function
    r = space.uniform_ratio_within(level)
    assert space.flops_ratio(space.uniform(r)) <= level
    assert r == 1.0 or space.flops_ratio(space.uniform(min(1.0, r + 1e-3))) > level
    sweep = {max(p.ratios.values()) for p in uniform_policies(space, [level])}
    assert sweep == set(space.levels) | {r}


def _run(hv, best, finetuned=None):
    return {"hypervolume": hv, "wall_s": 1.0,
            "best_proxy": {lv: (None if a is None else {"accuracy": a}) for lv, a in best.items()},
            "finetuned": {lv: {"accuracy": a} for lv, a in (finetuned or {}).items()}}


def test_summary_pairs_seeds_and_targets_use_the_best_searcher():
    per_seed = {
        UNIFORM: {"0": _run(0.50, {"0.3": 0.60}), "1": _run(0.50, {"0.3": 0.70})},
        "random": {"0": _run(0.40, {"0.3": 0.62}), "1": _run(0.50, {"0.3": 0.72})},
        "tpe": {"0": _run(0.44, {"0.3": 0.70}), "1": _run(0.55, {"0.3": 0.74})},
        "masking": {"0": _run(0.30, {"0.3": None}), "1": _run(0.30, {"0.3": 0.90})},
    }
    summary = summarize({"per_seed": per_seed}, [0.3])
    tpe = summary["tpe"]
    assert tpe["proxy_delta"]["0.3"]["values"] == pytest.approx([0.10, 0.04])
    assert tpe["proxy_delta"]["0.3"]["mean"] == pytest.approx(0.07)
    assert tpe["hv_vs_random"]["values"] == pytest.approx([0.10, 0.10])
    # a seed without a feasible model is missing, not zero
    assert summary["masking"]["proxy"]["0.3"]["n"] == 1
    checks = {c["kind"]: c for c in check_targets("digits", summary)}
    proxy = checks["proxy_delta"]
    assert proxy["best"] == "masking" and proxy["value"] == pytest.approx(0.20) and proxy["met"]
    shapes = check_targets("shapes", summary)
    hv = next(c for c in shapes if c["kind"] == "hv_vs_random")
    assert hv["best"] == "tpe" and hv["met"]
    finetuned = next(c for c in shapes if c["kind"] == "finetuned_delta")
    assert finetuned["value"] is None and not finetuned["met"]  # no fine-tuned numbers at 15%


def test_a_missed_target_is_reported_as_missed():
    per_seed = {UNIFORM: {"0": _run(0.5, {"0.3": 0.80})}, "random": {"0": _run(0.5, {"0.3": 0.82})}}
    (check,) = check_targets("digits", summarize({"per_seed": per_seed}, [0.3]))
    assert check["value"] == pytest.approx(0.02) and not check["met"]


@pytest.mark.parametrize("kwargs, match", [
    ({"levels": ()}, "levels"), ({"levels": (0.3, 1.5)}, "levels"),
    ({"levels": (0.3, 0.5), "max_flops_ratio": 0.4}, "max_flops_ratio"),
    ({"levels": (0.3,), "max_flops_ratio": 0.5, "finetune_steps": 0}, "finetune_steps"),
])
def test_bad_presets_are_refused(kwargs, match):
    kwargs.setdefault("max_flops_ratio", 0.5)
    with pytest.raises(ValueError, match=match):
        TaskPreset(**kwargs)


def test_bench_config_builds_a_valid_study_per_method(tmp_path):
    cfg = BenchConfig(task="digits", preset=TaskPreset(levels=(0.3,), max_flops_ratio=0.5), n_trials=8)
    for method in cfg.searchers:
        config = cfg.study_config(method, 1, tmp_path)
        assert config.study.n_trials == 8 and config.study.seed == 1
        assert config.evaluation.seed == 1 and config.evaluation.recovery == "adaptive_bn"
        assert config.constraints.max_flops_ratio == 0.5
        assert str(tmp_path) in config.study.storage_url
    with pytest.raises(ValueError, match="bogus"):
        BenchConfig(task="digits", preset=TaskPreset(levels=(0.3,), max_flops_ratio=0.5), methods=(UNIFORM, "bogus"))
    assert math.isclose(sum(s.share for s in cfg.study_config("portfolio", 0, tmp_path).searchers), 1.0)


def test_watermark_pairs_are_scored_on_samples_the_studies_never_saw():
    import torch

    from benchmarks.watermark import held_out_task
    from tests.fakes import tiny_task

    task = tiny_task()
    x, y = task.validation
    rest = held_out_task(task, 10)
    assert torch.equal(rest.validation[0], x[10:]) and torch.equal(rest.validation[1], y[10:])
    assert torch.equal(task.validation[0], x)            # the study's task is not changed
    for bad in (None, 0, len(y)):
        with pytest.raises(ValueError):
            held_out_task(task, bad)


def test_latency_benchmark_arms_are_valid_studies(tmp_path):
    from benchmarks.latency import ARMS, LATENCY_ARMS, _study_config

    assert set(LATENCY_ARMS) < set(ARMS) and "flops" in ARMS
    for arm in ARMS:
        config = _study_config(tmp_path, arm, arm, 2, 5)
        assert config.study.objectives[1] == ARMS[arm]["objective"] and config.study.seed == 2
    measured = _study_config(tmp_path, "m", "latency_measured", 0, 5)
    assert measured.evaluation.measure_latency and not measured.latency.table


def _front(points):
    return [{"accuracy": a, "measured_ms": ms} for a, ms in points]


def test_attainment_ratio_compares_fronts_at_equal_accuracy():
    from benchmarks.latency import attainment_ratio

    slow = _front([(0.95, 10.0), (0.90, 8.0), (0.80, 6.0)])
    fast = _front([(0.95, 9.0), (0.90, 7.2), (0.80, 5.4)])   # 10% faster at every accuracy
    result = attainment_ratio(fast, slow, span=0.1, levels=5)
    assert result["geometric_mean"] == pytest.approx(0.9)
    assert attainment_ratio(slow, fast, span=0.1, levels=5)["geometric_mean"] == pytest.approx(1 / 0.9)
    # the common best is the lower of the two best accuracies: a front's extra top model is not compared
    higher = _front([(0.99, 30.0)]) + fast
    assert attainment_ratio(higher, slow, span=0.1, levels=5)["levels"][0] == pytest.approx(0.95)
    assert attainment_ratio(higher, slow, span=0.1, levels=5)["geometric_mean"] == pytest.approx(0.9)


def test_loo_residual_sd_separates_explained_from_unexplained_latency():
    import numpy as np

    from benchmarks.latency import _loo_residual_sd

    rng = np.random.default_rng(0)
    flops = rng.uniform(0.2, 1.0, 40)
    affine = 0.4 + 0.6 * flops
    assert _loo_residual_sd(flops[:, None], affine) < 1e-9
    noisy = affine + rng.normal(0, 0.05, 40)
    assert 0.03 < _loo_residual_sd(flops[:, None], noisy) < 0.08


def test_shared_pool_is_a_driver_pool_that_binds_each_studys_settings():
    from benchmarks.quality_run import SharedPool
    from evaluators.settings import EvalSettings
    from search.pool import Pool
    from tests.fakes import FakePool, tiny_space

    space = tiny_space()
    inner = FakePool(space)
    shared = SharedPool(inner)
    assert isinstance(shared, Pool)
    study, cheap = EvalSettings(seed=3), EvalSettings(seed=4, fidelity="cheap")
    shared.bind(study).submit(space.uniform(0.5), tag="a")      # no settings: the bound study's
    shared.submit(space.uniform(0.6), tag="b", settings=cheap)  # a proposal's own settings win
    assert shared.in_flight == 2 and shared.capacity == inner.capacity
    assert [s for _, _, s in inner._queue] == [study, cheap]
    got = shared.results(timeout=0) + shared.results(timeout=0)
    assert [tag for tag, _, _ in got] == ["a", "b"]
    shared.close()  # the next study reuses it: the real pool stays open
    assert not inner.closed


def test_results_page_states_missed_targets_first_and_collects_each_result(tmp_path):
    from benchmarks.common import write_result
    from benchmarks.results_page import notes, results_markdown

    met = {"task": "digits", "name": "a", "kind": "proxy_delta", "value": 0.06, "threshold": 0.05, "met": True,
           "best": "tpe"}
    missed = {**met, "name": "b", "value": 0.01, "met": False}
    lines = notes({"results": {"targets": [met, missed], "tasks": {}}})
    assert lines[2].startswith("- **Missed** (digits): b") and lines[3].startswith("- Met (digits): a")
    write_result("search_quality", {"targets": [missed], "tasks": {}}, config={"wall_seconds": 90.0}, out_dir=tmp_path,
                 markdown="## Search quality\n![p](search_quality_digits_pareto.png)")
    page = results_markdown(tmp_path, [], False, ["search_quality"])
    assert "## Search quality" in page and "](search_quality_digits_pareto.png)" in page  # outside the repo: as written
    assert "search_quality 1.5 min" in page and "- **Missed** (digits): b" in page
    (tmp_path / "finetune_lengths").mkdir()
    (tmp_path / "finetune_lengths" / "finetune_lengths_shapes.md").write_text("## Short and long fine-tune: shapes")
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "finetune_lengths_digits_quick.md").write_text("## Short and long fine-tune: digits")
    (tmp_path / "headroom").mkdir()
    (tmp_path / "headroom" / "headroom.md").write_text("## Headroom over uniform pruning: shapes")
    (tmp_path / "quick" / "headroom_quick.md").write_text("## Headroom over uniform pruning: digits")
    (tmp_path / "headroom" / "headroom_recheck.md").write_text("## Headroom re-checked on unseen seeds: shapes")
    (tmp_path / "quick" / "headroom_recheck_quick.md").write_text("## Headroom re-checked on unseen seeds: digits")
    page = results_markdown(tmp_path, [], False, ["search_quality"])
    assert "fine-tune: shapes" in page and "fine-tune: digits" not in page   # a full page never shows quick ones
    assert "pruning: shapes" in page and "pruning: digits" not in page
    assert "## Headroom over uniform pruning: shapes\n\nFrom [`headroom/headroom.md`](headroom/headroom.md)." in page
    assert "unseen seeds: shapes" in page and "unseen seeds: digits" not in page


def test_global_pruning_baselines_are_compared_but_never_the_best_searcher():
    from benchmarks.quality_presets import BASELINES

    per_seed = {
        UNIFORM: {"0": _run(0.5, {"0.3": 0.60}, {"0.3": 0.80}), "1": _run(0.5, {"0.3": 0.70}, {"0.3": 0.82})},
        "global_magnitude": {"0": _run(0.5, {"0.3": 0.65}, {"0.3": 0.84}), "1": _run(0.5, {"0.3": 0.60}, {"0.3": 0.81})},
        "global_lamp": {"0": _run(0.5, {"0.3": 0.95}, {"0.3": 0.70}), "1": _run(0.5, {"0.3": 0.50}, {"0.3": 0.90})},
        "tpe": {"0": _run(0.5, {"0.3": 0.70}, {"0.3": 0.85}), "1": _run(0.5, {"0.3": 0.72}, {"0.3": 0.86})},
    }
    summary = summarize({"per_seed": per_seed}, [0.3])
    tpe = summary["tpe"]
    assert tpe["finetuned_delta"]["0.3"]["values"] == pytest.approx([0.05, 0.04])  # against uniform
    assert tpe["finetuned_vs_baselines"]["0.3"]["values"] == pytest.approx([0.01, -0.04])  # the better per seed
    assert tpe["proxy_vs_baselines"]["0.3"]["values"] == pytest.approx([-0.25, 0.02])
    assert summary["global_lamp"]["proxy_delta"]["0.3"]["values"] == pytest.approx([0.35, -0.20])
    (check,) = check_targets("digits", summary)  # global_lamp has the best proxy delta but is no searcher
    assert check["best"] == "tpe" and set(check["all"]) == {"tpe"}
    assert set(BASELINES) == {UNIFORM, "global_magnitude", "global_lamp"}


def test_baselines_are_methods_but_not_studies():
    from benchmarks.quality_presets import BASELINES, register_method

    cfg = BenchConfig(task="digits", preset=TaskPreset(levels=(0.3,), max_flops_ratio=0.5))
    assert cfg.methods[: len(BASELINES)] == BASELINES
    assert not set(BASELINES) & set(cfg.searchers) and not set(BASELINES) & set(cfg.method_table())
    with pytest.raises(ValueError, match="already registered"):
        register_method("global_lamp")


@pytest.mark.parametrize("method", ["global_magnitude", "global_lamp"])
def test_global_baseline_policies_meet_each_target_off_the_grid(method):
    from benchmarks.quality_run import global_policies
    from benchmarks.quality_scores import heuristic_result
    from evaluators.metrics import Metrics
    from tests.fakes import tiny_space, tiny_task

    task, space = tiny_task(), tiny_space(ratio_min=0.3)
    pairs = global_policies(method, task, space, [0.25, 0.5])
    targets = [t for t, _ in pairs]
    assert targets == sorted(targets) and {0.25, 0.5} <= set(targets)
    assert {round(space.flops_ratio(space.uniform(r)), 9) for r in space.levels} <= {round(t, 9) for t in targets}
    flops = space.with_config(methods=("l1", "l2")).flops_ratio
    for target, policy in pairs:
        assert flops(policy) <= target + 1e-12 and policy.method == "l2"
    assert any(r not in space.levels for _, p in pairs for r in p.ratios.values())  # kept / channels, off the grid
    assert any(r < space.ratio_min for _, p in pairs for r in p.ratios.values())  # not limited to the study's range
    evaluated = [(t, p, Metrics(accuracy=t, flops=1.0, params=1.0, flops_ratio=flops(p))) for t, p in pairs]
    res = heuristic_result(evaluated, [0.25, 0.5], max_flops=0.5)
    assert res["trials"] == len(pairs) and res["hypervolume"] > 0
    assert [p["target"] for p in res["points"]] == targets
    best = res["best_proxy"]["0.25"]
    assert best["flops_ratio"] <= 0.25 and best["accuracy"] == max(t for t, p in pairs if flops(p) <= 0.25)


def test_a_promoted_study_is_scored_at_its_highest_rung_on_proxy_axes():
    """The best model per level is chosen among the highest rung reached there (what the
    study's front selects on), while HV and the reported proxy use each trial's rung-0 score."""
    from benchmarks.quality_scores import _best_at

    points = [
        {"trial": 0, "fidelity": "full", "feasible": True, "accuracy": 0.70, "selected_by": 0.70,
         "flops_ratio": 0.2, "rung_steps": 0},
        {"trial": 1, "fidelity": "full", "feasible": True, "accuracy": 0.60, "selected_by": 0.90,
         "flops_ratio": 0.25, "rung_steps": 80},
        {"trial": 2, "fidelity": "full", "feasible": True, "accuracy": 0.65, "selected_by": 0.85,
         "flops_ratio": 0.1, "rung_steps": 80},
    ]
    assert _best_at(points, 0.3)["trial"] == 1
    assert _best_at(points, 0.2)["trial"] == 2
    assert _best_at(points[:1], 0.3)["trial"] == 0


def test_the_promoted_method_sets_a_promotion_ladder_in_its_studies(tmp_path):
    from benchmarks.quality_presets import PRESETS

    cfg = BenchConfig(task="shapes", preset=PRESETS["shapes"], methods=(UNIFORM, "tpe", "tpe_promoted"))
    promoted = cfg.study_config("tpe_promoted", 0, tmp_path)
    assert promoted.promotion.steps == (PRESETS["shapes"].finetune_steps,)
    assert not cfg.study_config("tpe", 0, tmp_path).promotion.enabled
    assert [s.kind for s in promoted.searchers] == ["tpe"]


def test_the_mixed_masking_methods_cycle_both_starts_and_two_lengths_under_rungs(tmp_path):
    from benchmarks.quality_presets import MIXED_LENGTH_FACTOR, PRESETS

    preset = PRESETS["tokens"]
    cfg = BenchConfig(task="tokens", preset=preset, methods=(UNIFORM, "masking_mixed_promoted",
                                                             "masking_mixed_promoted_long", "masking_mixed_laddered"))
    promoted = cfg.study_config("masking_mixed_promoted", 0, tmp_path)
    long = cfg.study_config("masking_mixed_promoted_long", 0, tmp_path)
    laddered = cfg.study_config("masking_mixed_laddered", 0, tmp_path)
    for study in (promoted, long, laddered):
        (searcher,) = study.searchers
        assert searcher.kind == "masking" and searcher.options["starts"] == ["uniform", "global_magnitude"]
        assert searcher.options["steps"] == [preset.masking_steps, MIXED_LENGTH_FACTOR * preset.masking_steps]
    assert promoted.promotion.steps == (preset.finetune_steps,) and promoted.promotion.repeats == 1
    assert long.promotion.steps == (5 * preset.finetune_steps,) and long.promotion.repeats == 1
    assert laddered.promotion.steps == (preset.finetune_steps, 5 * preset.finetune_steps)
    assert laddered.promotion.repeats == 2


def test_several_fine_tune_seeds_are_averaged_and_kept():
    from benchmarks.quality_run import _finetuned
    from evaluators.metrics import Metrics

    runs = [Metrics(accuracy=a, flops_ratio=0.2, eval_seconds=1.0) for a in (0.7, 0.8, 0.9)]
    out = _finetuned(runs)
    assert out["accuracy"] == pytest.approx(0.8) and out["accuracies"] == [0.7, 0.8, 0.9]
    assert _finetuned([runs[0], Metrics.failure("boom")]) == {"error": "boom"}
    cfg = BenchConfig(task="digits", preset=TaskPreset(levels=(0.3,), max_flops_ratio=0.5), finetune_seeds=3)
    assert [cfg.finetune_settings(2, k)["seed"] for k in range(3)] == [1002, 2002, 3002]  # never the study seed 2


def test_fine_tuned_hypervolume_models_are_spread_up_to_the_constraint():
    from benchmarks.quality_scores import _best_per_level

    cfg = BenchConfig(task="digits", preset=TaskPreset(levels=(0.3,), max_flops_ratio=0.6), hv_points=3)
    assert cfg.hv_levels == (0.2, 0.4, 0.6)
    points = [{"trial": i, "fidelity": "full", "feasible": True, "accuracy": a, "flops_ratio": f}
              for i, (a, f) in enumerate([(0.5, 0.15), (0.7, 0.35), (0.9, 0.55), (0.6, 0.18)])]
    chosen = _best_per_level(points, cfg.hv_levels, {i: {"trial": i} for i in range(4)})
    assert [b["trial"] for b in chosen.values()] == [3, 1, 2]


def test_the_filled_methods_grow_proposals_to_the_reported_levels(tmp_path):
    from benchmarks.quality_presets import PRESETS, default_methods

    cfg = BenchConfig(task="shapes", preset=PRESETS["shapes"],
                      methods=(UNIFORM, "tpe", "tpe_filled", "tpe_filled_promoted"))
    assert cfg.study_config("tpe_filled", 0, tmp_path).fill_levels == PRESETS["shapes"].levels
    both = cfg.study_config("tpe_filled_promoted", 0, tmp_path)
    assert both.fill_levels == PRESETS["shapes"].levels and both.promotion.enabled
    assert cfg.study_config("tpe", 0, tmp_path).fill is None


def _quality_file(tmp_path, name, methods, uniform_policy=0.4):
    import json

    def run(ratio):
        return {"best_proxy": {"0.15": {"accuracy": 0.5, "flops_ratio": 0.14, "policy": {"ratios": {"a": ratio}}}},
                "hypervolume": 0.5, "finetuned": {"0.15": {"accuracy": 0.6}}}

    per_seed = {m: {"0": run(uniform_policy if m == UNIFORM else 0.3)} for m in (UNIFORM, *methods)}
    path = tmp_path / name
    path.write_text(json.dumps({"results": {"tasks": {"shapes": {"per_seed": per_seed, "base_accuracy": 0.9,
                                                                  "finetune_seeds": 2}}}}))
    return path


def test_finetune_lengths_merges_the_methods_of_several_runs_that_agree_on_the_baselines(tmp_path):
    from benchmarks.finetune_lengths import level_models_only, merged_task

    first = _quality_file(tmp_path, "a.json", ["tpe"])
    second = _quality_file(tmp_path, "b.json", ["tpe", "tpe_filled"])
    merged = merged_task([first, second], "shapes")
    assert sorted(merged["per_seed"]) == ["tpe", "tpe_filled", UNIFORM]
    assert set(level_models_only(merged["per_seed"])["tpe"]["0"]) == {"best_proxy", "hypervolume"}
    other = _quality_file(tmp_path, "c.json", ["nsga2"], uniform_policy=0.5)
    with pytest.raises(ValueError, match="baseline uniform chose other models"):
        merged_task([first, other], "shapes")
    with pytest.raises(ValueError, match="no results for task 'tokens'"):
        merged_task([first], "tokens")


def test_finetune_lengths_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    from benchmarks.finetune_lengths import main

    source = _quality_file(tmp_path, "a.json", ["tpe"])
    out = tmp_path / "out"
    for argv, words in (([], "no such file"), (["--from", str(source), "--steps", "0"], "--steps must be >= 1"),
                        (["--from", str(source), "--task", "shapes", "--methods", "nope"], "nope not in the source"),
                        (["--from", str(source), "--task", "tokens"], "no results for task 'tokens'"),
                        (["--from", str(source), "--finetune-seeds", "0"], "--finetune-seeds must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(out)])
        assert exc.value.code == 2 and words in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_finetune_lengths_takes_the_source_runs_fine_tune_seeds_unless_told(tmp_path, monkeypatch):
    import benchmarks.finetune_lengths as fl

    source = _quality_file(tmp_path, "a.json", ["tpe"])
    seen = []

    def columns(cfgs, per_seed):
        seen.append([cfg.finetune_seeds for cfg in cfgs])
        raise RuntimeError("stop before fine-tuning")

    monkeypatch.setattr(fl, "finetune_columns", columns)
    for given in (None, 4):
        with pytest.raises(RuntimeError, match="stop before"):
            fl.run([source], "shapes", [5, 10], workers=1, cache_dir=None, finetune_seeds=given)
    assert seen == [[2, 2], [4, 4]]   # the source file's 2, then the 4 asked for


@pytest.mark.parametrize("argv, words", [
    (["--masking-steps", "0"], "--masking-steps must be >= 1, got 0"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--finetune-seeds", "0"], "--finetune-seeds must be >= 1, got 0"),
    (["--hv-points", "-1"], "--hv-points must be >= 0, got -1"),
    (["--task-options", "[1]"], "--task-options must be a JSON object"),
    (["--masking-snap", "up"], "--masking-snap: invalid choice: 'up'"),
    (["--promotion-eta", "1"], "--promotion-eta must be > 1, got 1"),
    (["--promotion-repeats", "0"], "--promotion-repeats must be >= 1, got 0"),
])
def test_search_quality_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, words):
    from benchmarks.search_quality import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and words in err[-1]
    assert not out.exists()


def _planned(monkeypatch, tmp_path, task, methods, quick=False, **overrides):
    """search_quality.run for one task with the studies not run: (the task's BenchConfig,
    the config the JSON file would hold)."""
    import benchmarks.search_quality as sq

    seen = []

    def bench_task(cfg, out_dir, checkpoint):
        seen.append(cfg)
        return {"targets": []}

    monkeypatch.setattr(sq, "bench_task", bench_task)
    _, config = sq.run([task], quick=quick, seeds=[0], n_trials=4, workers=1, methods=["uniform", *methods],
                       task_options={}, cache_dir=str(tmp_path), out_dir=tmp_path, requested=True, **overrides)
    return seen[0], config["tasks"][task]


@pytest.mark.parametrize("quick, asked, expected", [(False, None, 5), (False, 40, 40), (True, None, 2), (True, 7, 7)])
def test_search_quality_masking_steps_reach_every_masking_run(tmp_path, monkeypatch, quick, asked, expected):
    cfg, config = _planned(monkeypatch, tmp_path, "shapes", ["masking"], quick=quick, masking_steps=asked)
    (masking,) = cfg.method_table()["masking"]
    assert masking["options"]["steps"] == expected
    assert config["preset"]["masking_steps"] == expected


@pytest.mark.parametrize("asked, expected", [(None, "nearest"), ("below", "below")])
def test_search_quality_masking_snap_reaches_every_masking_run(tmp_path, monkeypatch, asked, expected):
    cfg, config = _planned(monkeypatch, tmp_path, "tokens", ["masking", "masking_mixed_promoted"],
                           masking_snap=asked)
    table = cfg.method_table()
    mixed = table["masking_mixed_promoted"]["searchers"][0]
    for options in (table["masking"][0]["options"], mixed["options"]):
        assert options.get("snap", "nearest") == expected   # the searcher's default is not written out
    assert config["preset"]["masking_snap"] == expected


@pytest.mark.parametrize("asked, expected", [(None, 3), (2.0, 2.0)])
def test_search_quality_promotion_eta_reaches_every_promoted_arm(tmp_path, monkeypatch, asked, expected):
    arms = ["masking_mixed_promoted", "masking_mixed_promoted_long", "tpe_filled_laddered"]
    cfg, config = _planned(monkeypatch, tmp_path, "shapes", ["masking", *arms], promotion_eta=asked)
    table = cfg.method_table()
    assert [table[arm]["promotion"]["eta"] for arm in arms] == [expected] * 3
    assert isinstance(table["masking"], list)   # no study tables: no promotion
    assert config["preset"]["promotion_eta"] == expected


@pytest.mark.parametrize("asked, expected", [(None, (None, None, 2)), (3, (3, 3, 3))])
def test_search_quality_promotion_repeats_reach_every_promoted_arm(tmp_path, monkeypatch, asked, expected):
    arms = ["masking_mixed_promoted", "masking_mixed_promoted_long", "tpe_filled_laddered"]
    cfg, config = _planned(monkeypatch, tmp_path, "shapes", arms, promotion_repeats=asked)
    table = cfg.method_table()
    assert tuple(table[arm]["promotion"].get("repeats") for arm in arms) == expected
    assert config["preset"]["promotion_repeats"] == asked
