"""Budget: one launcher's share of a study's n_trials, with other launchers on the study."""

from __future__ import annotations

import optuna

from search.budget import Budget
from search.launchers import Launcher, write_heartbeat

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_with(n_running_of_other: int, n_complete: int):
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="b")
    study_id = storage.get_study_id_from_name("b")
    me = write_heartbeat(storage, study_id, Launcher.current())
    other = Launcher("0" * 12, me.host + "-elsewhere", 1, me.heartbeat)
    write_heartbeat(storage, study_id, other)
    for _ in range(n_complete):
        study.tell(study.ask(), 1.0)
    for _ in range(n_running_of_other):
        study.ask().set_user_attr("run", other.run_id)
    return storage, study_id, me


def test_alone_the_own_count_is_exact_and_no_limit_means_none():
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="b")
    study_id = storage.get_study_id_from_name("b")
    me = write_heartbeat(storage, study_id, Launcher.current())
    assert Budget(5, 2, storage, study_id, me).left(in_flight=1) == 2
    assert Budget(None, 2, storage, study_id, me).left(in_flight=1) is None
    exhausted = Budget(5, 0, storage, study_id, me)
    exhausted.exhausted = True
    assert exhausted.left(0) == 0


def test_trials_of_another_live_launcher_hold_places():
    storage, study_id, me = study_with(n_running_of_other=2, n_complete=1)
    budget = Budget(4, 0, storage, study_id, me)
    assert budget.left(in_flight=0) == 1          # 1 complete + 2 running elsewhere
    assert budget.over_budget(3) is False          # trials 0..2 hold 3 of 4 places
    trial = optuna.load_study(study_name="b", storage=storage).ask()
    trial.set_user_attr("run", me.run_id)
    assert budget.over_budget(5) is True           # trials 0..3 fill the budget


def test_heartbeat_is_written_at_most_every_heartbeat_s():
    storage, study_id, me = study_with(0, 0)
    budget = Budget(1, 0, storage, study_id, me)
    budget.heartbeat()
    assert budget.me == me                         # too soon: nothing written
    budget.last_heartbeat -= 10_000
    budget.heartbeat()
    stored = storage.get_study_system_attrs(study_id)[f"prunesearch:launcher:{me.run_id}"]
    assert budget.me.heartbeat >= me.heartbeat and stored["heartbeat"] == budget.me.heartbeat
