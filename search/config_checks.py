"""Checks of a ``StudyConfig`` that look across its sections (each raises one ``ConfigError`` line).

``StudyConfig.__post_init__`` runs them after every section has checked itself: whether the
searchers' options build, whether ``[promotion]`` has a score to rank by, and whether
``[fill]`` has levels the constraints allow and no watermark to fight with."""

from __future__ import annotations

from typing import Any

from search.config import NO_SEARCHERS, ConfigError
from search.promotion import score_objective


def check_searchers(config: Any) -> None:
    from search.base import build_options

    if not config.searchers:
        raise ConfigError(NO_SEARCHERS)
    names = [s.name for s in config.searchers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"[[searchers]] name {dupes[0]!r} is used twice: give each searcher a distinct name")
    for s in config.searchers:
        try:
            build_options(s.kind, s.options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"[[searchers]] {s.name!r}: {exc}") from None


def check_promotion(config: Any) -> None:
    from evaluators.recover import available_recoveries

    if not config.promotion.enabled:
        return
    if score_objective(config.study.objectives) is None:
        raise ConfigError("[promotion] ranks trials by a quality objective, but every [study] objective is a "
                          "cost: add one (e.g. \"accuracy\") or remove [promotion]")
    if config.promotion.recovery not in available_recoveries():
        raise ConfigError(f"[promotion] recovery: unknown recovery {config.promotion.recovery!r} "
                          f"(known: {', '.join(available_recoveries())})")


def check_fill(config: Any) -> None:
    if config.fill is None:
        return
    levels, cap = config.fill_levels, config.constraints.max_flops_ratio
    if not levels:
        raise ConfigError("[fill] needs FLOPs levels to grow proposals to: set [fill] levels = [...] or "
                          "[constraints] max_flops_ratio")
    if cap is not None and levels[-1] > cap + 1e-12:
        raise ConfigError(f"[fill] level {levels[-1]:g} is above [constraints] max_flops_ratio {cap:g}: every "
                          "model grown to it would be infeasible; lower the level")
    if config.watermark is not None:
        raise ConfigError("[fill] and [watermark] cannot be combined: the watermark sets the pruning rates that "
                          "[fill] would grow; remove one")
