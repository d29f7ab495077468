"""The trial writer: what optuna-dashboard and Optuna read back from a recorded trial."""

from __future__ import annotations

import optuna

from search.config import ConstraintsSection
from tests.fakes import Harness, tiny_space


def _study(harness):
    return optuna.load_study(study_name=harness.name, storage=harness.storage)


def test_constraints_are_named_for_optuna_and_listed_for_the_dashboard():
    harness = Harness(tiny_space(), constraints=ConstraintsSection(max_flops_ratio=0.6, max_params_ratio=0.9))
    harness.run(harness.searcher("random", seed=1), 4)
    for trial, record in zip(_study(harness).trials, harness.records()):
        listed = trial.system_attrs["constraints"]
        assert listed == [record.constraints["max_flops_ratio"], record.constraints["max_params_ratio"]]
        assert set(record.constraints) == {"max_flops_ratio", "max_params_ratio"}   # positional copies left out
        assert trial.constraints["max_flops_ratio"] == listed[0]


def test_every_trial_has_a_readable_note():
    harness = Harness(tiny_space())
    harness.run(harness.searcher("random", seed=1), 2)
    for trial in _study(harness).trials:
        note = trial.user_attrs["note"]
        assert note.startswith("s | method l1 | ratios ") and "\n" not in note
