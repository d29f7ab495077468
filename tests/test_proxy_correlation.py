"""The proxy-correlation benchmark: its summaries on synthetic numbers and a tiny real run."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import proxy_correlation as pc


def test_a_monotone_proxy_correlates_1_and_a_reversed_one_minus_1():
    reference = [0.2, 0.5, 0.4, 0.9, 0.7]
    monotone = [10 * r + 3 for r in reference]
    assert pc.rank_correlation(monotone, reference) == pytest.approx({"spearman": 1.0, "kendall": 1.0})
    assert pc.rank_correlation([-v for v in monotone], reference) == pytest.approx({"spearman": -1.0, "kendall": -1.0})


def test_a_constant_proxy_has_no_correlation_and_bad_lengths_are_refused():
    got = pc.rank_correlation([0.1, 0.1, 0.1], [0.3, 0.2, 0.5])
    assert math.isnan(got["spearman"]) and math.isnan(got["kendall"])
    with pytest.raises(ValueError, match="equal-length"):
        pc.rank_correlation([0.1, 0.2], [0.1, 0.2, 0.3])


def test_bootstrap_interval_of_a_perfect_proxy_is_1_and_of_noise_is_wide():
    reference = [i / 20 for i in range(20)]
    assert pc.bootstrap_interval(reference, reference, 200)["spearman"] == pytest.approx([1.0, 1.0])
    noise = [((i * 7) % 20) / 20 for i in range(20)]   # a fixed shuffle
    rho = pc.rank_correlation(noise, reference)["spearman"]
    lo, hi = pc.bootstrap_interval(noise, reference, 200)["spearman"]
    assert lo <= rho <= hi and hi - lo > 0.3


def test_within_bins_ranks_inside_each_flops_bin_only():
    flops = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
    reference = [0.50, 0.55, 0.60, 0.80, 0.85, 0.90]
    # Right across bins (small < large) but reversed inside each: overall high, within-bin -1.
    proxy = [0.3, 0.2, 0.1, 0.9, 0.8, 0.7]
    assert pc.rank_correlation(proxy, reference)["spearman"] > 0.4
    assert pc.within_bins(proxy, reference, flops, bins=2) == pytest.approx(-1.0)
    assert pc.within_bins(reference, reference, flops, bins=2) == pytest.approx(1.0)


def test_partial_spearman_credits_only_what_flops_does_not_explain():
    flops = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    reference = [0.50, 0.48, 0.60, 0.62, 0.75, 0.71, 0.83, 0.86]   # size plus a within-pair order
    assert pc.partial_spearman(reference, reference, flops) == pytest.approx(1.0)
    assert math.isnan(pc.partial_spearman(flops, reference, flops))
    reversed_pairs = [0.48, 0.50, 0.62, 0.60, 0.71, 0.75, 0.86, 0.83]  # right size order, wrong within pairs
    assert pc.partial_spearman(reversed_pairs, reference, flops) < 0


def test_cost_summary_and_summarize_report_every_proxy_against_the_reference():
    assert pc.cost_summary([1.0, 3.0]) == {"mean_s": 2.0, "total_s": 4.0}
    with pytest.raises(ValueError):
        pc.cost_summary([])
    records = [{"flops_ratio": f, "accuracy": {"adaptive_bn": f, "finetune_5": -f, pc.REFERENCE: f},
                "seconds": {"adaptive_bn": 0.1, "finetune_5": 1.0, pc.REFERENCE: 4.0}}
               for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    s = pc.summarize(records, ["adaptive_bn", "finetune_5"], bootstrap=20, bins=2)
    assert set(s) == {pc.FLOPS, "adaptive_bn", "finetune_5", pc.REFERENCE}
    assert s["adaptive_bn"]["spearman"] == pytest.approx(1.0)
    assert s["finetune_5"]["kendall"] == pytest.approx(-1.0)
    assert s["finetune_5"]["cost"]["mean_s"] == 1.0 and s[pc.REFERENCE]["cost"]["total_s"] == 24.0
    assert s[pc.FLOPS]["cost"]["mean_s"] == 0.0


def test_best_untrained_proxy_ignores_flops_and_fine_tunes():
    summary = {pc.FLOPS: {"partial_spearman": 0.99}, "finetune_50": {"partial_spearman": 0.9},
               "cap": {"partial_spearman": 0.4}, "adaptive_bn": {"partial_spearman": 0.6},
               "cap_nobn": {"partial_spearman": float("nan")}, pc.REFERENCE: {"cost": {}}}
    assert pc.best_untrained(summary) == "adaptive_bn"


def test_every_proxy_is_valid_settings_scored_alike_and_the_reference_tunes_longest():
    from evaluators.settings import EvalSettings

    got = {k: EvalSettings(**v) for k, v in pc.proxy_settings((50, 200), 300).items()}
    assert list(got) == ["adaptive_bn", "cap", "cap_nobn", "finetune_50", "finetune_200", pc.REFERENCE]
    assert len({(s.eval_samples, s.seed, s.calibration_samples) for s in got.values()}) == 1
    tuned = [s for s in got.values() if s.recovery == "finetune"]
    assert len({(s.finetune_lr, s.kd, s.batch_size) for s in tuned}) == 1
    assert got[pc.REFERENCE].finetune_steps == max(s.finetune_steps for s in got.values())


@pytest.mark.parametrize("argv", [["--tasks", "nope"], ["--policies", "2"], ["--workers", "-1"]])
def test_bad_options_exit_2_and_write_nothing(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        pc.main(["--quick", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert not list(tmp_path.iterdir())


def test_quick_run_writes_the_table_per_task(tmp_path):
    assert pc.main(["--quick", "--tasks", "digits", "--policies", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "proxy_correlation_quick.json").read_text())
    res = data["results"]["tasks"]["digits"]
    assert data["results"]["complete"] is True and res["policies"] == 3 and len(res["records"]) == 3
    assert set(res["summary"]) == {pc.FLOPS, "adaptive_bn", "cap", "cap_nobn", "finetune_2", "finetune_5", pc.REFERENCE}
    assert all(0.0 <= a <= 1.0 for r in res["records"] for a in r["accuracy"].values())
    assert res["summary"]["finetune_5"]["cost"]["mean_s"] > 0
    assert "| adaptive_bn |" in (tmp_path / "proxy_correlation_quick.md").read_text()
    # --summarize recomputes the summary from the records alone.
    del res["summary"]["cap"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert pc.main(["--summarize", str(tmp_path / "old.json"), "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "proxy_correlation_quick.json").read_text())["results"]["tasks"]["digits"]
    assert "partial_spearman" in again["summary"]["cap"] and again["records"] == res["records"]
    # Further files' records (another policy draw) join the first's tasks.
    old = str(tmp_path / "old.json")
    assert pc.main(["--summarize", old, old, "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "proxy_correlation_quick.json").read_text())["results"]["tasks"]["digits"]
    assert merged["policies"] == 6 and merged["records"] == res["records"] * 2


def test_make_bench_leaves_the_full_run_out_but_quick_and_only_run_it(tmp_path, monkeypatch):
    import benchmarks.__main__ as bench

    ran: list[list[str]] = []

    def fake_run(name, quick, out):
        ran[-1].append(name)
        return {"script": name, "exit_code": 0, "wall_s": 0.0}

    monkeypatch.setattr(bench, "run_script", fake_run)
    for argv in ([], ["--quick"], ["--only", "proxy_correlation"]):
        ran.append([])
        assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    full, quick, only = ran
    assert not {"proxy_correlation", "finetune_lengths", "headroom"} & set(full) and "search_quality" in full
    assert {"proxy_correlation", "headroom"} <= set(quick) and only == ["proxy_correlation"]
    # the quick run fine-tunes what its search_quality run chose: it must come after it
    assert quick.index("finetune_lengths") > quick.index("search_quality")
