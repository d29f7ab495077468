"""Who proposes, who records: searchers, the study runner, storage, export and the CLI.

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
