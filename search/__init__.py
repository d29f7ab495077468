"""Who proposes, who records: searchers, the study's set-up, driver and storage, export, CLI.

Modules, one job each: ``base`` (the Searcher contract and registry), ``setup`` (validate a
config and build what a run needs), ``runner`` (``run_study``), ``driver`` (the loop),
``budget`` / ``launchers`` (the shared trial budget, launcher liveness), ``cache`` (shared
evaluations), ``recorder`` (the one writer of trials), ``records`` (trials read back, the
Pareto front), ``storage`` (URLs, opening, read-only study access), ``resume``,
``study_change`` (a resume with changed constraints: refused or re-judged), ``baseline``
(the unpruned model's metrics, stored once per study), ``pool`` (the evaluator-pool
protocol), ``export``, ``cli`` with ``report`` (its tables) and ``describe`` (the space
before any trial).

Import cost matters for Ray workers and the CLI, so the heavy pieces (runner, export,
cli) are imported from their modules, not here.
"""

from search.base import (
    Outcome,
    Proposal,
    Searcher,
    SearcherContext,
    available_searchers,
    make_searcher,
    register_searcher,
)
from search.config import ConfigError, StudyConfig, load_config

__all__ = [
    "ConfigError", "Outcome", "Proposal", "Searcher", "SearcherContext", "StudyConfig", "available_searchers",
    "load_config", "make_searcher", "register_searcher",
]
