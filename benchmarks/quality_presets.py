"""What the search-quality benchmark compares: task presets, targets and the method table.

A *method* is a named ``[[searchers]]`` list (``fn(preset, quick)``) registered in
:data:`METHODS`, optionally with study tables of its own (:data:`STUDY_TABLES`: e.g. a
``[promotion]`` ladder); the :data:`BASELINES` are not studies but search-free policies
(``evaluators.heuristics``): ``uniform``, the baseline every method is compared with, and
Torch-Pruning's global pruning ``global_magnitude`` and ``global_lamp``. :class:`BenchConfig` turns one task's preset, budget and seeds into study configs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT
from search.masking_core import SNAPS, MaskingSchedule
from search.promotion import PromotionConfig
from spaces.checks import check_choice, check_int, check_number
from spaces.registry import Registry

UNIFORM = "uniform"
#: search-free methods, evaluated at FLOPs targets instead of run as studies (uniform first)
BASELINES = (UNIFORM, "global_magnitude", "global_lamp")


def _check_levels(name: str, values: tuple[float, ...]) -> None:
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise ValueError(f"{name} must be FLOPs ratios in (0, 1], got {values!r}")


@dataclass(frozen=True)
class TaskPreset:
    """How one task is benchmarked: reported FLOPs levels, constraint, evaluation and fine-tune."""

    levels: tuple[float, ...]                  # report best feasible accuracy at FLOPs ratio <= level
    max_flops_ratio: float                     # the studies' constraint (steers searchers to the levels)
    evaluation: Mapping[str, Any] = field(default_factory=dict)  # proxy EvalSettings overrides
    finetune_steps: int = 100
    finetune_lr: float = 0.01
    finetune_recovery: str = "finetune"   # the recovery of the identical final fine-tune (and of promotion rungs)
    masking_steps: int = 30
    masking_snap: str = MaskingSchedule.snap   # masking option snap: "below" keeps each run's policy within its target
    masking_targets: tuple[float, ...] = (0.15, 0.25, 0.35, 0.45)
    promotion_eta: float = PromotionConfig.eta   # promoted arms: the best 1/eta of a rung per FLOPs level go on
    promotion_repeats: int | None = None   # promoted arms: fine-tunes per rung evaluation (None: each arm's own)
    options: Mapping[str, Any] = field(default_factory=dict)   # task options
    finetune_levels: tuple[float, ...] | None = None           # levels whose models are fine-tuned; None = all
    rung_eval_samples: int | None = None   # validation samples a promotion rung is scored on (None: the proxy's)
    space: Mapping[str, Any] = field(default_factory=lambda: {"ratio_min": 0.2, "ratio_max": 1.0})

    def __post_init__(self) -> None:
        _check_levels("levels", self.levels)
        if not 0.0 < self.max_flops_ratio <= 1.0 or self.max_flops_ratio < max(self.levels):
            raise ValueError(f"max_flops_ratio {self.max_flops_ratio!r} must be in (0, 1] and >= every level")
        check_int("finetune_steps", self.finetune_steps, minimum=1)
        check_int("masking_steps", self.masking_steps, minimum=1)
        check_choice("masking_snap", self.masking_snap, SNAPS)
        check_number("finetune_lr", self.finetune_lr, positive=True)
        if check_number("promotion_eta", self.promotion_eta) <= 1:
            raise ValueError(f"promotion_eta must be > 1, got {self.promotion_eta!r}")
        if self.promotion_repeats is not None:
            check_int("promotion_repeats", self.promotion_repeats, minimum=1)
        _check_levels("masking_targets", self.masking_targets)
        if self.finetune_levels is not None and not set(self.finetune_levels) <= set(self.levels):
            raise ValueError(f"finetune_levels {self.finetune_levels!r} must be among levels {self.levels!r}")

    @property
    def tuned_levels(self) -> tuple[float, ...]:
        return self.levels if self.finetune_levels is None else self.finetune_levels


# Why adaptive BN as the proxy (benchmarks/results/methods.md): CaP recovers far more
# accuracy, but it costs ~1 s per digits evaluation instead of ~0.3 s, and it saturates the
# digits proxy (uniform 50% channels -> 98.7%), which leaves nothing to rank policies by.
# Adaptive BN is what EagleEye uses to rank pruned candidates before fine-tuning.
PRESETS: dict[str, TaskPreset] = {
    "digits": TaskPreset(levels=(0.3, 0.5), max_flops_ratio=0.5, finetune_steps=40, masking_steps=10,
                         masking_targets=(0.2, 0.3, 0.4, 0.5)),
    # shapes: the target is at 15% FLOPs. With per-group ratios in [0.2, 1] only 1% of random
    # policies land there (mean 37% FLOPs); ratios in [0.1, 0.8] put 20% of them at <= 15% and
    # 89% at <= 30% (mean 21%), so every searcher, random included, works in the reported
    # region; the constraint (30%) does the rest. The uniform baseline is a continuous ratio,
    # not limited by the grid. Proxy recovery is CaP (least-squares compensation, no BN pass):
    # at 15% FLOPs adaptive BN leaves every policy near chance (uniform 19%, 12 classes), a
    # proxy that cannot rank candidates (per-study results of a run with it are in
    # search_quality_shapes_adaptive_bn.txt: no searcher's mean HV reached uniform's), while CaP gives
    # uniform 63% and random policies 26-63%, for ~2x the cost. 2400 validation images: the
    # proxy scores the first 500 (one sample = 0.2 pt, the same for every policy); fine-tuned
    # models are scored on all of them. Only the target level is fine-tuned (one fine-tune
    # costs ~30 proxy evaluations there).
    "shapes": TaskPreset(levels=(0.15, 0.3), max_flops_ratio=0.3,
                         evaluation={"recovery": "cap_nobn", "eval_samples": 500},
                         space={"ratio_min": 0.1, "ratio_max": 0.8}, finetune_steps=80, finetune_levels=(0.15,),
                         rung_eval_samples=2400,
                         masking_steps=5, masking_targets=(0.1, 0.15, 0.2, 0.25, 0.3)),
    # tokens: a transformer (evaluators.tokens), different in kind from the two CNN tasks:
    # heads, MLP widths and the residual stream are the groups. ratio_min 0.15 keeps >= 1 of
    # 4 heads. No BatchNorm, so adaptive BN is no recovery at all; CaP compensation ranks
    # uniform policies at 12-53% FLOPs at 52-89% (1000 validation sequences) where a
    # 200-step fine-tune from the pruned weights gives 44-95% (probe on the loaded 2-core
    # machine, 0.6-1.3 s per CaP evaluation, 7-17 s per fine-tune). That fine-tune starts
    # from the plainly pruned weights and ends below CaP alone; the benchmark fine-tunes from
    # the compensated weights (cap_finetune) at lr 0.003 (0.01 diverges at 12% FLOPs: 21.5%).
    "tokens": TaskPreset(levels=(0.15, 0.3), max_flops_ratio=0.3,
                         evaluation={"recovery": "cap_nobn", "eval_samples": 1000},
                         space={"ratio_min": 0.15, "ratio_max": 0.9}, finetune_steps=100,
                         finetune_recovery="cap_finetune", finetune_lr=0.003, rung_eval_samples=2000,
                         masking_steps=5, masking_targets=(0.1, 0.15, 0.2, 0.25, 0.3)),
}
GENERIC_PRESET = TaskPreset(levels=(0.3, 0.5), max_flops_ratio=0.5)
QUICK = {"n_trials": 8, "seeds": (0,), "finetune_steps": 5, "masking_steps": 2}
FULL = {"n_trials": 64, "seeds": (0, 1, 2)}

# Targets of the issue, keyed by task: (kind, level, threshold).
TARGETS: dict[str, list[dict[str, Any]]] = {
    "digits": [{"name": "proxy accuracy, best searcher - uniform, FLOPs <= 30%", "kind": "proxy_delta",
                "level": 0.3, "threshold": 0.05}],
    "shapes": [{"name": "fine-tuned accuracy, best searcher - uniform, FLOPs <= 15%", "kind": "finetuned_delta",
                "level": 0.15, "threshold": 0.02},
               {"name": "hypervolume, best searcher / random - 1", "kind": "hv_vs_random", "threshold": 0.05},
               {"name": "fine-tuned accuracy, best searcher - better baseline, FLOPs <= 15%",
                "kind": "finetuned_vs_baselines", "level": 0.15, "threshold": 0.01}],
    "tokens": [{"name": f"fine-tuned accuracy, best searcher - better baseline, FLOPs <= {int(100 * lv)}%",
                "kind": "finetuned_vs_baselines", "level": lv, "threshold": 0.01} for lv in (0.15, 0.3)],
}


# -- the method table ----------------------------------------------------------------------------
MethodBuilder = Callable[[TaskPreset, bool], list[dict[str, Any]]]
METHODS: Registry[MethodBuilder] = Registry("method")


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register the ``[[searchers]]`` list of a compared method (``fn(preset, quick)``)."""
    if name in BASELINES:
        raise ValueError(f"method {name!r} is already registered")
    return METHODS.register(name)


#: methods run only when asked for (``--methods``): their studies cost several times a
#: proxy-only study's, which the full ``make bench`` budget (45 min) has no room for
OPT_IN = frozenset({"tpe_promoted", "tpe_filled", "tpe_filled_promoted", "tpe_filled_laddered",
                    "masking_global_start", "masking_two_starts_promoted", "masking_mixed_promoted",
                    "masking_mixed_promoted_long", "masking_mixed_laddered"})


def available_methods() -> tuple[str, ...]:
    """The baselines (uniform first), then every registered method."""
    return (*BASELINES, *METHODS.names())


def default_methods() -> tuple[str, ...]:
    """What a run compares unless ``--methods`` says otherwise: every method but ``OPT_IN``."""
    return tuple(m for m in available_methods() if m not in OPT_IN)


def method_searchers(method: str, preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    """The ``[[searchers]]`` list of ``method``'s studies."""
    return METHODS.get(method)(preset, quick)


#: method -> fn(preset, quick) -> extra study tables of that method's studies (``[promotion]``)
STUDY_TABLES: dict[str, Callable[[TaskPreset, bool], dict[str, Any]]] = {}


def method_tables(method: str, preset: TaskPreset, quick: bool) -> dict[str, Any]:
    """Every study table ``method`` sets: ``searchers`` and its own extra tables."""
    extra = STUDY_TABLES.get(method)
    return {"searchers": method_searchers(method, preset, quick), **(extra(preset, quick) if extra else {})}


def _masking_options(preset: TaskPreset, quick: bool) -> dict[str, Any]:
    # Masking runs are trained, so each trial costs steps x (a forward/backward pass); fewer
    # steps than the searcher's default keep the 3-seed benchmark within its time budget.
    # all_targets: one trained run proposes its allocation at every target (a trial per target).
    # snap only when not the searcher's default, so default studies keep their configuration
    snap = {} if preset.masking_snap == MaskingSchedule.snap else {"snap": preset.masking_snap}
    return {"targets": list(preset.masking_targets[:1] if quick else preset.masking_targets),
            "steps": preset.masking_steps, "rerank_every": 5, **snap,
            "parallel": 2, "all_targets": True}


def _genetic_options(quick: bool) -> dict[str, Any]:
    if quick:  # no sensitivity pass: 10 trials would not get past it to a full-fidelity trial
        return {"population": 4, "top_k": 2, "sensitivity_ratios": []}
    return {"population": 8, "top_k": 3}


# Optuna searchers start from the uniform sweep (option uniform_start): 8 of the 64 trials
# are uniform policies spread over the FLOPs budget, so the search refines a front uniform
# pruning already reaches instead of rediscovering it from random draws.
UNIFORM_START = {"quick": 2, "full": 8}


def _uniform_start(quick: bool) -> int:
    return UNIFORM_START["quick" if quick else "full"]


@register_method("random")
def _random(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "random"}]


@register_method("tpe")
def _tpe(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "tpe", "options": {"n_startup_trials": 4 if quick else 10, "uniform_start": _uniform_start(quick)}}]


@register_method("nsga2")
def _nsga2(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "nsga2", "options": {"population_size": 4 if quick else 8, "uniform_start": _uniform_start(quick)}}]


@register_method("genetic")
def _genetic(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "genetic", "options": _genetic_options(quick)}]


@register_method("masking")
def _masking(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "masking", "options": _masking_options(preset, quick)}]


@register_method("portfolio")
def _portfolio(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    # TPE learns from every full-fidelity trial of the study (the GA's promoted ones and the
    # masking proposals too); NSGA-II and the GA evolve their own populations.
    return [
        {"kind": "tpe", "share": 0.4, "options": {"n_startup_trials": 4 if quick else 8,
                                                   "uniform_start": _uniform_start(quick)}},
        {"kind": "nsga2", "share": 0.2, "options": {"population_size": 4 if quick else 6}},
        {"kind": "genetic", "share": 0.3, "options": _genetic_options(quick)},
        {"kind": "masking", "share": 0.1, "options": {**_masking_options(preset, quick), "parallel": 1}},
    ]


def _promotion(preset: TaskPreset, quick: bool) -> dict[str, Any]:
    # One rung at the preset's own fine-tune length: the trials promoted are ranked by what
    # the benchmark's identical final fine-tune then measures (proxy_correlation: a 200-step
    # fine-tune is the only proxy that orders similar-size policies well).
    # FLOPs levels 0.05 wide: every reported level's bound is a level edge, so trials just
    # under a reported level do not compete with larger ones for promotion.
    # A rung is scored on the whole validation split (rung_eval_samples), as the final
    # fine-tune is: on shapes the proxy's 500 samples leave a +-2 point noise per score.
    samples = {} if preset.rung_eval_samples is None else {"eval_samples": preset.rung_eval_samples}
    repeats = {} if preset.promotion_repeats is None else {"repeats": preset.promotion_repeats}
    return {"promotion": {"steps": [QUICK["finetune_steps"] if quick else preset.finetune_steps],
                          "eta": preset.promotion_eta, "levels": max(1, round(preset.max_flops_ratio / 0.05)),
                          "recovery": preset.finetune_recovery, **samples, **repeats}}


STUDY_TABLES["tpe_promoted"] = _promotion


def _fill(preset: TaskPreset, quick: bool) -> dict[str, Any]:
    # every proposal grown to the reported FLOPs level above it (spaces.fill)
    return {"fill": {"levels": list(preset.levels)}}


def _ladder(preset: TaskPreset, quick: bool) -> dict[str, Any]:
    # Two rungs, the preset's fine-tune and 5x it (finetune_lengths' two columns), each
    # scored on the mean of 2 fine-tune seeds: on shapes one 80-step fine-tune moves by
    # +-1.6 points with its seed (headroom.json), more than the gaps it is asked to rank.
    table = _promotion(preset, quick)["promotion"]
    short = table["steps"][0]
    return {"promotion": {**table, "steps": [short, 5 * short], "repeats": preset.promotion_repeats or 2}}


# TPE's searchers, each with study tables of its own
for _variant in ("tpe_promoted", "tpe_filled", "tpe_filled_promoted", "tpe_filled_laddered"):
    register_method(_variant)(_tpe)
STUDY_TABLES["tpe_filled"] = _fill
STUDY_TABLES["tpe_filled_promoted"] = lambda preset, quick: {**_fill(preset, quick), **_promotion(preset, quick)}
STUDY_TABLES["tpe_filled_laddered"] = lambda preset, quick: {**_fill(preset, quick), **_ladder(preset, quick)}


# -- one task's benchmark ------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """One task's benchmark: the preset plus budget, seeds and workers."""

    task: str
    preset: TaskPreset
    seeds: tuple[int, ...] = FULL["seeds"]
    n_trials: int = FULL["n_trials"]
    workers: int = 2
    methods: tuple[str, ...] = field(default_factory=default_methods)
    cache_dir: str = str(ROOT / "studies" / "cache")
    quick: bool = False
    finetune_seeds: int = 1   # fine-tunes per chosen model (seeds study seed + 1000 (k + 1)), averaged
    hv_points: int = 0        # models spread over the FLOPs range fine-tuned for the fine-tuned HV (0: none)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct integers >= 0, got {self.seeds!r}")
        check_int("n_trials", self.n_trials, minimum=2)
        check_int("workers", self.workers, minimum=1)
        check_int("finetune_seeds", self.finetune_seeds, minimum=1)
        check_int("hv_points", self.hv_points, minimum=0)
        for method in self.methods:
            if method not in BASELINES:
                METHODS.get(method)
        if UNIFORM not in self.methods:
            raise ValueError("the uniform baseline must be among the methods (everything is compared to it)")

    @property
    def hv_levels(self) -> tuple[float, ...]:
        """FLOPs levels whose best models are fine-tuned for the fine-tuned hypervolume:
        ``hv_points`` evenly spaced up to the constraint."""
        top = self.preset.max_flops_ratio
        return tuple(round(top * j / self.hv_points, 4) for j in range(1, self.hv_points + 1))

    @property
    def searchers(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m not in BASELINES)

    def method_table(self) -> dict[str, Any]:
        """``{method: [[searchers]] list}`` of every compared method but the baselines (a
        method with study tables of its own: ``{"searchers": [...], "promotion": {...}}``)."""
        return {m: (method_tables(m, self.preset, self.quick) if m in STUDY_TABLES
                    else method_searchers(m, self.preset, self.quick)) for m in self.searchers}

    def fingerprint(self) -> dict[str, Any]:
        """What the per-study results depend on (checkpoints are reused only when it matches)."""
        return json.loads(json.dumps({
            "task": self.task, "preset": {k: v for k, v in self.preset.__dict__.items() if k != "finetune_steps"},
            "n_trials": self.n_trials, "workers": self.workers, "quick": self.quick,
            "methods": self.method_table(),
        }, default=list))

    def evaluation(self, seed: int) -> dict[str, Any]:
        """The proxy evaluation settings of one seed (its calibration draw and fine-tune stream)."""
        # finetune_lr: what a promotion rung fine-tunes with (the proxy recoveries ignore it)
        return {"recovery": "adaptive_bn", "calibration_samples": 256, "bn_batches": 4,
                "finetune_lr": self.preset.finetune_lr, **self.preset.evaluation, "seed": seed, "threads": 1}

    def study_config(self, method: str, seed: int, storage_dir: Path) -> Any:
        """The ``StudyConfig`` of ``method``'s study for ``seed`` (journal storage in ``storage_dir``)."""
        from search.config import StudyConfig

        name = f"{self.task}-{method}-seed{seed}"
        return StudyConfig.from_dict({
            "study": {"name": name, "storage": str(storage_dir / f"{name}.journal"), "seed": seed,
                      "n_trials": self.n_trials, "objectives": ["accuracy", "flops"], "workers": self.workers,
                      "threads_per_worker": 1, "window": 2},
            "task": {"name": self.task, "options": dict(self.preset.options), "cache_dir": self.cache_dir},
            "space": {"ratio_step": 0.05, "methods": ["l1"], **self.preset.space},
            "evaluation": self.evaluation(seed),
            "constraints": {"max_flops_ratio": self.preset.max_flops_ratio},
            **method_tables(method, self.preset, self.quick),
        })

    def finetune_settings(self, seed: int, k: int = 0) -> dict[str, Any]:
        """The identical final fine-tune of a study seed's models (its ``k``-th fine-tune seed).

        Never the study's own seed: a promotion rung fine-tunes with the study's evaluation
        seed, and scoring the model it selected with that same fine-tune again would count
        the luck it was selected for (k = 0 used to be the study's seed)."""
        p = self.preset
        return {**self.evaluation(seed), "recovery": p.finetune_recovery, "finetune_steps": p.finetune_steps,
                "finetune_lr": p.finetune_lr, "kd": True, "eval_samples": None, "seed": seed + 1000 * (k + 1)}


# Masking from other starts: every run from Torch-Pruning global magnitude pruning's
# allocation at its target; or runs alternating between the uniform and that start, the
# better of the two chosen per FLOPs level by the promotion rung's fine-tune (on shapes the
# uniform start did better after fine-tuning, on tokens the global one).
@register_method("masking_global_start")
def _masking_global_start(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "masking", "options": {**_masking_options(preset, quick), "starts": ["global_magnitude"]}}]


@register_method("masking_two_starts_promoted")
def _masking_two_starts(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "masking", "options": {**_masking_options(preset, quick),
                                            "starts": ["uniform", "global_magnitude"]}}]


STUDY_TABLES["masking_two_starts_promoted"] = _promotion


# Masking whose runs differ in start and in length: both starts, each trained for the
# preset's steps and for 6x them (how long a run trains moved tokens and shapes in opposite
# directions), the study's rungs choosing per FLOPs level what survives a fine-tune: one
# rung of the preset's fine-tune (promoted) or of 5x it (promoted_long), or both with two
# seeds each (laddered, chosen on the long one).
MIXED_LENGTH_FACTOR = 6


@register_method("masking_mixed_promoted")
def _masking_mixed(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    options = _masking_options(preset, quick)
    return [{"kind": "masking", "options": {**options, "starts": ["uniform", "global_magnitude"],
                                            "steps": [options["steps"], MIXED_LENGTH_FACTOR * options["steps"]]}}]


def _long_promotion(preset: TaskPreset, quick: bool) -> dict[str, Any]:
    table = _promotion(preset, quick)["promotion"]
    return {"promotion": {**table, "steps": [5 * table["steps"][0]]}}


register_method("masking_mixed_laddered")(_masking_mixed)
register_method("masking_mixed_promoted_long")(_masking_mixed)
STUDY_TABLES["masking_mixed_promoted"] = _promotion
STUDY_TABLES["masking_mixed_promoted_long"] = _long_promotion
STUDY_TABLES["masking_mixed_laddered"] = _ladder
